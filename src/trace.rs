//! W3C trace context: the `traceparent` a request arrives with, carried
//! into its log lines and its audit line as `trace_id`, so one request can
//! be followed from Envoy's access log (`%REQ(TRACEPARENT)%`) to keyward's
//! decision and audit trail. No tracing backend: keyward exports no spans,
//! it only names the trace in what it already logs.
//!
//! Where it is read: the gRPC metadata of any call ([`TraceLayer`]), the
//! client request's headers inside an ext_authz `Check` (Envoy forwards
//! `traceparent` when its `allowed_headers` name it; see
//! `k8s/base/envoy.yaml`), and REST request headers ([`rest_layer`]).
//!
//! Cost: a request without a `traceparent` pays one header lookup and
//! nothing else. With a valid one, its handling runs inside an INFO span
//! `request{trace_id=…}` (every log line it emits names the trace) and a
//! task-local ([`current`]) that the audit line reads, so the audit line
//! keeps its `trace_id` even under `RUST_LOG=keyward::audit=info`, which
//! filters the span out.
//!
//! Parsing is strict ([`TraceParent::parse`]): anything else is ignored,
//! never echoed, so a caller cannot put text of its choosing into a log
//! line through this header.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::futures::TaskLocalFuture;
use tonic::codegen::http;
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// The header's name (lower case, as HTTP/2 and Envoy carry it).
pub const HEADER: &str = "traceparent";

/// `00-` + 32 hex + `-` + 16 hex + `-` + 2 hex.
const LENGTH: usize = 55;

/// A valid version-00 `traceparent`, kept as its (checked, ASCII) text.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent([u8; LENGTH]);

impl TraceParent {
    /// Parses a header value per W3C Trace Context level 1: version `00`
    /// exactly (no other version is accepted, and a version-00 value has
    /// nothing after its flags), a 32-digit trace-id and a 16-digit
    /// parent-id, neither all zeros, two flag digits; lower-case hex only,
    /// as the specification requires. `None` for anything else.
    #[must_use]
    pub fn parse(value: &[u8]) -> Option<Self> {
        let text: [u8; LENGTH] = value.try_into().ok()?;
        let hex = |range: std::ops::Range<usize>| {
            text[range]
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let zero = |range: std::ops::Range<usize>| text[range].iter().all(|b| *b == b'0');
        let well_formed = text.starts_with(b"00-")
            && text[35] == b'-'
            && text[52] == b'-'
            && hex(3..35)
            && hex(36..52)
            && hex(53..55)
            && !zero(3..35)
            && !zero(36..52);
        well_formed.then_some(Self(text))
    }

    /// The first valid `traceparent` of a header map: exactly one field of
    /// that name (W3C: several make the context invalid).
    #[must_use]
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(HEADER).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Self::parse(value.as_bytes())
    }

    /// The trace-id: 32 lower-case hex digits.
    #[must_use]
    pub fn trace_id(&self) -> &str {
        // Checked to be ASCII hex by `parse`.
        std::str::from_utf8(&self.0[3..35]).unwrap_or_default()
    }

    /// The span a traced request runs in: its log lines name the trace.
    #[must_use]
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("request", trace_id = self.trace_id())
    }
}

impl std::fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).unwrap_or_default())
    }
}

tokio::task_local! {
    /// The trace of the request this task is handling.
    static CURRENT: TraceParent;
}

/// The trace of the request being handled on this task, if it came with
/// a valid `traceparent`.
#[must_use]
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(|trace| *trace).ok()
}

pin_project_lite::pin_project! {
    /// `F`, run inside its request's trace when it has one.
    pub struct Traced<F> {
        #[pin]
        inner: Inner<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProjection]
    enum Inner<F> {
        // No (valid) `traceparent`: `F` as it is.
        Plain { #[pin] inner: F },
        // Within the trace's span, with `current` set.
        Within { #[pin] inner: TaskLocalFuture<TraceParent, Instrumented<F>> },
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().inner.project() {
            InnerProjection::Plain { inner } => inner.poll(cx),
            InnerProjection::Within { inner } => inner.poll(cx),
        }
    }
}

/// Runs `inner` within `trace` (when there is one).
pub fn traced<F: Future>(trace: Option<TraceParent>, inner: F) -> Traced<F> {
    let inner = match trace {
        None => Inner::Plain { inner },
        Some(trace) => Inner::Within {
            inner: CURRENT.scope(trace, inner.instrument(trace.span())),
        },
    };
    Traced { inner }
}

/// Runs every gRPC call within the trace its metadata names.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let trace = TraceParent::from_headers(request.headers());
        traced(trace, self.inner.call(request))
    }
}

/// The REST API's middleware: each request within the trace its headers
/// name.
pub async fn rest_layer(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let trace = TraceParent::from_headers(request.headers());
    traced(trace, next.run(request)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_parses() {
        let trace = TraceParent::parse(VALID.as_bytes()).expect("valid");
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(format!("{trace:?}"), VALID);
        assert!(
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .is_some()
        );
    }

    #[test]
    fn anything_else_is_ignored() {
        for invalid in [
            "",
            "00",
            // Another version, or the forbidden ff.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Upper-case hex, a non-hex digit.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Wrong lengths and separators; trailing data on version 00.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-\u{e9}",
        ] {
            assert!(
                TraceParent::parse(invalid.as_bytes()).is_none(),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn two_headers_are_no_context() {
        let mut headers = http::HeaderMap::new();
        headers.append(HEADER, http::HeaderValue::from_static(VALID));
        assert!(TraceParent::from_headers(&headers).is_some());
        headers.append(HEADER, http::HeaderValue::from_static(VALID));
        assert!(TraceParent::from_headers(&headers).is_none());
    }

    #[tokio::test]
    async fn the_trace_is_current_inside_only() {
        let trace = TraceParent::parse(VALID.as_bytes());
        assert_eq!(traced(trace, async { current() }).await, trace);
        assert_eq!(traced(None, async { current() }).await, None);
        assert_eq!(current(), None);
    }
}
