//! The background task that keeps the usage plane and its store in step:
//! leases traded every [`TICK`], counts flushed every [`FLUSH_EVERY`]
//! ticks, the store probed once a second while it is away.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use keyward_core::domain::key::KeyId;
use keyward_core::index::Index;

use super::local::LocalStore;
use super::store::{RESPONSE_TIMEOUT, Store, UsageStoreError};
use super::{Place, UsagePlane};

/// How often leases are traded. A lease covers about two ticks of the
/// key's demand, so this is also about how long an unused token stays out
/// of the shared budget.
pub const TICK: Duration = Duration::from_millis(50);

/// Counts are flushed every this many ticks (a second).
const FLUSH_EVERY: u32 = 20;

/// Ticks without demand after which a lease is given back and the key no
/// longer traded (a second).
const IDLE_TICKS: u32 = 20;

/// Trades in flight at once (one connection pipelines them).
const TRADES_IN_FLIGHT: usize = 256;

impl UsagePlane {
    /// Keeps leases and counts in step with the store until the task is
    /// aborted. Decisions never wait on it.
    pub async fn run(self: Arc<Self>, index: Arc<Index>) {
        match &self.place {
            Place::Shared(connection) => self.run_shared(connection, &index).await,
            Place::Local(local) => loop {
                tokio::time::sleep(TICK * FLUSH_EVERY).await;
                if let Err(error) = self.flush_local(local).await {
                    self.metrics.errors.inc();
                    tracing::warn!(%error, "usage counts could not be written");
                }
            },
        }
    }

    /// Writes what is counted: at shutdown, after the last decision.
    pub async fn close(&self) {
        let flushed = match &self.place {
            Place::Local(local) => self.flush_local(local).await,
            Place::Shared(_) => {
                let store = self.store.lock().map_or(None, |store| store.clone());
                match store {
                    Some(store) => self.flush(&store).await,
                    None => Ok(()),
                }
            }
        };
        if let Err(error) = flushed {
            tracing::warn!(%error, "the last usage counts could not be written");
        }
    }

    /// Sums the counts held into this sidecar's own database, durably.
    async fn flush_local(&self, local: &LocalStore) -> Result<(), UsageStoreError> {
        let taken = self.counts.take();
        if taken.is_empty() {
            return Ok(());
        }
        let local = local.clone();
        let (result, unwritten) = tokio::task::spawn_blocking(move || {
            for (n, ((id, minute), tally)) in taken.iter().enumerate() {
                if let Err(error) = local.add(id, *minute, tally) {
                    return (Err(error.into()), taken[n..].to_vec());
                }
            }
            (local.flush().map_err(UsageStoreError::from), Vec::new())
        })
        .await
        .map_err(|_| UsageStoreError::Thread)?;
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        self.metrics
            .dropped
            .inc_by(self.counts.put_back(unwritten, now));
        result
    }

    async fn run_shared(&self, connection: &super::Connection, index: &Index) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // None until the first round: its failure is logged too.
        let mut up: Option<bool> = None;
        let mut tick: u32 = 0;
        loop {
            ticks.tick().await;
            tick = tick.wrapping_add(1);
            // Away: a probe a second, nothing queued behind it.
            if up != Some(true) && tick % FLUSH_EVERY != 1 {
                continue;
            }
            let result = self
                .round(
                    connection,
                    index,
                    tick.is_multiple_of(FLUSH_EVERY) || up != Some(true),
                )
                .await;
            match (result, up) {
                (Ok(()), None | Some(false)) => {
                    up = Some(true);
                    self.global_limits.store(true, Ordering::Relaxed);
                    self.metrics.up.set(1);
                    tracing::info!(store = %connection.redacted(), "usage store reachable: rate limits are global");
                }
                (Err(error), None | Some(true)) => {
                    up = Some(false);
                    self.global_limits.store(false, Ordering::Relaxed);
                    self.metrics.up.set(0);
                    self.metrics.errors.inc();
                    tracing::warn!(store = %connection.redacted(), %error, "usage store away: rate limits are each sidecar's own until it answers");
                }
                (Err(_), Some(false)) => {
                    self.metrics.errors.inc();
                }
                (Ok(()), Some(true)) => {}
            }
        }
    }

    /// One round: connect if need be, trade every lease, flush counts when
    /// `flush`.
    async fn round(
        &self,
        connection: &super::Connection,
        index: &Index,
        flush: bool,
    ) -> Result<(), UsageStoreError> {
        let held = self.store.lock().map_or(None, |store| store.clone());
        let store = if let Some(store) = held {
            store
        } else {
            let store = tokio::time::timeout(RESPONSE_TIMEOUT * 2, Store::connect(connection))
                .await
                .map_err(|_| UsageStoreError::Timeout)??;
            if let Ok(mut held) = self.store.lock() {
                *held = Some(store.clone());
            }
            store
        };
        // Not cut short from here: every command has its own response
        // timeout, so a hung store ends the round within it, and no lease
        // or count taken for a trade is lost to a cancelled future.
        self.trade_all(index, &store).await?;
        if flush {
            self.flush(&store).await?;
        }
        Ok(())
    }

    /// Trades every active lease; the first failure is the round's.
    async fn trade_all(&self, index: &Index, store: &Store) -> Result<(), UsageStoreError> {
        let ids: Vec<KeyId> = self.leased.iter().map(|entry| *entry.key()).collect();
        self.metrics
            .leased_keys
            .set(i64::try_from(ids.len()).unwrap_or(i64::MAX));
        let results: Vec<Result<(), UsageStoreError>> = futures_util::stream::iter(ids)
            .map(|id| self.trade(index, store.clone(), id))
            .buffer_unordered(TRADES_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Trades one key's lease: what is in hand goes back, what was spent on
    /// credit is paid, and about two ticks of its last demand is taken.
    async fn trade(
        &self,
        index: &Index,
        mut store: Store,
        id: KeyId,
    ) -> Result<(), UsageStoreError> {
        let Some(entry) = index.entry(&id) else {
            self.leased.remove(&id);
            return Ok(());
        };
        let Some(limit) = entry.limit else {
            entry.usage.lease.take();
            self.leased.remove(&id);
            return Ok(());
        };
        let lease = &entry.usage.lease;
        let (tokens, demand) = lease.take();
        if demand == 0 {
            let idle = self.leased.get_mut(&id).map_or(IDLE_TICKS, |mut idle| {
                *idle += 1;
                *idle
            });
            if tokens == 0 {
                if idle >= IDLE_TICKS {
                    self.leased.remove(&id);
                }
                return Ok(());
            }
        } else if let Some(mut idle) = self.leased.get_mut(&id) {
            *idle = 0;
        }
        let parts = limit.parts();
        let want = if demand == 0 {
            0
        } else {
            demand.saturating_mul(2).min(parts.burst)
        };
        let give = u64::try_from(tokens.max(0)).unwrap_or(0);
        let owed = tokens.min(0).unsigned_abs();
        match store.trade(&id, parts, give, owed, want).await {
            Ok(trade) => {
                lease.settle(trade);
                self.metrics.trades.inc();
                Ok(())
            }
            Err(error) => {
                lease.restore(tokens);
                Err(error)
            }
        }
    }

    /// Sums the counts held into the store; what could not be written is
    /// held for the next flush (an hour at most).
    async fn flush(&self, store: &Store) -> Result<(), UsageStoreError> {
        let results: Vec<_> = futures_util::stream::iter(self.counts.take())
            .map(|((id, minute), tally)| {
                let mut store = store.clone();
                async move {
                    let outcomes: super::store::Outcomes = tally
                        .iter()
                        .enumerate()
                        .filter(|(_, count)| **count > 0)
                        .map(|(outcome, count)| (super::counts::label(outcome), *count))
                        .collect();
                    store
                        .add_counts(&id, minute, &outcomes)
                        .await
                        .map_err(|error| (error, ((id, minute), tally)))
                }
            })
            .buffer_unordered(TRADES_IN_FLIGHT)
            .collect()
            .await;
        let mut unwritten = Vec::new();
        let mut failure = None;
        for result in results {
            if let Err((error, held)) = result {
                failure.get_or_insert(error);
                unwritten.push(held);
            }
        }
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        let dropped = self.counts.put_back(unwritten, now);
        self.metrics.dropped.inc_by(dropped);
        failure.map_or(Ok(()), Err)
    }
}
