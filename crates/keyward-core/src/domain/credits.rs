//! A key's usage credits: a number of allowed requests, optionally refilled
//! every period, and the lease a deciding process spends them from.
//!
//! The balance lives in the key's record in the store of truth (sled, or
//! etcd for replicated sidecars): the one place that is durable and
//! consistent for every sidecar at once, so neither a crash nor the loss of
//! the usage store can hand out a credit twice. No decision reads it there:
//! each process *reserves* credits from the record ahead of demand (one
//! store write moves them into its [`CreditLease`]) and a decision spends
//! one from the lease with one compare-and-swap. What a process reserved
//! and did not spend goes back when its demand stops; what a process held
//! when it was killed is lost, never granted again.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

/// Most credits a key may hold (and a refill may set).
pub const MAX_CREDITS: u64 = 1_000_000_000_000;

/// Shortest refill period.
pub const MIN_REFILL_PERIOD: Duration = Duration::from_secs(1);

/// Longest refill period (a year).
pub const MAX_REFILL_PERIOD: Duration = Duration::from_secs(366 * 86_400);

/// A key's credits as its record holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credits {
    /// Credits no process has reserved yet (at most [`MAX_CREDITS`]).
    pub remaining: u64,
    /// The refill, if any.
    pub refill: Option<Refill>,
    /// Unix nanos the current refill period began (when the credits were
    /// set, or the last refill boundary).
    pub refilled_at: i64,
    /// A random id of the last move between the record and a lease, so a
    /// write whose reply was lost is told apart from another process's
    /// move that left the same balance (0: none yet).
    pub last_move: u64,
}

/// Every `period`, the key's credits are *set* to `amount` (not added to:
/// unused credits do not pile up, as Unkey documents its own refill).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refill {
    amount: u64,
    period: Duration,
}

/// Why credits are not valid, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidCredits {
    /// `remaining`, `refill.amount` or `refill.period`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl Refill {
    /// A refill of `amount` every `period`.
    pub fn new(amount: u64, period: Duration) -> Result<Self, InvalidCredits> {
        if amount == 0 || amount > MAX_CREDITS {
            return Err(InvalidCredits {
                field: "refill.amount",
                problem: format!("must be 1 to {MAX_CREDITS}"),
            });
        }
        if !(MIN_REFILL_PERIOD..=MAX_REFILL_PERIOD).contains(&period) {
            return Err(InvalidCredits {
                field: "refill.period",
                problem: "must be 1s to 366d".into(),
            });
        }
        Ok(Self { amount, period })
    }

    /// What each refill sets the credits to.
    #[must_use]
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// How often it refills.
    #[must_use]
    pub fn period(&self) -> Duration {
        self.period
    }

    fn period_nanos(&self) -> i64 {
        i64::try_from(self.period.as_nanos()).unwrap_or(i64::MAX)
    }
}

impl Credits {
    /// Credits set at `now`: `remaining`, refilled as `refill` says.
    pub fn new(remaining: u64, refill: Option<Refill>, now: i64) -> Result<Self, InvalidCredits> {
        if remaining > MAX_CREDITS {
            return Err(InvalidCredits {
                field: "remaining",
                problem: format!("must be 0 to {MAX_CREDITS}"),
            });
        }
        Ok(Self {
            remaining,
            refill,
            refilled_at: now,
            last_move: 0,
        })
    }

    /// When the next refill is due (Unix nanos); `i64::MAX`: never.
    #[must_use]
    pub fn next_refill(&self) -> i64 {
        self.refill.map_or(i64::MAX, |refill| {
            self.refilled_at.saturating_add(refill.period_nanos())
        })
    }

    /// The credits as of `now`: refilled if a period ended since the last
    /// refill (however many ended, one refill: it sets, it does not add).
    #[must_use]
    pub fn due(mut self, now: i64) -> Self {
        if let Some(refill) = self.refill
            && now >= self.next_refill()
        {
            let period = refill.period_nanos().max(1);
            let periods = (now - self.refilled_at) / period;
            self.refilled_at = self
                .refilled_at
                .saturating_add(periods.saturating_mul(period));
            self.remaining = refill.amount;
        }
        self
    }

    /// Reserves up to `want` credits at `now` for one process: never more
    /// than half of what is left (rounded up), so the last credits are
    /// shared out among every process asking rather than stranded in one
    /// lease. Returns how many were reserved.
    pub fn reserve(&mut self, want: u64, now: i64) -> u64 {
        *self = self.due(now);
        let granted = want.min(self.remaining.div_ceil(2));
        self.remaining -= granted;
        granted
    }

    /// Takes exactly `amount` credits out (to give them to another key),
    /// or none if fewer are left at `now`.
    pub fn withdraw(&mut self, amount: u64, now: i64) -> bool {
        *self = self.due(now);
        if self.remaining < amount {
            return false;
        }
        self.remaining -= amount;
        true
    }

    /// Takes back `amount` credits a process reserved in `period` and did
    /// not spend, unless the credits are in another period now (set anew
    /// or refilled: the old period's credits lapse).
    pub fn give_back(&mut self, amount: u64, period: i64, now: i64) {
        *self = self.due(now);
        if period == self.refilled_at {
            self.remaining = self.remaining.saturating_add(amount).min(MAX_CREDITS);
        }
    }

    /// How many credits a reservation moved out of `before` to leave
    /// these (`self`: the record after it).
    #[must_use]
    pub fn reserved_from(&self, before: &Self) -> u64 {
        let start = if self.refilled_at == before.refilled_at {
            before.remaining
        } else {
            self.refill.map_or(before.remaining, |refill| refill.amount)
        };
        start.saturating_sub(self.remaining)
    }

    /// Whether these credits are no looser than `bound`'s: no more left,
    /// and a refill no larger and no more frequent (none if `bound` has
    /// none).
    #[must_use]
    pub fn within(&self, bound: &Self) -> bool {
        let refill_within = match (self.refill, bound.refill) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => {
                mine.amount <= theirs.amount && mine.period >= theirs.period
            }
        };
        self.remaining <= bound.remaining && refill_within
    }
}

/// A process's credits in hand for one key. Spending is one
/// compare-and-swap; a lease never goes below zero, so a process never
/// spends a credit it did not reserve. Its credits belong to one *period*
/// of the key's credits (their `refilled_at`): once the record shows
/// another (the credits were set anew, or refilled), what the lease holds
/// is void at the next decision.
#[derive(Debug, Default)]
pub struct CreditLease {
    /// Credits reserved and not yet spent.
    tokens: AtomicI64,
    /// The period they were reserved in.
    period: AtomicI64,
    /// Requests that reached the credits since the keeper last looked
    /// (what the next reservation is sized from).
    demand: AtomicU32,
}

impl CreditLease {
    /// Spends one credit of `period` (the key's current one), or says
    /// there is none in hand (changing nothing but the demand).
    #[inline]
    pub fn spend(&self, period: i64) -> bool {
        self.demand.fetch_add(1, Ordering::Relaxed);
        if self.period.load(Ordering::Acquire) != period {
            return false;
        }
        // A compare-and-swap, not a subtraction undone on failure: the
        // count never dips below zero, so a concurrent `take` cannot
        // take a credit a failed spend is about to put back.
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens > 0).then(|| tokens - 1)
            })
            .is_ok()
    }

    /// Whether a credit of `period` is in hand; counts the request toward
    /// demand when none is (a later [`Self::spend`] counts it otherwise).
    #[inline]
    pub fn has(&self, period: i64) -> bool {
        let has = self.period.load(Ordering::Acquire) == period
            && self.tokens.load(Ordering::Relaxed) > 0;
        if !has {
            self.demand.fetch_add(1, Ordering::Relaxed);
        }
        has
    }

    /// Credits in hand for `period` (0 for any other).
    #[must_use]
    pub fn in_hand(&self, period: i64) -> u64 {
        if self.period.load(Ordering::Relaxed) != period {
            return 0;
        }
        u64::try_from(self.tokens.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Credits in hand, whatever their period.
    #[must_use]
    pub fn in_hand_any(&self) -> u64 {
        u64::try_from(self.tokens.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Adds credits reserved in `period`; credits of an earlier period
    /// still in hand are void. One caller at a time (the key's keeper).
    pub fn add(&self, credits: u64, period: i64) {
        let credits = i64::try_from(credits).unwrap_or(i64::MAX);
        if self.period.load(Ordering::Relaxed) != period {
            // Old tokens void first, then the period (released), then the
            // new tokens: a decision that sees the new period (acquired)
            // never spends an old token.
            self.tokens.store(0, Ordering::Relaxed);
            self.period.store(period, Ordering::Release);
        }
        self.tokens.fetch_add(credits, Ordering::Relaxed);
    }

    /// Takes up to `most` credits in hand (to give them back), with their
    /// period. One caller at a time, as for [`Self::add`], so the period
    /// cannot change under it.
    pub fn take(&self, most: u64) -> (u64, i64) {
        let most = i64::try_from(most).unwrap_or(i64::MAX);
        let before = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                Some(tokens - tokens.clamp(0, most))
            })
            .unwrap_or(0);
        let taken = u64::try_from(before.clamp(0, most)).unwrap_or(0);
        (taken, self.period.load(Ordering::Relaxed))
    }

    /// The demand since the last call.
    pub fn take_demand(&self) -> u32 {
        self.demand.swap(0, Ordering::Relaxed)
    }
}

/// Ticks in a [`DemandWindow`]: a second of a keeper's 50 ms ticks.
pub const DEMAND_TICKS: usize = 20;

/// A key's credit demand over the last second, one keeper tick a slot, and
/// how many ticks it has gone without any: what a keeper (a sidecar's, or
/// an Envoy module's) sizes reservations and give-backs from.
#[derive(Debug, Default)]
pub struct DemandWindow {
    demand: [u32; DEMAND_TICKS],
    at: usize,
    idle: u32,
}

impl DemandWindow {
    /// A new tick with `demand` requests.
    pub fn push(&mut self, demand: u32) {
        self.at = (self.at + 1) % DEMAND_TICKS;
        self.demand[self.at] = demand;
        self.idle = if demand == 0 {
            self.idle.saturating_add(1)
        } else {
            0
        };
    }

    /// Adds `demand` to the current tick (a borrower's, counted with the
    /// keeper's own).
    pub fn add(&mut self, demand: u64) {
        let slot = &mut self.demand[self.at];
        *slot = slot.saturating_add(u32::try_from(demand).unwrap_or(u32::MAX));
    }

    /// The demand over the last second.
    #[must_use]
    pub fn second(&self) -> u64 {
        self.demand.iter().map(|d| u64::from(*d)).sum()
    }

    /// Ticks in a row without demand.
    #[must_use]
    pub fn idle(&self) -> u32 {
        self.idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn daily(amount: u64) -> Option<Refill> {
        Refill::new(amount, Duration::from_secs(86_400)).ok()
    }

    #[test]
    fn bad_credits_name_their_field() {
        assert_eq!(
            Credits::new(MAX_CREDITS + 1, None, 0)
                .expect_err("too many")
                .field,
            "remaining"
        );
        assert_eq!(
            Refill::new(0, Duration::from_secs(60))
                .expect_err("zero")
                .field,
            "refill.amount"
        );
        assert_eq!(
            Refill::new(1, Duration::from_millis(10))
                .expect_err("short")
                .field,
            "refill.period"
        );
    }

    #[test]
    fn a_refill_sets_the_balance_once_however_many_periods_passed() {
        let credits = Credits::new(3, daily(100), 10 * SEC).expect("valid");
        assert_eq!(credits.due(10 * SEC + 86_399 * SEC).remaining, 3);
        let later = credits.due(10 * SEC + 3 * 86_400 * SEC + 5);
        assert_eq!(later.remaining, 100);
        assert_eq!(later.refilled_at, 10 * SEC + 3 * 86_400 * SEC);
        assert_eq!(later.next_refill(), 10 * SEC + 4 * 86_400 * SEC);
        assert_eq!(
            Credits::new(3, None, 0).expect("valid").next_refill(),
            i64::MAX
        );
    }

    #[test]
    fn reservations_take_at_most_half_and_never_more_than_left() {
        let mut credits = Credits::new(10, None, 0).expect("valid");
        let mut reserved = Vec::new();
        while credits.remaining > 0 {
            reserved.push(credits.reserve(100, 1));
        }
        assert_eq!(reserved, [5, 3, 1, 1]);
        let before = Credits::new(7, daily(10), 0).expect("valid");
        let mut after = before;
        after.reserve(3, 1);
        assert_eq!(after.reserved_from(&before), 3);
        let mut refilled = before;
        refilled.reserve(4, 86_400 * SEC);
        assert_eq!(refilled.remaining, 6);
        assert_eq!(
            refilled.reserved_from(&before),
            4,
            "counted from the refill"
        );
        assert_eq!(credits.reserve(100, 2), 0);
    }

    #[test]
    fn credits_given_back_lapse_at_a_refill() {
        let mut credits = Credits::new(10, daily(10), 0).expect("valid");
        assert_eq!(credits.reserve(4, 1), 4);
        credits.give_back(4, 0, 2);
        assert_eq!(credits.remaining, 10);
        assert_eq!(credits.reserve(4, 3), 4);
        credits.give_back(4, 0, 86_400 * SEC + 1);
        assert_eq!(
            credits.remaining, 10,
            "the refill set it; the old lease lapsed"
        );
    }

    #[test]
    fn within_compares_balance_and_refill() {
        let bound = Credits::new(100, daily(100), 0).expect("valid");
        let fewer = Credits::new(50, None, 0).expect("valid");
        assert!(fewer.within(&bound));
        assert!(!bound.within(&fewer), "a refill where the bound has none");
        let more = Credits::new(101, None, 0).expect("valid");
        assert!(!more.within(&bound));
        let hourly = Credits::new(
            10,
            Some(Refill::new(10, Duration::from_secs(3600)).expect("valid")),
            0,
        )
        .expect("valid");
        assert!(!hourly.within(&bound), "refilled more often");
    }

    #[test]
    fn a_credit_lease_costs_every_key_24_bytes() {
        // docs/credits.md states it: every key's usage state carries one.
        assert_eq!(std::mem::size_of::<CreditLease>(), 24);
    }

    #[test]
    fn a_lease_never_spends_what_it_does_not_hold() {
        let lease = CreditLease::default();
        assert!(!lease.spend(7));
        lease.add(2, 7);
        assert!(lease.spend(7));
        assert!(lease.spend(7));
        assert!(!lease.has(7));
        lease.add(1, 7);
        assert!(lease.has(7));
        assert_eq!(lease.in_hand(7), 1);
        assert_eq!(lease.take_demand(), 4);
        lease.add(4, 7);
        assert_eq!(lease.take(3), (3, 7));
        assert_eq!(lease.take(u64::MAX), (2, 7));
        assert_eq!(lease.in_hand(7), 0);
    }

    #[test]
    fn credits_of_another_period_are_void() {
        let lease = CreditLease::default();
        lease.add(5, 7);
        assert!(!lease.spend(8), "the key's credits were set anew");
        assert_eq!(lease.in_hand(8), 0);
        lease.add(1, 8);
        assert!(lease.spend(8));
        assert!(!lease.spend(8), "the old period's four are gone");
    }

    #[test]
    fn a_demand_window_holds_the_last_second_and_counts_idle_ticks() {
        let mut window = DemandWindow::default();
        for _ in 0..DEMAND_TICKS {
            window.push(3);
        }
        window.add(5);
        assert_eq!(window.second(), 3 * DEMAND_TICKS as u64 + 5);
        for tick in 1..=DEMAND_TICKS {
            window.push(0);
            assert_eq!(window.idle(), u32::try_from(tick).expect("small"));
        }
        assert_eq!(window.second(), 0, "a second later, nothing is left");
        window.push(1);
        assert_eq!((window.second(), window.idle()), (1, 0));
    }
}
