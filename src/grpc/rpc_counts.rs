//! Every RPC counted at the edge, as a tower layer around every service, by
//! the status code the client receives: requests that fail to decode, are
//! shed, time out or name no method are counted too, which handlers never
//! see.
//!
//! - A response carrying `grpc-status` in its headers (every error keyward
//!   returns is trailers-only) counts under that code; one without it counts
//!   as OK: every keyward RPC is unary, so its trailers can only say OK.
//!   (A server stream that fails later, which only Health/Watch and
//!   reflection could, still counts as OK when it starts.)
//! - An error from an inner layer (load shedding) becomes the status tonic
//!   would send, here, so it is counted as sent.
//! - A request dropped before it answers counts as CANCELLED: tonic's request
//!   timeout sits outside every user layer and cancels the request, and a
//!   client that resets the stream cancels it too; CANCELLED is what either
//!   client sees.
//!
//! Counters are resolved once per known path at start-up, so counting costs
//! one hash of the path and one atomic add.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxBuildHasher;
use tonic::Code;
use tonic::codegen::http;

use crate::metrics::Metrics;

/// Envoy's ext_authz service: envoy-types carries no descriptor set.
const CHECK: (&str, &str) = ("/envoy.service.auth.v3.Authorization/Check", "Check");

/// Every RPC keyward serves, by path, with its `method` label: read from
/// the descriptor sets the services are generated from (keyward's, health,
/// reflection), so a new RPC is counted under its own name without being
/// listed here. Health's methods are labelled `Health…`, apart from Check.
fn served_methods() -> Vec<(String, String)> {
    use prost::Message;
    let sets = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = vec![(CHECK.0.to_owned(), CHECK.1.to_owned())];
    for set in sets {
        // The sets are compiled in: one that does not decode is a build bug.
        let set = prost_types::FileDescriptorSet::decode(set).expect("a valid descriptor set");
        for file in set.file {
            let package = file.package();
            // keyward's set also holds the etcd client's protos.
            if !(package.starts_with("keyward.") || package.starts_with("grpc.")) {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    let label = if service.name() == "Health" {
                        format!("Health{}", method.name())
                    } else {
                        method.name().to_owned()
                    };
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    methods.push((path, label));
                }
            }
        }
    }
    methods
}

/// The `method` label of a path keyward does not serve.
const UNKNOWN_METHOD: &str = "unknown";

/// Every gRPC code, in number order.
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The counters of every (method, code), resolved once.
#[derive(Debug)]
struct Counters {
    slots: Vec<[Counter; CODES.len()]>,
    by_path: HashMap<String, usize, FxBuildHasher>,
}

impl Counters {
    fn new(metrics: &Metrics) -> Self {
        let mut slots = Vec::new();
        let mut by_label: HashMap<String, usize> = HashMap::new();
        let mut by_path = HashMap::with_hasher(FxBuildHasher);
        let unknown = (String::new(), UNKNOWN_METHOD.to_owned());
        for (path, label) in served_methods().into_iter().chain([unknown]) {
            let slot = *by_label.entry(label.clone()).or_insert_with(|| {
                slots.push(CODES.map(|code| metrics.rpc_counter(&label, code)));
                slots.len() - 1
            });
            by_path.insert(path, slot);
        }
        Self { slots, by_path }
    }

    fn slot(&self, path: &str) -> usize {
        self.by_path
            .get(path)
            .or_else(|| self.by_path.get(""))
            .copied()
            .unwrap_or_default()
    }

    fn count(&self, slot: usize, code: Code) {
        if let Some(counters) = self.slots.get(slot) {
            counters[code as usize].inc();
        }
    }
}

/// Counts every RPC of the services it wraps (see the module docs).
#[derive(Debug, Clone)]
pub struct CountRpcsLayer {
    counters: Arc<Counters>,
}

impl CountRpcsLayer {
    /// A layer counting into `metrics`' `keyward_rpcs_total`.
    #[must_use]
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            counters: Arc::new(Counters::new(metrics)),
        }
    }
}

impl<S> tower::Layer<S> for CountRpcsLayer {
    type Service = CountRpcs<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountRpcs {
            inner,
            counters: Arc::clone(&self.counters),
        }
    }
}

/// The service [`CountRpcsLayer`] makes.
#[derive(Debug, Clone)]
pub struct CountRpcs<S> {
    inner: S,
    counters: Arc<Counters>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, R> tower::Service<http::Request<B>> for CountRpcs<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Only gRPC is counted here (the REST API shares the server).
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
        let pending = grpc.then(|| Pending {
            counters: Arc::clone(&self.counters),
            slot: self.counters.slot(request.uri().path()),
            answered: false,
        });
        Counted {
            inner: self.inner.call(request),
            pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way; counted when it resolves or is dropped.
    pub struct Counted<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

/// Counts CANCELLED if dropped unanswered.
struct Pending {
    counters: Arc<Counters>,
    slot: usize,
    answered: bool,
}

impl Pending {
    fn answer(&mut self, code: Code) {
        self.answered = true;
        self.counters.count(self.slot, code);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.counters.count(self.slot, Code::Cancelled);
        }
    }
}

impl<F, R, E> Future for Counted<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    E: Into<BoxError>,
    R: Default,
{
    type Output = Result<http::Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match std::task::ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            // What tonic would send for it (RESOURCE_EXHAUSTED when shed).
            Err(error) => tonic::Status::from_error(error.into()).into_http(),
        };
        let mut response = response;
        let mut code = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<i32>().ok())
            .map_or(Code::Ok, Code::from_i32);
        if code == Code::OutOfRange {
            // keyward's handlers never answer OUT_OF_RANGE: tonic does, for
            // a message over the size limit, which gRPC's status-code
            // guide calls RESOURCE_EXHAUSTED.
            code = Code::ResourceExhausted;
            response.headers_mut().insert(
                "grpc-status",
                http::HeaderValue::from(Code::ResourceExhausted as i32),
            );
        }
        if let Some(pending) = this.pending {
            pending.answer(code);
        }
        Poll::Ready(Ok(response))
    }
}
