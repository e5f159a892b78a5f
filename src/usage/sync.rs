//! The background task that keeps the usage plane and its store in step:
//! leases traded every [`TICK`], counts flushed every [`FLUSH_EVERY`]
//! ticks; while the store is away, a PING a second and nothing else
//! (counts wait in memory, an hour at most: older ones are dropped each
//! second).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use keyward_core::domain::key::KeyId;
use keyward_core::domain::lease::{IDLE_TRADES, Lease, TRADE_TICK_NANOS, Trade, Turn};
use keyward_core::domain::rate::Gcra;
use keyward_core::index::Index;
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use super::local::LocalPlace;
use super::store::{RESPONSE_TIMEOUT, Store, UsageStoreError};
use super::{Place, UsagePlane};
use crate::keys::StoreHealth;

/// How often leases are traded ([`TRADE_TICK_NANOS`]).
pub const TICK: Duration = Duration::from_nanos(TRADE_TICK_NANOS.unsigned_abs());

/// Counts are flushed every this many ticks (a second).
const FLUSH_EVERY: u32 = 20;

/// How long a round may run before rate limits stop waiting on it.
const ROUND_PATIENCE: Duration = Duration::from_millis(300);

/// Trades in flight at once (one connection pipelines them).
const TRADES_IN_FLIGHT: usize = 256;

/// Tokens remembered as lent per key through the feed, in trades' worth
/// (every holder's together).
const LENT_TRADES: u64 = 4;

/// A trade another lease holder asks for (see [`UsagePlane::trade_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// The key.
    pub id: KeyId,
    /// Unused tokens given back.
    pub give: u64,
    /// Tokens spent on credit, paid.
    pub owed: u64,
    /// Tokens wanted.
    pub want: u32,
}

/// Reports the store unanswered (if it was followed at all) when the
/// task that follows it ends.
struct Ended<'a>(&'a watch::Sender<Option<bool>>);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.send_if_modified(|up| {
            let followed = up.is_some();
            if followed {
                *up = Some(false);
            }
            followed
        });
    }
}

impl UsagePlane {
    /// Keeps leases and counts in step with the store until `stop` (then
    /// [`Self::close`] writes the rest). Decisions never wait on it.
    /// `health` is the key store's: on a standalone sidecar, the counts'
    /// database lives on the same volume and follows it.
    pub async fn run(
        self: Arc<Self>,
        index: Arc<Index>,
        health: watch::Receiver<StoreHealth>,
        stop: CancellationToken,
    ) {
        // However the task ends (stopped, or a panic), the store is no
        // longer followed: health must not go on saying it answers.
        let _ended = Ended(&self.up);
        match &self.place {
            Place::Shared(connection) => self.run_shared(connection, &index, &stop).await,
            Place::Local(place) => self.run_local(place, health, &stop).await,
        }
    }

    async fn run_local(
        &self,
        place: &LocalPlace,
        mut health: watch::Receiver<StoreHealth>,
        stop: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK * FLUSH_EVERY) => {}
                changed = health.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Closing and opening sled touch the disk: off the
                    // async workers.
                    let healthy = *health.borrow_and_update() == StoreHealth::Healthy;
                    let place = place.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if healthy { place.reopen() } else { place.close() }
                    })
                    .await;
                    continue;
                }
                () = stop.cancelled() => return,
            }
            if *health.borrow() != StoreHealth::Healthy {
                self.age_counts();
                continue;
            }
            let reopening = place.clone();
            let _ = tokio::task::spawn_blocking(move || reopening.reopen()).await;
            if let Err(error) = self.flush_local(place).await {
                self.metrics.errors.inc();
                tracing::warn!(%error, "usage counts could not be written; the database is closed and opened again in a second");
                let closing = place.clone();
                let _ = tokio::task::spawn_blocking(move || closing.close()).await;
            }
        }
    }

    /// Writes what is counted: at shutdown, after the last decision.
    pub async fn close(&self) {
        let flushed = match &self.place {
            Place::Local(place) => self.flush_local(place).await,
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
        // Off the async workers: sled flushes and joins its thread on drop.
        if let Place::Local(place) = &self.place {
            let place = place.clone();
            let _ = tokio::task::spawn_blocking(move || place.close()).await;
        }
    }

    /// Sums the counts held into this sidecar's own database, durably.
    async fn flush_local(&self, place: &LocalPlace) -> Result<(), UsageStoreError> {
        let Some(local) = place.store() else {
            self.age_counts();
            return Ok(());
        };
        let taken = self.counts.take();
        if taken.is_empty() {
            return Ok(());
        }
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

    async fn run_shared(
        &self,
        connection: &super::Connection,
        index: &Index,
        stop: &CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // None until the first round: its failure is logged too.
        let mut up: Option<bool> = None;
        let mut tick: u32 = 0;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            tick = tick.wrapping_add(1);
            let result = if up == Some(true) {
                self.watched_round(connection, index, tick.is_multiple_of(FLUSH_EVERY))
                    .await
            } else if tick % FLUSH_EVERY == 1 {
                // Away: a PING a second and nothing else; once it answers,
                // a whole round (every lease traded again, the counts held
                // meanwhile written) before limits are global again.
                match self.probe(connection).await {
                    Ok(()) => self.round(connection, index, true).await,
                    Err(error) => Err(error),
                }
            } else {
                continue;
            };
            if up != Some(true) && tick % FLUSH_EVERY == 1 {
                self.age_counts();
            }
            match (result, up) {
                (Ok(()), None | Some(false)) => {
                    up = Some(true);
                    self.up.send_replace(up);
                    self.global_limits.store(true, Ordering::Relaxed);
                    self.metrics.up.set(1);
                    tracing::info!(store = %connection.redacted(), "usage store reachable: rate limits are global");
                }
                (Err(error), None | Some(true)) => {
                    up = Some(false);
                    self.up.send_replace(up);
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

    /// A round while the store is up, watched: one that outlasts
    /// [`ROUND_PATIENCE`] (the store stalled, with leases running dry
    /// that it may never refill) makes rate limits each sidecar's own at
    /// once, not when its commands time out; they are global again when it
    /// ends well. It is never cut short (see [`Self::round`]).
    async fn watched_round(
        &self,
        connection: &super::Connection,
        index: &Index,
        flush: bool,
    ) -> Result<(), UsageStoreError> {
        let round = self.round(connection, index, flush);
        tokio::pin!(round);
        tokio::select! {
            result = &mut round => result,
            () = tokio::time::sleep(ROUND_PATIENCE) => {
                self.global_limits.store(false, Ordering::Relaxed);
                self.up.send_replace(Some(false));
                let result = round.await;
                if result.is_ok() {
                    self.global_limits.store(true, Ordering::Relaxed);
                    self.up.send_replace(Some(true));
                }
                result
            }
        }
    }

    /// Drops counts held past their hour (the store away, or the local
    /// database closed), counting them as dropped.
    fn age_counts(&self) {
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        let dropped = self.counts.put_back(self.counts.take(), now);
        self.metrics.dropped.inc_by(dropped);
    }

    /// The store's connection, connecting first if need be.
    async fn connected(&self, connection: &super::Connection) -> Result<Store, UsageStoreError> {
        let held = self.store.lock().map_or(None, |store| store.clone());
        if let Some(store) = held {
            return Ok(store);
        }
        let store = tokio::time::timeout(RESPONSE_TIMEOUT * 2, Store::connect(connection))
            .await
            .map_err(|_| UsageStoreError::Timeout)??;
        if let Ok(mut held) = self.store.lock() {
            *held = Some(store.clone());
        }
        Ok(store)
    }

    /// Whether the store answers a PING.
    async fn probe(&self, connection: &super::Connection) -> Result<(), UsageStoreError> {
        self.connected(connection).await?.ping().await
    }

    /// One round: trade every lease, flush counts when `flush`.
    async fn round(
        &self,
        connection: &super::Connection,
        index: &Index,
        flush: bool,
    ) -> Result<(), UsageStoreError> {
        let store = self.connected(connection).await?;
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
        if let Ok(enlisted) = self.enlisted.lock() {
            for id in enlisted.try_iter() {
                self.leased.entry(id).or_insert(0);
            }
        }
        let ids: Vec<KeyId> = self.leased.iter().map(|entry| *entry.key()).collect();
        self.metrics
            .leased_keys
            .set(i64::try_from(ids.len()).unwrap_or(i64::MAX));
        // After a failure no further lease is taken: the round fails, and a
        // lease not taken keeps deciding as it was.
        let failed = &std::sync::atomic::AtomicBool::new(false);
        let results: Vec<Result<(), UsageStoreError>> = futures_util::stream::iter(ids)
            .map(|id| async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let result = self.trade(index, store.clone(), id).await;
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                result
            })
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
        let Some((limit, usage)) = index.limit_and_usage(&id) else {
            self.leased.remove(&id);
            return Ok(());
        };
        let Some(limit) = limit else {
            usage.lease.forget();
            self.leased.remove(&id);
            return Ok(());
        };
        let lease = &usage.lease;
        let mut idle = self.leased.get(&id).map_or(IDLE_TRADES, |idle| *idle);
        let turn = lease.turn(&limit, &mut idle, keyward_core::clock::now_nanos());
        if let Some(mut held) = self.leased.get_mut(&id) {
            *held = idle;
        }
        let Turn::Trade {
            give,
            owed,
            want,
            taken,
        } = turn
        else {
            if turn == Turn::Retire {
                self.leased.remove(&id);
            }
            return Ok(());
        };
        match store.trade(&id, limit.parts(), give, owed, want).await {
            Ok(trade) => {
                // The local limiter is set from the shared budget only while
                // limits are global: otherwise it is the one deciding.
                let local = self
                    .global_limits
                    .load(Ordering::Relaxed)
                    .then_some(&usage.tat);
                lease.settle(trade, &limit, local, keyward_core::clock::now_nanos());
                self.metrics.trades.inc();
                Ok(())
            }
            Err(error) => {
                lease.failed(taken);
                Err(error)
            }
        }
    }

    /// Trades leases another holder (an Envoy module, through the decision
    /// feed) took on its own, with this sidecar's store: `None` while rate
    /// limits are not global here (no shared store, or it is away: the
    /// holder's limits are its own too). A key not live, or without a
    /// rate limit, gets no trade (the holder keeps its debt and asks
    /// again). What a holder asks is bounded by the key's limit as this
    /// sidecar knows it: `want` by one trade's share, `owed` by what an
    /// honest holder can owe (credit, and two seconds of admissions while
    /// its trade stalled), `give` by what this sidecar lent out for the
    /// key and was not given back (so tokens never taken cannot refill
    /// the budget).
    pub async fn trade_for(
        &self,
        index: &Index,
        asks: Vec<Ask>,
    ) -> Result<Option<Vec<Option<Trade>>>, UsageStoreError> {
        if !self.global_limits.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(store) = self.store.lock().map_or(None, |store| store.clone()) else {
            return Ok(None);
        };
        let trades: Vec<Result<Option<Trade>, UsageStoreError>> = futures_util::stream::iter(asks)
            .map(|ask| {
                let limit = index.limit_and_usage(&ask.id).and_then(|(limit, _)| limit);
                self.trade_lent(store.clone(), ask, limit)
            })
            .buffered(TRADES_IN_FLIGHT)
            .collect()
            .await;
        self.metrics.trades.inc_by(
            trades
                .iter()
                .filter(|trade| matches!(trade, Ok(Some(_))))
                .count() as u64,
        );
        trades.into_iter().collect::<Result<_, _>>().map(Some)
    }

    /// One of [`Self::trade_for`]'s trades, its ask bounded.
    async fn trade_lent(
        &self,
        mut store: Store,
        ask: Ask,
        limit: Option<Gcra>,
    ) -> Result<Option<Trade>, UsageStoreError> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let most = Lease::most_wanted(&limit);
        let stalled = u64::try_from(2_000_000_000 / limit.parts().interval.max(1)).unwrap_or(0);
        let owed = ask
            .owed
            .min(u64::from(most) + u64::try_from(Lease::credit_for(&limit)).unwrap_or(0) + stalled);
        // Taken from what was lent before the trade: a give that fails may
        // still have been applied, and counts as given.
        let give = {
            let mut lent = self.lent.entry(ask.id).or_insert(0);
            let give = ask.give.min(u64::from(most)).min(*lent);
            *lent -= give;
            give
        };
        let trade = store
            .trade(&ask.id, limit.parts(), give, owed, ask.want.min(most))
            .await?;
        // Bounded: tokens lent to holders that went away are not
        // remembered past a few trades' worth.
        let mut lent = self.lent.entry(ask.id).or_insert(0);
        *lent = (*lent + u64::from(trade.granted)).min(LENT_TRADES * u64::from(most));
        if *lent == 0 {
            drop(lent);
            self.lent.remove_if(&ask.id, |_, lent| *lent == 0);
        }
        Ok(Some(trade))
    }

    /// Sums the counts held into the store.
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
        // A write that failed may still have been applied (a timeout after
        // the command was sent): sending it again could count it twice, so
        // it is dropped and counted as dropped. One flush's worth at most:
        // the store is then away, and nothing is flushed until it answers.
        let mut failure = None;
        for result in results {
            if let Err((error, (_, tally))) = result {
                failure.get_or_insert(error);
                self.metrics.dropped.inc_by(tally.iter().sum());
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
