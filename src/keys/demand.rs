//! The on-demand replica (`--replica-mode on-demand`): a sidecar holds only
//! the keys its callers present, fetched from etcd the first time a
//! decision needs one, and still follows the whole prefix's watch.
//!
//! - **The hit path is the full replica's**: a held key is an index entry
//!   like any other, decided with no lock and no allocation. A decision
//!   marks the entry seen (one relaxed load, and a store once per sweep);
//!   a sweep once a second reports the seen keys to the eviction policy.
//! - **Eviction**: moka's LRU over the held ids, at most
//!   `--replica-cache-keys`. moka because it is the well-kept concurrent
//!   cache of the Rust ecosystem (a port of Caffeine), with an eviction
//!   listener, per-entry expiry for the absent ids, and `try_get_with`,
//!   which coalesces concurrent loads of one key. LRU rather than its
//!   default TinyLFU admission: admission can refuse a key just fetched
//!   (evicting it before the decision that asked for it reads it), and the
//!   scans TinyLFU guards against cannot reach the held set here: made-up
//!   ids are never held (they are absent), so only real keys compete. The
//!   evicted ids go to the key writer, the index's only writer, which drops
//!   them.
//! - **Ordering**: a fetch reads one key at etcd revision H and hands it to
//!   the writer, which applies watched changes in revision order. Applied
//!   only if no watched change to that key after H has been passed over
//!   (the writer keeps the last `cache::RECENT_EVENTS` ids it saw); otherwise
//!   fetched again. The fetched version is noted by its revision, so the
//!   watch's older events for the key are skipped: a fetch never
//!   resurrects a revoked key or rolls one back.
//! - **Absent keys** are remembered ([`ABSENT_KEYS`] at most, for
//!   [`ABSENT_TTL`]); a watched put of the id forgets it.
//! - **First sights are bounded**: at most `--replica-fetch-rate` etcd
//!   reads a second (burst the same) for ids the members' filter lists
//!   ([`super::members`]: every id etcd holds, kept current by the watch),
//!   and a tenth of that for ids it does not, however many ids are
//!   presented; concurrent first sights of one id share one read. So a
//!   flood of made-up ids spends the small budget, and the ids that exist
//!   keep theirs. Ids found in etcd before (held, or evicted since) are
//!   fetched again within a budget of their own (the same rate), then the
//!   listed ids'. Over its budget, or with etcd away, a listed id is
//!   refused as unverifiable; an unlisted id over its budget is answered
//!   as unknown, as made-up ids are (never allowed either way). In all:
//!   at most 2.1 × `--replica-fetch-rate` first-sight reads a second.
//! - **Key management's reads are bounded too**: reading one key's record
//!   or a page of an account's keys spends a budget of its own
//!   (`--replica-fetch-rate` a second; over it, UNAVAILABLE), and an id
//!   the members' filter does not list is not found without a read.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::change::KeyError;
use super::members::{Members, Membership};
use super::shared::{Command, Fetch, Fetched, Inbound, deliver};
use crate::clock::now_nanos;
use crate::domain::key::KeyId;
use crate::domain::rate::{Gcra, RateLimit};
use crate::metrics::Metrics;
use crate::store::db::Cursor;
use crate::store::etcd::Etcd;
use crate::store::index::Index;
use crate::store::record::{self, KeyRecord};

/// Default most keys an on-demand replica holds.
pub const DEFAULT_CACHE_KEYS: u64 = 20_000;
/// Default most first-sight etcd reads a second.
pub const DEFAULT_FETCH_RATE: u32 = 1_000;
/// Most ids remembered as absent (≈ 100 bytes each: ≈ 6.5 MB).
pub const ABSENT_KEYS: u64 = 65_536;
/// How long an id is remembered as absent. The watch forgets it sooner if
/// the id is written; this bounds what a missed event could cost.
pub const ABSENT_TTL: Duration = Duration::from_secs(60);
/// Known ids remembered per key held (see `OnDemand::known`), at most
/// [`MAX_KNOWN`] (≈ 100 bytes each).
const KNOWN_PER_HELD: u64 = 4;
/// See [`KNOWN_PER_HELD`].
const MAX_KNOWN: u64 = 1_000_000;
/// Longest wait for one fetch from etcd.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Fetches of one first sight before it is given up as unverifiable (a
/// fetch is read again when the watch changed the key meanwhile).
const FETCH_ATTEMPTS: usize = 3;
/// Inserts into the held set between forced maintenance runs: how far
/// past `--replica-cache-keys` it can grow between sweeps.
const MAINTAIN_EVERY: u64 = 256;
/// Longest wait for one page of an account's keys from etcd.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often seen keys are reported to the eviction policy.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The share of `--replica-fetch-rate` first sights of ids the members'
/// filter does not list get: 1/10.
const STRANGER_SHARE: u32 = 10;

/// A rate of etcd reads a second (burst the same): the limit and its
/// state, together so that one is never checked against another's.
#[derive(Debug)]
struct Budget {
    gcra: Gcra,
    tat: AtomicI64,
}

impl Budget {
    /// # Panics
    /// Never for a rate the flag's parser admits (1 to a million).
    fn per_second(rate: u32) -> Self {
        Self {
            gcra: RateLimit::new(rate.max(1), Duration::from_secs(1), 0)
                .expect("the flag's parser checks the fetch rate")
                .gcra(Duration::ZERO),
            tat: AtomicI64::new(0),
        }
    }

    /// Spends one read at `now` (Unix nanos) if the budget has one.
    fn admit(&self, now: i64) -> bool {
        self.gcra.admit(&self.tat, now).is_ok()
    }
}

/// Settings of an on-demand replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Most keys held.
    pub cache_keys: u64,
    /// Most first-sight etcd reads a second.
    pub fetch_rate: u32,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            cache_keys: DEFAULT_CACHE_KEYS,
            fetch_rate: DEFAULT_FETCH_RATE,
        }
    }
}

/// What a first sight found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The key is in the index now: decide again.
    Held,
    /// etcd has no such key.
    Absent,
    /// etcd could not be asked (away, slow, or first sights over their
    /// rate): the key can be neither allowed nor called unknown.
    Unverifiable,
}

/// The on-demand replica's shared state: the eviction policy, absent ids,
/// and the first-sight path.
#[derive(Debug)]
pub struct OnDemand {
    held: moka::sync::Cache<KeyId, ()>,
    evicted: Arc<Mutex<Vec<KeyId>>>,
    absent: moka::sync::Cache<KeyId, ()>,
    /// Ids etcd was found to hold here (evicted or not): fetched again
    /// outside the first-sight rate, so a flood of made-up ids cannot stop
    /// a known key from being fetched again after an eviction.
    known: moka::sync::Cache<KeyId, ()>,
    /// Coalesces concurrent first sights of one id (never holds a value).
    fetching: moka::future::Cache<KeyId, ()>,
    /// Which ids etcd holds: first sights of ids it does not list spend
    /// their own, smaller budget ([`super::members`]).
    members: Arc<Members>,
    first_sights: Budget,
    /// First sights of ids the members' filter does not list.
    stranger_sights: Budget,
    /// Fetches of ids found before (held, or evicted since).
    refetches: Budget,
    /// etcd reads key management makes (a key's record, an account's
    /// page), apart from decisions' first sights.
    manage_reads: Budget,
    /// Keys held so far (see [`MAINTAIN_EVERY`]).
    inserts: AtomicU64,
    etcd: Etcd,
    runtime: Handle,
    commands: OnceLock<SyncSender<Command>>,
    index: Arc<Index>,
    metrics: Arc<Metrics>,
}

impl OnDemand {
    /// The replica's state over `index`, fetching from `etcd` on `runtime`.
    ///
    /// # Panics
    /// If `demand.fetch_rate` is 0 or over a million (the flag's parser
    /// refuses both).
    #[must_use]
    pub fn new(
        demand: Demand,
        etcd: Etcd,
        runtime: Handle,
        index: Arc<Index>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&evicted);
        let held = moka::sync::Cache::builder()
            .max_capacity(demand.cache_keys)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |id: Arc<KeyId>, (), cause| {
                // Removed for room (not by the writer itself): the writer
                // drops it from the index.
                if cause.was_evicted() {
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(*id);
                }
            })
            .build();
        Arc::new(Self {
            held,
            evicted,
            absent: moka::sync::Cache::builder()
                .max_capacity(ABSENT_KEYS)
                .time_to_live(ABSENT_TTL)
                .build(),
            known: moka::sync::Cache::builder()
                .max_capacity(
                    demand
                        .cache_keys
                        .saturating_mul(KNOWN_PER_HELD)
                        .min(MAX_KNOWN),
                )
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            fetching: moka::future::Cache::builder().max_capacity(1).build(),
            members: Arc::new(Members::default()),
            first_sights: Budget::per_second(demand.fetch_rate),
            stranger_sights: Budget::per_second(demand.fetch_rate / STRANGER_SHARE),
            refetches: Budget::per_second(demand.fetch_rate),
            manage_reads: Budget::per_second(demand.fetch_rate),
            inserts: AtomicU64::new(0),
            etcd,
            runtime,
            commands: OnceLock::new(),
            index,
            metrics,
        })
    }

    /// Where fetched keys go: the writer's queue (set once it runs).
    pub fn connect(&self, commands: SyncSender<Command>) {
        let _ = self.commands.set(commands);
    }

    /// A first sight of `id` (the index does not hold it): remembered as
    /// absent, or fetched from etcd once however many callers ask at once.
    pub async fn lookup(&self, id: KeyId) -> Lookup {
        if self.index.contains(&id) {
            return Lookup::Held;
        }
        if self.absent.contains_key(&id) {
            self.metrics.first_sight("absent_remembered", None);
            return Lookup::Absent;
        }
        // The initializer never succeeds, so nothing is cached here: only
        // callers that arrive while it runs share its outcome.
        match self
            .fetching
            .try_get_with(id, async { Err::<(), _>(self.fetch(id).await) })
            .await
        {
            Ok(()) => Lookup::Unverifiable,
            Err(lookup) => *lookup,
        }
    }

    /// Builds the members' filter, and again when it must be.
    pub async fn maintain_members(self: Arc<Self>) {
        Arc::clone(&self.members)
            .maintain(self.etcd.clone(), Arc::clone(&self.metrics))
            .await;
    }

    /// Whether a first sight of `id` may read etcd, and if not, what to
    /// answer. Ids found before (evicted since) have a budget of their own,
    /// then share the listed ids'; ids the members' filter lists have
    /// `--replica-fetch-rate`; others a tenth of it, and past it they are
    /// answered as unknown (what etcd's listing and the watch say of them),
    /// never as unverifiable: a different answer for live and made-up ids
    /// would tell anyone which ids are live.
    fn admit_first_sight(&self, id: &KeyId) -> Result<(), Lookup> {
        let now = now_nanos();
        if self.known.contains_key(id) && self.refetches.admit(now) {
            return Ok(());
        }
        match self.members.of(id) {
            Membership::Member => {
                if self.first_sights.admit(now) {
                    return Ok(());
                }
                self.metrics.first_sight("over_rate", None);
                Err(Lookup::Unverifiable)
            }
            Membership::Stranger => {
                if self.stranger_sights.admit(now) {
                    return Ok(());
                }
                self.metrics.first_sight("over_rate_unlisted", None);
                Err(Lookup::Absent)
            }
        }
    }

    /// Whether key management may read etcd now (its own budget:
    /// `--replica-fetch-rate` a second).
    fn admit_manage_read(&self) -> Result<(), KeyError> {
        let admitted = self.manage_reads.admit(now_nanos());
        self.metrics
            .manage_read(if admitted { "read" } else { "over_rate" });
        admitted.then_some(()).ok_or(KeyError::Unavailable)
    }

    /// Reads `id` from etcd and has the writer apply it (again if the watch
    /// changed the key meanwhile).
    async fn fetch(&self, id: KeyId) -> Lookup {
        // A caller that found the key missing, then was overtaken by a
        // shared fetch that ended before it asked to share it: the key is
        // held now, and reading etcd again would spend a first sight.
        if self.index.contains(&id) {
            return Lookup::Held;
        }
        let started = Instant::now();
        if let Err(answer) = self.admit_first_sight(&id) {
            return answer;
        }
        for _ in 0..FETCH_ATTEMPTS {
            let Some((found, revision)) = self.read(id).await else {
                self.metrics.first_sight("etcd_unreachable", None);
                return Lookup::Unverifiable;
            };
            let Some(commands) = self.commands.get() else {
                return Lookup::Unverifiable;
            };
            let (reply, outcome) = oneshot::channel();
            let fetch = Fetch {
                id,
                found,
                revision,
                reply,
            };
            if !deliver(commands, Inbound::Fetched(Box::new(fetch))).await {
                return Lookup::Unverifiable;
            }
            match outcome.await {
                Ok(Fetched::Held) => {
                    self.hold(id);
                    self.known.insert(id, ());
                    self.metrics.first_sight("held", Some(started.elapsed()));
                    return Lookup::Held;
                }
                Ok(Fetched::Absent) => {
                    self.known.invalidate(&id);
                    self.metrics.first_sight("absent", Some(started.elapsed()));
                    return Lookup::Absent;
                }
                Ok(Fetched::Stale) => {}
                Err(_) => return Lookup::Unverifiable,
            }
        }
        self.metrics.first_sight("kept_changing", None);
        Lookup::Unverifiable
    }

    /// One read of `id` at etcd, on the etcd runtime: the record and its
    /// revision if any, and etcd's revision; `None` when etcd did not
    /// answer in time (or the record cannot be read).
    async fn read(&self, id: KeyId) -> Option<(Option<(KeyRecord, i64)>, i64)> {
        // Asked from the caller's task: the client's connection tasks run
        // on the etcd runtime already, and a hop to it costs a wake-up.
        let key = self.etcd.key_path(&id);
        let (kv, revision) = match tokio::time::timeout(FETCH_TIMEOUT, self.etcd.get_at(&key)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                tracing::debug!(%error, "a first-sight read of etcd failed");
                return None;
            }
            Err(_) => return None,
        };
        let found = match kv {
            None => None,
            Some(kv) => match record::decode(&kv.value) {
                Ok(record) if record.id == id => Some((record, kv.mod_revision)),
                Ok(_) | Err(_) => {
                    tracing::error!(key_id = %id, "unreadable key record in etcd");
                    return None;
                }
            },
        };
        Some((found, revision))
    }

    /// A key's record, read from etcd (key management on an on-demand
    /// replica reads the truth: the replica holds only what is presented).
    pub async fn record(&self, id: KeyId) -> Result<Option<KeyRecord>, KeyError> {
        if self.members.of(&id) == Membership::Stranger {
            // Not in etcd as of the watch (or written moments ago
            // elsewhere): a made-up id costs no read.
            self.metrics.manage_read("unlisted");
            return Ok(None);
        }
        self.admit_manage_read()?;
        match self.read(id).await {
            Some((found, _)) => Ok(found.map(|(record, _)| record)),
            None => Err(KeyError::Unavailable),
        }
    }

    /// Up to `limit` of `account`'s keys after `after`, in creation order,
    /// from etcd's per-account listing; the cursor for the next page when
    /// there may be one.
    pub async fn account_page(
        &self,
        account: Arc<str>,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, Option<Cursor>), KeyError> {
        self.admit_manage_read()?;
        let etcd = self.etcd.clone();
        let read = self.runtime.spawn(async move {
            let after = after.map(|cursor| cursor.position());
            tokio::time::timeout(LIST_TIMEOUT, etcd.account_page(&account, after, limit)).await
        });
        match read.await {
            Ok(Ok(Ok(Some((records, last))))) => Ok((records, last.map(Cursor::after))),
            Ok(Ok(Ok(None))) => Err(KeyError::Invalid {
                field: "account_id",
                problem: "etcd holds this account's key count but not its key ids (written by an earlier keyward): list it through a full replica".into(),
            }),
            Ok(Ok(Err(error))) => {
                tracing::warn!(%error, "listing an account's keys in etcd failed");
                Err(KeyError::Unavailable)
            }
            _ => Err(KeyError::Unavailable),
        }
    }

    /// Notes that the index now holds `id` (the writer, after a fetch or
    /// this sidecar's own write); over the cap, moka picks what goes.
    pub fn hold(&self, id: KeyId) {
        self.members.insert(&id);
        self.absent.invalidate(&id);
        self.held.insert(id, ());
        // moka evicts in its maintenance, which it runs on its own now
        // and then, and the sweep once a second; forced every so many
        // inserts, the held set stays within the cap plus that many
        // without paying for maintenance on every first sight.
        if self
            .inserts
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(MAINTAIN_EVERY)
        {
            self.held.run_pending_tasks();
        }
    }

    /// Whether `id` is held by the policy.
    #[must_use]
    pub fn holds(&self, id: &KeyId) -> bool {
        self.held.contains_key(id)
    }

    /// `id` was removed from the index (revoked).
    pub fn release(&self, id: &KeyId) {
        self.known.invalidate(id);
        self.held.invalidate(id);
    }

    /// etcd has no `id` (checked in revision order by the writer).
    pub fn remember_absent(&self, id: KeyId) {
        self.absent.insert(id, ());
    }

    /// The watch saw `id` put: etcd holds it (whatever was remembered of
    /// its absence is over).
    pub fn watched_put(&self, id: &KeyId) {
        self.members.insert(id);
        self.absent.invalidate(id);
    }

    /// Forgets everything (a new watch after a compaction).
    pub fn clear(&self) {
        self.members.invalidate();
        self.held.invalidate_all();
        self.absent.invalidate_all();
        self.evicted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The ids the policy evicted since the last call, to drop from the
    /// index (those held again meanwhile excepted).
    pub fn take_evicted(&self) -> Vec<KeyId> {
        let evicted =
            std::mem::take(&mut *self.evicted.lock().unwrap_or_else(PoisonError::into_inner));
        evicted
            .into_iter()
            .filter(|id| !self.held.contains_key(id))
            .collect()
    }

    /// Reports the keys decisions used since the last sweep to the policy,
    /// once a second, and nudges the writer when something was evicted.
    pub async fn sweep(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(SWEEP_EVERY);
        loop {
            ticks.tick().await;
            let this = Arc::clone(&self);
            // moka's maintenance may take a moment at a million ids: off
            // the etcd runtime's only worker.
            let evicted = tokio::task::spawn_blocking(move || {
                this.index.take_seen(|id| {
                    this.held.get(id);
                });
                this.held.run_pending_tasks();
                !this
                    .evicted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_empty()
            })
            .await
            .unwrap_or(false);
            if evicted
                && let Some(commands) = self.commands.get()
                && !deliver(commands, Inbound::Evicted).await
            {
                return;
            }
        }
    }
}

impl super::mirror::HoldPolicy for OnDemand {
    fn written(&self, id: KeyId) {
        if !self.holds(&id) {
            self.hold(id);
        }
    }

    fn revoked(&self, id: KeyId) {
        self.release(&id);
        self.remember_absent(id);
    }

    fn take_evicted(&self) -> Vec<KeyId> {
        OnDemand::take_evicted(self)
    }
}
