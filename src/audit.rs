//! The audit log (target `keyward::audit`): one event for every key change
//! and every refused change, whichever front door (gRPC or REST) it came
//! through. Never a secret. A request that came with a valid W3C
//! `traceparent` has its `trace_id` in its audit line ([`crate::trace`]).

use crate::domain::record::KeyRecord;
use crate::keys::{KeyError, Principal};

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
    let access = &after.access;
    let trace = crate::trace::current();
    tracing::info!(
        target: "keyward::audit",
        actor = %principal.label(),
        operation,
        key_id = %after.id,
        account = %after.account,
        name = %after.name,
        name_before = before.map(|b| b.name.as_str()).filter(|n| *n != after.name),
        scopes_added = ?added,
        scopes_removed = ?removed,
        enabled = !access.disabled,
        expires_at_unix = access.limits.expires_at.map(|at| at.div_euclid(1_000_000_000)),
        allowed_cidrs = ?access.limits.allowed_cidrs,
        rate_limit = access.limits.rate_limit.map(|limit| format!(
            "{}/{}ms burst {}",
            limit.requests(),
            limit.period().as_millis(),
            limit.burst()
        )),
        credits = access.limits.credits.map(|credits| match credits.refill {
            Some(refill) => format!(
                "{} (set to {} every {}s)",
                credits.remaining,
                refill.amount(),
                refill.period().as_secs()
            ),
            None => credits.remaining.to_string(),
        }),
        rotated = before.is_some_and(|b| b.access.secret != access.secret),
        trace_id = trace.as_ref().map(crate::trace::TraceParent::trace_id),
        leaked_at_url = after.leak.as_ref().map(|leak| leak.url.as_str()),
        result = "ok",
    );
}

/// A key's secret found in public, as a verified secret scanning report
/// said, and what was done (`taken`): never the token.
pub fn leaked(after: &KeyRecord, taken: &str) {
    let leak = after.leak.as_ref();
    tracing::warn!(
        target: "keyward::audit",
        actor = "github-secret-scanning",
        operation = "leaked",
        key_id = %after.id,
        account = %after.account,
        name = %after.name,
        taken,
        url = leak.map(|leak| leak.url.as_str()),
        source = leak.map(|leak| leak.source.as_str()),
        token_type = leak.map(|leak| leak.kind.as_str()),
        previous_secret = leak.is_some_and(|leak| leak.previous_secret),
        enabled = !after.access.disabled,
        result = "ok",
    );
}

/// A refused change, with why.
pub fn refused(principal: &Principal, operation: &str, error: &KeyError) {
    let trace = crate::trace::current();
    tracing::info!(
        target: "keyward::audit",
        actor = %principal.label(),
        operation,
        error = %error,
        trace_id = trace.as_ref().map(crate::trace::TraceParent::trace_id),
        result = "refused",
    );
}

/// A backup started: every key's record (hashes, never a secret) leaves
/// the sidecar.
pub fn backup(principal: &Principal) {
    let trace = crate::trace::current();
    tracing::info!(
        target: "keyward::audit",
        actor = %principal.label(),
        operation = "backup",
        trace_id = trace.as_ref().map(crate::trace::TraceParent::trace_id),
        result = "started",
    );
}
