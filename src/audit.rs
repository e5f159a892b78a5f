//! The audit log (target `keyward::audit`): one event for every key change
//! and every refused change, whichever front door (gRPC or REST) it came
//! through. Never a secret.

use crate::keys::{KeyError, Principal};
use crate::store::record::{self, KeyRecord};

/// An acknowledged change: who, what (operation, key, scope diff, name),
/// when (the event's timestamp), result.
pub fn changed(
    principal: &Principal,
    operation: &str,
    before: Option<&KeyRecord>,
    after: &KeyRecord,
) {
    let had = |scope: &String| before.is_some_and(|b| b.scopes.contains(scope));
    let (added, removed): (Vec<&String>, Vec<&String>) = if operation == "delete" {
        (Vec::new(), after.scopes.iter().collect())
    } else {
        (
            after.scopes.iter().filter(|s| !had(s)).collect(),
            before.map_or_else(Vec::new, |b| {
                b.scopes
                    .iter()
                    .filter(|s| !after.scopes.contains(s))
                    .collect()
            }),
        )
    };
    tracing::info!(
        target: "keyward::audit",
        actor = %principal.label(),
        operation,
        key_id = %key_id(after),
        account = %after.account_id,
        name = %after.name,
        name_before = before.map(|b| b.name.as_str()).filter(|n| *n != after.name),
        scopes_added = ?added,
        scopes_removed = ?removed,
        enabled = !after.disabled,
        expires_at_unix = (after.expires_at_unix_nanos != 0)
            .then(|| after.expires_at_unix_nanos.div_euclid(1_000_000_000)),
        allowed_cidrs = ?after.allowed_cidrs,
        rate_limit = (after.rate_requests != 0).then(|| format!(
            "{}/{}ms burst {}",
            after.rate_requests,
            after.rate_period_nanos / 1_000_000,
            after.rate_burst
        )),
        rotated = before.is_some_and(|b| b.secret_sha256 != after.secret_sha256),
        result = "ok",
    );
}

/// A refused change, with why.
pub fn refused(principal: &Principal, operation: &str, error: &KeyError) {
    tracing::info!(
        target: "keyward::audit",
        actor = %principal.label(),
        operation,
        error = %error,
        result = "refused",
    );
}

/// A record's key id as text (empty for a record too broken to have one).
#[must_use]
pub fn key_id(record: &KeyRecord) -> String {
    record::key_id(record)
        .map(|id| id.to_string())
        .unwrap_or_default()
}
