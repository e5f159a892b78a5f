//! The key writer: one dedicated thread that owns every change to the store.
//!
//! Why a thread of its own: sled blocks on the disk, and a disk can fill up,
//! turn read-only or stall. Run on the async workers, two stuck writes park
//! the whole runtime and every decision with it; here they cost writes only.
//!
//! What it guarantees:
//! - **Rules at the commit point.** The caller is re-read from the store
//!   inside the same serial step as its write, so a key revoked or narrowed
//!   a moment ago cannot act on what it held before; the per-account limit,
//!   "never grant more than you hold" and "never touch a key holding scopes
//!   you lack" are checked there too.
//! - **Group commit.** Every change waiting when the thread wakes is staged,
//!   then one flush makes the batch durable: one tenant's burst shares
//!   flushes instead of queueing one flush per write in front of everyone.
//! - **Acknowledge after durable.** The index (and so every decision) sees a
//!   change only after its flush succeeded; a failed flush fails the batch.
//! - **Recovery.** sled poisons a database on its first I/O error, so after
//!   a failure the writer drops the store, reopens it, proves it with a
//!   durable probe write, and reconciles the index and account counts with
//!   what is on disk (a write that failed may still have reached it). Until
//!   then it retries every [`RETRY`] and health reports the failure.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::change::{AccountCounts, KeyError, Operation, Principal, intern};
use super::change::{Change, Committed};
use super::demand::{Demand, OnDemand, Recent};
use super::remote::{Remote, Revisions};
use super::shared::{
    Command, FailureKind, Fetch, Fetched, Job, Replication, Shared, StoreHealth, Synced,
};
use super::stage::{Rules, Staged, View, Write};
use crate::clock::now_nanos;
use crate::domain::catalog::Catalog;
use crate::domain::key::KeyId;
use crate::domain::record::{Access, KeyRecord};
use crate::domain::scope_set::ScopeSet;
use crate::metrics::Metrics;
use crate::store::db::{Put, RawRecord, Store, StoreError};
use crate::store::etcd::{Page, Watched};
use crate::store::index::{Entry, Index};

/// How often a failed store is reopened and probed.
pub const RETRY: Duration = Duration::from_secs(1);
/// While the store keeps failing, at most one log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// Most changes committed by one flush.
const MAX_BATCH: usize = 256;

/// How the writer runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most keys per account.
    pub max_per_account: usize,
    /// Longest a caller waits for a change (or a read).
    pub write_timeout: Duration,
    /// How often last-used times are written to the store.
    pub last_used_every: Duration,
    /// Replicated mode: how to reach etcd (`None`: standalone).
    pub replication: Option<crate::store::etcd::Connection>,
    /// Replicated mode: hold only the keys presented (`None`: every key).
    pub on_demand: Option<Demand>,
}

/// The writer thread's state.
pub struct Writer {
    dir: PathBuf,
    store: Option<Store>,
    shared: Arc<Shared>,
    index: Arc<Index>,
    catalog: Arc<Catalog>,
    accounts: AccountCounts,
    max_per_account: usize,
    metrics: Arc<Metrics>,
    last_failure_log: Option<Instant>,
    last_used_every: Duration,
    next_last_used: Instant,
    /// Replicated mode: etcd is the truth and the store its local replica.
    remote: Option<Remote>,
    /// Replicated mode: the full read of etcd being applied, if any.
    rebuild: Option<Rebuild>,
    /// On-demand replica: the held keys' policy, and the ids the watch
    /// delivered lately (to order fetches against).
    demand: Option<(Arc<OnDemand>, Recent)>,
}

/// A full read of etcd, applied page by page.
struct Rebuild {
    /// The revision every page is at.
    revision: i64,
    /// Every key id the pages held so far (16 bytes a key, while the read
    /// lasts): what the last page keeps.
    live: HashSet<KeyId>,
    started: Instant,
}

/// An acknowledged change waiting for its batch's flush.
struct Acked {
    reply: oneshot::Sender<Result<Committed, KeyError>>,
    operation: Operation,
    committed: Committed,
}

/// One committed change, as the replica applies it.
#[derive(Clone, Copy)]
enum Applied<'a> {
    /// A key's record (new or changed), with its resolved scopes.
    Put(&'a KeyRecord, ScopeSet),
    /// A removed key.
    Remove(KeyId),
}

impl<'a> Applied<'a> {
    /// What a staged `write` of `record` applies.
    fn of(record: &'a KeyRecord, write: Write, scopes: ScopeSet) -> Self {
        match write {
            Write::Create | Write::Replace => Self::Put(record, scopes),
            Write::Remove => Self::Remove(record.id),
        }
    }
}

/// A change to the index, made once the replica's batch is flushed.
enum IndexChange {
    Put(KeyId, Entry),
    Remove(KeyId),
}

impl Writer {
    /// Opens the store in `dir` and loads every key; returns the writer
    /// (to run on its own thread), the shared half and the live index.
    /// With `remote`, the store is etcd's replica: it must be one already,
    /// or empty (a standalone store is moved with `keyward migrate`).
    pub fn open(
        dir: PathBuf,
        catalog: Arc<Catalog>,
        settings: &Settings,
        metrics: Arc<Metrics>,
        remote: Option<Remote>,
    ) -> Result<(Self, Arc<Shared>, Arc<Index>), StoreError> {
        let store = Store::open(&dir)?;
        let mut replica = store.replica()?;
        match (&remote, &replica) {
            (Some(_), None) if !store.is_empty() => {
                return Err(StoreError::Mode(
                    "it holds a standalone key store, and --etcd-endpoints was given: move its keys into etcd with `keyward migrate`, then start on an empty data directory",
                ));
            }
            (None, Some(_)) => {
                return Err(StoreError::Mode(
                    "it is a replica of etcd (it was started with --etcd-endpoints): start it with --etcd-endpoints again, or use another data directory",
                ));
            }
            (Some(_), None) => {
                // Marked before any key is written: a first read killed
                // half-way leaves a replica that never synced (it reads
                // again at the next start), not what looks like a
                // standalone store.
                store.set_replica(0, 0)?;
                store.flush()?;
            }
            (Some(_), Some(_)) if settings.on_demand.is_some() && !store.is_empty() => {
                // A full replica left by an earlier start: an on-demand
                // replica does not keep it current, so it must not pass for
                // current (or be decided from) if full mode comes back.
                store.clear_replica()?;
                store.flush()?;
                replica = store.replica()?;
            }
            _ => {}
        }
        let remote = remote.map(|mut remote| {
            if let Some(replica) = &replica
                && settings.on_demand.is_none()
            {
                remote.replica = Revisions::restored(replica.revision, replica.ahead.clone());
            }
            remote
        });
        // On demand, the index starts empty: keys come from etcd as they
        // are presented, never from the disk.
        let (index, accounts) = if settings.on_demand.is_some() {
            (Index::default(), AccountCounts::new())
        } else {
            load(&store, &catalog)?
        };
        let index = Arc::new(index);
        metrics.set_keys(index.len());
        metrics.set_store_healthy(true);
        let shared = Arc::new(Shared {
            store: RwLock::new(Some(store.clone())),
            health: watch::Sender::new(StoreHealth::Healthy),
            replication: watch::Sender::new(replica.as_ref().map_or_else(
                Replication::default,
                |replica| Replication {
                    // Restarted from a replica that had synced: ready at
                    // the first full read, or once etcd proves unreachable.
                    ready: false,
                    connected: false,
                    synced_at: replica.synced_at,
                    revision: replica.revision,
                },
            )),
            metrics: Arc::clone(&metrics),
            snapshots: super::snapshot::Tracker::default(),
        });
        let writer = Self {
            dir,
            store: Some(store),
            shared: Arc::clone(&shared),
            index: Arc::clone(&index),
            catalog,
            accounts,
            max_per_account: settings.max_per_account,
            metrics,
            last_failure_log: None,
            last_used_every: settings.last_used_every,
            next_last_used: Instant::now() + settings.last_used_every,
            remote,
            rebuild: None,
            demand: None,
        };
        Ok((writer, shared, index))
    }

    /// Makes this an on-demand replica with `demand`'s policy (before it
    /// runs).
    pub fn hold_on_demand(&mut self, demand: Arc<OnDemand>) {
        self.demand = Some((demand, Recent::default()));
    }

    /// The local store keys are written to: none on demand (the replica is
    /// the index, and etcd).
    fn replica_store(&self, store: &Store) -> Option<Store> {
        self.demand.is_none().then(|| store.clone())
    }

    /// Commits changes until closed (or every sender is gone).
    pub fn run(mut self, commands: &Receiver<Command>) {
        loop {
            let first = if self.store.is_some() {
                let wait = self
                    .next_last_used
                    .saturating_duration_since(Instant::now());
                match commands.recv_timeout(wait) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        self.persist_last_used();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match commands.recv_timeout(RETRY) {
                    Ok(command) => {
                        self.recover();
                        command
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.recover();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Commit(job) => batch.push(*job),
                    Command::Sync(synced) => {
                        // In arrival order: what was queued before it first.
                        self.commit(std::mem::take(&mut batch));
                        self.sync(synced);
                    }
                    Command::Snapshot(reply) => {
                        // A point in time: what was queued before it is
                        // committed (and flushed) first.
                        self.commit(std::mem::take(&mut batch));
                        let _ = reply.send(self.begin_snapshot());
                    }
                    Command::Close(reply) => {
                        self.commit(batch);
                        self.persist_last_used();
                        let _ = reply.send(self.close());
                        return;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = commands.try_recv().ok();
                }
            }
            self.commit(batch);
            if Instant::now() >= self.next_last_used {
                self.persist_last_used();
            }
        }
        self.persist_last_used();
        let _ = self.close();
    }

    /// Fixes a standalone backup's point in time: now, between batches,
    /// with everything acknowledged flushed and the index matching the
    /// store. From here on [`Self::apply`] saves what the backup has yet
    /// to read before changing it.
    fn begin_snapshot(&self) -> Result<super::snapshot::Begun, super::snapshot::SnapshotError> {
        let store = self
            .store
            .clone()
            .filter(|_| self.remote.is_none())
            .ok_or(super::snapshot::SnapshotError::Unavailable)?;
        Ok(super::snapshot::Begun {
            saved: self.shared.snapshots.begin(),
            keys: self.index.len() as u64,
            store,
        })
    }

    /// Writes the last-used times decisions recorded since the previous
    /// run, in one batch and one flush: however many decisions there were,
    /// at most one write per key per period. Best effort: a failure leaves
    /// them in memory for the next run (and starts recovery).
    fn persist_last_used(&mut self) {
        self.next_last_used = Instant::now() + self.last_used_every;
        // On demand, last-used times live in memory only (as the keys do).
        let Some(store) = self.store.clone().filter(|_| self.demand.is_none()) else {
            return;
        };
        let times = self.index.unpersisted_last_used();
        if times.is_empty() {
            return;
        }
        match store.record_last_used(&times).and_then(|()| store.flush()) {
            Ok(()) => self.index.persisted_last_used(&times),
            Err(error) => self.fail(&error),
        }
    }

    /// Flushes and lets go of the store, so that it can be opened again
    /// (sled locks its directory while any handle lives).
    fn close(&mut self) -> Result<(), StoreError> {
        self.shared.set_store(None);
        match self.store.take() {
            Some(store) => {
                if self.remote.is_some() && self.demand.is_none() {
                    let replication = *self.shared.replication.borrow();
                    store.set_replica(replication.revision, replication.synced_at)?;
                }
                store.flush()
            }
            None => Err(StoreError::Sled(sled::Error::Unsupported(
                "the store was failing at close".into(),
            ))),
        }
    }

    /// Commits a batch: each change is checked and written to the truth
    /// (sled, or etcd in its own transaction), then applied to the local
    /// store; one flush makes the batch durable; then the index changes
    /// and everyone is answered.
    fn commit(&mut self, batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let Some(store) = self.store.clone() else {
            for job in batch {
                let _ = job.reply.send(Err(KeyError::Unavailable));
            }
            return;
        };
        let started = Instant::now();
        let mut acked = Vec::with_capacity(batch.len());
        let mut changes = Vec::with_capacity(batch.len());
        let mut failure = None;
        for job in batch {
            // The caller has been told "not acknowledged": do not apply it.
            if job.deadline <= started || job.reply.is_closed() {
                continue;
            }
            let operation = job.change.operation();
            let (staged, revision) = match self.write(&store, &job.actor, job.change, job.deadline)
            {
                Ok(outcome) => outcome,
                Err(KeyError::Store(error)) => {
                    let _ = job.reply.send(Err(KeyError::Unavailable));
                    failure.get_or_insert(error);
                    continue;
                }
                Err(refused) => {
                    let _ = job.reply.send(Err(refused));
                    continue;
                }
            };
            // This sidecar's own write is ahead of its watch: noted before
            // the write itself, so a restarted replica that has the write
            // never replays older history over it. (Watched changes need
            // no note: the batch that applies them also raises the floor.)
            let replica = self.replica_store(&store);
            let noted = match (revision, &replica) {
                (Some(revision), Some(replica)) => {
                    replica.note_revision(&staged.committed.after.id, revision)
                }
                _ => Ok(()),
            };
            let applied = Applied::of(&staged.committed.after, staged.write, staged.scopes);
            let stored =
                noted.and_then(|()| self.apply(replica.as_ref(), applied, revision, &mut changes));
            if let Err(error) = stored {
                failure.get_or_insert(error);
                // Standalone, the store is the truth: the change failed.
                // Replicated, etcd has it, so it stands; the replica is
                // rebuilt from etcd once the disk recovers.
                if self.remote.is_none() {
                    let _ = job.reply.send(Err(KeyError::Unavailable));
                    continue;
                }
            }
            acked.push(Acked {
                reply: job.reply,
                operation,
                committed: staged.committed,
            });
        }
        if acked.is_empty() && failure.is_none() {
            // The store answered (every change was refused on its merits,
            // or by etcd): whatever stall was reported is over.
            self.shared.publish(StoreHealth::Healthy);
            return;
        }
        let flushed = match failure {
            Some(error) => Err(error),
            None => store.flush(),
        };
        let took = started.elapsed();
        let durable = flushed.is_ok() || self.remote.is_some();
        if durable {
            self.change_index(changes);
        }
        for change in acked {
            self.metrics
                .store_write(change.operation.label(), took, durable);
            let outcome = if durable {
                Ok(change.committed)
            } else {
                Err(KeyError::Unavailable)
            };
            let _ = change.reply.send(outcome);
        }
        match flushed {
            Ok(()) => self.shared.publish(StoreHealth::Healthy),
            Err(error) => self.fail(&error),
        }
    }

    /// Checks a change against the truth, and commits it there when the
    /// truth is etcd (returning the revision it committed at). Standalone,
    /// the store is the truth and [`Self::apply`] is the write.
    fn write(
        &mut self,
        store: &Store,
        actor: &Principal,
        change: Change,
        deadline: Instant,
    ) -> Result<(Staged, Option<i64>), KeyError> {
        let rules = Rules {
            catalog: &self.catalog,
            max_per_account: self.max_per_account,
        };
        match &mut self.remote {
            None => rules
                .stage(&mut Local::new(store, &self.accounts), actor, change)
                .map(|staged| (staged, None)),
            Some(remote) => remote
                .commit(&rules, actor, &change, deadline)
                .map(|(staged, revision)| (staged, Some(revision))),
        }
    }

    /// Applies one committed change to the local store and queues the
    /// index change it makes (made once the batch is flushed); the only
    /// path by which changes reach the replica and the index, whether this
    /// sidecar wrote them (`revision` from etcd, or `None` standalone) or
    /// the watch brought them. Idempotent by revision: a change already
    /// applied, or older than what the replica holds, changes nothing.
    /// Without a store (the disk is failing) only the index changes.
    fn apply(
        &mut self,
        store: Option<&Store>,
        change: Applied<'_>,
        revision: Option<i64>,
        index: &mut Vec<IndexChange>,
    ) -> Result<(), StoreError> {
        let id = match change {
            Applied::Put(record, _) => record.id,
            Applied::Remove(id) => id,
        };
        if let (Some(remote), Some(revision)) = (&mut self.remote, revision)
            && !remote.replica.admit(id, revision)
        {
            return Ok(());
        }
        if let (Some(store), None) = (store, &self.remote) {
            // Standalone, a backup may be reading the store.
            self.shared.snapshots.before_write(store, &id);
        }
        match change {
            Applied::Put(record, scopes) => {
                let put = match store {
                    Some(store) => store.put(record)?,
                    None => Put::Unchanged,
                };
                self.index_put(record, scopes, put, index);
            }
            Applied::Remove(id) => {
                index.push(IndexChange::Remove(id));
                if let Some(store) = store
                    && let Some(removed) = store.remove(&id)?
                    && let Some(count) = self.accounts.get_mut(removed.account.as_str())
                {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.accounts.remove(removed.account.as_str());
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues the index entry of a key put in the store, and counts it for
    /// its account if the store did not have it.
    fn index_put(
        &mut self,
        record: &KeyRecord,
        scopes: ScopeSet,
        put: Put,
        index: &mut Vec<IndexChange>,
    ) {
        let account = intern(&self.accounts, &record.account);
        index.push(IndexChange::Put(
            record.id,
            Entry::new(&record.access, scopes, Arc::clone(&account)),
        ));
        if put == Put::Created {
            *self.accounts.entry(account).or_default() += 1;
        }
    }

    fn change_index(&self, changes: Vec<IndexChange>) {
        let demand = self.demand.as_ref().map(|(demand, _)| demand);
        for change in changes {
            match change {
                IndexChange::Put(id, entry) => {
                    self.index.replace(id, entry);
                    // A held key's update is not a use; a key this sidecar
                    // created is held from now on.
                    if let Some(demand) = demand
                        && !demand.holds(&id)
                    {
                        demand.hold(id);
                    }
                }
                IndexChange::Remove(id) => {
                    self.index.remove(&id);
                    if let Some(demand) = demand {
                        // Revoked: ids are never reused, so its next
                        // presentations are answered without asking etcd.
                        demand.release(&id);
                        demand.remember_absent(id);
                    }
                }
            }
        }
        self.drop_evicted();
        self.metrics.set_keys(self.index.len());
    }

    /// On demand: drops from the index what the policy evicted.
    fn drop_evicted(&self) {
        if let Some((demand, _)) = &self.demand {
            for id in demand.take_evicted() {
                self.index.remove(&id);
            }
        }
    }

    /// Applies what the etcd watch delivered (replicated mode).
    fn sync(&mut self, synced: Synced) {
        match synced {
            Synced::Events(changes) => self.sync_events(&changes),
            Synced::Page { page, permit } => {
                let applied = self.apply_page(&page);
                drop(permit);
                if let Err(error) = applied {
                    self.fail(&error);
                }
            }
            Synced::Current { read_at } => self.shared.confirmed(read_at),
            Synced::Reset { revision } => self.reset(revision),
            Synced::Fetched(fetch) => {
                let outcome = self.apply_fetched(&fetch);
                let _ = fetch.reply.send(outcome);
            }
            Synced::Evicted => {
                self.drop_evicted();
                self.metrics.set_keys(self.index.len());
            }
        }
    }

    /// On demand: a watch starts after `revision` with nothing held (at
    /// start, or after etcd compacted the history a watch needed: what was
    /// held may have missed changes, so it is fetched again as presented).
    fn reset(&mut self, revision: i64) {
        let Some((demand, recent)) = &mut self.demand else {
            return;
        };
        demand.clear();
        recent.reset(revision);
        self.index.retain(|_| false);
        if let Some(remote) = &mut self.remote {
            remote.replica.reset(revision);
        }
        self.metrics.set_keys(0);
        self.shared.replicated(revision, true);
        tracing::info!(
            revision,
            "on-demand replica following etcd: keys are fetched as they are presented"
        );
    }

    /// On demand: applies a key fetched at its first sight, unless the
    /// watch changed it after the fetch's revision (then it is read again).
    fn apply_fetched(&mut self, fetch: &Fetch) -> Fetched {
        let Some((demand, recent)) = &self.demand else {
            return Fetched::Stale;
        };
        if self.index.contains(&fetch.id) {
            // The watch keeps a held key current.
            return Fetched::Held;
        }
        let (floor, written_here) = self.remote.as_ref().map_or((0, false), |remote| {
            (
                remote.replica.floor(),
                remote.replica.changed_after(&fetch.id, fetch.revision),
            )
        });
        // Changed after the fetch's revision, by the watch (passed over
        // while the key was not held) or by this sidecar itself (say a
        // revocation whose event has not come back yet): read it again.
        if written_here
            || (fetch.revision < floor && !recent.unchanged_since(&fetch.id, fetch.revision))
        {
            return Fetched::Stale;
        }
        let Some((record, written_at)) = &fetch.found else {
            demand.remember_absent(fetch.id);
            return Fetched::Absent;
        };
        // Noted by revision: the watch's older events for the key (still
        // on their way) are skipped, never applied over it.
        if let Some(remote) = &mut self.remote {
            remote.replica.admit(fetch.id, *written_at);
        }
        let scopes = self.catalog.resolve_stored(&record.scopes).0;
        let mut index = Vec::with_capacity(1);
        self.index_put(record, scopes, Put::Unchanged, &mut index);
        // The index only: the fetch's caller tells the eviction policy
        // (moka's maintenance then runs on its task, not on this thread).
        for change in index {
            if let IndexChange::Put(id, entry) = change {
                self.index.replace(id, entry);
            }
        }
        self.metrics.set_keys(self.index.len());
        Fetched::Held
    }

    /// Applies watched changes in revision order, then records how far the
    /// replica has got. Decisions see them even if the local disk fails
    /// (etcd has them; the replica is rebuilt when the disk recovers).
    fn sync_events(&mut self, changes: &[Watched]) {
        let Some(through) = changes.iter().filter_map(Watched::revision).max() else {
            return;
        };
        // The watch resumed without completing a full read: that read is
        // abandoned (its pages stand, each a key's state at one revision,
        // and the watch brings every later change).
        self.rebuild = None;
        let store = self.store.clone().filter(|_| self.demand.is_none());
        let mut index = Vec::with_capacity(changes.len());
        let mut failure = None;
        for change in changes {
            let (applied, revision) = match change {
                Watched::Put { record, revision } => (
                    Applied::Put(record, self.catalog.resolve_stored(&record.scopes).0),
                    *revision,
                ),
                Watched::Deleted { id, revision } => (Applied::Remove(*id), *revision),
                Watched::Progress { .. } | Watched::Compacted { .. } => continue,
            };
            if !self.held_here(applied, revision) {
                continue;
            }
            if let Err(error) = self.apply(store.as_ref(), applied, Some(revision), &mut index) {
                failure.get_or_insert(error);
            }
        }
        if let Some(remote) = &mut self.remote {
            remote.replica.advance(through);
        }
        let flushed = match (failure, &store) {
            (Some(error), _) => Err(error),
            (None, Some(store)) => {
                let synced_at = now_nanos();
                store
                    .set_replica(through, synced_at)
                    .and_then(|()| store.flush())
            }
            (None, None) => Ok(()),
        };
        self.change_index(index);
        self.shared.replicated(through, false);
        if let Err(error) = flushed {
            self.fail(&error);
        }
    }

    /// Whether a watched change is for this replica: always in full mode;
    /// on demand, only for held keys (a put of another key ends what was
    /// remembered of its absence). Noted for ordering fetches either way.
    fn held_here(&mut self, change: Applied<'_>, revision: i64) -> bool {
        let Some((demand, recent)) = &mut self.demand else {
            return true;
        };
        let id = match change {
            Applied::Put(record, _) => record.id,
            Applied::Remove(id) => id,
        };
        recent.note(id, revision);
        if matches!(change, Applied::Put(..)) {
            demand.watched_put(&id);
        }
        self.index.contains(&id)
    }

    /// Applies one page of a full read of etcd (at start, after a
    /// compaction, after the disk recovered): its keys are written to the
    /// replica and the index as they come, each switching atomically while
    /// decisions keep reading. The last page removes what etcd no longer
    /// holds and makes the replica ready. Keys this sidecar changed after
    /// the read's revision keep their newer state. A first page abandons
    /// any read in progress (etcd compacted its revision).
    fn apply_page(&mut self, page: &Page) -> Result<(), StoreError> {
        let Some(store) = self.store.clone() else {
            // No replica to rebuild; recovery reads everything itself.
            self.rebuild = None;
            return Ok(());
        };
        let behind = self
            .remote
            .as_ref()
            .is_some_and(|remote| page.revision < remote.replica.floor());
        if page.first && behind {
            // A read older than what the replica already holds (queued
            // behind a re-read on recovery): applying it would roll keys
            // back.
            self.rebuild = None;
            return Ok(());
        }
        if page.first {
            self.rebuild = Some(Rebuild {
                revision: page.revision,
                live: HashSet::new(),
                started: Instant::now(),
            });
        }
        let Some(mut rebuild) = self.rebuild.take_if(|r| r.revision == page.revision) else {
            return Ok(());
        };
        rebuild
            .live
            .extend(page.records.iter().map(|record| record.id));
        let fresh: Vec<&KeyRecord> =
            page.records
                .iter()
                .filter(|record| {
                    !self.remote.as_ref().is_some_and(|remote| {
                        remote.replica.changed_after(&record.id, page.revision)
                    })
                })
                .collect();
        let puts = store.put_all(&fresh)?;
        let mut index = Vec::with_capacity(fresh.len());
        for (record, put) in fresh.into_iter().zip(puts) {
            let scopes = self.catalog.resolve_stored(&record.scopes).0;
            self.index_put(record, scopes, put, &mut index);
        }
        self.change_index(index);
        if page.last {
            self.finish_rebuild(&store, &rebuild)
        } else {
            self.rebuild = Some(rebuild);
            Ok(())
        }
    }

    /// Completes a full read: removes every key etcd did not hold at its
    /// revision (unless this sidecar wrote it since), then marks the
    /// replica as holding everything through that revision.
    fn finish_rebuild(&mut self, store: &Store, rebuild: &Rebuild) -> Result<(), StoreError> {
        let Some(remote) = &mut self.remote else {
            return Ok(());
        };
        let newer = remote.replica.reset(rebuild.revision);
        let keep = |id: &KeyId| rebuild.live.contains(id) || newer.contains(id);
        let gone = store
            .ids()
            .filter(|id| id.as_ref().map_or(true, |id| !keep(id)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = Vec::with_capacity(gone.len());
        for id in &gone {
            self.apply(Some(store), Applied::Remove(*id), None, &mut index)?;
        }
        store.set_replica(rebuild.revision, now_nanos())?;
        store.flush()?;
        self.change_index(index);
        // The index holds no key the store lacks; this keeps it so even
        // if the disk failed while changes were applied to the index only.
        self.index.retain(keep);
        self.metrics.set_keys(self.index.len());
        self.shared.replicated(rebuild.revision, true);
        tracing::info!(
            keys = self.index.len(),
            revision = rebuild.revision,
            removed = gone.len(),
            elapsed_ms = rebuild.started.elapsed().as_millis(),
            "replica synced with etcd"
        );
        Ok(())
    }

    /// Rebuilds the replica from a full read of etcd on this thread (the
    /// disk recovered); fails while etcd cannot be read.
    fn reread(&mut self) -> Result<(), StoreError> {
        if self.demand.is_some() {
            // Nothing of the replica is on disk.
            return Ok(());
        }
        let Some(mut listing) = self.remote.as_ref().map(Remote::list) else {
            return Ok(());
        };
        loop {
            let page = self
                .remote
                .as_ref()
                .map(|remote| remote.next_page(&mut listing));
            match page {
                Some(Ok(Some(page))) => {
                    let last = page.last;
                    self.apply_page(&page)?;
                    if last {
                        return Ok(());
                    }
                }
                Some(Ok(None)) | None => return Ok(()),
                Some(Err(error)) => {
                    tracing::debug!(%error, "reading etcd to rebuild the replica failed");
                    return Err(StoreError::Mode(
                        "etcd could not be read in full; the replica cannot be rebuilt yet",
                    ));
                }
            }
        }
    }

    /// Gives up the poisoned store; [`Self::recover`] reopens it.
    fn fail(&mut self, error: &StoreError) {
        // Details (paths, OS messages) stay in this log line.
        tracing::error!(%error, "store write failed");
        self.shared
            .publish(StoreHealth::Failing(FailureKind::of(error)));
        self.store = None;
        self.shared.set_store(None);
        self.last_failure_log = Some(Instant::now());
    }

    /// Reopens the store, proves it takes a durable write, and reconciles
    /// the index and counts with the truth: the disk standalone (a write
    /// that failed may still have reached it), etcd when replicated (the
    /// replica may have missed changes the index has). Every handle must be
    /// gone first: sled locks its directory.
    fn recover(&mut self) {
        self.store = None;
        self.shared.set_store(None);
        let reopened = Store::open(&self.dir).and_then(|store| {
            store.probe()?;
            Ok(store)
        });
        let recovered = reopened.and_then(|store| {
            self.store = Some(store.clone());
            match &self.remote {
                None => {
                    let (fresh, accounts) = load(&store, &self.catalog)?;
                    self.index.reconcile(&fresh);
                    self.accounts = accounts;
                    Ok(())
                }
                Some(_) => self.reread(),
            }
        });
        match recovered {
            Ok(()) => {
                self.metrics.set_keys(self.index.len());
                self.shared.set_store(self.store.clone());
                self.shared.publish(StoreHealth::Healthy);
            }
            Err(error) => {
                self.store = None;
                if self
                    .last_failure_log
                    .is_none_or(|at| at.elapsed() >= LOG_EVERY)
                {
                    tracing::warn!(%error, retry_ms = RETRY.as_millis(), "store still failing");
                    self.last_failure_log = Some(Instant::now());
                }
                self.shared
                    .publish(StoreHealth::Failing(FailureKind::of(&error)));
            }
        }
    }
}

/// The standalone store as a [`View`]: the writer thread is its only
/// writer and runs reads and writes serially, so what a change read is
/// still true when it writes.
struct Local<'a> {
    store: &'a Store,
    accounts: &'a AccountCounts,
}

impl<'a> Local<'a> {
    fn new(store: &'a Store, accounts: &'a AccountCounts) -> Self {
        Self { store, accounts }
    }
}

impl View for Local<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        Ok(self.store.get(id)?)
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        Ok(self.accounts.get(account).copied().unwrap_or_default())
    }
}

/// Loads every stored key into a fresh index, with key counts per account.
/// Stored scope names the catalog no longer defines grant nothing (and are
/// logged), but stay in the record, so restoring the catalog restores them.
pub fn load(store: &Store, catalog: &Catalog) -> Result<(Index, AccountCounts), StoreError> {
    let index = Index::default();
    // Read, decode and index in parallel: at a million keys, start-up time
    // is the time to walk the store.
    let parts = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let loaded: Vec<Result<AccountCounts, StoreError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parts)
            .map(|part| {
                let index = &index;
                scope.spawn(move || load_part(store.partition(part, parts), catalog, index))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    // The first part's Arc for an account is kept, so later keys of the
    // account share it.
    let mut accounts = AccountCounts::new();
    for part in loaded {
        for (account, count) in part? {
            *accounts.entry(account).or_default() += count;
        }
    }
    index.load_last_used(store.stored_last_used()?);
    Ok((index, accounts))
}

/// Loads part of the stored records into the index; returns key counts per
/// account. Each part interns its own account ids.
fn load_part(
    part: impl Iterator<Item = Result<RawRecord, StoreError>>,
    catalog: &Catalog,
    index: &Index,
) -> Result<AccountCounts, StoreError> {
    let mut accounts: AccountCounts = HashMap::new();
    for raw in part {
        let key = raw?.indexed()?;
        let stored = (
            key.id,
            key.account.as_str(),
            key.scopes.as_slice(),
            &key.access,
        );
        index_key(index, &mut accounts, catalog, stored);
    }
    Ok(accounts)
}

/// Puts a stored key into an index being built, counting it for its
/// account. Stored scope names the catalog no longer defines grant nothing
/// (and are logged), but stay in the record.
fn index_key(
    index: &Index,
    accounts: &mut AccountCounts,
    catalog: &Catalog,
    (id, account, scopes, access): (KeyId, &str, &[String], &Access),
) {
    let (scopes, unknown) = catalog.resolve_stored(scopes);
    if !unknown.is_empty() {
        tracing::warn!(key_id = %id, ?unknown, "stored scopes not in the catalog grant nothing");
    }
    let account = intern(accounts, account);
    *accounts.entry(Arc::clone(&account)).or_default() += 1;
    index.insert(id, Entry::new(access, scopes, account));
}
