//! What the REST handlers take from a request: the `{api_key_id}` of a
//! path, a query string, and body values in the management service's
//! terms. Refusals are in SendGrid's error format, naming the field.

use std::time::Duration;

use super::Problem;
use super::shapes::{CreditsBody, RateLimitBody};
use crate::keys::KeyError;
use crate::manage::fields::{CreditsInput, GrantInput, RateLimitInput, UnixTime};

/// An expiry in Unix seconds.
pub(super) fn time(seconds: Option<i64>) -> Option<UnixTime> {
    seconds.map(|seconds| UnixTime { seconds, nanos: 0 })
}

/// A rate limit as the body gives it.
pub(super) fn rate_limit(limit: Option<RateLimitBody>) -> Option<RateLimitInput> {
    limit.map(|limit| RateLimitInput {
        requests: limit.requests,
        period: Some(Some(Duration::from_millis(limit.period_ms))),
        burst: limit.burst,
    })
}

/// Usage credits as the body gives them.
pub(super) fn credits(credits: Option<CreditsBody>) -> Option<CreditsInput> {
    credits.map(|credits| CreditsInput {
        remaining: credits.remaining,
        refill: credits.refill.map(|refill| {
            (
                refill.amount,
                Some(Some(Duration::from_secs(refill.period_seconds))),
            )
        }),
    })
}

/// Scopes by name, as the body gives them (SendGrid has no levels).
pub(super) fn grant(scopes: Option<Vec<String>>) -> GrantInput {
    GrantInput {
        scopes,
        access: Vec::new(),
    }
}

/// The `{api_key_id}` of a path, refused in SendGrid's error format (axum's
/// own refusal is plain text) when it is not UTF-8.
pub(super) struct KeyIdPath(pub(super) String);

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

/// A route's query string, read as `T`; refused as the field `query`.
pub(super) fn query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, KeyError> {
    serde_urlencoded::from_str(query).map_err(|e| KeyError::Invalid {
        field: "query",
        problem: e.to_string(),
    })
}
