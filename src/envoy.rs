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
use tonic::{Request, Response, Status};

use crate::domain::catalog::Catalog;
use crate::domain::decision::{Decision, DenyReason};
use crate::front::{FrontDoor, InvalidRequest};

/// Header carrying the verified key id to the upstream.
pub const KEY_ID_HEADER: &str = "x-keyward-key-id";
/// Header carrying the verified account id to the upstream.
pub const ACCOUNT_ID_HEADER: &str = "x-keyward-account-id";
/// On a scope deny: the scopes the key lacks, comma-separated (as GitHub's
/// `x-accepted-github-permissions` tells clients what to fix).
pub const MISSING_SCOPES_HEADER: &str = "x-keyward-missing-scopes";
/// On a deny: the machine-readable reason.
pub const DENY_REASON_HEADER: &str = "x-keyward-deny-reason";

/// The ext_authz service.
#[derive(Debug, Clone)]
pub struct CheckService {
    front: FrontDoor,
}

impl CheckService {
    /// The service over the shared decision path.
    #[must_use]
    pub fn new(front: FrontDoor) -> Self {
        Self { front }
    }

    /// Decides a `CheckRequest`; `Err` for a request that is not an HTTP
    /// request keyward can decide (validated as `Authorize` validates).
    async fn decide(&self, request: &CheckRequest) -> Result<Decision, InvalidRequest> {
        let http = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| InvalidRequest {
                field: "attributes.request.http",
                problem: "required: the check request carries no HTTP request".into(),
            })?;
        let (method, path) = FrontDoor::validate(&http.method, &http.path)?;
        let credential = http
            .headers
            .get("authorization")
            .map(String::as_str)
            .or_else(|| {
                http.header_map.as_ref().and_then(|map| {
                    map.headers
                        .iter()
                        .find(|h| h.key.eq_ignore_ascii_case("authorization"))
                        .and_then(|h| {
                            if h.raw_value.is_empty() {
                                Some(h.value.as_str())
                            } else {
                                std::str::from_utf8(&h.raw_value).ok()
                            }
                        })
                })
            })
            .unwrap_or_default();
        Ok(self
            .front
            .decide(credential, source_address(request), method, path)
            .await)
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let response = match self.decide(request.get_ref()).await {
            Ok(decision) if decision.allowed() => allow(&decision),
            Ok(decision) => deny(&decision, self.front.catalog()),
            Err(invalid) => {
                let problem = invalid.to_string();
                denied_response(
                    Status::invalid_argument(&problem),
                    HttpStatusCode::BadRequest,
                    &problem,
                    None,
                    Vec::new(),
                )
            }
        };
        Ok(Response::new(response))
    }
}

/// The downstream address Envoy reports (`attributes.source.address`): the
/// real client when Envoy is configured to trust its load balancer's
/// `X-Forwarded-For` (see README).
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
    ok.add_header(
        KEY_ID_HEADER,
        decision.key_id.map(|id| id.to_string()).unwrap_or_default(),
        overwrite,
        false,
    )
    .add_header(
        ACCOUNT_ID_HEADER,
        decision.account.as_deref().unwrap_or_default(),
        overwrite,
        false,
    )
    .remove_header("authorization");
    // A rate-limited key's client sees its budget on every response.
    for (name, value) in rate_limit_headers(decision) {
        ok.add_response_header(name, value, overwrite, false);
    }
    let mut response = CheckResponse::with_status(Status::ok(""));
    response.set_http_response(ok);
    response
}

fn deny(decision: &Decision, catalog: &Catalog) -> CheckResponse {
    let reason = decision.deny.unwrap_or(DenyReason::UnknownRoute);
    let missing = catalog.names(&decision.missing);
    let mut headers = vec![(DENY_REASON_HEADER, reason.label().to_owned())];
    let (grpc, http, message) = match reason {
        DenyReason::MissingKey
        | DenyReason::MalformedKey
        | DenyReason::UnknownKey
        | DenyReason::KeyExpired
        | DenyReason::KeyDisabled => {
            headers.push(("www-authenticate", "Bearer realm=\"keyward\"".to_owned()));
            (
                Status::unauthenticated(reason.label()),
                HttpStatusCode::Unauthorized,
                reason.message().to_owned(),
            )
        }
        DenyReason::InsufficientScope => {
            headers.push((MISSING_SCOPES_HEADER, missing.join(", ")));
            headers.push((
                "www-authenticate",
                format!(
                    "Bearer realm=\"keyward\", error=\"insufficient_scope\", scope=\"{}\"",
                    missing.join(" ")
                ),
            ));
            (
                Status::permission_denied(reason.label()),
                HttpStatusCode::Forbidden,
                FrontDoor::message(decision, &missing),
            )
        }
        DenyReason::RateLimited => {
            headers.extend(rate_limit_headers(decision));
            (
                Status::resource_exhausted(reason.label()),
                HttpStatusCode::TooManyRequests,
                reason.message().to_owned(),
            )
        }
        DenyReason::KeyUnverifiable => (
            Status::unavailable(reason.label()),
            HttpStatusCode::ServiceUnavailable,
            reason.message().to_owned(),
        ),
        DenyReason::UnknownRoute | DenyReason::AmbiguousPath | DenyReason::IpNotAllowed => (
            Status::permission_denied(reason.label()),
            HttpStatusCode::Forbidden,
            reason.message().to_owned(),
        ),
    };
    denied_response(grpc, http, &message, Some(reason.label()), headers)
}

/// `x-ratelimit-limit`, `-remaining`, `-reset` (seconds until the full
/// burst is back), and on a refusal `retry-after` (seconds), for a key with
/// a rate limit. Seconds round up, so a client that waits them succeeds.
fn rate_limit_headers(decision: &Decision) -> Vec<(&'static str, String)> {
    let Some(quota) = decision.quota else {
        return Vec::new();
    };
    let seconds = |millis: u32| millis.div_ceil(1000);
    let mut headers = vec![
        ("x-ratelimit-limit", quota.limit.to_string()),
        ("x-ratelimit-remaining", quota.remaining.to_string()),
        ("x-ratelimit-reset", seconds(quota.reset_ms).to_string()),
    ];
    if decision.deny == Some(DenyReason::RateLimited) {
        headers.push((
            "retry-after",
            seconds(quota.retry_after_ms).max(1).to_string(),
        ));
    }
    headers
}

/// A deny with SendGrid's error body (plus keyward's `reason`, when the
/// request was decided).
fn denied_response(
    grpc: Status,
    http: HttpStatusCode,
    message: &str,
    reason: Option<&str>,
    headers: Vec<(&str, String)>,
) -> CheckResponse {
    let body = match reason {
        Some(reason) => serde_json::json!({
            "errors": [{ "field": null, "message": message, "reason": reason }]
        }),
        None => serde_json::json!({ "errors": [{ "field": null, "message": message }] }),
    };
    let mut denied = DeniedHttpResponseBuilder::new();
    denied
        .set_http_status(http)
        .add_header("content-type", "application/json", None, false)
        .set_body(body.to_string());
    for (name, value) in headers {
        denied.add_header(name, value, None, false);
    }
    let mut response = CheckResponse::with_status(grpc);
    response.set_http_response(denied);
    response
}
