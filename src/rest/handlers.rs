//! The REST handlers and their OpenAPI descriptions. Each route is
//! registered with `routes!`, which takes its path and method from the
//! handler's `#[utoipa::path]`: the document and the router are one list.

use axum::body::Bytes;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::shapes::{
    AllowlistBody, CatalogReply, CreateBody, CreatedKey, ErrorReply, ExpiryBody, KeyDetail,
    KeyListed, KeySummary, ListReply, RateLimitBody, RateLimitChange, ReadReply, RenameBody,
    ReplaceBody, RotateBody, RotatedKey, ScopesReply,
};
use super::{ON_BEHALF_OF, Problem, Rest, body, body_or_default, refused};
use crate::audit;
use crate::domain::record::KeyRecord;
use crate::grpc::convert;
use crate::keys::{Expiry, KeyError, Lifecycle, Operation, Principal, StateChange};
use crate::pb::v1 as pb;

/// Every route, and the document describing them.
pub(super) fn routes() -> (axum::Router<Rest>, utoipa::openapi::OpenApi) {
    let (router, mut document) = operations().split_for_parts();
    utoipa::Modify::modify(&Common, &mut document);
    (router, document)
}

fn operations() -> OpenApiRouter<Rest> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list, create))
        .routes(routes!(read, replace, rename, delete))
        .routes(routes!(disable))
        .routes(routes!(enable))
        .routes(routes!(rotate))
        .routes(routes!(set_expiry))
        .routes(routes!(set_allowlist))
        .routes(routes!(set_rate_limit))
        .routes(routes!(scopes))
        .routes(routes!(catalog))
}

/// What a route asks of its caller before a byte of its body is read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Required {
    /// Only a valid credential: the caller's own scopes, the catalog.
    Credential,
    /// `api_keys.read`; refused without an audit event, as reads are.
    Read,
    /// A change: the operation's scopes, a refusal audited under its label.
    Change(&'static str, Operation),
}

/// What the route `template` (as matched) asks of its caller for `method`;
/// `None` for a route this table does not know, which is refused (a test
/// checks that every documented route is here). Kept next to
/// [`operations`] so that a new route is added to both.
pub(super) fn required(method: &axum::http::Method, template: &str) -> Option<Required> {
    use axum::http::Method;
    let read = *method == Method::GET || *method == Method::HEAD;
    let change = |label, operation| Some(Required::Change(label, operation));
    match (template, method) {
        ("/v3/scopes" | "/v3/scopes/catalog", _) if read => Some(Required::Credential),
        ("/v3/api_keys" | "/v3/api_keys/{api_key_id}", _) if read => Some(Required::Read),
        ("/v3/api_keys", &Method::POST) => change("create", Operation::Create),
        ("/v3/api_keys/{api_key_id}", &Method::PUT) => change("update", Operation::Update),
        ("/v3/api_keys/{api_key_id}", &Method::PATCH) => change("rename", Operation::Update),
        ("/v3/api_keys/{api_key_id}", &Method::DELETE) => change("delete", Operation::Delete),
        ("/v3/api_keys/{api_key_id}/disable", &Method::POST) => {
            change("disable", Operation::Update)
        }
        ("/v3/api_keys/{api_key_id}/enable", &Method::POST) => change("enable", Operation::Update),
        ("/v3/api_keys/{api_key_id}/rotate", &Method::POST) => change("rotate", Operation::Rotate),
        ("/v3/api_keys/{api_key_id}/expiry", &Method::PUT) => {
            change("set_expiry", Operation::Update)
        }
        ("/v3/api_keys/{api_key_id}/allowlist", &Method::PUT) => {
            change("set_allowlist", Operation::Update)
        }
        ("/v3/api_keys/{api_key_id}/rate_limit", &Method::PUT) => {
            change("set_rate_limit", Operation::Update)
        }
        _ => None,
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyward REST API",
        description = "SendGrid's v3 API key management (`/v3/api_keys`, `/v3/scopes`), served by keyward, with keyward's lifecycle actions and scope catalog in the same style. Authenticate with `Authorization: Bearer <API key holding api_keys.* scopes | admin token>`; the admin names the account with `on-behalf-of`. Errors are SendGrid's `{\"errors\": [{\"field\", \"message\"}]}`.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "api_keys", description = "SendGrid's API key endpoints"),
        (name = "lifecycle", description = "keyward: disable, enable, rotate, expiry, allowlist, rate limit"),
        (name = "scopes", description = "What a credential holds and what a key can be granted"),
    )
)]
struct ApiDoc;

/// What every route shares, added to each operation so none can miss it:
/// bearer authentication, the `on-behalf-of` header, and the refusals any
/// route can give.
struct Common;

impl utoipa::Modify for Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{RefOr, Required, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let on_behalf_of = ParameterBuilder::new()
            .name(ON_BEHALF_OF)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "With the admin token: the account to act in (required to list or create). An API key acts in its own account and may not name another.",
            ))
            .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(
                utoipa::openapi::schema::Type::String,
            )))
            .build();
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorReply")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                operation.security =
                    Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                        "bearer",
                        Vec::<String>::new(),
                    )]);
                operation
                    .parameters
                    .get_or_insert_with(Vec::new)
                    .push(on_behalf_of.clone());
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "401".into(),
                    error("No valid credential (missing, malformed, unknown, revoked, disabled, expired or outside its allowlist)"),
                );
                responses.insert(
                    "503".into(),
                    error("Storage is failing or not responding; nothing was acknowledged"),
                );
                if operation.request_body.is_some() {
                    responses.entry("400".into()).or_insert_with(|| {
                        error("The body or a field is invalid (named in `field`)")
                    });
                    responses.insert(
                        "408".into(),
                        error("The body did not arrive within the request timeout"),
                    );
                    responses.insert(
                        "413".into(),
                        error("The body is larger than --max-message-bytes"),
                    );
                }
            }
        }
        components
            .schemas
            .entry("ErrorReply".into())
            .or_insert_with(<ErrorReply as utoipa::PartialSchema>::schema);
    }
}

/// The time now, Unix nanos.
fn now() -> i64 {
    crate::clock::now_nanos()
}

impl Rest {
    fn detail(&self, record: &KeyRecord) -> KeyDetail {
        KeyDetail::of(record, self.keys.last_used(record), now())
    }

    /// A changed key as its changer may see it: all of it to a caller that
    /// could read the key anyway, else SendGrid's PATCH answer.
    fn shown_to(&self, principal: &Principal, record: &KeyRecord) -> Response {
        if self.keys.permit(principal, Operation::Read).is_ok() {
            axum::Json(self.detail(record)).into_response()
        } else {
            axum::Json(KeySummary::of(record)).into_response()
        }
    }

    /// Disables or enables a key.
    async fn set_disabled(
        &self,
        caller: (&Principal, &HeaderMap),
        id: &str,
        disabled: bool,
    ) -> Result<Response, Problem> {
        let state = || {
            Ok(StateChange {
                disabled: Some(disabled),
                ..StateChange::default()
            })
        };
        let label = if disabled { "disable" } else { "enable" };
        self.set_state(caller, label, id, state).await
    }

    /// The lifecycle actions: one state change, with UpdateKey's rules.
    async fn set_state(
        &self,
        (principal, headers): (&Principal, &HeaderMap),
        label: &'static str,
        id: &str,
        state: impl FnOnce() -> Result<StateChange, KeyError>,
    ) -> Result<Response, Problem> {
        let record = self
            .on_key(
                (principal, headers),
                (label, Operation::Update),
                id,
                |id| async move {
                    let (before, record) = self.keys.set_state(principal, &id, state()?).await?;
                    audit::changed(principal, label, Some(&before), &record);
                    Ok(record)
                },
            )
            .await?;
        Ok(self.shown_to(principal, &record))
    }
}

// --- request values ---------------------------------------------------------------

/// An expiry in Unix seconds, checked as gRPC checks it.
fn expires_at(seconds: Option<i64>) -> Result<Option<i64>, KeyError> {
    convert::expires_at(
        seconds
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 })
            .as_ref(),
    )
}

/// A rate limit, checked as gRPC checks it.
fn rate_limit(
    limit: Option<RateLimitBody>,
) -> Result<Option<crate::domain::rate::RateLimit>, KeyError> {
    let limit = limit.map(|limit| pb::RateLimit {
        requests: limit.requests,
        period: Some(prost_types::Duration {
            seconds: i64::try_from(limit.period_ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from(limit.period_ms % 1000).unwrap_or(0) * 1_000_000,
        }),
        burst: limit.burst,
    });
    convert::rate_limit(limit.as_ref())
}

/// The `{api_key_id}` of a path, refused in SendGrid's error format (axum's
/// own refusal is plain text) when it is not UTF-8.
struct KeyIdPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for KeyIdPath {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Problem> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(id)| Self(id))
            .map_err(|_| {
                Problem::bad_request("api_key_id", "api_key_id: must be a 22-character key id")
            })
    }
}

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    page_token: Option<String>,
}

// --- SendGrid's endpoints ---------------------------------------------------------

/// Create an API key. Without `scopes` it is a Full Access key (every
/// general scope; never billing). The secret is in this reply only.
#[utoipa::path(post, path = "/v3/api_keys", tag = "api_keys", request_body = CreateBody,
    responses(
        (status = 201, description = "Created; `api_key` is the secret, shown once", body = CreatedKey),
        (status = 400, description = "A field is invalid (named in `field`)", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.create`, asks for more than it holds (the field is named), or the account is full", body = ErrorReply),
    ))]
async fn create(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let fail = |e| refused(&principal, "create")(e);
    let account = rest
        .account(&principal, Operation::Create, &headers)
        .map_err(fail)?;
    let request: CreateBody = body(&bytes).map_err(fail)?;
    let name = rest.access.name(&request.name).map_err(fail)?;
    let grant = rest
        .grant(request.scopes.as_deref())
        .map_err(fail)?
        .unwrap_or_else(|| rest.keys.catalog().full_access());
    let lifecycle = Lifecycle {
        expires_at: expires_at(request.expires_at).map_err(fail)?,
        allowed_cidrs: rest
            .access
            .allowed_cidrs(request.allowed_cidrs.as_deref().unwrap_or_default())
            .map_err(fail)?,
        rate_limit: rate_limit(request.rate_limit).map_err(fail)?,
    };
    let (record, secret) = rest
        .keys
        .create(&principal, account, name, grant, lifecycle)
        .await
        .map_err(fail)?;
    audit::changed(&principal, "create", None, &record);
    let reply = CreatedKey {
        api_key: secret,
        api_key_id: record.id.to_string(),
        name: record.name,
        scopes: record.scopes,
    };
    Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
}

/// List the account's keys, a page at a time, in creation order.
#[utoipa::path(get, path = "/v3/api_keys", tag = "api_keys",
    params(
        ("limit" = Option<u32>, Query, description = "Keys per page, 1 to 1000 (default 100)"),
        ("page_token" = Option<String>, Query, description = "keyward: `next_page_token` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page", body = ListReply),
        (status = 400, description = "`limit`, `page_token` or `on-behalf-of` is invalid", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.read`", body = ErrorReply),
    ))]
async fn list(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let account = rest.account(&principal, Operation::Read, &headers)?;
    let query: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or_default())
        .map_err(|e| Problem::bad_request("query", format!("query: {e}")))?;
    let limit = match query.limit {
        None => convert::DEFAULT_PAGE_SIZE,
        Some(text) => {
            let size = text.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Problem::bad_request("limit", "limit: must be a positive integer")
            })?;
            // Larger pages are capped, as gRPC caps them.
            convert::page_size(i32::try_from(size).unwrap_or(i32::MAX))?
        }
    };
    let (records, next) = rest
        .keys
        .list(
            account,
            query.page_token.as_deref().unwrap_or_default(),
            limit,
            None,
        )
        .await?;
    let now = now();
    let result = records
        .iter()
        .map(|record| KeyListed::of(record, rest.keys.last_used(record), now))
        .collect();
    let reply = ListReply {
        result,
        next_page_token: (!next.is_empty()).then_some(next),
    };
    Ok(axum::Json(reply).into_response())
}

/// Read one key: its scopes and lifecycle state.
#[utoipa::path(get, path = "/v3/api_keys/{api_key_id}", tag = "api_keys",
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key, as a one-element list (SendGrid's shape)", body = ReadReply),
        (status = 400, description = "The id is malformed", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.read`", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn read(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
) -> Result<Response, Problem> {
    rest.keys.permit(&principal, Operation::Read)?;
    let id = convert::key_id(&id)?;
    rest.confine(&principal, &headers, &id).await?;
    let record = rest.keys.get(&principal, &id).await?;
    let reply = ReadReply {
        result: vec![rest.detail(&record)],
    };
    Ok(axum::Json(reply).into_response())
}

/// Replace a key's name and every scope (PUT semantics).
#[utoipa::path(put, path = "/v3/api_keys/{api_key_id}", tag = "api_keys", request_body = ReplaceBody,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 400, description = "A field is invalid (named in `field`)", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update` or asks for more than it holds", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn replace(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let (rest, principal) = (&rest, &principal);
    let record = rest
        .on_key(
            (principal, &headers),
            ("update", Operation::Update),
            &id,
            |id| async move {
                let request: ReplaceBody = body(&bytes)?;
                let name = rest.access.name(&request.name)?;
                let grant =
                    rest.grant(request.scopes.as_deref())?
                        .ok_or_else(|| KeyError::Invalid {
                            field: "scopes",
                            problem:
                                "required: PUT replaces every scope (PATCH changes only the name)"
                                    .into(),
                        })?;
                let (before, record) = rest.keys.update(principal, &id, name, Some(grant)).await?;
                audit::changed(principal, "update", Some(&before), &record);
                Ok(record)
            },
        )
        .await?;
    Ok(axum::Json(rest.detail(&record)).into_response())
}

/// Rename a key (PATCH: its scopes stay).
#[utoipa::path(patch, path = "/v3/api_keys/{api_key_id}", tag = "api_keys", request_body = RenameBody,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key's name and id", body = KeySummary),
        (status = 400, description = "The name is invalid", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update`", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn rename(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let (rest, principal) = (&rest, &principal);
    let record = rest
        .on_key(
            (principal, &headers),
            ("rename", Operation::Update),
            &id,
            |id| async move {
                let request: RenameBody = body(&bytes)?;
                let name = rest.access.name(&request.name)?;
                let (before, record) = rest.keys.update(principal, &id, name, None).await?;
                audit::changed(principal, "rename", Some(&before), &record);
                Ok(record)
            },
        )
        .await?;
    Ok(axum::Json(KeySummary::of(&record)).into_response())
}

/// Delete (revoke) a key: the very next decision refuses it.
#[utoipa::path(delete, path = "/v3/api_keys/{api_key_id}", tag = "api_keys",
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "The id is malformed", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.delete`", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn delete(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
) -> Result<Response, Problem> {
    let (rest, principal) = (&rest, &principal);
    rest.on_key(
        (principal, &headers),
        ("delete", Operation::Delete),
        &id,
        |id| async move {
            let record = rest.keys.delete(principal, &id).await?;
            audit::changed(principal, "delete", Some(&record), &record);
            Ok(())
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// --- keyward's lifecycle actions --------------------------------------------------

/// Disable a key: every decision refuses it until it is enabled again.
#[utoipa::path(post, path = "/v3/api_keys/{api_key_id}/disable", tag = "lifecycle",
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed (its id and name only, to a caller without `api_keys.read`)", body = KeyDetail),
        (status = 403, description = "The caller lacks `api_keys.update`", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn disable(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
) -> Result<Response, Problem> {
    rest.set_disabled((&principal, &headers), &id, true).await
}

/// Enable a disabled key (one the admin disabled only the admin can).
#[utoipa::path(post, path = "/v3/api_keys/{api_key_id}/enable", tag = "lifecycle",
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 403, description = "The caller lacks `api_keys.update`, or the admin disabled the key", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn enable(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
) -> Result<Response, Problem> {
    rest.set_disabled((&principal, &headers), &id, false).await
}

/// Rotate a key's secret: the new one is in this reply only; the previous
/// one keeps working for `overlap_seconds`.
#[utoipa::path(post, path = "/v3/api_keys/{api_key_id}/rotate", tag = "lifecycle",
    request_body(content = Option<RotateBody>, description = "Optional: an empty body is no overlap"),
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "Rotated; `api_key` is the new secret, shown once", body = RotatedKey),
        (status = 400, description = "`overlap_seconds` is out of range", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update` and `api_keys.create`, or the key is less restricted than the caller", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn rotate(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let (rest, principal) = (&rest, &principal);
    let (record, secret) = rest
        .on_key(
            (principal, &headers),
            ("rotate", Operation::Rotate),
            &id,
            |id| async move {
                let request: RotateBody = body_or_default(&bytes)?;
                let seconds = i64::try_from(request.overlap_seconds).unwrap_or(i64::MAX);
                let overlap = convert::overlap(Some(&prost_types::Duration { seconds, nanos: 0 }))?;
                let (before, record, secret) = rest.keys.rotate(principal, &id, overlap).await?;
                audit::changed(principal, "rotate", Some(&before), &record);
                Ok((record, secret))
            },
        )
        .await?;
    let reply = RotatedKey {
        api_key: secret,
        api_key_id: record.id.to_string(),
        previous_secret_valid_until: record
            .access
            .previous_open_at(now())
            .map(|at| at.div_euclid(1_000_000_000)),
        name: record.name,
    };
    Ok(axum::Json(reply).into_response())
}

/// Set or clear when a key stops working.
#[utoipa::path(put, path = "/v3/api_keys/{api_key_id}/expiry", tag = "lifecycle", request_body = ExpiryBody,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 400, description = "`expires_at` is not in the future", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update`, or would make the key outlive the calling key", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn set_expiry(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let state = || {
        let request: ExpiryBody = body(&bytes)?;
        let at = request
            .expires_at
            .required("expires_at", "a time in Unix seconds, or null for never")?;
        Ok(StateChange {
            expires_at: Some(expires_at(at)?.map_or(Expiry::Never, Expiry::At)),
            ..StateChange::default()
        })
    };
    rest.set_state((&principal, &headers), "set_expiry", &id, state)
        .await
}

/// Replace the addresses a key works from (empty: any).
#[utoipa::path(put, path = "/v3/api_keys/{api_key_id}/allowlist", tag = "lifecycle", request_body = AllowlistBody,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 400, description = "A range is invalid", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update`, or would allow addresses the calling key is not allowed", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn set_allowlist(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let state = || {
        let request: AllowlistBody = body(&bytes)?;
        Ok(StateChange {
            allowed_cidrs: Some(rest.access.allowed_cidrs(&request.allowed_cidrs)?),
            ..StateChange::default()
        })
    };
    rest.set_state((&principal, &headers), "set_allowlist", &id, state)
        .await
}

/// Set or remove a key's rate limit.
#[utoipa::path(put, path = "/v3/api_keys/{api_key_id}/rate_limit", tag = "lifecycle", request_body = RateLimitChange,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 400, description = "A limit field is out of range", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update`, or would loosen the limit beyond the calling key's", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn set_rate_limit(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let state = || {
        let request: RateLimitChange = body(&bytes)?;
        let limit = request
            .rate_limit
            .required("rate_limit", "a limit, or null for none")?;
        Ok(StateChange {
            rate_limit: Some(rate_limit(limit)?),
            ..StateChange::default()
        })
    };
    rest.set_state((&principal, &headers), "set_rate_limit", &id, state)
        .await
}

// --- scopes -------------------------------------------------------------------------

/// The calling credential's own scopes (SendGrid's), and who it is.
#[utoipa::path(get, path = "/v3/scopes", tag = "scopes",
    responses((status = 200, description = "The caller's scopes", body = ScopesReply)))]
async fn scopes(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, Problem> {
    let scopes = rest
        .keys
        .catalog()
        .names(&rest.keys.held_scopes(&principal));
    let reply = match &principal {
        Principal::Admin => ScopesReply {
            scopes,
            credential: "admin",
            account: None,
            api_key_id: None,
        },
        Principal::Key { id, account, .. } => ScopesReply {
            scopes,
            credential: "api_key",
            account: Some(account.to_string()),
            api_key_id: Some(id.to_string()),
        },
    };
    Ok(axum::Json(reply).into_response())
}

/// Every category a key can be granted, with its levels and scopes.
#[utoipa::path(get, path = "/v3/scopes/catalog", tag = "scopes",
    responses((status = 200, description = "The catalog", body = CatalogReply)))]
async fn catalog(State(rest): State<Rest>) -> Result<Response, Problem> {
    Ok(axum::Json(CatalogReply::of(rest.keys.catalog())).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every documented route and method has its requirement, so none is
    /// refused for want of one, and none reads a body before its check.
    #[test]
    fn every_route_states_what_it_requires() {
        let (_, document) = routes();
        let mut seen = 0;
        for (path, item) in &document.paths.paths {
            for (method, operation) in [
                (axum::http::Method::GET, &item.get),
                (axum::http::Method::POST, &item.post),
                (axum::http::Method::PUT, &item.put),
                (axum::http::Method::PATCH, &item.patch),
                (axum::http::Method::DELETE, &item.delete),
            ] {
                if operation.is_some() {
                    seen += 1;
                    assert!(required(&method, path).is_some(), "{method} {path}");
                }
            }
        }
        assert_eq!(seen, 14, "every route was looked at");
    }
}
