//! Wall-clock time for key lifecycle checks: precise where it is cheap
//! enough, cached where every decision reads it.

use std::sync::atomic::{AtomicI64, Ordering};

/// `expires_at` of a key that never expires.
pub const NEVER: i64 = i64::MAX;

/// The wall clock, as Unix nanoseconds.
#[must_use]
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// How often the cached time decisions read is refreshed: expiry holds to
/// within this.
pub const CLOCK_REFRESH: std::time::Duration = std::time::Duration::from_millis(10);

/// The cached wall clock (Unix nanos; 0 until [`start_clock`] ran).
static RECENT: AtomicI64 = AtomicI64::new(0);

/// Starts the one thread that keeps the cached time fresh, for the rest of
/// the process (later calls find it running). A precise clock read costs
/// ~30 ns, a fifth of a decision; the cached one is a single atomic load,
/// kept as plain Unix nanoseconds so that reading it costs no arithmetic
/// (coarsetime's fixed-point time cost a u128 multiply per read).
pub fn start_clock() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        RECENT.store(now_nanos(), Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("keyward-clock".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(CLOCK_REFRESH);
                    RECENT.store(now_nanos(), Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            // Without the thread, reads fall back to the precise clock.
            RECENT.store(0, Ordering::Relaxed);
        }
    });
}

/// The wall clock as Unix nanoseconds, from the time cached by
/// [`start_clock`]; the precise clock when nothing keeps the cache (it never
/// fails open with a stale zero).
#[inline]
#[must_use]
pub fn recent_now_nanos() -> i64 {
    match RECENT.load(Ordering::Relaxed) {
        0 => now_nanos(),
        recent => recent,
    }
}
