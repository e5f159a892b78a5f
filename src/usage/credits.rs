//! The credit keeper: moves a key's usage credits between its record in
//! the store of truth and this sidecar's lease on them
//! (`keyward_core::domain::credits`), so that decisions spend from memory.
//!
//! Every [`TICK`] it looks at each key it keeps: a lease below half of the
//! key's last second of demand is topped up to a second's worth (one store
//! write: a group-committed sled write standalone, an etcd transaction
//! replicated); a lease idle for [`IDLE_TICKS`] (or for a tick when the
//! record has none left to reserve, so other sidecars may use them) is
//! given back. A decision that finds the lease empty while the record
//! still has credits waits for one reservation ([`CreditKeeper::top_up`]):
//! a key's first request on a sidecar, or demand that outran the lease.
//! Stopping gives every lease back; a sidecar killed outright loses what
//! its leases held (never more than about a second of its demand per key),
//! rather than risk a credit granted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use keyward_core::domain::key::KeyId;
use keyward_core::index::Index;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::keys::change::CreditMovement;
use crate::keys::{KeyError, Keys};
use crate::metrics::UsageMetrics;

/// How often leases are looked at.
pub const TICK: Duration = Duration::from_millis(50);

/// Ticks in the demand window (a second).
const WINDOW: usize = 20;

/// Ticks without demand after which a lease is given back (30 s), unless
/// the record has none left to reserve (then after one).
const IDLE_TICKS: u32 = 600;

/// Fewest credits a reservation asks for.
const MIN_RESERVATION: u64 = 2;

/// Reservations the ticks may have under way at once.
const RESERVATIONS_IN_FLIGHT: usize = 64;

/// How long a decision waits for a reservation before it is refused.
pub const RESERVE_PATIENCE: Duration = Duration::from_secs(2);

/// Keeps this sidecar's credit leases.
#[derive(Debug)]
pub struct CreditKeeper {
    keys: Arc<Keys>,
    index: Arc<Index>,
    /// Keys with a lease here (at most every key with credits: only a
    /// verified key's decision adds one).
    kept: DashMap<KeyId, Arc<Kept>, rustc_hash::FxBuildHasher>,
    in_flight: Arc<Semaphore>,
    metrics: UsageMetrics,
}

/// One key's lease, as the keeper follows it.
#[derive(Debug, Default)]
struct Kept {
    /// Decisions waiting for a reservation.
    waiting: AtomicU32,
    /// One reservation at a time; decisions wait here.
    window: Arc<Mutex<Window>>,
}

/// A key's demand over the last second, a tick a slot.
#[derive(Debug, Default)]
struct Window {
    demand: [u32; WINDOW],
    at: usize,
    idle: u32,
}

impl Window {
    fn push(&mut self, demand: u32) {
        self.at = (self.at + 1) % WINDOW;
        self.demand[self.at] = demand;
        if demand == 0 {
            self.idle = self.idle.saturating_add(1);
        } else {
            self.idle = 0;
        }
    }

    fn second(&self) -> u64 {
        self.demand.iter().map(|d| u64::from(*d)).sum()
    }
}

impl CreditKeeper {
    /// A keeper over the key store and the index decisions read.
    #[must_use]
    pub fn new(keys: Arc<Keys>, index: Arc<Index>, metrics: UsageMetrics) -> Arc<Self> {
        Arc::new(Self {
            keys,
            index,
            kept: DashMap::default(),
            in_flight: Arc::new(Semaphore::new(RESERVATIONS_IN_FLIGHT)),
            metrics,
        })
    }

    /// Reserves credits for `id` now, for a decision that found its lease
    /// empty: at least what every decision waiting asks for. `Ok` when the
    /// lease holds some (perhaps from another waiter's reservation).
    pub async fn top_up(&self, id: KeyId) -> Result<(), KeyError> {
        self.metrics.credit_waits.inc();
        let kept = Arc::clone(self.kept.entry(id).or_default().value());
        kept.waiting.fetch_add(1, Ordering::Relaxed);
        let window = kept.window.lock().await;
        let waiting = u64::from(kept.waiting.fetch_sub(1, Ordering::Relaxed));
        let Some(entry) = self.index.entry(&id) else {
            return Err(KeyError::NotFound(id.to_string()));
        };
        let held = entry.credits.ok_or(KeyError::NoCreditsLeft)?;
        if entry.usage.credits.in_hand(held.period) > 0 {
            return Ok(());
        }
        let want = window.second().max(waiting).max(MIN_RESERVATION);
        self.reserve(id, want).await
    }

    /// One reservation of `want` credits into `id`'s lease (the caller
    /// holds the key's turn).
    async fn reserve(&self, id: KeyId, want: u64) -> Result<(), KeyError> {
        let (granted, period) = self
            .keys
            .move_credits(id, CreditMovement::Reserve { want })
            .await?;
        self.metrics.credit_reservations.inc();
        if let Some(entry) = self.index.entry(&id) {
            entry.usage.credits.add(granted, period);
        }
        Ok(())
    }

    /// Gives `id`'s unspent credits back to its record.
    async fn give_back(&self, id: KeyId) -> Result<(), KeyError> {
        let Some(entry) = self.index.entry(&id) else {
            return Ok(());
        };
        let (amount, period) = entry.usage.credits.take_all();
        if amount == 0 || entry.credits.is_none_or(|held| held.period != period) {
            return Ok(());
        }
        self.keys
            .move_credits(id, CreditMovement::GiveBack { amount, period })
            .await
            .map(drop)
            .or_else(|error| match error {
                KeyError::NotFound(_) | KeyError::NoCreditsLeft => Ok(()),
                error => Err(error),
            })
    }

    /// Keeps every lease until `stop`, then gives them all back (within
    /// `RESERVE_PATIENCE`: a store that does not answer must not hold the
    /// exit; what it could not take back is lost, never granted twice).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.tick(),
                () = stop.cancelled() => break,
            }
        }
        let ids: Vec<KeyId> = self.kept.iter().map(|kept| *kept.key()).collect();
        let returned = tokio::time::timeout(RESERVE_PATIENCE, async {
            for id in ids {
                if let Err(error) = self.give_back(id).await {
                    tracing::warn!(key_id = %id, %error, "unspent credits could not be given back; they are lost");
                }
            }
        })
        .await;
        if returned.is_err() {
            tracing::warn!("unspent credits were not all given back in time; the rest are lost");
        }
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
            let Some(entry) = self.index.entry(&id) else {
                self.kept.remove(&id);
                continue;
            };
            let Some(held) = entry.credits else {
                entry.usage.credits.take_all();
                self.kept.remove(&id);
                continue;
            };
            // A reservation or a waiting decision has the key: next tick.
            let Ok(mut window) = Arc::clone(&kept.window).try_lock_owned() else {
                continue;
            };
            window.push(entry.usage.credits.take_demand());
            let in_hand = entry.usage.credits.in_hand(held.period);
            let second = window.second();
            let idle_for = if held.unreserved == 0 { 1 } else { IDLE_TICKS };
            let movement = if second == 0 && window.idle >= idle_for {
                if in_hand == 0 && kept.waiting.load(Ordering::Relaxed) == 0 {
                    self.kept.remove(&id);
                    continue;
                }
                Some(None)
            } else if second > 0
                && in_hand * 2 < second.max(MIN_RESERVATION)
                && held.reservable_at(now)
            {
                Some(Some(second.max(MIN_RESERVATION).saturating_sub(in_hand)))
            } else {
                None
            };
            let Some(movement) = movement else { continue };
            let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                continue;
            };
            let keeper = Arc::clone(self);
            tokio::spawn(async move {
                let result = match movement {
                    Some(want) => keeper.reserve(id, want).await,
                    None => keeper.give_back(id).await,
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
}
