//! The credit keeper: moves a key's usage credits between its record in
//! the store of truth and this sidecar's lease on them
//! (`keyward_core::domain::credits`), so that decisions spend from memory.
//!
//! Every [`TICK`] it looks at each key it keeps: a lease below half of the
//! key's last second of demand is topped up to a second's worth (one store
//! write: a group-committed sled write standalone, an etcd transaction
//! replicated); a lease idle for [`IDLE_TICKS`] is given back, and once
//! the record has none left to reserve, whatever a lease holds beyond two
//! seconds of its demand goes back at once (other sidecars may need it). A
//! decision that finds the lease empty while the record still has credits
//! waits for one reservation ([`CreditKeeper::top_up`]): a key's first
//! request on a sidecar, or demand that outran the lease.
//!
//! One move at a time per key: every move holds the key's turn (its
//! [`Window`]) until it has landed in the lease, in a task of its own, so
//! a decision that stops waiting never loses a reservation. The lease the
//! keeper moves credits into is the one it adopted (`Window::usage`): when
//! the index drops or replaces the key (an on-demand replica evicting it,
//! a deletion), the old lease is given back, never lost with its entry.
//!
//! Stopping gives every lease back; a sidecar killed outright loses what
//! its leases held (never more than about a second of its demand per key),
//! rather than risk a credit granted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use keyward_core::domain::credits::DemandWindow;
use keyward_core::domain::key::KeyId;
use keyward_core::index::{Index, Usage};
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::keys::change::CreditMovement;
use crate::keys::{KeyError, Keys};
use crate::metrics::UsageMetrics;

/// How often leases are looked at.
pub const TICK: Duration = Duration::from_millis(50);

/// Ticks without demand after which a lease is given back once its record
/// has none left to reserve (a second: another sidecar may need them).
const IDLE_TICKS_EMPTY: u32 = 20;

/// Ticks without demand after which a lease is given back (five minutes:
/// a quiet key's next request should not wait).
const IDLE_TICKS: u32 = 6000;

/// Ticks a key reserves nothing after a reservation whose outcome was
/// unknown (a second).
const QUIET_TICKS: u32 = 20;

/// Fewest credits a reservation asks for.
const MIN_RESERVATION: u64 = 2;

/// Moves the ticks may have under way at once.
const MOVES_IN_FLIGHT: u32 = 64;

/// How long a decision waits for a reservation before it is refused, and
/// how long stopping waits to give leases back.
pub const RESERVE_PATIENCE: Duration = Duration::from_secs(2);

/// Keeps this sidecar's credit leases.
#[derive(Debug)]
pub struct CreditKeeper {
    keys: Arc<Keys>,
    index: Arc<Index>,
    /// Keys with a lease here (at most every key with credits: only a
    /// verified key's decision adds one).
    kept: DashMap<KeyId, Arc<Kept>, rustc_hash::FxBuildHasher>,
    /// Credits lent to other deciders (Envoy modules, through the decision
    /// feed) and not given back, per key, with their period: what a
    /// caller may give back at most.
    lent: DashMap<KeyId, (i64, u64), rustc_hash::FxBuildHasher>,
    in_flight: Arc<Semaphore>,
    metrics: UsageMetrics,
}

/// One key's lease, as the keeper follows it.
#[derive(Debug, Default)]
struct Kept {
    /// Decisions waiting for a reservation.
    waiting: AtomicU32,
    /// The key's turn: one move at a time; decisions wait here.
    window: Arc<Mutex<Window>>,
}

/// A key's demand over the last second, a tick a slot, and the lease the
/// keeper moves its credits into.
#[derive(Debug, Default)]
struct Window {
    demand: DemandWindow,
    /// The per-request state whose lease this keeper fills (the index
    /// entry's, as adopted).
    usage: Option<Arc<Usage>>,
    /// Leases the index no longer uses (the key evicted, replaced or
    /// deleted) still holding credits: given back before anything else.
    orphans: Vec<Arc<Usage>>,
    /// The key's account (its turn at the writer), once adopted.
    account: Option<Arc<str>>,
    /// Ticks left without reservations after one whose outcome was unknown.
    quiet: u32,
}

impl Window {
    fn push(&mut self, demand: u32) {
        self.quiet = self.quiet.saturating_sub(1);
        self.demand.push(demand);
    }

    fn second(&self) -> u64 {
        self.demand.second()
    }
}

/// Counts a waiting decision for as long as it waits, however it stops.
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one key's look at a tick decided.
enum Move {
    Reserve(u64),
    GiveBack(u64),
    /// Give back what the leases the index no longer uses hold.
    Orphans,
}

impl CreditKeeper {
    /// A keeper over the key store and the index decisions read.
    #[must_use]
    pub fn new(keys: Arc<Keys>, index: Arc<Index>, metrics: UsageMetrics) -> Arc<Self> {
        Arc::new(Self {
            keys,
            index,
            kept: DashMap::default(),
            lent: DashMap::default(),
            in_flight: Arc::new(Semaphore::new(MOVES_IN_FLIGHT as usize)),
            metrics,
        })
    }

    /// Reserves credits for `id` now, for a decision that found its lease
    /// empty: at least what every decision waiting asks for. `Ok` when the
    /// lease holds some (perhaps from another waiter's reservation).
    pub async fn top_up(self: &Arc<Self>, id: KeyId) -> Result<(), KeyError> {
        self.metrics.credit_waits.inc();
        let kept = Arc::clone(self.kept.entry(id).or_default().value());
        let waiting = Waiting::new(&kept.waiting);
        let window = Arc::clone(&kept.window).lock_owned().await;
        let want = window
            .second()
            .max(u64::from(kept.waiting.load(Ordering::Relaxed)))
            .max(MIN_RESERVATION);
        drop(waiting);
        // Everything from here in a task of its own, holding the key's
        // turn: a move under way lands (in the lease, or back in the
        // record) even if the decision waiting for it is cancelled (a
        // client gone, a proxy's timeout).
        let keeper = Arc::clone(self);
        tokio::spawn(async move { keeper.top_up_in_turn(window, id, want).await })
            .await
            .map_err(|_| KeyError::Unavailable)?
    }

    /// [`Self::top_up`]'s work, in the key's turn.
    async fn top_up_in_turn(
        &self,
        mut window: OwnedMutexGuard<Window>,
        id: KeyId,
        want: u64,
    ) -> Result<(), KeyError> {
        let entry = self
            .index
            .entry(&id)
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        let held = entry
            .credits
            .as_deref()
            .copied()
            .ok_or(KeyError::NoCreditsLeft)?;
        adopt(&mut window, &entry);
        // Rare (an eviction between two decisions): given back first.
        let account = window.account.clone();
        self.give_back_orphans(&mut window, id, account.as_ref())
            .await?;
        let now = keyward_core::clock::now_nanos();
        if now < held.next_refill && entry.usage.credits.in_hand(held.period) > 0 {
            return Ok(());
        }
        self.reserve(&mut window, id, account.as_ref(), want)
            .await
            .map(drop)
    }

    /// Lends up to `want` of `id`'s credits to another decider (an Envoy
    /// module, through the decision feed) out of this sidecar's lease,
    /// reserving from the record first when the lease holds fewer (that
    /// write awaited); first takes back `give` credits of `period` it lent
    /// before (at most what it lent for the key and was not given back; a
    /// past period's lapse). The borrower's demand counts toward the
    /// lease's, so the keeper tops it up ahead of the next loan. In the
    /// key's turn, in a task of its own (a cancelled call loses nothing).
    ///
    /// Nothing is lent after `deadline` (the key's turn not reached, or the
    /// reservation not back, by then: `Unavailable`), so a borrower that
    /// stops waiting soon after never loses a loan: what was reserved
    /// stays in this sidecar's lease.
    pub async fn lend(
        self: &Arc<Self>,
        id: KeyId,
        want: u64,
        give: (u64, i64),
        deadline: tokio::time::Instant,
    ) -> Result<(u64, i64), KeyError> {
        let kept = Arc::clone(self.kept.entry(id).or_default().value());
        let window = tokio::time::timeout_at(deadline, Arc::clone(&kept.window).lock_owned())
            .await
            .map_err(|_| KeyError::Unavailable)?;
        let keeper = Arc::clone(self);
        tokio::spawn(async move { keeper.lend_in_turn(window, id, want, give, deadline).await })
            .await
            .map_err(|_| KeyError::Unavailable)?
    }

    /// [`Self::lend`]'s work, in the key's turn.
    async fn lend_in_turn(
        &self,
        mut window: OwnedMutexGuard<Window>,
        id: KeyId,
        want: u64,
        (give, given_period): (u64, i64),
        deadline: tokio::time::Instant,
    ) -> Result<(u64, i64), KeyError> {
        let Some(entry) = self.index.entry(&id) else {
            self.lent.remove(&id);
            return Err(KeyError::NotFound(id.to_string()));
        };
        let Some(held) = entry.credits.as_deref().copied() else {
            self.lent.remove(&id);
            return Ok((0, 0));
        };
        adopt(&mut window, &entry);
        let account = window.account.clone();
        self.give_back_orphans(&mut window, id, account.as_ref())
            .await?;
        let usage = Arc::clone(&entry.usage);
        let now = keyward_core::clock::now_nanos();
        // Credits of a past period lapse; adding them would void the
        // current period's in hand.
        let back = self.returned(id, give, given_period);
        if back > 0 && given_period == held.period && now < held.next_refill {
            usage.credits.add(back, given_period);
        }
        if want == 0 {
            return Ok((0, held.period));
        }
        window.demand.add(want);
        let mut period = held.period;
        let in_hand = usage.credits.in_hand(period);
        if (in_hand < want || now >= held.next_refill) && held.reservable_at(now) {
            let ask = (want - in_hand.min(want))
                .max(window.second())
                .max(MIN_RESERVATION);
            match self.reserve(&mut window, id, account.as_ref(), ask).await {
                Ok(reserved) => period = reserved,
                Err(error) if usage.credits.in_hand(period) == 0 => {
                    return match error {
                        KeyError::NoCreditsLeft => Ok((0, period)),
                        error => Err(error),
                    };
                }
                Err(_) => {}
            }
        }
        if now >= held.next_refill && period == held.period {
            // A refill was due and could not be recorded: what is in hand
            // is void, and the refill's credits are still to come.
            return Err(KeyError::Unavailable);
        }
        if usage.credits.in_hand(period) == 0 {
            return Ok((0, period));
        }
        if tokio::time::Instant::now() >= deadline {
            // The borrower may have stopped waiting: kept here.
            return Err(KeyError::Unavailable);
        }
        let (granted, period) = usage.credits.take(want);
        let mut lent = self.lent.entry(id).or_insert((period, 0));
        if lent.0 != period {
            *lent = (period, 0);
        }
        lent.1 = lent.1.saturating_add(granted);
        Ok((granted, period))
    }

    /// How many of `give` credits of `period` a borrower may give back for
    /// `id`: at most what it was lent for that period and has not given
    /// back (a past period's lapse).
    fn returned(&self, id: KeyId, give: u64, period: i64) -> u64 {
        if give == 0 {
            return 0;
        }
        let Some(mut lent) = self.lent.get_mut(&id) else {
            return 0;
        };
        if lent.0 != period {
            return 0;
        }
        let back = give.min(lent.1);
        lent.1 -= back;
        back
    }

    /// One reservation of `want` credits into the lease `window` holds (its
    /// owner holds the key's turn).
    async fn reserve(
        &self,
        window: &mut Window,
        id: KeyId,
        account: Option<&Arc<str>>,
        want: u64,
    ) -> Result<i64, KeyError> {
        if window.quiet > 0 {
            return Err(KeyError::Unavailable);
        }
        let moved = self
            .keys
            .move_credits(id, account, CreditMovement::Reserve { want })
            .await;
        let (granted, period) = match moved {
            Ok(moved) => moved,
            Err(KeyError::Unavailable) => {
                // Its outcome is unknown (it may have committed after its
                // caller gave up: those credits are lost, never granted
                // twice). The key reserves nothing for a second, so a store
                // slower than its timeout cannot drain a balance at a
                // reservation a tick.
                window.quiet = QUIET_TICKS;
                return Err(KeyError::Unavailable);
            }
            Err(error) => return Err(error),
        };
        self.metrics.credit_reservations.inc();
        if let Some(usage) = &window.usage {
            usage.credits.add(granted, period);
        }
        Ok(period)
    }

    /// Gives up to `most` of `usage`'s unspent credits back to `id`'s
    /// record (its owner holds the key's turn). Credits of a period the
    /// record has left lapse there.
    async fn give_back(
        &self,
        usage: &Usage,
        id: KeyId,
        account: Option<&Arc<str>>,
        most: u64,
    ) -> Result<(), KeyError> {
        let (amount, period) = usage.credits.take(most);
        if amount == 0 {
            return Ok(());
        }
        self.keys
            .move_credits(id, account, CreditMovement::GiveBack { amount, period })
            .await
            .map(drop)
            .or_else(|error| match error {
                // The key is gone, or has no credits now: nothing to give
                // them back to.
                KeyError::NotFound(_) | KeyError::NoCreditsLeft => Ok(()),
                // Never reached the writer: still this lease's (the key's
                // turn is held, so nothing else filled it meanwhile).
                KeyError::Busy => {
                    usage.credits.add(amount, period);
                    Err(KeyError::Busy)
                }
                error => Err(error),
            })
    }

    /// Gives back what every orphaned lease of the key holds; stops at the
    /// first failure (the rest wait for the next tick).
    async fn give_back_orphans(
        &self,
        window: &mut Window,
        id: KeyId,
        account: Option<&Arc<str>>,
    ) -> Result<(), KeyError> {
        while let Some(orphan) = window.orphans.last() {
            self.give_back(orphan, id, account, u64::MAX).await?;
            window.orphans.pop();
        }
        Ok(())
    }

    /// Keeps every lease until `stop`, then gives them all back (see
    /// [`Self::give_all_back`]).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.tick(),
                () = stop.cancelled() => break,
            }
        }
        if tokio::time::timeout(RESERVE_PATIENCE, self.give_all_back())
            .await
            .is_err()
        {
            tracing::warn!(
                "unspent credits were not all given back in time; the rest are lost, never granted twice"
            );
        }
    }

    /// Gives every lease back, after the last decision: the moves under way
    /// finish first (every permit taken), then each key's lease goes back
    /// in its turn, many at once (the writer commits them together).
    async fn give_all_back(&self) {
        let _all = self.in_flight.acquire_many(MOVES_IN_FLIGHT).await;
        let kept: Vec<(KeyId, Arc<Kept>)> = self
            .kept
            .iter()
            .map(|kept| (*kept.key(), Arc::clone(kept.value())))
            .collect();
        futures_util::stream::iter(kept)
            .for_each_concurrent(MOVES_IN_FLIGHT as usize, |(id, kept)| async move {
                let mut window = kept.window.lock().await;
                let account = window.account.clone();
                if let Some(usage) = window.usage.take() {
                    window.orphans.push(usage);
                }
                if let Err(error) = self.give_back_orphans(&mut window, id, account.as_ref()).await {
                    tracing::warn!(key_id = %id, %error, "unspent credits could not be given back; they are lost, never granted twice");
                }
            })
            .await;
    }

    /// One look at every lease.
    fn tick(self: &Arc<Self>) {
        self.metrics
            .credit_keys
            .set(i64::try_from(self.kept.len()).unwrap_or(i64::MAX));
        let now = keyward_core::clock::now_nanos();
        let kept: Vec<(KeyId, Arc<Kept>)> = self
            .kept
            .iter()
            .map(|kept| (*kept.key(), Arc::clone(kept.value())))
            .collect();
        for (id, kept) in kept {
            // A move or a waiting decision has the key: next tick.
            let Ok(mut window) = Arc::clone(&kept.window).try_lock_owned() else {
                continue;
            };
            let Some(entry) = self.index.entry(&id) else {
                // Deleted, or evicted from an on-demand replica: whatever
                // its lease holds goes back (a deleted key's lapses), and
                // what borrowers hold is no longer this sidecar's to take.
                self.lent.remove(&id);
                if let Some(usage) = window.usage.take() {
                    window.orphans.push(usage);
                }
                window
                    .orphans
                    .retain(|usage| usage.credits.in_hand_any() > 0);
                if window.orphans.is_empty() {
                    self.forget(id, kept, window);
                } else {
                    self.spawn_move(window, id, Move::Orphans);
                }
                continue;
            };
            let Some(held) = entry.credits.as_deref().copied() else {
                // Credits removed: the lease is void (nothing to give back
                // to); the key is no longer kept.
                if let Some(usage) = &window.usage {
                    usage.credits.take(u64::MAX);
                }
                self.forget(id, kept, window);
                continue;
            };
            adopt(&mut window, &entry);
            if !window.orphans.is_empty() {
                self.spawn_move(window, id, Move::Orphans);
                continue;
            }
            window.push(entry.usage.credits.take_demand());
            let in_hand = entry.usage.credits.in_hand(held.period);
            let second = window.second();
            let empty = held.unreserved == 0;
            let keep = 2 * second.max(1);
            let idle_after = if empty { IDLE_TICKS_EMPTY } else { IDLE_TICKS };
            let movement = if second == 0 && window.demand.idle() >= idle_after {
                if in_hand == 0 && kept.waiting.load(Ordering::Relaxed) == 0 {
                    self.forget(id, kept, window);
                    continue;
                }
                Move::GiveBack(u64::MAX)
            } else if empty && in_hand > keep {
                Move::GiveBack(in_hand - keep)
            } else if second > 0
                && window.quiet == 0
                && in_hand * 2 < second.max(MIN_RESERVATION)
                && held.reservable_at(now)
            {
                Move::Reserve(second.max(MIN_RESERVATION).saturating_sub(in_hand))
            } else {
                continue;
            };
            self.spawn_move(window, id, movement);
        }
    }

    /// Stops keeping `id` unless a decision is about to wait on it.
    fn forget(&self, id: KeyId, kept: Arc<Kept>, window: OwnedMutexGuard<Window>) {
        drop(window);
        drop(kept);
        // The map's reference is the only one left: nobody is between
        // finding the entry and counting itself as waiting.
        self.kept.remove_if(&id, |_, kept| {
            Arc::strong_count(kept) == 1 && kept.waiting.load(Ordering::Relaxed) == 0
        });
    }

    /// Runs one move in its own task, in the key's turn (`window`), if a
    /// move slot is free (else the next tick tries again).
    fn spawn_move(self: &Arc<Self>, window: OwnedMutexGuard<Window>, id: KeyId, movement: Move) {
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            return;
        };
        let keeper = Arc::clone(self);
        tokio::spawn(async move {
            let mut window = window;
            let account = window.account.clone();
            let account = account.as_ref();
            let result = match movement {
                Move::Reserve(want) => keeper
                    .reserve(&mut window, id, account, want)
                    .await
                    .map(drop),
                Move::GiveBack(most) => match window.usage.clone() {
                    Some(usage) => keeper.give_back(&usage, id, account, most).await,
                    None => Ok(()),
                },
                Move::Orphans => keeper.give_back_orphans(&mut window, id, account).await,
            };
            if let Err(error) = result
                && !matches!(error, KeyError::NoCreditsLeft | KeyError::NotFound(_))
            {
                tracing::debug!(key_id = %id, %error, "credits not moved; tried again next tick");
            }
            drop((window, permit));
        });
    }
}

/// Makes `entry`'s lease the one `window` fills; the lease it filled
/// before, if another one still holding credits, is an orphan to give
/// back.
fn adopt(window: &mut Window, entry: &keyward_core::index::Entry) {
    let usage = &entry.usage;
    if window.account.is_none() {
        window.account = Some(Arc::clone(&entry.account));
    }
    if let Some(old) = window.usage.replace(Arc::clone(usage))
        && !Arc::ptr_eq(&old, usage)
        && old.credits.in_hand_any() > 0
    {
        window.orphans.push(old);
    }
}
