//! SendGrid's key-management REST surface (`/v3/api_keys`, `/v3/scopes`),
//! so SendGrid's own client libraries work against keyward unchanged but
//! for the host. A thin adapter, like the gRPC KeyManager: the same
//! authentication ([`crate::access`]), field validation
//! ([`crate::grpc::convert`]), rules and writes ([`crate::keys`]) and audit
//! log ([`crate::audit`]); only the shapes are SendGrid's.
//!
//! - `Authorization: Bearer <api key>` acts in the key's own account with its
//!   `api_keys.*` scopes; the operator's admin token acts as the parent
//!   account and names the account with SendGrid's `on-behalf-of` header
//!   (the subuser convention), required where gRPC requires `account_id`.
//! - Errors are SendGrid's `{"errors": [{"field", "message"}]}` with its
//!   statuses (400, 401, 403, 404; 503 while storage is failing), never an
//!   internal detail.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::{Access, Unauthenticated};
use crate::audit;
use crate::domain::record::KeyRecord;
use crate::grpc::convert;
use crate::keys::{KeyError, Keys, Lifecycle, Operation, Principal};

/// SendGrid's header naming the account (subuser) the parent acts for.
pub const ON_BEHALF_OF: &str = "on-behalf-of";

/// What every handler shares.
#[derive(Debug, Clone)]
struct Rest {
    keys: Arc<Keys>,
    access: Access,
    body: BodyLimits,
}

/// What a request body may cost before it is refused.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, declared or sent.
    pub max_bytes: usize,
    /// Longest the whole body may take to arrive.
    pub read_timeout: std::time::Duration,
}

/// The REST routes over the shared key service. Every route authenticates
/// the caller from its headers before a byte of the body is read (see
/// [`authenticated`]).
pub fn router(keys: Arc<Keys>, access: Access, body: BodyLimits) -> Router {
    let rest = Rest { keys, access, body };
    Router::new()
        .route("/v3/api_keys", get(list).post(create))
        .route(
            "/v3/api_keys/{api_key_id}",
            get(read).put(replace).patch(rename).delete(delete),
        )
        .route("/v3/scopes", get(scopes))
        .route_layer(axum::middleware::from_fn_with_state(
            rest.clone(),
            authenticated,
        ))
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
        .with_state(rest)
}

/// The peer's address, as the listener recorded it (plain or TLS).
fn peer(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
}

/// Authenticates first, then reads the body: a caller without a valid
/// credential gets 401 and keyward holds none of its body; a declared
/// length over the limit is 413 at once; a body that does not arrive
/// within the deadline is 408. The handler gets the caller as an
/// extension and the body in memory.
async fn authenticated(
    State(rest): State<Rest>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let principal = match rest
        .principal(&parts.headers, peer(&parts.extensions))
        .await
    {
        Ok(principal) => principal,
        Err(problem) => return problem.into_response(),
    };
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
        let body = json!({ "errors": [{ "field": self.field, "message": self.message }] });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<Unauthenticated> for Problem {
    fn from(Unauthenticated(problem): Unauthenticated) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            None,
            format!("authorization: {problem}"),
        )
    }
}

/// The same meaning as the gRPC status of the same error
/// ([`crate::grpc::status`]), in SendGrid's statuses; fields carry their
/// REST names.
impl From<KeyError> for Problem {
    fn from(error: KeyError) -> Self {
        match error {
            KeyError::Invalid { field, problem } => {
                let field = match field {
                    "key_id" => "api_key_id",
                    "account_id" => ON_BEHALF_OF,
                    "page_size" => "limit",
                    other => other,
                };
                Self::bad_request(field, format!("{field}: {problem}"))
            }
            KeyError::PermissionDenied(message) => Self::new(StatusCode::FORBIDDEN, None, message),
            KeyError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, None, "resource not found"),
            // SendGrid answers a full account with 403.
            error @ KeyError::LimitReached { .. } => {
                Self::new(StatusCode::FORBIDDEN, None, error.to_string())
            }
            KeyError::Store(error) => {
                tracing::error!(%error, "store failure");
                Self::storage_failing()
            }
            KeyError::Unavailable => Self::storage_failing(),
            KeyError::Rng => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "internal error; nothing was changed",
            ),
        }
    }
}

impl Problem {
    fn storage_failing() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "storage is failing or not responding; the change was not acknowledged (read the key to see whether it was applied) and can be retried later",
        )
    }
}

// --- requests ---------------------------------------------------------------------

/// A JSON body, or SendGrid's 400 naming what is wrong with it.
fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, Problem> {
    serde_json::from_slice(bytes).map_err(|e| {
        Problem::bad_request(
            "body",
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    #[serde(default)]
    name: String,
    scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct ReplaceBody {
    #[serde(default)]
    name: String,
    scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct RenameBody {
    #[serde(default)]
    name: String,
}

/// What an update does to a key's scopes.
enum Scopes<'a> {
    /// PATCH: keeps them.
    Keep,
    /// PUT: replaces every one with the body's (absent: refused).
    Replace(Option<&'a [String]>),
}

impl Rest {
    /// PUT and PATCH: a new name, and with `scopes` (PUT) every scope
    /// replaced; audited either way. Returns the key as changed.
    async fn update(
        &self,
        principal: &Principal,
        headers: &HeaderMap,
        operation: &'static str,
        (id, name): (&str, &str),
        scopes: Scopes<'_>,
    ) -> Result<KeyRecord, Problem> {
        let fail = |e| refused(principal, operation)(e);
        self.keys
            .permit(principal, Operation::Update)
            .map_err(fail)?;
        let id = convert::key_id(id).map_err(fail)?;
        self.confine(principal, headers, &id).await.map_err(fail)?;
        let name = convert::name(name).map_err(fail)?;
        let grant = match scopes {
            Scopes::Keep => None,
            Scopes::Replace(scopes) => Some(
                self.grant(scopes)
                    .map_err(fail)?
                    .ok_or_else(|| KeyError::Invalid {
                        field: "scopes",
                        problem: "required: PUT replaces every scope (PATCH changes only the name)"
                            .into(),
                    })
                    .map_err(fail)?,
            ),
        };
        let (before, record) = self
            .keys
            .update(principal, &id, name, grant)
            .await
            .map_err(fail)?;
        audit::changed(principal, operation, Some(&before), &record);
        Ok(record)
    }

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

    /// The account to act in: the admin names it with `on-behalf-of`; a
    /// key acts in its own (and may not name another).
    fn account(
        &self,
        principal: &Principal,
        operation: Operation,
        headers: &HeaderMap,
    ) -> Result<Arc<str>, KeyError> {
        self.keys
            .authorize(principal, operation, self.named_account(headers)?)
    }

    /// The account `on-behalf-of` names ("" without it); given twice, it
    /// is refused rather than guessed.
    fn named_account<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, KeyError> {
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
        self.access.screen_account(named)
    }

    /// Confines an operation on one key to the account `on-behalf-of`
    /// names: the admin acting for `globex` finds no key of `acme` (404),
    /// and a key cannot name another account. A key's account never
    /// changes, so checking before the change is as good as during it.
    async fn confine(
        &self,
        principal: &Principal,
        headers: &HeaderMap,
        id: &crate::domain::key::KeyId,
    ) -> Result<(), KeyError> {
        let named = self.named_account(headers)?;
        if named.is_empty() {
            return Ok(());
        }
        match principal {
            Principal::Admin => {
                let record = self.keys.get(principal, id).await?;
                if record.account != named {
                    return Err(KeyError::NotFound(id.to_string()));
                }
                Ok(())
            }
            Principal::Key { account, .. } if &**account != named => Err(
                KeyError::PermissionDenied("an API key acts only in its own account".into()),
            ),
            Principal::Key { .. } => Ok(()),
        }
    }

    fn grant(
        &self,
        scopes: Option<&[String]>,
    ) -> Result<Option<crate::domain::scope_set::ScopeSet>, KeyError> {
        match scopes {
            None => Ok(None),
            // `"scopes": []` asks for nothing; granting everything for it
            // would fail open.
            Some([]) => Err(KeyError::Invalid {
                field: "scopes",
                problem: "an empty list grants no scope (omit scopes for a Full Access key)".into(),
            }),
            Some(scopes) => {
                convert::grant(self.keys.catalog(), scopes, &HashMap::<String, i32>::new())
            }
        }
    }
}

/// Audits a refusal, then turns it into SendGrid's error.
fn refused(principal: &Principal, operation: &str) -> impl FnOnce(KeyError) -> Problem {
    move |error| {
        audit::refused(principal, operation, &error);
        error.into()
    }
}

fn summary(record: &KeyRecord) -> Value {
    json!({ "name": record.name, "api_key_id": record.id.to_string() })
}

/// A key as SendGrid shows it, plus keyward's lifecycle fields (SendGrid's
/// clients ignore fields they do not know): `enabled`, and `expires_at` in
/// Unix seconds (null: never).
fn detail(record: &KeyRecord) -> Value {
    json!({
        "name": record.name,
        "api_key_id": record.id.to_string(),
        "scopes": record.scopes,
        "enabled": !record.access.disabled,
        "expires_at": record.access.expires_at.map(|at| at.div_euclid(1_000_000_000)),
    })
}

// --- handlers ---------------------------------------------------------------------

/// `POST /v3/api_keys {"name", "scopes"?}`: no scopes is Full Access.
async fn create(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let fail = |e| refused(&principal, "create")(e);
    let request: CreateBody = body(&bytes)?;
    let account = rest
        .account(&principal, Operation::Create, &headers)
        .map_err(fail)?;
    let name = convert::name(&request.name).map_err(fail)?;
    let grant = rest
        .grant(request.scopes.as_deref())
        .map_err(fail)?
        .unwrap_or_else(|| rest.keys.catalog().full_access());
    let (record, secret) = rest
        .keys
        .create(&principal, account, name, grant, Lifecycle::default())
        .await
        .map_err(fail)?;
    audit::changed(&principal, "create", None, &record);
    let reply = json!({
        "api_key": secret,
        "api_key_id": record.id.to_string(),
        "name": record.name,
        "scopes": record.scopes,
    });
    Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
}

/// `GET /v3/api_keys?limit=N`: the account's keys, names and ids.
async fn list(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let account = rest.account(&principal, Operation::Read, &headers)?;
    let limit = match query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
    {
        None => convert::DEFAULT_PAGE_SIZE,
        Some(text) => {
            let size = text.parse::<i32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Problem::bad_request("limit", "limit: must be a positive integer")
            })?;
            convert::page_size(size)?
        }
    };
    let (records, _) = rest.keys.list(account, "", limit, None).await?;
    let result: Vec<Value> = records.iter().map(summary).collect();
    Ok(axum::Json(json!({ "result": result })).into_response())
}

/// `GET /v3/api_keys/{api_key_id}`.
async fn read(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    rest.keys.permit(&principal, Operation::Read)?;
    let id = convert::key_id(&id)?;
    rest.confine(&principal, &headers, &id).await?;
    let record = rest.keys.get(&principal, &id).await?;
    Ok(axum::Json(json!({ "result": [detail(&record)] })).into_response())
}

/// `PUT /v3/api_keys/{api_key_id} {"name", "scopes"}`: replaces the name
/// and every scope.
async fn replace(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let request: ReplaceBody = body(&bytes)?;
    let scopes = Scopes::Replace(request.scopes.as_deref());
    let record = rest
        .update(&principal, &headers, "update", (&id, &request.name), scopes)
        .await?;
    Ok(axum::Json(detail(&record)).into_response())
}

/// `PATCH /v3/api_keys/{api_key_id} {"name"}`.
async fn rename(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let request: RenameBody = body(&bytes)?;
    let record = rest
        .update(
            &principal,
            &headers,
            "rename",
            (&id, &request.name),
            Scopes::Keep,
        )
        .await?;
    Ok(axum::Json(summary(&record)).into_response())
}

/// `DELETE /v3/api_keys/{api_key_id}`: 204 once revoked.
async fn delete(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let fail = |e| refused(&principal, "delete")(e);
    rest.keys
        .permit(&principal, Operation::Delete)
        .map_err(fail)?;
    let id = convert::key_id(&id).map_err(fail)?;
    rest.confine(&principal, &headers, &id)
        .await
        .map_err(fail)?;
    let record = rest.keys.delete(&principal, &id).await.map_err(fail)?;
    audit::changed(&principal, "delete", Some(&record), &record);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v3/scopes`: the calling credential's own scopes.
async fn scopes(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, Problem> {
    let scopes = rest
        .keys
        .catalog()
        .names(&rest.keys.held_scopes(&principal));
    Ok(axum::Json(json!({ "scopes": scopes })).into_response())
}
