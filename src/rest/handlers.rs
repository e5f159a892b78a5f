//! The REST handlers and their OpenAPI descriptions. Each route is
//! registered with `routes!`, which takes its path and method from the
//! handler's `#[utoipa::path]`: the document and the router are one list.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::input::{KeyIdPath, credits, grant, rate_limit, time};
use super::shapes::{
    AllowlistBody, CatalogReply, CreateBody, CreatedKey, CreditsChange, ErrorReply, ExpiryBody,
    KeyDetail, KeyListed, KeySummary, ListReply, RateLimitChange, ReadReply, RenameBody,
    ReplaceBody, RotateBody, RotatedKey, ScopesReply,
};
use super::{ON_BEHALF_OF, Problem, Rest, body, body_or_default};
use crate::domain::record::KeyRecord;
use crate::keys::{KeyError, Principal};
use crate::manage::{Action, NewKey, PageRequest, Replacement};

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
        .routes(routes!(set_credits))
        .routes(routes!(super::usage::usage))
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
    /// A change: the action's scopes, a refusal audited under its label.
    Change(Action),
}

/// What the route `template` (as matched) asks of its caller for `method`;
/// `None` for a route this table does not know, which is refused (a test
/// checks that every documented route is here). Kept next to
/// [`operations`] so that a new route is added to both.
pub(super) fn required(method: &axum::http::Method, template: &str) -> Option<Required> {
    use axum::http::Method;
    let read = *method == Method::GET || *method == Method::HEAD;
    let change = |action| Some(Required::Change(action));
    match (template, method) {
        ("/v3/scopes" | "/v3/scopes/catalog", _) if read => Some(Required::Credential),
        ("/v3/api_keys" | "/v3/api_keys/{api_key_id}" | "/v3/api_keys/{api_key_id}/usage", _)
            if read =>
        {
            Some(Required::Read)
        }
        ("/v3/api_keys", &Method::POST) => change(Action::Create),
        ("/v3/api_keys/{api_key_id}", &Method::PUT) => change(Action::Update),
        ("/v3/api_keys/{api_key_id}", &Method::PATCH) => change(Action::Rename),
        ("/v3/api_keys/{api_key_id}", &Method::DELETE) => change(Action::Delete),
        ("/v3/api_keys/{api_key_id}/disable", &Method::POST) => change(Action::Disable),
        ("/v3/api_keys/{api_key_id}/enable", &Method::POST) => change(Action::Enable),
        ("/v3/api_keys/{api_key_id}/rotate", &Method::POST) => change(Action::Rotate),
        ("/v3/api_keys/{api_key_id}/expiry", &Method::PUT) => change(Action::SetExpiry),
        ("/v3/api_keys/{api_key_id}/allowlist", &Method::PUT) => change(Action::SetAllowlist),
        ("/v3/api_keys/{api_key_id}/rate_limit", &Method::PUT) => change(Action::SetRateLimit),
        ("/v3/api_keys/{api_key_id}/credits", &Method::PUT) => change(Action::SetCredits),
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
        (name = "lifecycle", description = "keyward: disable, enable, rotate, expiry, allowlist, rate limit, credits, usage"),
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
        KeyDetail::of(record, self.manager.last_used(record), now())
    }

    /// A changed key as its changer may see it: all of it to a caller that
    /// could read the key anyway, else SendGrid's PATCH answer.
    fn shown_to(&self, principal: &Principal, record: &KeyRecord) -> Response {
        if self.manager.may_read(principal) {
            axum::Json(self.detail(record)).into_response()
        } else {
            axum::Json(KeySummary::of(record)).into_response()
        }
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
    let key = body(&bytes).map(|request: CreateBody| NewKey {
        name: request.name,
        grant: grant(request.scopes),
        expires_at: time(request.expires_at),
        allowed_cidrs: request.allowed_cidrs.unwrap_or_default(),
        rate_limit: rate_limit(request.rate_limit),
        credits: credits(request.credits),
    });
    let (record, secret) = rest
        .manager
        .create(&principal, Rest::named_account(&headers), key)
        .await?;
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
    let page = page(query.as_deref().unwrap_or_default());
    let (records, next) = rest
        .manager
        .list(&principal, Rest::named_account(&headers), page)
        .await?;
    let now = now();
    let result = records
        .iter()
        .map(|record| KeyListed::of(record, rest.manager.last_used(record), now))
        .collect();
    let reply = ListReply {
        result,
        next_page_token: (!next.is_empty()).then_some(next),
    };
    Ok(axum::Json(reply).into_response())
}

/// The page a listing's query asks for.
fn page(query: &str) -> Result<PageRequest, KeyError> {
    let query: ListQuery = super::input::query(query)?;
    let size = match query.limit {
        None => 0,
        Some(text) => {
            text.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| KeyError::Invalid {
                    field: "limit",
                    problem: "must be a positive integer".into(),
                })?
        }
    };
    Ok(PageRequest {
        token: query.page_token.unwrap_or_default(),
        // Larger pages are capped, as gRPC caps them.
        size: i64::try_from(size).unwrap_or(i64::MAX),
        unused_for: None,
    })
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
    let record = rest
        .manager
        .get(&principal, &id, Rest::named_account(&headers))
        .await?;
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
    let replacement = body(&bytes).map(|request: ReplaceBody| Replacement {
        name: request.name,
        grant: grant(request.scopes),
        grant_required: "required: PUT replaces every scope (PATCH changes only the name)",
    });
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.update(&principal, key, replacement).await?;
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
    let name = body(&bytes).map(|request: RenameBody| request.name);
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.rename(&principal, key, name).await?;
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
    let key = (id.as_str(), Rest::named_account(&headers));
    rest.manager.delete(&principal, key).await?;
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
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_disabled(&principal, key, true).await?;
    Ok(rest.shown_to(&principal, &record))
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
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_disabled(&principal, key, false).await?;
    Ok(rest.shown_to(&principal, &record))
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
    let overlap = body_or_default(&bytes)
        .map(|request: RotateBody| Some(Some(Duration::from_secs(request.overlap_seconds))));
    let key = (id.as_str(), Rest::named_account(&headers));
    let (record, secret) = rest.manager.rotate(&principal, key, overlap).await?;
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
    let at = body(&bytes).and_then(|request: ExpiryBody| {
        let at = request
            .expires_at
            .required("expires_at", "a time in Unix seconds, or null for never")?;
        Ok(time(at))
    });
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_expiry(&principal, key, at).await?;
    Ok(rest.shown_to(&principal, &record))
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
    let cidrs = body(&bytes).map(|request: AllowlistBody| request.allowed_cidrs);
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_allowlist(&principal, key, cidrs).await?;
    Ok(rest.shown_to(&principal, &record))
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
    let limit = body(&bytes).and_then(|request: RateLimitChange| {
        let limit = request
            .rate_limit
            .required("rate_limit", "a limit, or null for none")?;
        Ok(rate_limit(limit))
    });
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_rate_limit(&principal, key, limit).await?;
    Ok(rest.shown_to(&principal, &record))
}

/// Set or remove a key's usage credits.
#[utoipa::path(put, path = "/v3/api_keys/{api_key_id}/credits", tag = "lifecycle", request_body = CreditsChange,
    params(("api_key_id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "The key as changed", body = KeyDetail),
        (status = 400, description = "A credits field is out of range", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.update`, or would give more credits than the key had or the calling key has left", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
    ))]
async fn set_credits(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let given = body(&bytes).and_then(|request: CreditsChange| {
        let given = request
            .credits
            .required("credits", "credits, or null for none")?;
        Ok(credits(given))
    });
    let key = (id.as_str(), Rest::named_account(&headers));
    let record = rest.manager.set_credits(&principal, key, given).await?;
    Ok(rest.shown_to(&principal, &record))
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
        .manager
        .catalog()
        .names(&rest.manager.held_scopes(&principal));
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
    Ok(axum::Json(CatalogReply::of(rest.manager.catalog())).into_response())
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
        assert_eq!(seen, 16, "every route was looked at");
    }
}
