//! SendGrid's key-management REST surface (`/v3/api_keys`, `/v3/scopes`),
//! so SendGrid's own client libraries work against keyward unchanged but
//! for the host, plus keyward's lifecycle actions and catalog in the same
//! style, the OpenAPI document describing all of it (`GET /openapi.json`)
//! and the web console ([`crate::console`]). A thin adapter, like the gRPC
//! KeyManager: the same authentication ([`crate::access`]) and the same
//! management service ([`crate::manage`]: field checks, rules, writes and
//! the audit log); only the shapes are SendGrid's.
//!
//! - `Authorization: Bearer <api key>` acts in the key's own account with its
//!   `api_keys.*` scopes; the operator's admin token acts as the parent
//!   account and names the account with SendGrid's `on-behalf-of` header
//!   (the subuser convention), required where gRPC requires `account_id`.
//! - Errors are SendGrid's `{"errors": [{"field", "message"}]}` with its
//!   statuses (400, 401, 403, 404; 503 while storage is failing), never an
//!   internal detail.
//! - Every response carries the console's security headers ([`SECURITY_HEADERS`]):
//!   key data is never cached, sniffed, framed or sent as a referrer.

mod handlers;
mod input;
pub mod scanning;
pub mod shapes;
mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::access::Authenticator;
use crate::keys::{KeyError, Keys, Principal};
use crate::manage::Manager;
use crate::refusal::Refusal;
use shapes::{ErrorEntry, ErrorReply};

pub use crate::refusal::ON_BEHALF_OF;

/// The Content-Security-Policy of every response: the console's own
/// scripts, styles and images and nothing else; no inline script or
/// style, no eval, no frames, no `<base>`, forms only to itself.
/// Trusted Types are required and no policy may be made: the script can
/// never hand a string to an HTML or script sink, even by mistake.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; require-trusted-types-for 'script'; trusted-types 'none'";

/// Headers set on every response of the REST listener.
pub const SECURITY_HEADERS: [(&str, &str); 7] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    // Every response may show key data (the console's page too, once
    // scripts fill it): none is stored by a browser or proxy.
    ("cache-control", "no-store"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// What every handler shares.
#[derive(Debug, Clone)]
struct Rest {
    manager: Manager,
    /// The key store itself, for secret scanning's reports.
    keys: Arc<Keys>,
    access: Authenticator,
    body: BodyLimits,
    /// GitHub's secret scanning reports, when `--secret-scanning-keys` is set.
    scanning: Option<Arc<scanning::Scanning>>,
}

/// What a request body may cost before it is refused.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, declared or sent.
    pub max_bytes: usize,
    /// Longest the whole body may take to arrive.
    pub read_timeout: std::time::Duration,
}

/// What the listener serves besides the API.
#[derive(Debug, Clone)]
pub struct Surface {
    /// The web console at `/`.
    pub console: bool,
    /// Whether the listener is HTTPS (then every response carries HSTS).
    pub tls: bool,
    /// GitHub's secret scanning reports at [`scanning::PATH`].
    pub scanning: Option<Arc<scanning::Scanning>>,
    /// The usage plane, for key usage (`--usage-store`).
    pub usage: Option<Arc<crate::usage::UsagePlane>>,
}

/// The REST routes over the shared key service, the OpenAPI document, and
/// with `surface.console` the web console. Every API route authenticates the
/// caller and checks its permission from the headers before a byte of the
/// body is read (see [`authenticated`]); the document and the console's files are public
/// (they hold no key data). GitHub's secret scanning endpoint, when on, is
/// the one route outside that authentication: it is added after it, and
/// its reports authenticate by their signature ([`scanning`]).
pub fn router(
    keys: Arc<Keys>,
    access: Authenticator,
    body: BodyLimits,
    surface: Surface,
) -> Router {
    let Surface {
        console,
        tls,
        scanning,
        usage,
    } = surface;
    let rest = Rest {
        manager: Manager::new(Arc::clone(&keys), access.clone()).with_usage(usage),
        keys,
        access,
        body,
        scanning,
    };
    let (api, document) = handlers::routes();
    let document: Arc<str> = document
        .to_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        .into();
    let mut router = api
        .route_layer(axum::middleware::from_fn_with_state(
            rest.clone(),
            authenticated,
        ))
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let document = Arc::clone(&document);
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        document.to_string(),
                    )
                }
            }),
        );
    if rest.scanning.is_some() {
        router = router.route(scanning::PATH, axum::routing::post(scanning::report));
    }
    if console {
        router = router.merge(crate::console::routes());
    }
    router
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                "this endpoint does not take that method",
            )
        })
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, None, "no such endpoint") })
        // `authenticated` has read and bounded the body already.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(secured))
        .layer(axum::middleware::map_response(
            move |mut response: Response| async move {
                if tls {
                    response.headers_mut().insert(
                        axum::http::header::STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static("max-age=31536000"),
                    );
                }
                response
            },
        ))
        // Outermost: authentication refusals and audit lines alike are
        // logged within the request's trace.
        .layer(axum::middleware::from_fn(crate::trace::rest_layer))
        .with_state(rest)
}

/// The OpenAPI document of every REST route, as `GET /openapi.json` serves
/// it. Built from the same calls that route the requests, so the two
/// cannot drift apart.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    handlers::routes().1
}

/// Adds [`SECURITY_HEADERS`] to a response.
async fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

/// Authenticates and checks the caller's permission first, then reads the
/// body: a caller without a valid credential gets 401, and one without the
/// route's `api_keys.*` scopes 403, at once, and keyward holds none of its
/// body; a declared length over the limit is 413 at once; a body that does
/// not arrive within the deadline is 408. The handler gets the caller as
/// an extension and the body in memory (and checks again what needs the
/// body or the key: least privilege, the account).
async fn authenticated(
    State(rest): State<Rest>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let principal = match rest
        .principal(&parts.headers, crate::access::peer(&parts.extensions))
        .await
    {
        Ok(principal) => principal,
        Err(problem) => return problem.into_response(),
    };
    if let Err(problem) = rest.permitted(&principal, &parts) {
        return problem.into_response();
    }
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("body"),
            format!(
                "body: larger than the {} bytes allowed",
                rest.body.max_bytes
            ),
        )
        .into_response()
    };
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > rest.body.max_bytes as u64) {
        return too_large();
    }
    let read = axum::body::to_bytes(body, rest.body.max_bytes);
    let bytes = match tokio::time::timeout(rest.body.read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                Some("body"),
                "body: did not arrive in time",
            )
            .into_response();
        }
    };
    parts.extensions.insert(principal);
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

// --- errors ---------------------------------------------------------------------

/// A refusal in SendGrid's error format.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    field: Option<&'static str>,
    message: String,
}

impl Problem {
    fn new(status: StatusCode, field: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status,
            field,
            message: message.into(),
        }
    }

    fn bad_request(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some(field), message)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ErrorReply {
            errors: vec![ErrorEntry {
                field: self.field,
                message: self.message,
            }],
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// SendGrid's form of a refusal ([`crate::refusal`]).
impl From<Refusal> for Problem {
    fn from(refusal: Refusal) -> Self {
        Self::new(refusal.http, refusal.field, refusal.body)
    }
}

impl From<KeyError> for Problem {
    fn from(error: KeyError) -> Self {
        Refusal::from(error).into()
    }
}

impl From<crate::access::Unauthenticated> for Problem {
    fn from(error: crate::access::Unauthenticated) -> Self {
        Refusal::from(error).into()
    }
}

// --- requests ---------------------------------------------------------------------

/// A JSON body, or the 400 naming what is wrong with it by position, never
/// by quoting it: serde's own messages echo the offending value, which may
/// be a secret pasted into the wrong field.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, KeyError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Eof => "the JSON ends early",
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                "a field of the wrong type or value, a required field missing, or a field this endpoint does not take"
            }
        };
        KeyError::Invalid {
            field: "body",
            problem: format!(
                "not a valid body for this endpoint: {what} (line {}, column {}); see /openapi.json",
                e.line(),
                e.column()
            ),
        }
    })
}

/// [`body`], where an empty body means every field's default
/// (`POST …/rotate` without an overlap).
fn body_or_default<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, KeyError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        body(bytes)
    }
}

impl Rest {
    /// The caller, from `Authorization` and its address.
    async fn principal(
        &self,
        headers: &HeaderMap,
        client: Option<std::net::IpAddr>,
    ) -> Result<Principal, Problem> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().map_err(|_| ()));
        Ok(self.access.principal(header, client).await?)
    }

    /// Whether `principal` may do what the matched route does, from the
    /// request's head alone ([`handlers::required`]), so a key without the
    /// scope is refused before a byte of its body is read or awaited. A
    /// refused change is audited as the handler would audit it.
    fn permitted(
        &self,
        principal: &Principal,
        parts: &axum::http::request::Parts,
    ) -> Result<(), Problem> {
        let route = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map(axum::extract::MatchedPath::as_str);
        match route.and_then(|route| handlers::required(&parts.method, route)) {
            Some(handlers::Required::Credential) => Ok(()),
            Some(handlers::Required::Read) => Ok(self.manager.permit_read(principal)?),
            Some(handlers::Required::Change(action)) => {
                Ok(self.manager.permit(principal, action)?)
            }
            // Fail closed: a route nobody said the requirement of.
            None => {
                tracing::error!(method = %parts.method, route = ?route, "a REST route without a stated permission; refused");
                Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    None,
                    "this endpoint's permission is not stated; refused",
                ))
            }
        }
    }

    /// The account `on-behalf-of` names ("" without it); given twice, it
    /// is refused rather than guessed.
    fn named_account(headers: &HeaderMap) -> Result<&str, KeyError> {
        let mut values = headers.get_all(ON_BEHALF_OF).iter();
        let named = match (values.next(), values.next()) {
            (None, _) => "",
            (Some(_), Some(_)) => {
                return Err(KeyError::Invalid {
                    field: "account_id",
                    problem: "given more than once".into(),
                });
            }
            (Some(value), None) => value.to_str().unwrap_or("\u{fffd}"),
        };
        Ok(named)
    }
}
