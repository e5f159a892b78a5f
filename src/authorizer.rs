//! The read path, and the one decision function every adapter calls:
//! key → index → constant-time verify → route mask → AND → [`Decision`].

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::{self, NEVER};
use crate::domain::decision::{Decision, DenyReason};
use crate::domain::key::{KeyId, PresentedKey};
use crate::domain::path::canonical_path;
use crate::domain::route::{Method, RouteMiss, RouteTable};
use crate::store::index::{Index, Rejected, Verified};

/// Decides requests. Synchronous, allocation-free, never touches disk.
#[derive(Debug, Clone)]
pub struct Authorizer {
    index: Arc<Index>,
    routes: Arc<RouteTable>,
}

impl Authorizer {
    /// An authorizer over the live index and a compiled route table.
    #[must_use]
    pub fn new(index: Arc<Index>, routes: Arc<RouteTable>) -> Self {
        Self { index, routes }
    }

    /// Verifies a credential as an API key: `Bearer <key>` or a bare key.
    /// In order: format, id, secret, disabled, expired. (The address
    /// allowlist is for decisions: see [`Self::decide`].)
    pub fn authenticate(&self, credential: &str) -> Result<Verified, AuthFailure> {
        self.authenticate_from(credential, None)
    }

    fn authenticate_from(
        &self,
        credential: &str,
        client: Option<IpAddr>,
    ) -> Result<Verified, AuthFailure> {
        let key = bearer_credential(credential);
        if key.is_empty() {
            return Err(AuthFailure::new(DenyReason::MissingKey, None));
        }
        let presented = PresentedKey::parse(key)
            .map_err(|_| AuthFailure::new(DenyReason::MalformedKey, None))?;
        let verified = self
            .index
            .verify(&presented, client)
            .map_err(|rejected| AuthFailure {
                reason: DenyReason::UnknownKey,
                key_id: Some(presented.id),
                wrong_secret: rejected == Rejected::WrongSecret,
            })?;
        // After the secret, so only the key's holder learns its state.
        if verified.disabled {
            return Err(AuthFailure::new(
                DenyReason::KeyDisabled,
                Some(presented.id),
            ));
        }
        // The clock is read only for keys that expire, and from the cached
        // time (see `recent_now_nanos`).
        if verified.expires_at != NEVER && verified.expires_at <= clock::recent_now_nanos() {
            return Err(AuthFailure::new(DenyReason::KeyExpired, Some(presented.id)));
        }
        Ok(verified)
    }

    /// Decides one request from `client` (when known). `method` is `None`
    /// for a valid HTTP method no route can name. The key is checked first,
    /// so an unauthenticated caller learns nothing about which routes exist.
    /// Order: key format, id, secret, disabled, expired, address, path,
    /// route and scopes.
    #[must_use]
    pub fn decide(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let verified = match self.authenticate_from(credential, client) {
            Ok(verified) => verified,
            Err(failure) => {
                let mut decision = Decision::denied(failure.reason);
                decision.key_id = failure.key_id;
                decision.wrong_secret = failure.wrong_secret;
                return decision;
            }
        };
        let address_allowed = verified.address_allowed;
        let mut decision = Decision::for_key(verified.id, verified.account);
        if !address_allowed {
            decision.deny = Some(DenyReason::IpNotAllowed);
            return decision;
        }
        let Ok(path) = canonical_path(path) else {
            decision.deny = Some(DenyReason::AmbiguousPath);
            return decision;
        };
        let required = match method.map(|m| self.routes.required(m, path)) {
            Some(Ok(required)) => required,
            Some(Err(RouteMiss::Ambiguous)) => {
                decision.deny = Some(DenyReason::AmbiguousPath);
                return decision;
            }
            None | Some(Err(RouteMiss::Unknown)) => {
                decision.deny = Some(DenyReason::UnknownRoute);
                return decision;
            }
        };
        decision.required = *required;
        if !verified.scopes.covers(required) {
            decision.missing = verified.scopes.missing(required);
            decision.deny = Some(DenyReason::InsufficientScope);
        }
        decision
    }
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
