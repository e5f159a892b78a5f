//! A stored API key as keyward reasons about it: typed fields, checked once
//! where bytes are decoded (`store::record`), so the rules, the backends,
//! the index and the front doors never see protobuf numbers or byte
//! vectors of unchecked length.

use crate::domain::catalog::KeyKind;
use crate::domain::key::{KeyId, SecretHash};
use crate::domain::rules::Limits;

/// One API key, everything but its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's id (the public half of the key).
    pub id: KeyId,
    /// The account the key belongs to.
    pub account: String,
    /// The key's display name.
    pub name: String,
    /// Full Access, Restricted Access or Billing, as of its last grant.
    pub kind: KeyKind,
    /// Scope names as granted; resolved against the running catalog when
    /// used, so a scope the catalog dropped is kept, not lost.
    pub scopes: Vec<String>,
    /// Unix nanos.
    pub created_at: i64,
    /// Unix nanos; never before `created_at`.
    pub updated_at: i64,
    /// What admits a request besides its scopes.
    pub access: Access,
    /// Where its secret was found in public, as a signed secret scanning
    /// report said; `None` when never reported (and in older records).
    /// Kept through enabling (the secret is still the one found), cleared
    /// by a rotation (the found secret stops working then).
    pub leak: Option<Leak>,
}

/// A secret of the key found in public: what a secret scanning partner
/// report (GitHub's) said, so the owner learns where to clean up. Never
/// holds the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    /// Unix nanos when keyward received the report.
    pub reported_at: i64,
    /// The public URL where it was found (may be empty: the scanner does
    /// not always have one).
    pub url: String,
    /// Where the scanner found it (GitHub's `source`: `content`,
    /// `commit`, `npm`, …; may be empty).
    pub source: String,
    /// The token type the scanner matched (the pattern's name).
    pub kind: String,
    /// The secret found was the key's previous one, in its rotation
    /// overlap (which the report ended), not the current one.
    pub previous_secret: bool,
}

/// What a decision checks of a key besides its scopes: the secret and the
/// key's lifecycle. The index holds exactly this (plus scopes and account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// SHA-256 of the current secret.
    pub secret: SecretHash,
    /// After a rotation with an overlap: the previous secret.
    pub previous: Option<PreviousSecret>,
    /// Disabled keys are denied.
    pub disabled: bool,
    /// Disabled by the admin: only the admin may enable it again.
    pub disabled_by_admin: bool,
    /// Its expiry, address allowlist, rate limit and credits.
    pub limits: Limits,
}

/// A rotated-out secret and until when it still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviousSecret {
    /// SHA-256 of the previous secret.
    pub hash: SecretHash,
    /// Unix nanos until which it is accepted.
    pub valid_until: i64,
}

impl Access {
    /// The lifecycle of a new key with `secret`: enabled, no previous secret.
    #[must_use]
    pub fn new(secret: SecretHash) -> Self {
        Self {
            secret,
            previous: None,
            disabled: false,
            disabled_by_admin: false,
            limits: Limits::default(),
        }
    }

    /// Whether the key has expired at `now` (Unix nanos).
    #[must_use]
    pub fn expired_at(&self, now: i64) -> bool {
        self.limits.expires_at.is_some_and(|at| at <= now)
    }

    /// Until when the previous secret still works, if it does at `now`.
    #[must_use]
    pub fn previous_open_at(&self, now: i64) -> Option<i64> {
        self.previous
            .map(|previous| previous.valid_until)
            .filter(|until| *until > now)
    }
}
