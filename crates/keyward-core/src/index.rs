//! The in-memory index every decision reads: key id → secret hash, scopes,
//! account. sled is never on the hot path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use rustc_hash::FxBuildHasher;

use crate::clock;
use crate::domain::allowlist::Allowlist;
use crate::domain::credits::CreditLease;
use crate::domain::key::{KeyId, PresentedKey, SecretHash};
use crate::domain::lease::Lease;
use crate::domain::rate::Gcra;
use crate::domain::record::Access;
use crate::domain::scope_set::ScopeSet;

/// Last-used times are kept to the minute: a key used all day writes its
/// in-memory time once a minute, and the store at most once per flush.
pub const LAST_USED_GRANULARITY_NANOS: i64 = 60_000_000_000;

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
    /// The key's rate limit, ready to enforce.
    pub limit: Option<Gcra>,
    /// The key's credits, if it has any: spent from `usage.credits`.
    /// Boxed: most keys have none, and every entry would otherwise carry
    /// its 32 bytes.
    pub credits: Option<Box<CreditsHeld>>,
    /// What changes per request. Shared by every version of the entry (an
    /// update replaces the entry, not the budget or the last-used time).
    pub usage: Arc<Usage>,
}

impl Entry {
    /// Whether a decision at `at` (Unix nanos) could have allowed this key:
    /// enabled, and not expired by then.
    #[must_use]
    pub fn could_decide_at(&self, at: i64) -> bool {
        !self.disabled && !self.expired_at(at)
    }

    /// Whether the key has expired by `at` (Unix nanos).
    #[inline]
    #[must_use]
    pub fn expired_at(&self, at: i64) -> bool {
        self.expires_at != crate::clock::NEVER && self.expires_at <= at
    }

    /// What the key holds, as `id`.
    #[must_use]
    pub fn verified(&self, id: KeyId) -> Verified {
        Verified {
            id,
            scopes: self.scopes,
            account: Arc::clone(&self.account),
        }
    }

    /// The entry for a key with `access`, its `scopes` resolved and its
    /// `account` interned.
    #[must_use]
    pub fn new(access: &Access, scopes: ScopeSet, account: Arc<str>) -> Self {
        // Absent hashes are all zeros: no secret hashes to that, and a
        // closed overlap (`previous_until` 0) never compares it anyway.
        let (previous_hash, previous_until) = access
            .previous
            .map_or((SecretHash::from_bytes([0; 32]), 0), |previous| {
                (previous.hash, previous.valid_until)
            });
        Self {
            hash: access.secret,
            scopes,
            account,
            disabled: access.disabled,
            expires_at: access.limits.expires_at.unwrap_or(clock::NEVER),
            previous_hash,
            previous_until,
            allowlist: Allowlist::from_stored(&access.limits.allowed_cidrs),
            limit: access
                .limits
                .rate_limit
                .map(|limit| limit.gcra(clock::CLOCK_REFRESH)),
            credits: access.limits.credits.map(|credits| {
                Box::new(CreditsHeld {
                    unreserved: credits.remaining,
                    next_refill: credits.next_refill(),
                    period: credits.refilled_at,
                })
            }),
            usage: Arc::default(),
        }
    }
}

/// What the store of truth last said of a key's credits: whether a
/// process with an empty lease may still get some (so a decision waits
/// for a reservation rather than refusing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditsHeld {
    /// Credits no process has reserved.
    pub unreserved: u64,
    /// When the next refill is due (Unix nanos; `i64::MAX`: never).
    pub next_refill: i64,
    /// The credits' current period (see `CreditLease`).
    pub period: i64,
}

impl CreditsHeld {
    /// Whether a reservation at `now` could bring credits.
    #[must_use]
    pub fn reservable_at(&self, now: i64) -> bool {
        self.unreserved > 0 || now >= self.next_refill
    }

    /// Until when a decider that was given no credits at `now` refuses the
    /// key without asking again: `pause`, or until the next refill if that
    /// comes sooner (the store of truth grants it at once). A refill this
    /// copy sees as due already, yet none given, is one the store has not
    /// recorded: a whole pause.
    #[must_use]
    pub fn dry_until(&self, now: i64, pause: i64) -> i64 {
        if self.next_refill > now {
            now.saturating_add(pause).min(self.next_refill)
        } else {
            now.saturating_add(pause)
        }
    }
}

/// A key's per-request state, written by decisions.
#[derive(Debug, Default)]
pub struct Usage {
    /// The rate limiter's theoretical arrival time (Unix nanos), while the
    /// limit is this process's alone.
    pub tat: AtomicI64,
    /// This process's lease on the limit, while a usage store holds it for
    /// every process.
    pub lease: Lease,
    /// The credits this process reserved for the key and has not spent.
    pub credits: CreditLease,
    /// When the key last authorized a request, to the minute (Unix nanos;
    /// 0: never).
    last_used: AtomicI64,
    /// The last-used time the store holds (written by the key writer only).
    persisted: AtomicI64,
    /// A decision used the key since the last sweep (on-demand replica:
    /// what the eviction policy hears of).
    seen: AtomicBool,
}

impl Usage {
    /// Records an allowed request at `now`: a load and a subtraction on all
    /// but the first request of each minute (the stored time is a minute
    /// boundary, so a minute or more since it means a new minute), and no
    /// write that would bounce a cache line between cores. True for the
    /// request that moved the time to a new minute.
    #[inline]
    pub fn touch(&self, now: i64) -> bool {
        if now - self.last_used.load(Ordering::Relaxed) >= LAST_USED_GRANULARITY_NANOS {
            let minute = now - now.rem_euclid(LAST_USED_GRANULARITY_NANOS);
            return self.last_used.fetch_max(minute, Ordering::Relaxed) < minute;
        }
        false
    }

    /// Records a use another copy of the key reported (Unix nanos, to the
    /// minute), as [`Self::touch`] would have.
    pub fn note_use(&self, at: i64) {
        let minute = at - at.rem_euclid(LAST_USED_GRANULARITY_NANOS);
        self.last_used.fetch_max(minute, Ordering::Relaxed);
    }

    /// Marks the key used: a load, and a store only the first time after
    /// each sweep, so hits do not bounce the line between cores.
    #[inline]
    pub fn mark_seen(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
        }
    }

    /// When the key was last used (0: never).
    #[must_use]
    pub fn last_used(&self) -> i64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// The index pinned for one decision.
pub struct Pinned<'a> {
    keys: papaya::HashMapRef<'a, KeyId, Entry, FxBuildHasher, papaya::LocalGuard<'a>>,
}

impl Pinned<'_> {
    /// Looks the key up and compares its secret hash in constant time. The
    /// hash is computed before the lookup, so unknown ids cost the same.
    /// `now` (Unix nanos) closes a rotation overlap that has ended; `use_`
    /// says whether a previous secret still in its overlap is enough.
    #[inline]
    pub fn verify(
        &self,
        key: &PresentedKey<'_>,
        now: i64,
        use_: SecretUse,
    ) -> Result<&Entry, Rejected> {
        let presented = key.secret_hash();
        let entry = self.keys.get(&key.id).ok_or(Rejected::UnknownId)?;
        // Each secret is compared in constant time. The previous one only
        // while a rotation overlap is open (key metadata, not a function of
        // the presented secret): a second compare costs as much as the
        // first (~30 ns).
        if entry.hash.matches(&presented) {
            entry.usage.mark_seen();
            return Ok(entry);
        }
        if entry.previous_until > now && entry.previous_hash.matches(&presented) {
            return match use_ {
                SecretUse::Decision => {
                    entry.usage.mark_seen();
                    Ok(entry)
                }
                SecretUse::Management => Err(Rejected::Superseded),
            };
        }
        Err(Rejected::WrongSecret)
    }
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
}

/// What a verified secret may do. A rotation's previous secret, during its
/// overlap, keeps requests passing while clients move to the new one; it
/// never manages keys, or whoever holds an old secret (a leaked one, the
/// reason to rotate) could rotate again and take the key over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretUse {
    /// A request decision: the current secret, or the previous one while
    /// its overlap is open.
    Decision,
    /// Key management: the current secret only.
    Management,
}

/// Why a presented key did not verify. Callers answer the first two the
/// same way; the distinction feeds guessing detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// No live key has this id.
    UnknownId,
    /// A live key has this id, but not this secret.
    WrongSecret,
    /// The key's previous secret, still in its rotation overlap, presented
    /// for [`SecretUse::Management`]: only its holder can learn this.
    Superseded,
}

/// Live keys by id, in a lock-free map: a read takes no lock, so decisions
/// on all cores never wait for each other, and a write never blocks a
/// reader. (A verify does clone the account's `Arc`, one atomic increment
/// on a line shared by the account's keys.) Ids are random bytes chosen by keyward, so a fast
/// non-keyed hash is safe.
pub struct Index {
    keys: papaya::HashMap<KeyId, Entry, FxBuildHasher>,
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("keys", &self.keys.len())
            .field("observed", &self.observer.get().is_some())
            .finish()
    }
}

/// Hears every change to an index, right after it is made (after: so a
/// reader that starts listening, then reads the map, misses nothing) and in
/// the order it was made (writes come from one writer at a time): what a
/// change feed to another decision point is built on.
pub trait Observer: Send + Sync {
    /// `id` is now `entry` (`None`: no longer live).
    fn changed(&self, id: &KeyId, entry: Option<&Entry>);
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
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Tells `observer` of every change from now on (one observer per
    /// index; false if it already has one).
    pub fn observe(&self, observer: Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn changed(&self, id: &KeyId, entry: Option<&Entry>) {
        if let Some(observer) = self.observer.get() {
            observer.changed(id, entry);
        }
    }

    /// Calls `each` with every live key id (a moment's view: keys added or
    /// removed meanwhile may or may not be seen).
    pub fn for_each_id(&self, mut each: impl FnMut(&KeyId)) {
        for id in self.keys.pin().keys() {
            each(id);
        }
    }

    /// A pinned view for one decision: entries it returns stay valid while
    /// it lives (however the index changes meanwhile).
    #[inline]
    #[must_use]
    pub fn pin(&self) -> Pinned<'_> {
        Pinned {
            keys: self.keys.pin(),
        }
    }

    /// Adds a key to an index being built (start-up, recovery), where no
    /// earlier version of it can have usage to keep.
    pub fn insert(&self, id: KeyId, entry: Entry) {
        self.put(id, entry);
    }

    /// Adds or replaces a live key. A replaced key keeps its usage
    /// (rate-limit budget, last-used time). Called by one writer at a time.
    pub fn replace(&self, id: KeyId, mut entry: Entry) {
        let keys = self.keys.pin();
        if let Some(current) = keys.get(&id) {
            entry.usage = Arc::clone(&current.usage);
        }
        drop(keys);
        self.put(id, entry);
    }

    /// Inserts, then tells the observer: a reader that starts listening
    /// before it reads the map misses no change (see [`Observer`]).
    fn put(&self, id: KeyId, entry: Entry) {
        let keys = self.keys.pin();
        keys.insert(id, entry);
        if let (Some(observer), Some(entry)) = (self.observer.get(), keys.get(&id)) {
            observer.changed(&id, Some(entry));
        }
    }

    /// When a key was last used (Unix nanos, to the minute; 0: never or
    /// no such key).
    #[must_use]
    pub fn last_used(&self, id: &KeyId) -> i64 {
        self.keys
            .pin()
            .get(id)
            .map_or(0, |entry| entry.usage.last_used())
    }

    /// Last-used times newer than the store's, to persist.
    #[must_use]
    pub fn unpersisted_last_used(&self) -> Vec<(KeyId, i64)> {
        self.keys
            .pin()
            .iter()
            .filter_map(|(id, entry)| {
                let last_used = entry.usage.last_used();
                (last_used > entry.usage.persisted.load(Ordering::Relaxed))
                    .then_some((*id, last_used))
            })
            .collect()
    }

    /// Records a use of `id` at `at` (Unix nanos) that another decision
    /// point made; false (and nothing noted) if no such key is live, or it
    /// could not have been used then (disabled, or expired by then): a
    /// report must not make a key that decides nothing look in use.
    /// The use is noted at `at` or `now`, whichever is earlier: a clock
    /// ahead of ours never makes a key look used later than it was.
    pub fn note_use(&self, id: &KeyId, at: i64, now: i64) -> bool {
        self.keys
            .pin()
            .get(id)
            .filter(|entry| entry.could_decide_at(at))
            .map(|entry| entry.usage.note_use(at.min(now)))
            .is_some()
    }

    /// Notes that the store now holds these last-used times.
    pub fn persisted_last_used(&self, written: &[(KeyId, i64)]) {
        let keys = self.keys.pin();
        for (id, last_used) in written {
            if let Some(entry) = keys.get(id) {
                entry
                    .usage
                    .persisted
                    .fetch_max(*last_used, Ordering::Relaxed);
            }
        }
    }

    /// Sets last-used times read from the store (at start-up).
    pub fn load_last_used(&self, stored: impl IntoIterator<Item = (KeyId, i64)>) {
        let keys = self.keys.pin();
        for (id, last_used) in stored {
            if let Some(entry) = keys.get(&id) {
                entry
                    .usage
                    .last_used
                    .fetch_max(last_used, Ordering::Relaxed);
                entry
                    .usage
                    .persisted
                    .fetch_max(last_used, Ordering::Relaxed);
            }
        }
    }

    /// A live key's entry (off the decision path: the writer's re-reads).
    #[must_use]
    pub fn entry(&self, id: &KeyId) -> Option<Entry> {
        self.keys.pin().get(id).cloned()
    }

    /// A live key's rate limit and usage (what a lease trader needs),
    /// without copying the rest of its entry.
    #[must_use]
    pub fn limit_and_usage(&self, id: &KeyId) -> Option<(Option<Gcra>, Arc<Usage>)> {
        self.keys
            .pin()
            .get(id)
            .map(|entry| (entry.limit, Arc::clone(&entry.usage)))
    }

    /// Whether a key is live.
    #[must_use]
    pub fn contains(&self, id: &KeyId) -> bool {
        self.keys.pin().contains_key(id)
    }

    /// Removes a key; the next verify of it fails.
    pub fn remove(&self, id: &KeyId) {
        if self.keys.pin().remove(id).is_some() {
            self.changed(id, None);
        }
    }

    /// Makes this index hold exactly the keys of `fresh` (after the store
    /// was reopened): changed keys are replaced, missing ones removed.
    /// Decisions keep reading throughout; each key switches atomically.
    pub fn reconcile(&self, fresh: &Self) {
        for (id, entry) in &fresh.keys.pin() {
            self.replace(*id, entry.clone());
        }
        let live = self.keys.pin();
        let fresh = fresh.keys.pin();
        let gone: Vec<KeyId> = live
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .copied()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// Removes every key `keep` refuses; the next verify of each fails.
    pub fn retain(&self, keep: impl Fn(&KeyId) -> bool) {
        let keys = self.keys.pin();
        let gone: Vec<KeyId> = keys.keys().filter(|id| !keep(id)).copied().collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// Calls `seen` with every key used since the last call.
    pub fn take_seen(&self, mut seen: impl FnMut(&KeyId)) {
        for (id, entry) in &self.keys.pin() {
            if entry.usage.seen.swap(false, Ordering::Relaxed) {
                seen(id);
            }
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

#[cfg(test)]
mod tests {
    use super::CreditsHeld;

    const NOW: i64 = 1_000_000_000_000;
    const PAUSE: i64 = 1_000_000_000;

    fn refilled_at(next_refill: i64) -> CreditsHeld {
        CreditsHeld {
            unreserved: 0,
            next_refill,
            period: 0,
        }
    }

    #[test]
    fn a_dry_key_is_asked_again_at_its_refill_if_that_comes_first() {
        assert_eq!(refilled_at(i64::MAX).dry_until(NOW, PAUSE), NOW + PAUSE);
        assert_eq!(
            refilled_at(NOW + PAUSE / 4).dry_until(NOW, PAUSE),
            NOW + PAUSE / 4,
            "the refill comes first"
        );
        assert_eq!(
            refilled_at(NOW + 5 * PAUSE).dry_until(NOW, PAUSE),
            NOW + PAUSE
        );
        assert_eq!(
            refilled_at(NOW - 1).dry_until(NOW, PAUSE),
            NOW + PAUSE,
            "a refill seen as due already, yet none given: a whole pause"
        );
    }
}
