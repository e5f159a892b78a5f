//! A process's lease on a key's global rate limit.
//!
//! When a usage store holds the limit for every sidecar, the budget itself
//! (a GCRA in the store) is never asked on the request path: each process
//! holds a few tokens taken from it ahead of demand, and a decision spends
//! one with one atomic subtraction. A background task trades the lease
//! every tick: unused tokens go back, what was spent on credit is paid,
//! and the next tick's share is taken (see the sidecar's `usage` module).
//!
//! Between trades a lease may run dry. While the store last reported room
//! in the budget, a decision may then spend a little on credit (at most
//! [`Lease::credit_for`] tokens, paid at the next trade, so a quiet key's
//! first requests are not refused for want of a lease); once the store
//! reported the budget spent, an empty lease refuses.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use super::rate::{Gcra, Quota};

/// A process's share of one key's global rate limit, and what the store
/// last said of the whole budget.
#[derive(Debug, Default)]
pub struct Lease {
    /// Tokens in hand; below zero, tokens spent on credit.
    tokens: AtomicI64,
    /// The store last reported the budget spent: no spending on credit.
    spent: AtomicBool,
    /// Requests that reached the limit since the last trade (what the next
    /// share is sized from).
    demand: AtomicU32,
    /// Milliseconds until the store's budget refills one token, as last
    /// reported (the retry-after of a refusal).
    retry_after_ms: AtomicU32,
    /// Tokens the store's budget held after the last trade.
    remaining: AtomicU32,
}

/// What one trade with the store brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trade {
    /// Tokens granted for the next tick.
    pub granted: u32,
    /// Tokens left in the store's budget after the grant.
    pub remaining: u32,
    /// Milliseconds until the budget's next token.
    pub retry_after_ms: u32,
}

impl Lease {
    /// Tokens a process may spend on credit for a key with `limit`: a
    /// sixty-fourth of its burst, at least one.
    #[must_use]
    pub fn credit_for(limit: &Gcra) -> i64 {
        i64::from((limit.parts().burst / 64).max(1))
    }

    /// Admits one request against the lease, or refuses it (changing
    /// nothing). Every call counts toward the next share.
    pub fn admit(&self, limit: &Gcra) -> Result<Quota, Quota> {
        self.demand.fetch_add(1, Ordering::Relaxed);
        let floor = if self.spent.load(Ordering::Relaxed) {
            0
        } else {
            -Self::credit_for(limit)
        };
        let before = self.tokens.fetch_sub(1, Ordering::Relaxed);
        let requests = limit.parts().requests;
        if before > floor {
            let in_hand = u32::try_from(before - 1).unwrap_or(0);
            return Ok(Quota {
                limit: requests,
                remaining: self
                    .remaining
                    .load(Ordering::Relaxed)
                    .saturating_add(in_hand)
                    .min(limit.parts().burst),
                reset_ms: self.retry_after_ms.load(Ordering::Relaxed),
                retry_after_ms: 0,
            });
        }
        self.tokens.fetch_add(1, Ordering::Relaxed);
        let retry_after_ms = self.retry_after_ms.load(Ordering::Relaxed).max(1);
        Err(Quota {
            limit: requests,
            remaining: 0,
            reset_ms: retry_after_ms,
            retry_after_ms,
        })
    }

    /// Takes the lease back for a trade: the tokens in hand (negative: owed)
    /// and the demand since the last trade. The lease is empty until
    /// [`Self::settle`].
    pub fn take(&self) -> (i64, u32) {
        (
            self.tokens.swap(0, Ordering::Relaxed),
            self.demand.swap(0, Ordering::Relaxed),
        )
    }

    /// Hands back what a trade could not settle (the store unreachable):
    /// tokens in hand, or a debt still owed.
    pub fn restore(&self, tokens: i64) {
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Applies a trade: the granted tokens join the lease (decisions may
    /// have spent on credit since [`Self::take`]; that stays owed).
    pub fn settle(&self, trade: Trade) {
        self.remaining.store(trade.remaining, Ordering::Relaxed);
        self.retry_after_ms
            .store(trade.retry_after_ms, Ordering::Relaxed);
        self.spent.store(trade.remaining == 0, Ordering::Relaxed);
        self.tokens
            .fetch_add(i64::from(trade.granted), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::rate::RateLimit;

    fn limit(requests: u32, burst: u32) -> Gcra {
        RateLimit::new(requests, Duration::from_secs(1), burst)
            .expect("valid")
            .gcra(Duration::from_millis(10))
    }

    #[test]
    fn a_fresh_lease_spends_on_credit_then_refuses() {
        let limit = limit(640, 640);
        let lease = Lease::default();
        let passed = (0..100).filter(|_| lease.admit(&limit).is_ok()).count();
        assert_eq!(passed, 10, "a sixty-fourth of the burst on credit");
        assert_eq!(lease.take(), (-10, 100), "owed, and the demand seen");
    }

    #[test]
    fn granted_tokens_are_spent_then_a_spent_budget_refuses() {
        let limit = limit(100, 100);
        let lease = Lease::default();
        lease.settle(Trade {
            granted: 5,
            remaining: 0,
            retry_after_ms: 10,
        });
        let passed = (0..20).filter(|_| lease.admit(&limit).is_ok()).count();
        assert_eq!(passed, 5, "no credit once the store says spent");
        let refused = lease.admit(&limit).expect_err("refused");
        assert_eq!((refused.remaining, refused.retry_after_ms), (0, 10));
        assert_eq!(lease.take(), (0, 21), "refusals leave no debt");
    }

    #[test]
    fn credit_spent_during_a_trade_stays_owed() {
        let limit = limit(64, 64);
        let lease = Lease::default();
        let (tokens, _) = lease.take();
        assert_eq!(tokens, 0);
        assert!(lease.admit(&limit).is_ok(), "one token on credit");
        lease.settle(Trade {
            granted: 3,
            remaining: 10,
            retry_after_ms: 0,
        });
        assert_eq!(lease.take().0, 2, "three granted, one owed");
    }

    #[test]
    fn concurrent_spending_never_exceeds_the_lease_and_credit() {
        let limit = limit(64_000, 64_000);
        let lease = Lease::default();
        lease.settle(Trade {
            granted: 1000,
            remaining: 5,
            retry_after_ms: 0,
        });
        let passed: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1000).filter(|_| lease.admit(&limit).is_ok()).count()))
                .collect();
            workers.into_iter().map(|w| w.join().expect("joins")).sum()
        });
        assert_eq!(
            passed,
            1000 + 1000,
            "the lease and a sixty-fourth of the burst"
        );
    }
}
