//! `GET /v3/api_keys/{api_key_id}/usage`: a key's usage, summed over every
//! sidecar sharing the usage store.

use axum::extract::{Extension, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::input::KeyIdPath;
use super::shapes::ErrorReply;
use super::{Problem, Rest};
use crate::keys::Principal;
use crate::usage::KeyUsage;

/// The query of a usage read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct UsageQuery {
    /// `1h` (the default: the last hour by minute), `24h`, `7d` or `30d`
    /// (by hour).
    range: Option<String>,
}

/// A key's usage: requests allowed and denied (denied by reason), as
/// totals and a series with every bucket.
#[utoipa::path(get, path = "/v3/api_keys/{api_key_id}/usage", tag = "lifecycle",
    params(("api_key_id" = String, Path, description = "The key's id"), UsageQuery),
    responses(
        (status = 200, description = "The key's usage over the range, summed over every sidecar", body = KeyUsage),
        (status = 400, description = "The id or the range is malformed; or a replica without a usage store (--usage-store), which keeps no usage", body = ErrorReply),
        (status = 403, description = "The caller lacks `api_keys.read`", body = ErrorReply),
        (status = 404, description = "No such key in the caller's account", body = ErrorReply),
        (status = 503, description = "The usage store is not answering", body = ErrorReply),
    ))]
pub(super) async fn usage(
    State(rest): State<Rest>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    KeyIdPath(id): KeyIdPath,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let range = super::input::query::<UsageQuery>(query.as_deref().unwrap_or(""))
        .map(|query| query.range.unwrap_or_default())?;
    let usage = rest
        .manager
        .usage(&principal, &id, Rest::named_account(&headers), Ok(&range))
        .await?;
    Ok(axum::Json(usage).into_response())
}
