//! The read path, and the one decision function every adapter calls:
//! key → index → constant-time verify → route mask → AND → [`Decision`].

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::{self, NEVER};
use crate::domain::decision::{Decision, DenyReason};
use crate::domain::key::{KeyId, PresentedKey};
use crate::domain::path::canonical_path;
use crate::domain::route::{Method, RouteMiss, RouteTable};
use crate::keys::demand::{Lookup, OnDemand};
use crate::store::index::{Entry, Index, Rejected, Verified};

/// Fetches of one first sight a decision makes (see
/// [`Authorizer::decide_fetching`]).
const FIRST_SIGHT_ATTEMPTS: usize = 2;

/// Decides requests. Synchronous, allocation-free, never touches disk.
/// On an on-demand replica, a key the index does not hold is fetched
/// first ([`Self::decide_fetching`]); every other decision is the same.
#[derive(Debug, Clone)]
pub struct Authorizer {
    index: Arc<Index>,
    routes: Arc<RouteTable>,
    demand: Option<Arc<OnDemand>>,
}

impl Authorizer {
    /// An authorizer over the live index and a compiled route table.
    #[must_use]
    pub fn new(index: Arc<Index>, routes: Arc<RouteTable>) -> Self {
        Self {
            index,
            routes,
            demand: None,
        }
    }

    /// The same, over an on-demand replica's index: keys it does not hold
    /// are fetched through `demand` at their first sight.
    #[must_use]
    pub fn with_on_demand(mut self, demand: Option<Arc<OnDemand>>) -> Self {
        self.demand = demand;
        self
    }

    /// [`Self::decide`], fetching the key first if this is an on-demand
    /// replica that does not hold it. A held key (every key of a full
    /// replica) is decided with no await: the same path as `decide`.
    pub async fn decide_fetching(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let mut decision = self.decide(credential, client, method, path);
        // Twice at most: a key fetched can be evicted again before it is
        // read only when the held set churns faster than a fetch.
        for _ in 0..FIRST_SIGHT_ATTEMPTS {
            let Some((demand, id)) =
                self.first_sight(decision.deny, decision.wrong_secret, decision.key_id)
            else {
                return decision;
            };
            match demand.lookup(id).await {
                Lookup::Held => decision = self.decide(credential, client, method, path),
                Lookup::Absent => return decision,
                Lookup::Unverifiable => break,
            }
        }
        match self.first_sight(decision.deny, decision.wrong_secret, decision.key_id) {
            Some((_, id)) => AuthFailure::new(DenyReason::KeyUnverifiable, Some(id)).decision(),
            None => decision,
        }
    }

    /// [`Self::authenticate`], fetching the key first as
    /// [`Self::decide_fetching`] does.
    pub async fn authenticate_fetching(
        &self,
        credential: &str,
        client: Option<IpAddr>,
    ) -> Result<Verified, AuthFailure> {
        let mut verified = self.authenticate(credential, client);
        for _ in 0..FIRST_SIGHT_ATTEMPTS {
            let Some((demand, id)) = self.first_sight_of(&verified) else {
                return verified;
            };
            match demand.lookup(id).await {
                Lookup::Held => verified = self.authenticate(credential, client),
                Lookup::Absent => return verified,
                Lookup::Unverifiable => break,
            }
        }
        match self.first_sight_of(&verified) {
            Some((_, id)) => Err(AuthFailure::new(DenyReason::KeyUnverifiable, Some(id))),
            None => verified,
        }
    }

    fn first_sight_of(
        &self,
        verified: &Result<Verified, AuthFailure>,
    ) -> Option<(&OnDemand, KeyId)> {
        let failure = verified.as_ref().err()?;
        self.first_sight(Some(failure.reason), failure.wrong_secret, failure.key_id)
    }

    /// A well-formed key id the index does not hold, on an on-demand
    /// replica (a wrong secret for a held key is not a first sight).
    fn first_sight(
        &self,
        deny: Option<DenyReason>,
        wrong_secret: bool,
        id: Option<KeyId>,
    ) -> Option<(&OnDemand, KeyId)> {
        match (&self.demand, deny, id) {
            (Some(demand), Some(DenyReason::UnknownKey), Some(id)) if !wrong_secret => {
                Some((demand, id))
            }
            _ => None,
        }
    }

    /// Verifies a credential as an API key, for a caller at `client`:
    /// `Bearer <key>` or a bare key. In order: format, id, secret, disabled,
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
        let entry = usable(index.verify(&presented, now), presented.id, now)?;
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
    /// route and scopes, rate limit; then an allowed request counts as the
    /// key's last use.
    #[must_use]
    pub fn decide(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let presented = match parse(credential) {
            Ok(presented) => presented,
            Err(failure) => return failure.decision(),
        };
        // The cached clock (an atomic load, see `recent_now_nanos`) serves
        // expiry, the rate limit and last-used alike.
        let now = clock::recent_now_nanos();
        let index = self.index.pin();
        let entry = match usable(index.verify(&presented, now), presented.id, now) {
            Ok(entry) => entry,
            Err(failure) => return failure.decision(),
        };
        let mut decision = Decision::for_key(presented.id, Arc::clone(&entry.account));
        if let Err(reason) = self.permits(entry, client, method, path, &mut decision) {
            decision.deny = Some(reason);
            return decision;
        }
        // Last: only a request that would otherwise pass spends quota.
        if let Some(limit) = &entry.limit {
            match limit.admit(&entry.usage.tat, now) {
                Ok(quota) => decision.quota = Some(quota),
                Err(quota) => {
                    decision.quota = Some(quota);
                    decision.deny = Some(DenyReason::RateLimited);
                    return decision;
                }
            }
        }
        entry.usage.touch(now);
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
    })?;
    if entry.disabled {
        return Err(AuthFailure::new(DenyReason::KeyDisabled, Some(id)));
    }
    if entry.expires_at != NEVER && entry.expires_at <= now {
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
}

impl AuthFailure {
    fn new(reason: DenyReason, key_id: Option<KeyId>) -> Self {
        Self {
            reason,
            key_id,
            wrong_secret: false,
        }
    }

    fn decision(self) -> Decision {
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
