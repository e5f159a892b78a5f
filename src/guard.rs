//! The brute-force guard: slows repeated failed verifications of one key id
//! without touching requests that carry the right secret.
//!
//! Only ids of live keys are tracked (guessing the secret of an id that does
//! not exist is pointless, and tracking random ids would let an attacker
//! grow the table), so memory is bounded by the number of keys. Once an id
//! fails `limit` times within a window, each further failure for it is
//! answered only after `delay`, which throttles a guesser that waits for its
//! answers. At most `max_delayed` replies wait at once, so the guard can
//! never tie up the server's capacity; past that, failures are answered at
//! once. A request with the right secret is never delayed.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustc_hash::FxBuildHasher;

use crate::domain::key::KeyId;

/// Failures of one id in the current window.
#[derive(Debug)]
struct Window {
    start: AtomicU64,
    failures: AtomicU32,
}

/// Per-key-id failure counting and throttling.
#[derive(Debug)]
pub struct FailureGuard {
    windows: papaya::HashMap<KeyId, Window, FxBuildHasher>,
    limit: u32,
    window: Duration,
    delay: Duration,
    max_delayed: usize,
    delayed: AtomicUsize,
    epoch: Instant,
}

/// A reply being held back; releases its slot when dropped.
#[derive(Debug)]
pub struct Penalty<'a> {
    guard: &'a FailureGuard,
    /// How long to hold the reply.
    pub delay: Duration,
}

impl Drop for Penalty<'_> {
    fn drop(&mut self) {
        self.guard.delayed.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FailureGuard {
    /// `limit` failures per `window` before each further failure waits `delay`.
    #[must_use]
    pub fn new(limit: u32, window: Duration, delay: Duration, max_delayed: usize) -> Self {
        Self {
            windows: papaya::HashMap::with_hasher(FxBuildHasher),
            limit,
            window,
            delay,
            max_delayed,
            delayed: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// Records a wrong secret for a live key id; returns the penalty to
    /// serve before replying, if the id is over its limit and a delay slot
    /// is free.
    pub fn failed(&self, id: KeyId) -> Option<Penalty<'_>> {
        if self.limit == 0 || self.delay.is_zero() {
            return None;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let windows = self.windows.pin();
        let window = windows.get_or_insert_with(id, || Window {
            start: AtomicU64::new(now),
            failures: AtomicU32::new(0),
        });
        let start = window.start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= window_ms
            && window
                .start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            window.failures.store(0, Ordering::Relaxed);
        }
        let failures = window
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures == self.limit + 1 {
            tracing::warn!(key_id = %id, limit = self.limit, "repeated failed verifications: throttling this key id");
        }
        if failures <= self.limit {
            return None;
        }
        if self.delayed.fetch_add(1, Ordering::Relaxed) >= self.max_delayed {
            self.delayed.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Penalty {
            guard: self,
            delay: self.delay,
        })
    }

    /// Records the failure if this was a wrong secret for a live key,
    /// and holds the caller back for the penalty, if any.
    pub async fn throttle(&self, wrong_secret: bool, id: Option<KeyId>) {
        if let (true, Some(id)) = (wrong_secret, id)
            && let Some(penalty) = self.failed(id)
        {
            tokio::time::sleep(penalty.delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_after_the_limit_and_caps_waiting_replies() {
        let guard = FailureGuard::new(3, Duration::from_secs(60), Duration::from_millis(50), 2);
        let id = KeyId::from_bytes([1; 16]);
        for _ in 0..3 {
            assert!(guard.failed(id).is_none(), "under the limit");
        }
        let first = guard.failed(id).expect("over the limit");
        let second = guard.failed(id).expect("a second slot");
        assert!(
            guard.failed(id).is_none(),
            "no more than max_delayed wait at once"
        );
        drop((first, second));
        assert!(guard.failed(id).is_some(), "slots come back");
        let other = KeyId::from_bytes([2; 16]);
        assert!(guard.failed(other).is_none(), "ids are counted separately");
    }

    #[test]
    fn windows_reset() {
        let guard = FailureGuard::new(1, Duration::from_millis(20), Duration::from_millis(5), 8);
        let id = KeyId::from_bytes([3; 16]);
        assert!(guard.failed(id).is_none());
        assert!(guard.failed(id).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(guard.failed(id).is_none(), "a new window starts clean");
    }
}
