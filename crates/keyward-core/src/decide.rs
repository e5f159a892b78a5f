//! The one decision function every front door calls (keyward's `Authorize`,
//! Envoy's ext_authz `Check`, and the Envoy module):
//! key → index → constant-time verify → route mask → AND → [`Decision`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::clock;
use crate::domain::decision::{Decision, DenyReason};
use crate::domain::key::{KeyId, PresentedKey};
use crate::domain::lease::Roster;
use crate::domain::path::canonical_path;
use crate::domain::route::{Method, RouteMiss, RouteTable};
use crate::index::{CreditsHeld, Entry, Index, Rejected, SecretUse, Verified};

/// Decides requests. Synchronous, allocation-free, never touches disk.
#[derive(Debug, Clone)]
pub struct Decider {
    index: Arc<Index>,
    routes: Arc<RouteTable>,
    /// Rate limits are global: spent from leases on a shared budget (see
    /// [`crate::domain::lease`]); otherwise each process's own.
    global_limits: Arc<AtomicBool>,
    /// Where keys spending a lease are sent to be traded, for a holder
    /// whose trader learns of them from decisions (the Envoy module).
    roster: Option<Roster>,
}

impl Decider {
    /// A decider over a live index and a compiled route table.
    #[must_use]
    pub fn new(index: Arc<Index>, routes: Arc<RouteTable>) -> Self {
        Self {
            index,
            routes,
            global_limits: Arc::default(),
            roster: None,
        }
    }

    /// The same decider, its rate limits global while `on` holds (a usage
    /// store reachable): leases are spent instead of this process's own
    /// budget.
    #[must_use]
    pub fn with_global_limits(mut self, on: Arc<AtomicBool>) -> Self {
        self.global_limits = on;
        self
    }

    /// The same decider, sending every key that spends a lease to
    /// `roster` (once, until its trader retires it).
    #[must_use]
    pub fn with_roster(mut self, roster: Roster) -> Self {
        self.roster = Some(roster);
        self
    }

    /// The index it reads.
    #[must_use]
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Verifies a credential as an API key that manages keys, for a caller
    /// at `client`: `Bearer <key>` or a bare key, its current secret only
    /// ([`SecretUse::Management`]). In order: format, id, secret, disabled,
    /// expired, address allowlist. (Routes and the rate limit are for
    /// decisions: see [`Self::decide`].)
    pub fn authenticate(
        &self,
        credential: &str,
        client: Option<IpAddr>,
    ) -> Result<Verified, AuthFailure> {
        let presented = parse(credential)?;
        let now = clock::recent_now_nanos();
        let index = self.index.pin();
        let entry = usable(
            index.verify(&presented, now, SecretUse::Management),
            presented.id,
            now,
        )?;
        if !entry.allowlist.permits(client) {
            return Err(AuthFailure::new(
                DenyReason::IpNotAllowed,
                Some(presented.id),
            ));
        }
        Ok(entry.verified(presented.id))
    }

    /// Decides one request from `client` (when known). `method` is `None`
    /// for a valid HTTP method no route can name. The key is checked first,
    /// so an unauthenticated caller learns nothing about which routes exist.
    /// Order: key format, id, secret, disabled, expired, address, path,
    /// route and scopes, credits, rate limit; then an allowed request counts as the
    /// key's last use.
    #[must_use]
    pub fn decide(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        self.decide_noting_use(credential, client, method, path).0
    }

    /// [`Self::decide`], also saying whether this decision was the key's
    /// first use in a new minute (what a copy reports back to the sidecar
    /// that keeps `last_used_at`).
    #[must_use]
    pub fn decide_noting_use(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> (Decision, bool) {
        let presented = match parse(credential) {
            Ok(presented) => presented,
            Err(failure) => return (failure.decision(), false),
        };
        // The cached clock (an atomic load, see `recent_now_nanos`) serves
        // expiry, the rate limit and last-used alike.
        let now = clock::recent_now_nanos();
        let index = self.index.pin();
        let verified = index.verify(&presented, now, SecretUse::Decision);
        let entry = match usable(verified, presented.id, now) {
            Ok(entry) => entry,
            Err(failure) => return (failure.decision(), false),
        };
        let mut decision = Decision::for_key(presented.id, Arc::clone(&entry.account));
        if let Err(reason) = self.permits(entry, client, method, path, &mut decision) {
            decision.deny = Some(reason);
            return (decision, false);
        }
        // Last: only a request that would otherwise pass spends credits or
        // quota. Credits are looked at before the rate limit (an empty
        // lease spends no rate token) and spent after it (a refused
        // request spends no credit): a credit is never given back, so no
        // race can mint one.
        let credits = entry.credits.as_ref();
        // Past the next refill the lease is void: a refill sets the
        // credits, and what the last period left must not be spent in
        // this one (the reservation that follows records the refill).
        if let Some(held) = credits
            && (now >= held.next_refill || !entry.usage.credits.has(held.period))
        {
            return (Self::no_credits(decision, held, now), false);
        }
        if let Some(limit) = &entry.limit {
            let admitted = if self.global_limits.load(Ordering::Relaxed) {
                if let Some(roster) = &self.roster {
                    entry.usage.lease.enlist(presented.id, roster);
                }
                entry.usage.lease.admit(limit, &entry.usage.tat, now)
            } else {
                limit.admit(&entry.usage.tat, now)
            };
            match admitted {
                Ok(quota) => decision.quota = Some(quota),
                Err(quota) => {
                    decision.quota = Some(quota);
                    decision.deny = Some(DenyReason::RateLimited);
                    return (decision, false);
                }
            }
        }
        if let Some(held) = credits
            && !entry.usage.credits.spend(held.period)
        {
            // Spent by another request since it was looked at: the rate
            // token taken is lost (at a lease's last credit only).
            return (Self::no_credits(decision, held, now), false);
        }
        let new_minute = entry.usage.touch(now);
        (decision, new_minute)
    }

    /// A refusal for want of credits in hand; `reservable` when the store
    /// of truth may still have some (a front door that can wait asks).
    fn no_credits(mut decision: Decision, held: &CreditsHeld, now: i64) -> Decision {
        decision.deny = Some(DenyReason::CreditsExhausted);
        decision.credits_reservable = held.reservable_at(now);
        decision.refill_in_ms = match held.next_refill {
            i64::MAX => 0,
            // Due already by this copy, not yet granted where it was asked:
            // soon, not never.
            due if due <= now => crate::domain::decision::UNAVAILABLE_RETRY_MS,
            due => crate::domain::rate::millis(due - now),
        };
        decision
    }

    /// The checks after the key: address, path, route and scopes. Fills in
    /// what the route requires and what the key lacks.
    fn permits(
        &self,
        entry: &Entry,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
        decision: &mut Decision,
    ) -> Result<(), DenyReason> {
        if !entry.allowlist.permits(client) {
            return Err(DenyReason::IpNotAllowed);
        }
        let path = canonical_path(path).map_err(|_| DenyReason::AmbiguousPath)?;
        let required = match method.map(|m| self.routes.required(m, path)) {
            Some(Ok(required)) => required,
            Some(Err(RouteMiss::Ambiguous)) => return Err(DenyReason::AmbiguousPath),
            None | Some(Err(RouteMiss::Unknown)) => return Err(DenyReason::UnknownRoute),
        };
        decision.required = *required;
        if entry.scopes.covers(required) {
            Ok(())
        } else {
            decision.missing = entry.scopes.missing(required);
            Err(DenyReason::InsufficientScope)
        }
    }
}

/// Longest path accepted; longer is a broken request, not a deny.
pub const MAX_PATH_BYTES: usize = 8192;

/// A request a front door cannot decide: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidRequest {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks what every front door takes from a request, the same way for
/// all: the method, and a path that is present and not over
/// [`MAX_PATH_BYTES`]. `Ok(None)` for a valid method no route can name.
pub fn validate<'a>(
    method: &str,
    path: &'a str,
) -> Result<(Option<Method>, &'a str), InvalidRequest> {
    let method = Method::parse(method).map_err(|e| InvalidRequest {
        field: "method",
        problem: e.to_string(),
    })?;
    if path.is_empty() {
        return Err(InvalidRequest {
            field: "path",
            problem: "required".into(),
        });
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(InvalidRequest {
            field: "path",
            problem: format!("at most {MAX_PATH_BYTES} bytes"),
        });
    }
    Ok((method, path))
}

/// The key in a credential, or why there is none.
fn parse(credential: &str) -> Result<PresentedKey<'_>, AuthFailure> {
    let key = bearer_credential(credential);
    if key.is_empty() {
        return Err(AuthFailure::new(DenyReason::MissingKey, None));
    }
    PresentedKey::parse(key).map_err(|_| AuthFailure::new(DenyReason::MalformedKey, None))
}

/// A verified key that may act: not disabled, not expired. Checked after
/// the secret, so only the key's holder learns its state.
fn usable(found: Result<&Entry, Rejected>, id: KeyId, now: i64) -> Result<&Entry, AuthFailure> {
    let entry = found.map_err(|rejected| AuthFailure {
        reason: DenyReason::UnknownKey,
        key_id: Some(id),
        wrong_secret: rejected == Rejected::WrongSecret,
        superseded: rejected == Rejected::Superseded,
    })?;
    if entry.disabled {
        return Err(AuthFailure::new(DenyReason::KeyDisabled, Some(id)));
    }
    if entry.expired_at(now) {
        return Err(AuthFailure::new(DenyReason::KeyExpired, Some(id)));
    }
    Ok(entry)
}

/// Why a credential did not authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// The deny reason to report.
    pub reason: DenyReason,
    /// The presented key id, when the key parsed.
    pub key_id: Option<KeyId>,
    /// A live key id with a wrong secret.
    pub wrong_secret: bool,
    /// A rotated key's previous secret, presented to manage keys (see
    /// [`SecretUse`]).
    pub superseded: bool,
}

impl AuthFailure {
    /// A failure for `reason`, about the key `key_id` (when it parsed).
    #[must_use]
    pub fn new(reason: DenyReason, key_id: Option<KeyId>) -> Self {
        Self {
            reason,
            key_id,
            wrong_secret: false,
            superseded: false,
        }
    }

    /// The failure as a decision.
    #[must_use]
    pub fn decision(self) -> Decision {
        let mut decision = Decision::denied(self.reason);
        decision.key_id = self.key_id;
        decision.wrong_secret = self.wrong_secret;
        decision
    }
}

/// The credential in an `Authorization` value: what follows a `Bearer `
/// scheme (any case), or the whole trimmed value when there is no scheme.
#[must_use]
pub fn bearer_credential(value: &str) -> &str {
    let value = value.trim();
    match value.split_at_checked(6) {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("bearer")
                && (rest.is_empty() || rest.starts_with([' ', '\t'])) =>
        {
            rest.trim_start()
        }
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_optional_and_case_insensitive() {
        assert_eq!(bearer_credential("Bearer SG.x"), "SG.x");
        assert_eq!(bearer_credential("bearer   SG.x "), "SG.x");
        assert_eq!(bearer_credential("SG.x"), "SG.x");
        assert_eq!(bearer_credential("  "), "");
        assert_eq!(bearer_credential("Bearer "), "");
        assert_eq!(bearer_credential("BearerSG.x"), "BearerSG.x");
        assert_eq!(bearer_credential("Basic abc"), "Basic abc");
    }
}
