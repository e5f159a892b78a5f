//! Per-key request rates: the limit as configured (checked once), and the
//! GCRA (generic cell rate algorithm) that enforces it with one atomic
//! compare-and-swap on one `i64` per key: no lock, no allocation, no timer.
//!
//! GCRA keeps a single number per key, the theoretical arrival time (TAT) of
//! the next request if requests arrived exactly at the configured rate. A
//! request at `now` passes when `TAT - now <= tolerance` and moves TAT one
//! interval on; a burst of `burst` requests fits in the tolerance.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Most requests per period.
pub const MAX_REQUESTS: u32 = 1_000_000;
/// Largest burst.
pub const MAX_BURST: u32 = 1_000_000;
/// Shortest period.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// Longest period.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);
/// Smallest spacing between requests: a million requests per second.
const MIN_INTERVAL_NANOS: i64 = 1_000;
/// Cap on the tolerance (~31 years), so TAT arithmetic cannot overflow.
const MAX_TOLERANCE_NANOS: i64 = 1 << 60;

/// A key's rate limit: `requests` per `period`, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    requests: u32,
    period_nanos: i64,
    burst: u32,
}

/// A rate limit keyward will not enforce: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RateLimitError {
    /// The offending field, relative to the rate limit (`requests`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl RateLimit {
    /// Checks a limit; `burst` 0 means `requests` (the whole period's
    /// allowance may arrive at once).
    pub fn new(requests: u32, period: Duration, burst: u32) -> Result<Self, RateLimitError> {
        let invalid = |field, problem: String| Err(RateLimitError { field, problem });
        if requests == 0 || requests > MAX_REQUESTS {
            return invalid("requests", format!("must be 1 to {MAX_REQUESTS}"));
        }
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) {
            return invalid("period", "must be 1ms to 24h".into());
        }
        if burst > MAX_BURST {
            return invalid("burst", format!("must be at most {MAX_BURST}"));
        }
        let period_nanos = i64::try_from(period.as_nanos()).unwrap_or(i64::MAX);
        if period_nanos / i64::from(requests) < MIN_INTERVAL_NANOS {
            return invalid(
                "requests",
                "more than 1000000 requests per second is not a limit".into(),
            );
        }
        Ok(Self {
            requests,
            period_nanos,
            burst: if burst == 0 { requests } else { burst },
        })
    }

    /// Requests per period.
    #[must_use]
    pub fn requests(self) -> u32 {
        self.requests
    }

    /// The period.
    #[must_use]
    pub fn period(self) -> Duration {
        Duration::from_nanos(u64::try_from(self.period_nanos).unwrap_or(0))
    }

    /// Requests that may pass at once.
    #[must_use]
    pub fn burst(self) -> u32 {
        self.burst
    }

    /// The enforcer for a clock that advances in steps of `clock_step`.
    /// A stepping clock stands still between steps, so the tolerance is at
    /// least one step: otherwise at most one request would pass per step,
    /// whatever the rate. (Bursts are then at least one step's worth.)
    #[must_use]
    pub fn gcra(self, clock_step: Duration) -> Gcra {
        let interval = self.period_nanos / i64::from(self.requests);
        let step = i64::try_from(clock_step.as_nanos()).unwrap_or(i64::MAX);
        Gcra {
            interval,
            tolerance: interval
                .saturating_mul(i64::from(self.burst - 1))
                .max(step)
                .min(MAX_TOLERANCE_NANOS),
            requests: self.requests,
            burst: self.burst,
        }
    }
}

/// A rate limit ready to enforce (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    interval: i64,
    tolerance: i64,
    requests: u32,
    burst: u32,
}

/// A key's budget after one request reached the limiter. Kept to 16 bytes
/// (milliseconds, saturating at ~49 days): it rides in every decision, and
/// a larger decision is copied with a call to memmove instead of inline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period.
    pub limit: u32,
    /// Requests that could pass right now.
    pub remaining: u32,
    /// Milliseconds until the full burst is available again (rounded up).
    pub reset_ms: u32,
    /// Milliseconds until the next request can pass (rounded up; 0 when
    /// this one passed).
    pub retry_after_ms: u32,
}

/// Nanoseconds as milliseconds, rounded up, saturating.
pub(crate) fn millis(nanos: i64) -> u32 {
    u32::try_from((nanos.max(0) + 999_999) / 1_000_000).unwrap_or(u32::MAX)
}

/// The numbers a [`Gcra`] enforces, to hand to another process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcraParts {
    /// Nanoseconds between requests at the configured rate.
    pub interval: i64,
    /// How far ahead of now the TAT may run (the burst).
    pub tolerance: i64,
    /// Requests per period (reported in quotas).
    pub requests: u32,
    /// The burst (reported in quotas).
    pub burst: u32,
}

impl Gcra {
    /// Its numbers, for [`Self::from_parts`] elsewhere.
    #[must_use]
    pub fn parts(&self) -> GcraParts {
        GcraParts {
            interval: self.interval,
            tolerance: self.tolerance,
            requests: self.requests,
            burst: self.burst,
        }
    }

    /// A limiter from another process's [`Self::parts`], if they are ones
    /// [`RateLimit::gcra`] can make.
    #[must_use]
    pub fn from_parts(parts: GcraParts) -> Option<Self> {
        let valid = parts.interval >= MIN_INTERVAL_NANOS
            && (0..=MAX_TOLERANCE_NANOS).contains(&parts.tolerance)
            && (1..=MAX_REQUESTS).contains(&parts.requests)
            && (1..=MAX_BURST).contains(&parts.burst);
        valid.then_some(Self {
            interval: parts.interval,
            tolerance: parts.tolerance,
            requests: parts.requests,
            burst: parts.burst,
        })
    }

    /// Admits one request at `now` (Unix nanos) against the key's TAT, or
    /// refuses it (changing nothing). Lock-free: concurrent requests of the
    /// same key retry the compare-and-swap, and each admission moves the
    /// TAT exactly one interval.
    pub fn admit(&self, tat: &AtomicI64, now: i64) -> Result<Quota, Quota> {
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let base = current.max(now);
            if base - now > self.tolerance {
                return Err(Quota {
                    limit: self.requests,
                    remaining: 0,
                    reset_ms: millis(base - now),
                    retry_after_ms: millis(base - now - self.tolerance),
                });
            }
            let next = base + self.interval;
            match tat.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(self.after(next, now)),
                Err(actual) => current = actual,
            }
        }
    }

    /// A theoretical arrival time at which `remaining` requests could pass
    /// at `now`: to carry a shared budget's state into this limiter when
    /// it takes over (see [`super::lease`]).
    #[must_use]
    pub fn tat_for_remaining(&self, remaining: u32, now: i64) -> i64 {
        let remaining = i64::from(remaining.min(self.burst));
        now.saturating_add(self.tolerance)
            .saturating_sub((remaining - 1).saturating_mul(self.interval))
    }

    /// Milliseconds until the full burst is available again, with
    /// `remaining` requests passable now.
    #[must_use]
    pub fn reset_ms(&self, remaining: u32) -> u32 {
        millis(i64::from(self.burst.saturating_sub(remaining)).saturating_mul(self.interval))
    }

    /// Requests that could pass at `now` with the TAT at `tat` (changing
    /// nothing).
    #[must_use]
    pub fn remaining_at(&self, tat: i64, now: i64) -> u32 {
        // Another request passes while TAT - now <= tolerance.
        let slack = self.tolerance - (tat.max(now) - now);
        if slack < 0 {
            0
        } else {
            u32::try_from(slack / self.interval + 1)
                .unwrap_or(u32::MAX)
                .min(self.burst)
        }
    }

    fn after(&self, next: i64, now: i64) -> Quota {
        Quota {
            limit: self.requests,
            remaining: self.remaining_at(next, now),
            reset_ms: millis(next - now),
            retry_after_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;
    const STEP: Duration = Duration::from_millis(10);

    fn limit(requests: u32, period: Duration, burst: u32) -> Gcra {
        RateLimit::new(requests, period, burst)
            .expect("valid limit")
            .gcra(STEP)
    }

    #[test]
    fn a_burst_passes_then_requests_are_spaced_by_the_interval() {
        let gcra = limit(10, Duration::from_secs(1), 5);
        let tat = AtomicI64::new(0);
        let start = 1_000 * SECOND;
        let passed = (0..20).filter(|_| gcra.admit(&tat, start).is_ok()).count();
        assert_eq!(passed, 5, "the burst, then refusals");
        let refused = gcra.admit(&tat, start).expect_err("exhausted");
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after_ms, 100, "one interval");
        assert!(gcra.admit(&tat, start + SECOND / 10).is_ok());
        assert!(gcra.admit(&tat, start + SECOND / 10).is_err());
    }

    #[test]
    fn the_average_rate_holds_with_a_stepping_clock() {
        // 1000/s with a burst of 1 on a clock that moves in 10 ms steps:
        // one request per step would be 100/s.
        let gcra = limit(1000, Duration::from_secs(1), 1);
        let tat = AtomicI64::new(0);
        let per_step: Vec<usize> = (0..100)
            .map(|step| {
                let now = 1_000 * SECOND + step * 10_000_000;
                (0..50).filter(|_| gcra.admit(&tat, now).is_ok()).count()
            })
            .collect();
        // The first step admits one step's worth plus the one request the
        // burst allows (the README's "up to 11 at once"); then 10 a step.
        assert_eq!(per_step[0], 11);
        assert!(per_step[1..].iter().all(|n| *n == 10), "{per_step:?}");
        assert_eq!(
            per_step.iter().sum::<usize>(),
            1001,
            "the rate over one second"
        );
    }

    #[test]
    fn remaining_counts_down_and_reset_is_the_time_to_refill() {
        let gcra = limit(100, Duration::from_secs(60), 3);
        let tat = AtomicI64::new(0);
        let now = 50 * SECOND;
        let first = gcra.admit(&tat, now).expect("passes");
        assert_eq!((first.limit, first.remaining), (100, 2));
        assert_eq!(first.reset_ms, 600, "one interval: 60 s / 100");
        assert_eq!(gcra.admit(&tat, now).expect("passes").remaining, 1);
        assert_eq!(gcra.admit(&tat, now).expect("passes").remaining, 0);
        assert!(gcra.admit(&tat, now).is_err());
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_burst() {
        let gcra = limit(1000, Duration::from_secs(3600), 1000);
        let tat = AtomicI64::new(0);
        let now = 7 * SECOND;
        let passed: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| (0..1000).filter(|_| gcra.admit(&tat, now).is_ok()).count())
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("joins")).sum()
        });
        assert_eq!(passed, 1000);
    }

    #[test]
    fn zero_and_absurd_limits_are_refused_by_field() {
        let field = |r, p, b| RateLimit::new(r, p, b).expect_err("refused").field;
        assert_eq!(field(0, Duration::from_secs(1), 0), "requests");
        assert_eq!(field(1, Duration::ZERO, 0), "period");
        assert_eq!(field(1, Duration::from_secs(86_401), 0), "period");
        assert_eq!(field(1, Duration::from_secs(1), MAX_BURST + 1), "burst");
        assert_eq!(field(1_000_000, Duration::from_millis(1), 0), "requests");
        let ok = RateLimit::new(100, Duration::from_secs(1), 0).expect("valid");
        assert_eq!(
            ok.burst(),
            100,
            "burst 0 means the whole period's allowance"
        );
    }
}
