//! Envoy's `envoy.service.auth.v3.Authorization/Check` (ext_authz), through
//! the same [`Authorizer`] as `keyward.v1.Authorizer`: one decision path.
//!
//! - The key comes from `Authorization: Bearer <key>` (in `headers`, or in
//!   `header_map` when Envoy sends raw headers).
//! - Envoy does not decode or normalise the path, so the same ambiguity rules
//!   apply; the query string is ignored.
//! - Allow: an OK status and an `OkHttpResponse` that sets the identity headers
//!   (overwriting any the client sent) and removes `authorization`, so the
//!   secret never reaches the upstream.
//! - Rate limits: a key with one gets `x-ratelimit-*` headers on every
//!   response, and when refused a 429 with `retry-after`.
//! - Deny: an OK gRPC reply whose status denies, carrying a 401/403/429
//!   `DeniedHttpResponse` with a SendGrid-style JSON body and headers naming
//!   the missing scopes. A gRPC *error* means keyward itself failed; with
//!   `failure_mode_allow: false` Envoy then fails closed.

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use std::borrow::Cow;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use tonic::{Request, Response, Status};

use crate::decisions::{FrontDoor, InvalidRequest};
use crate::domain::catalog::Catalog;
use crate::domain::decision::{Decision, DenyReason};
use keyward_core::reply::{self, Reply};

pub use keyward_core::reply::{
    ACCOUNT_ID_HEADER, DENY_REASON_HEADER, KEY_ID_HEADER, MISSING_SCOPES_HEADER,
};

/// The ext_authz service.
#[derive(Debug, Clone)]
pub struct CheckService {
    front: FrontDoor,
    trusted_hops: u32,
}

impl CheckService {
    /// The service over the shared decision path. `trusted_hops` is
    /// `--xff-trusted-hops`: Envoy's `xff_num_trusted_hops`, so that the
    /// client address is the one Envoy (and the module) computes.
    #[must_use]
    pub fn new(front: FrontDoor, trusted_hops: u32) -> Self {
        Self {
            front,
            trusted_hops,
        }
    }

    /// Decides a `CheckRequest`; `Err` for a request that is not an HTTP
    /// request keyward can decide (validated as `Authorize` validates).
    async fn decide(&self, request: &CheckRequest) -> Result<Decision, InvalidRequest> {
        let http = http_request(request).ok_or_else(|| InvalidRequest {
            field: "attributes.request.http",
            problem: "required: the check request carries no HTTP request".into(),
        })?;
        let (method, path) = FrontDoor::validate(&http.method, &http.path)?;
        let credential = header(http, "authorization").unwrap_or_default();
        let client = crate::domain::allowlist::forwarded_client(
            source_address(request),
            header(http, "x-forwarded-for").as_deref(),
            self.trusted_hops,
        );
        Ok(self.front.decide(&credential, client, method, path).await)
    }
}

/// The client's HTTP request a check is about.
fn http_request(request: &CheckRequest) -> Option<&HttpRequest> {
    request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
}

/// A request header as Envoy sent it: in `headers` (lower-cased names,
/// repeated values joined with `,`), or in `header_map` when Envoy sends
/// raw headers (every value, joined the same way).
fn header<'a>(http: &'a HttpRequest, name: &str) -> Option<Cow<'a, str>> {
    if let Some(value) = http.headers.get(name) {
        return Some(Cow::Borrowed(value));
    }
    let map = http.header_map.as_ref()?;
    let mut values = map
        .headers
        .iter()
        .filter(|h| h.key.eq_ignore_ascii_case(name))
        .filter_map(|h| {
            if h.raw_value.is_empty() {
                Some(h.value.as_str())
            } else {
                std::str::from_utf8(&h.raw_value).ok()
            }
        });
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for value in values {
                joined.push(',');
                joined.push_str(value);
            }
            Some(Cow::Owned(joined))
        }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // The client request's trace, as Envoy forwards it (its access log
        // shows the same `traceparent`): a header lookup when absent.
        let trace = http_request(request.get_ref())
            .and_then(|http| header(http, crate::trace::HEADER))
            .and_then(|value| crate::trace::TraceParent::parse(value.as_bytes()));
        let decided = crate::trace::traced(trace, self.decide(request.get_ref())).await;
        let response = match decided {
            Ok(decision) if decision.allowed() => allow(&decision),
            Ok(decision) => deny(&decision, self.front.catalog()),
            Err(invalid) => {
                let problem = invalid.to_string();
                denied_response(Status::invalid_argument(&problem), reply::invalid(&problem))
            }
        };
        Ok(Response::new(response))
    }
}

/// The direct peer Envoy reports (`attributes.source.address`: the TCP
/// connection's remote address, never derived from `X-Forwarded-For`).
fn source_address(request: &CheckRequest) -> Option<std::net::IpAddr> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    let address = request
        .attributes
        .as_ref()?
        .source
        .as_ref()?
        .address
        .as_ref()?
        .address
        .as_ref()?;
    match address {
        Address::SocketAddress(socket) => crate::domain::allowlist::client(&socket.address)
            .ok()
            .flatten(),
        _ => None,
    }
}

fn allow(decision: &Decision) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    // Overwrite, never append: a client must not smuggle its own identity.
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    for (name, value) in reply::identity_headers(decision) {
        ok.add_header(name, value, overwrite, false);
    }
    ok.remove_header("authorization");
    // A rate-limited key's client sees its budget on every response.
    for (name, value) in reply::rate_limit_headers(decision) {
        ok.add_response_header(name, value, overwrite, false);
    }
    let mut response = CheckResponse::with_status(Status::ok(""));
    response.set_http_response(ok);
    response
}

/// A deny: the gRPC status says why (for Envoy's logs and stats), the
/// HTTP reply is the one every gateway gives ([`reply::denied`]).
fn deny(decision: &Decision, catalog: &Catalog) -> CheckResponse {
    let reason = decision.deny.unwrap_or(DenyReason::UnknownRoute);
    let grpc = Status::new(crate::refusal::ext_authz_code(reason), reason.label());
    denied_response(grpc, reply::denied(decision, catalog))
}

fn denied_response(grpc: Status, reply: Reply) -> CheckResponse {
    let status =
        HttpStatusCode::try_from(i32::from(reply.status)).unwrap_or(HttpStatusCode::Forbidden);
    let mut denied = DeniedHttpResponseBuilder::new();
    denied
        .set_http_status(status)
        .add_header("content-type", "application/json", None, false)
        .set_body(reply.body);
    for (name, value) in reply.headers {
        denied.add_header(name, value, None, false);
    }
    let mut response = CheckResponse::with_status(grpc);
    response.set_http_response(denied);
    response
}
