//! The in-memory index every decision reads: key id → secret hash, scopes,
//! account. sled is never on the hot path.

use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use std::net::IpAddr;

use crate::domain::allowlist::Allowlist;
use crate::domain::key::{KeyId, PresentedKey, SecretHash};
use crate::domain::scope_set::ScopeSet;

/// What a decision needs of a key: 32 + 32 + 16 bytes plus the id.
#[derive(Clone, Debug)]
pub struct Entry {
    /// SHA-256 of the key's secret.
    pub hash: SecretHash,
    /// The key's scopes, resolved against the running catalog.
    pub scopes: ScopeSet,
    /// The key's account, shared by all keys of the account.
    pub account: Arc<str>,
    /// Disabled keys are denied.
    pub disabled: bool,
    /// Unix nanos after which the key is denied; `i64::MAX`: never.
    pub expires_at: i64,
    /// After a rotation: the previous secret's hash, valid until
    /// `previous_until` (Unix nanos; 0: no previous secret).
    pub previous_hash: SecretHash,
    /// See `previous_hash`.
    pub previous_until: i64,
    /// The addresses the key may be used from.
    pub allowlist: Allowlist,
}

/// A key that verified: its scopes and account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The key's id.
    pub id: KeyId,
    /// The key's scopes.
    pub scopes: ScopeSet,
    /// The key's account.
    pub account: Arc<str>,
    /// Whether the key is disabled.
    pub disabled: bool,
    /// Unix nanos after which the key is denied; `i64::MAX`: never.
    pub expires_at: i64,
    /// Whether the request's client address is allowed for this key.
    pub address_allowed: bool,
}

/// Why a presented key did not verify. Callers answer both the same way;
/// the distinction feeds guessing detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// No live key has this id.
    UnknownId,
    /// A live key has this id, but not this secret.
    WrongSecret,
}

/// Live keys by id, in a lock-free map: a read takes no lock, so decisions
/// on all cores never wait for each other, and a write never blocks a
/// reader. (A verify does clone the account's `Arc`, one atomic increment
/// on a line shared by the account's keys.) Ids are random bytes chosen by keyward, so a fast
/// non-keyed hash is safe.
#[derive(Debug)]
pub struct Index {
    keys: papaya::HashMap<KeyId, Entry, FxBuildHasher>,
}

impl Default for Index {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl Index {
    /// An empty index sized for `capacity` keys.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            keys: papaya::HashMap::with_capacity_and_hasher(capacity, FxBuildHasher),
        }
    }

    /// Looks the key up and compares its secret hash in constant time.
    /// The hash is computed before the lookup, so unknown ids cost the same.
    #[inline]
    pub fn verify(
        &self,
        key: &PresentedKey<'_>,
        client: Option<IpAddr>,
    ) -> Result<Verified, Rejected> {
        let presented = key.secret_hash();
        let keys = self.keys.pin();
        let entry = keys.get(&key.id).ok_or(Rejected::UnknownId)?;
        // Each secret is compared in constant time. The previous one only
        // while a rotation overlap is open (key metadata, not a function of
        // the presented secret), and the clock is read only when it matched:
        // a second compare costs as much as the first (~30 ns).
        let accepted = entry.hash.matches(&presented)
            || (entry.previous_until != 0
                && entry.previous_hash.matches(&presented)
                && entry.previous_until > crate::clock::recent_now_nanos());
        if accepted {
            Ok(Verified {
                id: key.id,
                scopes: entry.scopes,
                account: Arc::clone(&entry.account),
                disabled: entry.disabled,
                expires_at: entry.expires_at,
                address_allowed: entry.allowlist.permits(client),
            })
        } else {
            Err(Rejected::WrongSecret)
        }
    }

    /// Adds or replaces a key.
    pub fn insert(&self, id: KeyId, entry: Entry) {
        self.keys.pin().insert(id, entry);
    }

    /// Removes a key; the next verify of it fails.
    pub fn remove(&self, id: &KeyId) {
        self.keys.pin().remove(id);
    }

    /// Makes this index hold exactly the keys of `fresh` (after the store
    /// was reopened): changed keys are replaced, missing ones removed.
    /// Decisions keep reading throughout; each key switches atomically.
    pub fn reconcile(&self, fresh: &Self) {
        let live = self.keys.pin();
        for (id, entry) in &fresh.keys.pin() {
            live.insert(*id, entry.clone());
        }
        let fresh = fresh.keys.pin();
        let gone: Vec<KeyId> = live
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .copied()
            .collect();
        for id in gone {
            live.remove(&id);
        }
    }

    /// How many live keys there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
