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
//!
//! A trade that has not come back within [`STALLED_NANOS`] (the store
//! stalled) hands the key to this process's own limiter, started from the
//! budget the store last reported, until a trade settles again: a stalled
//! store costs a key its global limit, never its traffic.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use super::key::KeyId;
use super::rate::{Gcra, Quota};

/// How long a trade may be out before decisions stop waiting for it (three
/// trade ticks).
pub const STALLED_NANOS: i64 = 150_000_000;

/// How often every holder of leases (a sidecar, an Envoy module) trades
/// them. A lease covers about two ticks of the key's demand, so this is
/// also about how long an unused token stays out of the shared budget.
pub const TRADE_TICK_NANOS: i64 = 50_000_000;

/// Trades without demand after which a lease is given back and the key no
/// longer traded (a second).
pub const IDLE_TRADES: u32 = 20;

/// The shortest retry-after of a refusal while the store still had room:
/// the next trade brings tokens (a trade tick).
const RETRY_WITH_ROOM_MS: u32 = 50;

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
    /// Tokens the store's budget held after the last trade, plus one; 0
    /// until a trade settles, and again once the key is forgotten (one
    /// atomic: a report and whether there is one are never read apart).
    reported_remaining: AtomicU32,
    /// When the trade under way began (Unix nanos; 0: none).
    trading_since: AtomicI64,
    /// A trader holds the key in its set (see [`Roster`]).
    enlisted: AtomicBool,
}

/// Where decisions send the keys whose leases a trader must start
/// trading: each key once (its lease remembers it is enlisted) until the
/// trader retires it. Bounded: a full roster drops the id, and the key's
/// next decision sends it again.
#[derive(Debug, Clone)]
pub struct Roster(std::sync::mpsc::SyncSender<KeyId>);

impl Roster {
    /// A roster holding up to `bound` ids not yet taken, and the trader's
    /// end of it.
    #[must_use]
    pub fn new(bound: usize) -> (Self, std::sync::mpsc::Receiver<KeyId>) {
        let (sender, receiver) = std::sync::mpsc::sync_channel(bound);
        (Self(sender), receiver)
    }
}

/// What a trader does with one lease this tick (see [`Lease::turn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Trade with the store: `give` tokens back, `owed` paid, up to `want`
    /// taken; `taken` is what [`Lease::failed`] needs if the trade fails.
    Trade {
        /// Unused tokens given back.
        give: u64,
        /// Tokens spent on credit, paid.
        owed: u64,
        /// Tokens wanted for the next ticks.
        want: u32,
        /// What the lease held when taken (negative: owed).
        taken: i64,
    },
    /// Nothing to trade this tick.
    Rest,
    /// Idle long enough: the lease is forgotten; stop trading the key.
    Retire,
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
    /// Sends `id` to `roster` unless this lease is already enlisted there:
    /// one atomic load on every decision but the first.
    #[inline]
    pub fn enlist(&self, id: KeyId, roster: &Roster) {
        if !self.enlisted.load(Ordering::Relaxed)
            && !self.enlisted.swap(true, Ordering::Relaxed)
            && roster.0.try_send(id).is_err()
        {
            self.enlisted.store(false, Ordering::Relaxed);
        }
    }

    /// The most tokens one trade takes for `limit`: two ticks of the rate
    /// when the burst is smaller (a burst below a tick's worth would cap a
    /// holder below the rate: the store's budget is widened to two ticks
    /// too), else the burst.
    #[must_use]
    pub fn most_wanted(limit: &Gcra) -> u32 {
        let parts = limit.parts();
        let two_ticks =
            u32::try_from(2 * TRADE_TICK_NANOS / parts.interval.max(1)).unwrap_or(u32::MAX);
        parts.burst.max(two_ticks)
    }

    /// Takes the lease for this tick's trade at `now`, `idle` being the
    /// trades the key has gone without demand (updated here): what to ask
    /// of the store (two ticks of the demand seen, up to
    /// [`Self::most_wanted`]), or nothing.
    pub fn turn(&self, limit: &Gcra, idle: &mut u32, now: i64) -> Turn {
        let (tokens, demand) = self.take(now);
        if demand == 0 {
            *idle = idle.saturating_add(1);
            if tokens == 0 {
                self.failed(0);
                if *idle >= IDLE_TRADES {
                    // What the store said of the budget is stale by the
                    // next request: a spent budget has refilled meanwhile.
                    self.forget();
                    return Turn::Retire;
                }
                return Turn::Rest;
            }
        } else {
            *idle = 0;
        }
        Turn::Trade {
            give: u64::try_from(tokens.max(0)).unwrap_or(0),
            owed: tokens.min(0).unsigned_abs(),
            want: demand.saturating_mul(2).min(Self::most_wanted(limit)),
            taken: tokens,
        }
    }

    /// Tokens a process may spend on credit for a key with `limit`: a
    /// sixty-fourth of its burst, at least one.
    #[must_use]
    pub fn credit_for(limit: &Gcra) -> i64 {
        i64::from((limit.parts().burst / 64).max(1))
    }

    /// Admits one request at `now` against the lease, or refuses it
    /// (changing nothing). Every call counts toward the next share. While a
    /// trade is stalled, the key's own limiter (`tat`) decides instead.
    pub fn admit(&self, limit: &Gcra, tat: &AtomicI64, now: i64) -> Result<Quota, Quota> {
        let since = self.trading_since.load(Ordering::Relaxed);
        if since != 0 && now - since > STALLED_NANOS {
            let admitted = limit.admit(tat, now);
            if admitted.is_ok() {
                // Owed to the shared budget: the next trade pays it.
                self.tokens.fetch_sub(1, Ordering::Relaxed);
            }
            return admitted;
        }
        self.demand.fetch_add(1, Ordering::Relaxed);
        let spent = self.spent.load(Ordering::Relaxed);
        let floor = if spent { 0 } else { -Self::credit_for(limit) };
        let before = self.tokens.fetch_sub(1, Ordering::Relaxed);
        let parts = limit.parts();
        if before > floor {
            let in_hand = u32::try_from(before - 1).unwrap_or(0);
            // Before any report, this request and every one since on credit.
            let spending = (1 - before).max(1);
            let remaining = self.budget(limit, tat, now, in_hand, spending);
            return Ok(Quota {
                limit: parts.requests,
                remaining,
                reset_ms: limit.reset_ms(remaining),
                retry_after_ms: 0,
            });
        }
        self.tokens.fetch_add(1, Ordering::Relaxed);
        let reported = self.retry_after_ms.load(Ordering::Relaxed);
        let retry_after_ms = if spent {
            reported.max(1)
        } else {
            reported.max(RETRY_WITH_ROOM_MS)
        };
        // Refused for want of a lease while the budget has room: it is
        // full again when the budget as known here is, not a whole burst
        // from now.
        let left = if spent {
            0
        } else {
            // Less what this process spent on credit and still owes.
            self.budget(limit, tat, now, 0, (-before).max(0))
        };
        Err(Quota {
            limit: parts.requests,
            remaining: 0,
            reset_ms: limit.reset_ms(left),
            retry_after_ms,
        })
    }

    /// The shared budget as this process knows it at `now`: the store's
    /// last report plus `in_hand`; before any report (a key's first
    /// requests here, or its first after going quiet), the key's own
    /// limiter's view, last set from a report and refilled since, less
    /// `spending`. Never a 0 that would make a client back off from a full
    /// budget.
    fn budget(&self, limit: &Gcra, tat: &AtomicI64, now: i64, in_hand: u32, spending: i64) -> u32 {
        let parts = limit.parts();
        match self.reported_remaining.load(Ordering::Relaxed) {
            0 => {
                let after = tat.load(Ordering::Relaxed).max(now) + spending * parts.interval;
                limit.remaining_at(after, now)
            }
            plus_one => (plus_one - 1).saturating_add(in_hand).min(parts.burst),
        }
    }

    /// Takes the lease back for a trade at `now`: the tokens in hand
    /// (negative: owed) and the demand since the last trade. The lease is
    /// empty until [`Self::settle`] or [`Self::failed`].
    pub fn take(&self, now: i64) -> (i64, u32) {
        self.trading_since.store(now.max(1), Ordering::Relaxed);
        (
            self.tokens.swap(0, Ordering::Relaxed),
            self.demand.swap(0, Ordering::Relaxed),
        )
    }

    /// A trade that failed, or may or may not have been applied (a
    /// timeout): tokens being given back count as given (at worst the
    /// budget admits fewer), a debt stays owed.
    pub fn failed(&self, taken: i64) {
        self.tokens.fetch_add(taken.min(0), Ordering::Relaxed);
        self.trading_since.store(0, Ordering::Relaxed);
    }

    /// Applies a trade at `now`: the granted tokens join the lease
    /// (decisions may have spent on credit since [`Self::take`]; that stays
    /// owed), and the key's own limiter (`tat`, when given: not while it is
    /// the one deciding) is set to the budget reported, for when it must
    /// decide alone.
    pub fn settle(&self, trade: Trade, limit: &Gcra, tat: Option<&AtomicI64>, now: i64) {
        self.reported_remaining
            .store(trade.remaining.saturating_add(1), Ordering::Relaxed);
        self.retry_after_ms
            .store(trade.retry_after_ms, Ordering::Relaxed);
        self.spent.store(trade.remaining == 0, Ordering::Relaxed);
        self.tokens
            .fetch_add(i64::from(trade.granted), Ordering::Relaxed);
        if let Some(tat) = tat {
            tat.store(
                limit.tat_for_remaining(trade.remaining, now),
                Ordering::Relaxed,
            );
        }
        self.trading_since.store(0, Ordering::Relaxed);
    }

    /// Forgets what the store said of the budget (a key no longer traded:
    /// by its next request that is stale, and a spent budget may have
    /// refilled), any tokens in hand, and that it is enlisted.
    pub fn forget(&self) {
        self.enlisted.store(false, Ordering::Relaxed);
        self.spent.store(false, Ordering::Relaxed);
        self.retry_after_ms.store(0, Ordering::Relaxed);
        self.reported_remaining.store(0, Ordering::Relaxed);
        self.tokens.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::rate::RateLimit;

    const NOW: i64 = 1_000_000_000_000;

    fn limit(requests: u32, burst: u32) -> Gcra {
        RateLimit::new(requests, Duration::from_secs(1), burst)
            .expect("valid")
            .gcra(Duration::from_millis(10))
    }

    fn trade(granted: u32, remaining: u32) -> Trade {
        Trade {
            granted,
            remaining,
            retry_after_ms: 10,
        }
    }

    #[test]
    fn a_lease_costs_every_index_entry_32_bytes() {
        // docs/usage.md states it: every key's entry carries one.
        assert_eq!(std::mem::size_of::<Lease>(), 32);
    }

    #[test]
    fn a_fresh_lease_spends_on_credit_then_refuses() {
        let (limit, tat) = (limit(640, 640), AtomicI64::new(0));
        let lease = Lease::default();
        let passed = (0..100)
            .filter(|_| lease.admit(&limit, &tat, NOW).is_ok())
            .count();
        assert_eq!(passed, 10, "a sixty-fourth of the burst on credit");
        let fresh = Lease::default();
        let first = fresh.admit(&limit, &tat, NOW).expect("on credit");
        assert_eq!(
            first.remaining, 639,
            "before any report, the key's own limiter's view (a full burst less this one), not 0"
        );
        let second = fresh.admit(&limit, &tat, NOW).expect("on credit");
        assert_eq!(second.remaining, 638, "and it counts down");
        let refused = lease.admit(&limit, &tat, NOW).expect_err("refused");
        assert_eq!(refused.retry_after_ms, 50, "the next trade, not 1 ms");
        assert_eq!(
            (refused.remaining, refused.reset_ms),
            (0, limit.reset_ms(630)),
            "none here now, and the budget is full again once the ten spent on credit refill: no wait for a whole burst"
        );
        assert!(limit.reset_ms(630) < limit.reset_ms(0));
        assert_eq!(lease.take(NOW), (-10, 101), "owed, and the demand seen");
    }

    #[test]
    fn granted_tokens_are_spent_then_a_spent_budget_refuses() {
        let (limit, tat) = (limit(100, 100), AtomicI64::new(0));
        let lease = Lease::default();
        lease.settle(trade(5, 0), &limit, Some(&tat), NOW);
        let passed = (0..20)
            .filter(|_| lease.admit(&limit, &tat, NOW).is_ok())
            .count();
        assert_eq!(passed, 5, "no credit once the store says spent");
        let refused = lease.admit(&limit, &tat, NOW).expect_err("refused");
        assert_eq!((refused.remaining, refused.retry_after_ms), (0, 10));
        assert_eq!(lease.take(NOW), (0, 21), "refusals leave no debt");
        lease.failed(0);
        lease.forget();
        let later = NOW + 1_000_000_000;
        let quota = lease.admit(&limit, &tat, later);
        assert_eq!(
            quota.map(|quota| quota.remaining),
            Ok(99),
            "forgotten: credit again, not a stale refusal, and the spent budget's report refilled for a second"
        );
    }

    #[test]
    fn credit_spent_during_a_trade_stays_owed() {
        let (limit, tat) = (limit(64, 64), AtomicI64::new(0));
        let lease = Lease::default();
        assert_eq!(lease.take(NOW).0, 0);
        assert!(
            lease.admit(&limit, &tat, NOW).is_ok(),
            "one token on credit"
        );
        lease.settle(trade(3, 10), &limit, Some(&tat), NOW);
        assert_eq!(lease.take(NOW).0, 2, "three granted, one owed");
    }

    #[test]
    fn a_failed_trade_keeps_the_debt_and_forgets_the_tokens_given_back() {
        let (limit, tat) = (limit(64, 64), AtomicI64::new(0));
        let lease = Lease::default();
        lease.settle(trade(5, 10), &limit, Some(&tat), NOW);
        let (taken, _) = lease.take(NOW);
        lease.failed(taken);
        assert_eq!(lease.take(NOW).0, 0, "five given back count as given");
        lease.failed(-3);
        assert_eq!(lease.take(NOW).0, -3, "a debt is still owed");
    }

    #[test]
    fn a_stalled_trade_hands_the_key_to_its_own_limiter_at_the_budget_reported() {
        let (limit, tat) = (limit(100, 100), AtomicI64::new(0));
        let lease = Lease::default();
        lease.settle(trade(0, 7), &limit, Some(&tat), NOW);
        let _ = lease.take(NOW);
        let stalled = NOW + STALLED_NANOS + 1;
        let passed = (0..50)
            .filter(|_| lease.admit(&limit, &tat, stalled).is_ok())
            .count();
        assert_eq!(
            passed,
            7 + 15,
            "the store's last word and 150 ms of refill, not a fresh burst of 100"
        );
        assert_eq!(
            lease.take(stalled).0,
            -22,
            "what the stall admitted is owed"
        );
        lease.settle(trade(2, 0), &limit, Some(&tat), stalled);
        let passed = (0..50)
            .filter(|_| lease.admit(&limit, &tat, stalled).is_ok())
            .count();
        assert_eq!(passed, 2, "settled: the lease again");
    }

    #[test]
    fn concurrent_spending_never_exceeds_the_lease_and_credit() {
        let (limit, tat) = (limit(64_000, 64_000), AtomicI64::new(0));
        let lease = Lease::default();
        lease.settle(trade(1000, 5), &limit, Some(&tat), NOW);
        let passed: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1000)
                            .filter(|_| lease.admit(&limit, &tat, NOW).is_ok())
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("joins")).sum()
        });
        assert_eq!(
            passed,
            1000 + 1000,
            "the lease and a sixty-fourth of the burst"
        );
    }

    #[test]
    fn a_turn_asks_two_ticks_of_demand_and_retires_an_idle_lease() {
        let (limit, tat) = (limit(100, 100), AtomicI64::new(0));
        let lease = Lease::default();
        let mut idle = 0;
        lease.settle(trade(4, 50), &limit, Some(&tat), NOW);
        for _ in 0..3 {
            assert!(lease.admit(&limit, &tat, NOW).is_ok());
        }
        assert_eq!(
            lease.turn(&limit, &mut idle, NOW),
            Turn::Trade {
                give: 1,
                owed: 0,
                want: 6,
                taken: 1
            }
        );
        lease.settle(trade(0, 50), &limit, Some(&tat), NOW);
        for round in 1..IDLE_TRADES {
            assert_eq!(lease.turn(&limit, &mut idle, NOW), Turn::Rest, "{round}");
        }
        assert_eq!(lease.turn(&limit, &mut idle, NOW), Turn::Retire);
        assert!(
            lease.admit(&limit, &tat, NOW).is_ok(),
            "a retired lease begins again on credit"
        );
        let many = Lease::default();
        for _ in 0..500 {
            let _ = many.admit(&limit, &tat, NOW);
        }
        let Turn::Trade { want, .. } = many.turn(&limit, &mut 0, NOW) else {
            panic!("demand is traded");
        };
        assert_eq!(want, 100, "never more than the burst");
    }

    #[test]
    fn a_lease_is_enlisted_once_until_retired_and_a_full_roster_drops_nothing_for_good() {
        let (roster, enlisted) = Roster::new(1);
        let (one, two) = (Lease::default(), Lease::default());
        let (a, b) = (KeyId::from_bytes([1; 16]), KeyId::from_bytes([2; 16]));
        one.enlist(a, &roster);
        one.enlist(a, &roster);
        two.enlist(b, &roster);
        assert_eq!(
            enlisted.try_iter().collect::<Vec<_>>(),
            vec![a],
            "once; b found it full"
        );
        two.enlist(b, &roster);
        assert_eq!(
            enlisted.try_iter().collect::<Vec<_>>(),
            vec![b],
            "b sent again"
        );
        one.forget();
        one.enlist(a, &roster);
        assert_eq!(
            enlisted.try_iter().collect::<Vec<_>>(),
            vec![a],
            "retired, then again"
        );
    }
}
