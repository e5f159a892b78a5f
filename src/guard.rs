//! Detection of credential guessing: repeated wrong secrets for one live key
//! id, and repeated wrong admin tokens.
//!
//! Detection, not delay. Secrets carry 256 bits (admin tokens are checked
//! for strength at start-up), so online guessing is hopeless and delaying
//! answers protects nothing. A delay applied only to live ids told anyone
//! whether a leaked id is live; applied to every id, it needs a table that
//! random ids can fill. So every failure is answered at once and the same
//! way as an unknown key, and what matters is reported instead: someone
//! holds a live key id without its secret (a partly leaked key: rotate it),
//! or someone is trying admin tokens. Each id (and the admin token) crossing
//! `limit` failures in a window gives one warning and one count in
//! `keyward_guessing_detected_total`.
//!
//! Memory is bounded: at most `capacity` ids are tracked; when the table is
//! full, windows that have ended are pruned, and if it is still full the
//! failure is counted but not tracked.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxBuildHasher;

use crate::domain::key::KeyId;

/// Most key ids tracked at once.
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
    /// A wrong secret for a live key id.
    WrongSecret(KeyId),
    /// A credential that is neither an API key nor the admin token.
    AdminToken,
}

/// Per-key-id failure counting, bounded, with no effect on replies.
#[derive(Debug)]
pub struct FailureGuard {
    windows: papaya::HashMap<KeyId, Window, FxBuildHasher>,
    admin: Window,
    limit: u32,
    window: Duration,
    capacity: usize,
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
            windows: papaya::HashMap::with_hasher(FxBuildHasher),
            admin: Window::default(),
            limit,
            window,
            capacity,
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
        let failures = match failure {
            Failure::AdminToken => self.admin.fail(now, window_ms),
            Failure::WrongSecret(id) => {
                let windows = self.windows.pin();
                if windows.len() >= self.capacity && !windows.contains_key(&id) {
                    windows.retain(|_, w| {
                        now.saturating_sub(w.start_ms.load(Ordering::Relaxed)) < window_ms
                    });
                    if windows.len() >= self.capacity {
                        return;
                    }
                }
                windows
                    .get_or_insert_with(id, || Window {
                        start_ms: AtomicU64::new(now),
                        failures: AtomicU32::new(0),
                    })
                    .fail(now, window_ms)
            }
        };
        if failures == self.limit + 1 {
            self.detected.inc();
            match failure {
                Failure::WrongSecret(id) => tracing::warn!(
                    key_id = %id,
                    limit = self.limit,
                    window_s = self.window.as_secs(),
                    "repeated wrong secrets for a live key id: someone holds this id without its secret; consider replacing the key"
                ),
                Failure::AdminToken => tracing::warn!(
                    limit = self.limit,
                    window_s = self.window.as_secs(),
                    "repeated invalid credentials at KeyManager: someone is guessing the admin token or API keys"
                ),
            }
        }
    }

    /// How many key ids are tracked now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.windows.len()
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
            guard.record(Failure::WrongSecret(id));
        }
        assert_eq!(detected.get(), 1, "one detection, not one per failure");
        guard.record(Failure::WrongSecret(KeyId::from_bytes([2; 16])));
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
        guard.record(Failure::WrongSecret(id));
        std::thread::sleep(Duration::from_millis(30));
        guard.record(Failure::WrongSecret(id));
        assert_eq!(detected.get(), 0, "a new window starts clean");
        guard.record(Failure::WrongSecret(id));
        assert_eq!(detected.get(), 1);
    }

    #[test]
    fn memory_is_bounded_and_stale_windows_are_pruned() {
        let (guard, _) = guard(5, Duration::from_millis(20), 64);
        for i in 0..1_000u16 {
            let mut raw = [0; 16];
            raw[..2].copy_from_slice(&i.to_be_bytes());
            guard.record(Failure::WrongSecret(KeyId::from_bytes(raw)));
        }
        assert_eq!(guard.tracked(), 64, "never more than the capacity");
        std::thread::sleep(Duration::from_millis(30));
        guard.record(Failure::WrongSecret(KeyId::from_bytes([9; 16])));
        assert_eq!(guard.tracked(), 1, "ended windows make room");
    }
}
