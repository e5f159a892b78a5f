//! Detection of credential guessing: repeated failed verifications for one
//! key id (a wrong secret for a live id, or any secret for an id no live key
//! has), and repeated wrong admin tokens.
//!
//! Detection, not delay. Secrets carry 256 bits (admin tokens are checked
//! for strength at start-up), so online guessing is hopeless and delaying
//! answers protects nothing. A delay applied only to live ids told anyone
//! whether a leaked id is live; applied to every id, it needs a table that
//! random ids can fill. So every failure is answered at once and the same
//! way as an unknown key, and what matters is reported instead: someone
//! holds a key id without its secret (a partly leaked key: rotate it), or
//! someone is trying admin tokens. Each id (and the admin token) crossing
//! `limit` failures in a window gives one warning and one count in
//! `keyward_guessing_detected_total`.
//!
//! Live and unknown ids are counted alike, in the same table, so the metric
//! moves the same way for both: counting only live ids made it an oracle
//! (25 wrong secrets moved it for a live id and not for a random one). Only
//! the warning, which the operator alone reads, says whether the id is live.
//!
//! Memory is bounded and every failure costs O(1): ids (live or not) are
//! tracked in a fixed table of `capacity` slots, each id in the one slot a keyed hash
//! (random per process, so ids cannot be chosen to collide) picks. An id
//! whose slot holds another id's live window is not tracked alone: its
//! failures count in one shared window for every such id, which warns and
//! counts a detection the same way, so the guard never goes blind.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::domain::key::KeyId;

/// Slots in the table (about 48 bytes each).
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Failures in the current window, for one key id or the admin token.
#[derive(Debug, Default)]
struct Window {
    start_ms: AtomicU64,
    failures: AtomicU32,
}

impl Window {
    /// Counts one failure at `now_ms`; returns the count in the window.
    fn fail(&self, now_ms: u64, window_ms: u64) -> u32 {
        let start = self.start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= window_ms
            && self
                .start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.failures.store(0, Ordering::Relaxed);
        }
        self.failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1)
    }
}

/// What a failed verification was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A well-formed key whose secret did not verify: a wrong secret for a
    /// live id (`live`), or an id no live key has. Counted the same way
    /// either way; `live` only words the operator's warning.
    Unverified {
        /// The presented key id.
        id: KeyId,
        /// Whether a live key has this id.
        live: bool,
    },
    /// A credential that is neither an API key nor the admin token.
    AdminToken,
}

/// One slot of the table: the id it tracks and its window.
#[derive(Debug, Default)]
struct Slot {
    id: Option<KeyId>,
    start_ms: u64,
    failures: u32,
}

/// Per-key-id failure counting, bounded, with no effect on replies.
#[derive(Debug)]
pub struct FailureGuard {
    slots: Box<[Mutex<Slot>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Ids whose slot was taken by another live window, together.
    untracked: Window,
    admin: Window,
    limit: u32,
    window: Duration,
    epoch: Instant,
    detected: Counter,
}

impl FailureGuard {
    /// Warns when an id gets more than `limit` failures per `window`
    /// (`limit` 0: detection off); tracks at most `capacity` ids.
    /// `detected` counts each crossing.
    #[must_use]
    pub fn new(limit: u32, window: Duration, capacity: usize, detected: Counter) -> Self {
        Self {
            slots: (0..capacity.max(1))
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            untracked: Window::default(),
            admin: Window::default(),
            limit,
            window,
            epoch: Instant::now(),
            detected,
        }
    }

    /// Records one failed verification. Never delays, never changes a reply.
    pub fn record(&self, failure: Failure) {
        if self.limit == 0 {
            return;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        // Which window counts it: the admin token's, the id's own slot, or
        // the shared one for ids without a slot (`None`).
        let (failures, tracked) = match failure {
            Failure::AdminToken => (self.admin.fail(now, window_ms), Some(failure)),
            Failure::Unverified { id, .. } => self.fail_tracked(id, now, window_ms).map_or_else(
                || (self.untracked.fail(now, window_ms), None),
                |failures| (failures, Some(failure)),
            ),
        };
        if failures != self.limit + 1 {
            return;
        }
        self.detected.inc();
        let (limit, seconds) = (self.limit, self.window.as_secs());
        match tracked {
            Some(Failure::Unverified { id, live: true }) => tracing::warn!(
                key_id = %id,
                limit,
                window_s = seconds,
                "repeated wrong secrets for a live key id: someone holds this id without its secret; consider replacing the key"
            ),
            Some(Failure::Unverified { id, live: false }) => tracing::warn!(
                key_id = %id,
                limit,
                window_s = seconds,
                "repeated failed verifications for a key id no live key has: someone is guessing keys"
            ),
            Some(Failure::AdminToken) => tracing::warn!(
                limit,
                window_s = seconds,
                "repeated invalid credentials at KeyManager: someone is guessing the admin token or API keys"
            ),
            None => tracing::warn!(
                limit,
                window_s = seconds,
                "repeated failed verifications for key ids beyond the guard's table: someone is guessing keys, or holds ids without their secrets"
            ),
        }
    }

    /// Counts a failure in `id`'s slot, taking the slot over if its window
    /// has ended; `None` if another id's window still holds it.
    fn fail_tracked(&self, id: KeyId, now: u64, window_ms: u64) -> Option<u32> {
        let index =
            usize::try_from(self.hasher.hash_one(id) % self.slots.len() as u64).unwrap_or_default();
        let mut slot = self.slots[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ended = now.saturating_sub(slot.start_ms) >= window_ms;
        if slot.id != Some(id) {
            if slot.id.is_some() && !ended {
                return None;
            }
            *slot = Slot {
                id: Some(id),
                start_ms: now,
                failures: 0,
            };
        } else if ended {
            slot.start_ms = now;
            slot.failures = 0;
        }
        slot.failures = slot.failures.saturating_add(1);
        Some(slot.failures)
    }

    /// How many key ids hold a slot now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| {
                slot.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .id
                    .is_some()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limit: u32, window: Duration, capacity: usize) -> (FailureGuard, Counter) {
        let detected = Counter::default();
        (
            FailureGuard::new(limit, window, capacity, detected.clone()),
            detected,
        )
    }

    #[test]
    fn detects_once_per_window_per_id() {
        let (guard, detected) = guard(3, Duration::from_secs(60), 100);
        let id = KeyId::from_bytes([1; 16]);
        for _ in 0..10 {
            guard.record(unverified(id));
        }
        assert_eq!(detected.get(), 1, "one detection, not one per failure");
        guard.record(unverified(KeyId::from_bytes([2; 16])));
        assert_eq!(detected.get(), 1, "ids are counted separately");
        for _ in 0..4 {
            guard.record(Failure::AdminToken);
        }
        assert_eq!(detected.get(), 2);
    }

    #[test]
    fn windows_reset() {
        let (guard, detected) = guard(1, Duration::from_millis(20), 100);
        let id = KeyId::from_bytes([3; 16]);
        guard.record(unverified(id));
        std::thread::sleep(Duration::from_millis(30));
        guard.record(unverified(id));
        assert_eq!(detected.get(), 0, "a new window starts clean");
        guard.record(unverified(id));
        assert_eq!(detected.get(), 1);
    }

    fn unverified(id: KeyId) -> Failure {
        Failure::Unverified { id, live: true }
    }

    /// A live id and one no key has move the count identically.
    #[test]
    fn live_and_unknown_ids_are_counted_alike() {
        for live in [true, false] {
            let (guard, detected) = guard(3, Duration::from_secs(60), 100);
            let id = KeyId::from_bytes([7; 16]);
            for _ in 0..10 {
                guard.record(Failure::Unverified { id, live });
            }
            assert_eq!(detected.get(), 1, "live: {live}");
            assert_eq!(guard.tracked(), 1, "live: {live}");
        }
    }

    fn id(i: u16) -> KeyId {
        let mut raw = [0; 16];
        raw[..2].copy_from_slice(&i.to_be_bytes());
        KeyId::from_bytes(raw)
    }

    #[test]
    fn memory_is_bounded_and_ended_windows_make_room() {
        let (guard, _) = guard(5, Duration::from_millis(20), 64);
        for i in 0..1_000u16 {
            guard.record(unverified(id(i)));
        }
        assert!(guard.tracked() <= 64, "never more than the capacity");
        std::thread::sleep(Duration::from_millis(30));
        guard.record(unverified(id(5000)));
        assert!(
            guard.fail_tracked(id(5000), 31, 20).is_some(),
            "an ended window gives its slot up"
        );
    }

    #[test]
    fn a_full_table_never_blinds_the_guard() {
        let (guard, detected) = guard(3, Duration::from_secs(60), 8);
        // Far more live ids than slots: every slot is held by a live window.
        for i in 0..1_000u16 {
            guard.record(unverified(id(i)));
        }
        assert_eq!(guard.tracked(), 8);
        assert_eq!(
            detected.get(),
            1,
            "the untracked ids crossed the limit together"
        );
        // One without a slot guessed on: its failures still count, together.
        let held: Vec<Option<KeyId>> = guard
            .slots
            .iter()
            .map(|slot| slot.lock().expect("slot").id)
            .collect();
        let untracked = (0..1_000u16)
            .map(id)
            .find(|candidate| !held.contains(&Some(*candidate)))
            .expect("an id without a slot");
        let before = guard.untracked.failures.load(Ordering::Relaxed);
        for _ in 0..10 {
            guard.record(unverified(untracked));
        }
        let after = guard.untracked.failures.load(Ordering::Relaxed);
        assert_eq!(after, before + 10, "counted, never dropped");
    }
}
