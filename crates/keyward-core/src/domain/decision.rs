//! The outcome of one authorization: a value, never an error.

use std::sync::Arc;

use super::key::KeyId;
use super::rate::Quota;
use super::scope_set::ScopeSet;

/// Why a request was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// No key presented.
    MissingKey,
    /// The key is not `SG.<id>.<secret>`.
    MalformedKey,
    /// No live key with that id and secret.
    UnknownKey,
    /// The key lacks scopes the route requires.
    InsufficientScope,
    /// No route matches.
    UnknownRoute,
    /// The path could be read more than one way.
    AmbiguousPath,
    /// The key's expiry time has passed.
    KeyExpired,
    /// The key is disabled.
    KeyDisabled,
    /// The client's address is not in the key's allowlist (or unknown).
    IpNotAllowed,
    /// The key's rate limit is exhausted on this sidecar.
    RateLimited,
    /// An on-demand replica has never seen this key and cannot ask etcd
    /// now (etcd away, or first sights over their rate): refused, never
    /// allowed, and distinct from a key known not to exist.
    KeyUnverifiable,
    /// The key's usage credits are used up (until its next refill, if it
    /// has one).
    CreditsExhausted,
}

impl DenyReason {
    /// How many reasons there are.
    pub const COUNT: usize = 12;

    /// Every reason, in [`Self::index`] order (metrics keep one counter
    /// per reason).
    pub const ALL: [Self; Self::COUNT] = [
        Self::MissingKey,
        Self::MalformedKey,
        Self::UnknownKey,
        Self::InsufficientScope,
        Self::UnknownRoute,
        Self::AmbiguousPath,
        Self::KeyExpired,
        Self::KeyDisabled,
        Self::IpNotAllowed,
        Self::RateLimited,
        Self::KeyUnverifiable,
        Self::CreditsExhausted,
    ];

    /// The reason's place in [`Self::ALL`], below [`Self::COUNT`]. An
    /// exhaustive match: a new reason does not compile until it has one
    /// (and a compile-time check below holds `ALL` to it).
    #[must_use]
    pub const fn index(self) -> usize {
        match self {
            Self::MissingKey => 0,
            Self::MalformedKey => 1,
            Self::UnknownKey => 2,
            Self::InsufficientScope => 3,
            Self::UnknownRoute => 4,
            Self::AmbiguousPath => 5,
            Self::KeyExpired => 6,
            Self::KeyDisabled => 7,
            Self::IpNotAllowed => 8,
            Self::RateLimited => 9,
            Self::KeyUnverifiable => 10,
            Self::CreditsExhausted => 11,
        }
    }

    /// The HTTP status a gateway should answer with.
    #[must_use]
    pub fn http_status(self) -> u16 {
        match self {
            Self::MissingKey
            | Self::MalformedKey
            | Self::UnknownKey
            | Self::KeyExpired
            | Self::KeyDisabled => 401,
            Self::InsufficientScope
            | Self::UnknownRoute
            | Self::AmbiguousPath
            | Self::IpNotAllowed => 403,
            Self::RateLimited | Self::CreditsExhausted => 429,
            Self::KeyUnverifiable => 503,
        }
    }

    /// A message safe to show the client.
    #[must_use]
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingKey => "authorization required: no API key was presented",
            Self::MalformedKey => "the provided authorization grant is invalid: malformed API key",
            Self::UnknownKey => "the provided authorization grant is invalid, expired, or revoked",
            Self::InsufficientScope => "access forbidden: the API key lacks required scopes",
            Self::UnknownRoute => "access forbidden: no such route",
            Self::AmbiguousPath => "access forbidden: ambiguous request path",
            Self::KeyExpired => "the provided API key has expired",
            Self::KeyDisabled => "the provided API key is disabled",
            Self::IpNotAllowed => "access forbidden: the API key may not be used from this address",
            Self::RateLimited => "too many requests: the API key's rate limit is exhausted",
            Self::KeyUnverifiable => "the API key cannot be verified right now; retry later",
            Self::CreditsExhausted => "too many requests: the API key's usage credits are used up",
        }
    }

    /// A stable lower-case label, for logs and metrics.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::MalformedKey => "malformed_key",
            Self::UnknownKey => "unknown_key",
            Self::InsufficientScope => "insufficient_scope",
            Self::UnknownRoute => "unknown_route",
            Self::AmbiguousPath => "ambiguous_path",
            Self::KeyExpired => "key_expired",
            Self::KeyDisabled => "key_disabled",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::RateLimited => "rate_limited",
            Self::KeyUnverifiable => "key_unverifiable",
            Self::CreditsExhausted => "credits_exhausted",
        }
    }
}

// `ALL` lists each reason once, at its index.
const _: () = {
    let mut i = 0;
    while i < DenyReason::COUNT {
        assert!(DenyReason::ALL[i].index() == i);
        i += 1;
    }
};

/// How long a 503 asks a client to wait: what failed is transient (a store
/// slow or away, a copy not yet synced).
pub const UNAVAILABLE_RETRY_MS: u32 = 1_000;

/// What the authorizer decided, with everything a caller needs to explain it.
/// Holds no heap data of its own (the account is a shared `Arc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `None` when allowed.
    pub deny: Option<DenyReason>,
    /// The key's id, once the key parsed.
    pub key_id: Option<KeyId>,
    /// The key's account, once the key was verified.
    pub account: Option<Arc<str>>,
    /// What the matched route requires.
    pub required: ScopeSet,
    /// What the key lacks of `required`.
    pub missing: ScopeSet,
    /// The key id belongs to a live key but the secret was wrong (for
    /// guessing detection; the reply is the same as for an unknown key).
    pub wrong_secret: bool,
    /// For a key with a rate limit, once the request reached the limiter
    /// (allowed, or denied as rate limited): its budget.
    pub quota: Option<Quota>,
    /// Denied for credits while the store of truth still has some to
    /// reserve: this process's lease was empty (a key's first request here,
    /// or demand outran the lease). A front door that can wait asks for a
    /// reservation and decides again.
    pub credits_reservable: bool,
    /// Denied for credits: milliseconds until the key's next refill (0:
    /// none coming), its `retry-after`.
    pub refill_in_ms: u32,
}

impl Decision {
    /// Whether the request may pass.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.deny.is_none()
    }

    /// How long a client should wait before asking again, when that is
    /// known: a rate-limited request's wait for the budget's next token, a
    /// request denied for credits' wait for the key's next refill, a
    /// second for an unverifiable key (RFC 9110 §10.2.3).
    #[must_use]
    pub fn retry_after_ms(&self) -> Option<u32> {
        let wait = match self.deny? {
            DenyReason::RateLimited => self.quota?.retry_after_ms,
            DenyReason::CreditsExhausted => self.refill_in_ms,
            DenyReason::KeyUnverifiable => UNAVAILABLE_RETRY_MS,
            _ => 0,
        };
        (wait > 0).then_some(wait)
    }

    /// The HTTP status to answer with.
    #[must_use]
    pub fn http_status(&self) -> u16 {
        self.deny.map_or(200, DenyReason::http_status)
    }

    /// A verified key's decision, before the route is looked at: allowed
    /// unless a later check sets `deny`.
    pub(crate) fn for_key(key_id: KeyId, account: Arc<str>) -> Self {
        Self {
            deny: None,
            key_id: Some(key_id),
            account: Some(account),
            required: ScopeSet::EMPTY,
            missing: ScopeSet::EMPTY,
            wrong_secret: false,
            quota: None,
            credits_reservable: false,
            refill_in_ms: 0,
        }
    }

    pub(crate) fn denied(reason: DenyReason) -> Self {
        Self {
            deny: Some(reason),
            key_id: None,
            account: None,
            required: ScopeSet::EMPTY,
            missing: ScopeSet::EMPTY,
            wrong_secret: false,
            quota: None,
            credits_reservable: false,
            refill_in_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_small_enough_to_copy_inline() {
        // Past 128 bytes the compiler copies it with a call to memmove:
        // measured at ~6 ns a decision.
        assert!(std::mem::size_of::<Decision>() <= 128);
    }
}
