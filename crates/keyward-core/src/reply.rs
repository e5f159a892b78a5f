//! What a gateway answers for a decision, the same from every gateway
//! (Envoy's ext_authz through the sidecar, and the Envoy module): the HTTP
//! status, SendGrid's error body, and the headers that go with it.

use crate::domain::catalog::Catalog;
use crate::domain::decision::{Decision, DenyReason, UNAVAILABLE_RETRY_MS};

/// Header carrying the verified key id to the upstream.
pub const KEY_ID_HEADER: &str = "x-keyward-key-id";
/// Header carrying the verified account id to the upstream.
pub const ACCOUNT_ID_HEADER: &str = "x-keyward-account-id";
/// On a scope deny: the scopes the key lacks, comma-separated (as GitHub's
/// `x-accepted-github-permissions` tells clients what to fix).
pub const MISSING_SCOPES_HEADER: &str = "x-keyward-missing-scopes";
/// On a deny: the machine-readable reason.
pub const DENY_REASON_HEADER: &str = "x-keyward-deny-reason";

/// A local reply: a refused request never reaches the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// Headers besides `content-type` (always `application/json`).
    pub headers: Vec<(&'static str, String)>,
    /// SendGrid's error body.
    pub body: String,
}

/// The human message for a decision, the same through every front door:
/// the reason, and for a scope deny the scopes missing.
#[must_use]
pub fn message(decision: &Decision, missing: &[String]) -> String {
    match decision.deny {
        None => String::new(),
        Some(reason @ DenyReason::InsufficientScope) => {
            format!("{}: {}", reason.message(), missing.join(", "))
        }
        Some(reason) => reason.message().to_owned(),
    }
}

/// The reply to a denied decision (scopes named from `catalog`).
#[must_use]
pub fn denied(decision: &Decision, catalog: &Catalog) -> Reply {
    let reason = decision.deny.unwrap_or(DenyReason::UnknownRoute);
    let mut headers = vec![(DENY_REASON_HEADER, reason.label().to_owned())];
    let mut text = reason.message().to_owned();
    match reason {
        DenyReason::MissingKey
        | DenyReason::MalformedKey
        | DenyReason::UnknownKey
        | DenyReason::KeyExpired
        | DenyReason::KeyDisabled => {
            headers.push(("www-authenticate", "Bearer realm=\"keyward\"".to_owned()));
        }
        DenyReason::InsufficientScope => {
            let missing = catalog.names(&decision.missing);
            headers.push((MISSING_SCOPES_HEADER, missing.join(", ")));
            headers.push((
                "www-authenticate",
                format!(
                    "Bearer realm=\"keyward\", error=\"insufficient_scope\", scope=\"{}\"",
                    missing.join(" ")
                ),
            ));
            text = message(decision, &missing);
        }
        DenyReason::RateLimited => headers.extend(rate_limit_headers(decision)),
        // When the key's credits come back (if a refill is coming), or a
        // second for a store that could not verify the key.
        DenyReason::CreditsExhausted | DenyReason::KeyUnverifiable => {
            if let Some(wait) = decision.retry_after_ms() {
                headers.push(("retry-after", seconds(wait)));
            }
        }
        DenyReason::UnknownRoute | DenyReason::AmbiguousPath | DenyReason::IpNotAllowed => {}
    }
    Reply {
        status: reason.http_status(),
        headers,
        body: error_body(&text, Some(reason.label())),
    }
}

/// The reply to a request that cannot be decided at all (400).
#[must_use]
pub fn invalid(problem: &str) -> Reply {
    Reply {
        status: 400,
        headers: Vec::new(),
        body: error_body(problem, None),
    }
}

/// A reply refusing every request for `reason` when there is nothing to
/// decide with (a copy that has not synced): 503, the reason's message.
#[must_use]
pub fn unavailable(problem: &str, reason: &str) -> Reply {
    Reply {
        status: 503,
        headers: vec![
            (DENY_REASON_HEADER, reason.to_owned()),
            ("retry-after", seconds(UNAVAILABLE_RETRY_MS)),
        ],
        body: error_body(problem, Some(reason)),
    }
}

/// A wait in whole seconds, rounded up, as `retry-after` and
/// `x-ratelimit-reset` say it.
fn seconds(millis: u32) -> String {
    millis.div_ceil(1000).to_string()
}

/// SendGrid's error body (plus keyward's `reason`, when the request was
/// decided).
#[must_use]
pub fn error_body(message: &str, reason: Option<&str>) -> String {
    let body = match reason {
        Some(reason) => serde_json::json!({
            "errors": [{ "field": null, "message": message, "reason": reason }]
        }),
        None => serde_json::json!({ "errors": [{ "field": null, "message": message }] }),
    };
    body.to_string()
}

/// The identity headers an allowed request carries to the upstream
/// (overwriting any the client sent: a client must not smuggle its own).
#[must_use]
pub fn identity_headers(decision: &Decision) -> [(&'static str, String); 2] {
    [
        (
            KEY_ID_HEADER,
            decision.key_id.map(|id| id.to_string()).unwrap_or_default(),
        ),
        (
            ACCOUNT_ID_HEADER,
            decision.account.as_deref().unwrap_or_default().to_owned(),
        ),
    ]
}

/// `x-ratelimit-limit`, `-remaining`, `-reset` (seconds until the full
/// burst is back), and on a refusal `retry-after` (seconds), for a key with
/// a rate limit. Seconds round up, so a client that waits them succeeds.
#[must_use]
pub fn rate_limit_headers(decision: &Decision) -> Vec<(&'static str, String)> {
    let Some(quota) = decision.quota else {
        return Vec::new();
    };
    let mut headers = vec![
        ("x-ratelimit-limit", quota.limit.to_string()),
        ("x-ratelimit-remaining", quota.remaining.to_string()),
        ("x-ratelimit-reset", seconds(quota.reset_ms)),
    ];
    if decision.deny == Some(DenyReason::RateLimited) {
        headers.push(("retry-after", seconds(quota.retry_after_ms.max(1))));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(decision: &Decision) -> Option<String> {
        denied(decision, &Catalog::sendgrid())
            .headers
            .into_iter()
            .find_map(|(name, value)| (name == "retry-after").then_some(value))
    }

    #[test]
    fn credits_exhausted_says_when_the_refill_comes_and_nothing_without_one() {
        let mut decision = Decision::denied(DenyReason::CreditsExhausted);
        assert_eq!(retry_after(&decision), None, "no refill coming");
        decision.refill_in_ms = 1_500;
        assert_eq!(decision.retry_after_ms(), Some(1_500));
        assert_eq!(retry_after(&decision).as_deref(), Some("2"), "rounded up");
        let reply = denied(&decision, &Catalog::sendgrid());
        assert_eq!(reply.status, 429);
        assert!(reply.body.contains("credits"), "{}", reply.body);
    }

    #[test]
    fn every_503_says_to_retry_after_a_second() {
        let decision = Decision::denied(DenyReason::KeyUnverifiable);
        assert_eq!(retry_after(&decision).as_deref(), Some("1"));
        let reply = unavailable("keyward is not ready; retry later", "not_synced");
        assert_eq!(reply.status, 503);
        assert!(reply.headers.contains(&("retry-after", "1".to_owned())));
    }
}
