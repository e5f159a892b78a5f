//! etcd as the replicated truth, behind the writer's [`Backend`] seam,
//! with a local replica: a sled store holding every key (full), or only
//! the index holding the keys presented (on demand, [`super::cache`]).
//!
//! A change's [`Txn`] is a view of etcd that remembers every key it read
//! and commits in one transaction comparing them all
//! ([`super::remote`]); once etcd has it, the change stands, and this
//! sidecar applies it to its replica at once through the reflector
//! ([`super::reflector`]), which skips it when the watch brings it back.
//! A local disk that fails costs the replica, not the change: the replica
//! is read again from etcd when the disk recovers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::backend::{Backend, Flush, Outcome, Txn};
use super::cache::Cache;
use super::change::{AccountCounts, KeyError};
use super::demand::OnDemand;
use super::mirror::{Mirror, load};
use super::reflector::{Applied, Local, Reflector, Revisions};
use super::remote::{EtcdView, Remote};
use super::shared::{Fetched, Inbound, Replication, Shared};
use super::stage::{Staged, View};
use super::watcher::Event;
use crate::domain::catalog::Catalog;
use crate::domain::key::KeyId;
use crate::domain::record::KeyRecord;
use crate::metrics::Metrics;
use crate::store::db::{Store, StoreError};
use crate::store::index::Index;

/// etcd as the truth, and this sidecar's replica of it.
#[derive(Debug)]
pub struct Replicated {
    dir: PathBuf,
    /// `None` from a failure until recovery.
    store: Option<Store>,
    /// Every key is kept in the local store (on demand: none is).
    full: bool,
    remote: Remote,
    reflector: Reflector,
    /// On demand: fetched keys and evictions.
    cache: Option<Cache>,
    shared: Arc<Shared>,
    /// A local replica write of this batch failed (etcd has the batch).
    failure: Option<StoreError>,
}

impl Replicated {
    /// Opens the replica in `dir`: it must be one already, or empty (a
    /// standalone store is moved with `keyward migrate`). A full replica
    /// loads every key; an on-demand one starts empty.
    pub fn open(
        dir: PathBuf,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        remote: Remote,
        on_demand: bool,
    ) -> Result<(Self, Arc<Shared>, Arc<Index>), StoreError> {
        let store = Store::open(&dir)?;
        let mut replica = store.replica()?;
        match &replica {
            None if !store.is_empty() => {
                return Err(StoreError::Mode(
                    "it holds a standalone key store, and --etcd-endpoints was given: move its keys into etcd with `keyward migrate`, then start on an empty data directory",
                ));
            }
            None => {
                // Marked before any key is written: a first read killed
                // half-way leaves a replica that never synced (it reads
                // again at the next start), not what looks like a
                // standalone store.
                store.set_replica(0, 0)?;
                store.flush()?;
            }
            Some(_) if on_demand && !store.is_empty() => {
                // A full replica left by an earlier start: an on-demand
                // replica does not keep it current, so it must not pass for
                // current (or be decided from) if full mode comes back.
                store.clear_replica()?;
                store.flush()?;
                replica = store.replica()?;
            }
            Some(_) => {}
        }
        let revisions = match &replica {
            Some(replica) if !on_demand => {
                Revisions::restored(replica.revision, replica.ahead.clone())
            }
            _ => Revisions::default(),
        };
        // On demand, the index starts empty: keys come from etcd as they
        // are presented, never from the disk.
        let (index, accounts) = if on_demand {
            (Index::default(), AccountCounts::new())
        } else {
            load(&store, &catalog)?
        };
        let index = Arc::new(index);
        metrics.set_keys(index.len());
        metrics.set_store_healthy(true);
        let replication = replica
            .as_ref()
            .map_or_else(Replication::default, |replica| {
                Replication {
                    // Restarted from a replica that had synced: ready at the
                    // first full read, or once etcd proves unreachable.
                    ready: false,
                    connected: false,
                    synced_at: replica.synced_at,
                    revision: replica.revision,
                }
            });
        let shared = Shared::new(Some(store.clone()), replication, &metrics);
        let mirror = Mirror::new(Arc::clone(&index), catalog, accounts, metrics);
        let backend = Self {
            dir,
            store: Some(store),
            full: !on_demand,
            remote,
            reflector: Reflector::new(revisions, mirror, Arc::clone(&shared)),
            cache: None,
            shared: Arc::clone(&shared),
            failure: None,
        };
        Ok((backend, shared, index))
    }

    /// Makes this an on-demand replica with `demand`'s policy (before the
    /// writer runs).
    pub fn hold_on_demand(&mut self, demand: Arc<OnDemand>) {
        let index = Arc::clone(self.reflector.mirror().index());
        self.reflector
            .mirror()
            .hold_by(Arc::clone(&demand) as Arc<dyn super::mirror::HoldPolicy>);
        self.cache = Some(Cache::new(demand, index));
    }

    /// The local store keys are written to: none on demand (the replica is
    /// the index, and etcd), nor while the disk is failing.
    fn local(&self) -> Option<&Store> {
        self.store.as_ref().filter(|_| self.full)
    }

    /// Has the reflector apply what the watcher delivered (an on-demand
    /// restart also empties the cache).
    fn watched(&mut self, event: &Event) -> Result<(), StoreError> {
        if let (Event::Watching { revision }, Some(cache)) = (event, &mut self.cache) {
            cache.restart(*revision);
        }
        let local = self.store.as_ref().filter(|_| self.full);
        let local = local.map(|store| store as &dyn Local);
        let cache = &mut self.cache;
        self.reflector.reflect(local, event, |applied, revision| {
            cache
                .as_mut()
                .is_none_or(|cache| cache.watched(applied, revision))
        })
    }

    /// Rebuilds the replica from a full read of etcd on this thread (the
    /// disk recovered), through the events the watcher would deliver; fails
    /// while etcd cannot be read.
    fn reread(&mut self) -> Result<(), StoreError> {
        let Some(store) = self.local().cloned() else {
            // Nothing of the replica is on disk.
            return Ok(());
        };
        let mut listing = self.remote.list();
        loop {
            match self.remote.next_page(&mut listing) {
                Ok(Some(page)) => {
                    let (revision, first, last) = (page.revision, page.first, page.last);
                    let mut events = Vec::with_capacity(3);
                    if first {
                        events.push(Event::Init { revision });
                    }
                    events.push(Event::InitPage(page));
                    if last {
                        events.push(Event::InitDone { revision });
                    }
                    for event in &events {
                        self.reflector
                            .reflect(Some(&store as &dyn Local), event, |_, _| true)?;
                    }
                    if last {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(error) => {
                    tracing::debug!(%error, "reading etcd to rebuild the replica failed");
                    return Err(StoreError::Mode(
                        "etcd could not be read in full; the replica cannot be rebuilt yet",
                    ));
                }
            }
        }
    }
}

impl Backend for Replicated {
    fn begin(&mut self, deadline: Instant) -> Result<Box<dyn Txn + '_>, KeyError> {
        let store = self.store.as_ref().ok_or(KeyError::Unavailable)?;
        Ok(Box::new(EtcdTxn {
            view: self.remote.view(deadline),
            local: self.full.then_some(store),
            reflector: &mut self.reflector,
            failure: &mut self.failure,
        }))
    }

    fn flush(&mut self, failure: Option<StoreError>) -> Flush {
        let flushed = match (failure.or(self.failure.take()), &self.store) {
            (Some(error), _) => Err(error),
            (None, Some(store)) => store.flush(),
            (None, None) => Ok(()),
        };
        // etcd has the batch: it stands, whatever the local disk did.
        self.reflector.mirror().publish();
        Flush {
            stands: true,
            failure: flushed.err(),
        }
    }

    fn ready(&self) -> bool {
        self.store.is_some()
    }

    fn fail(&mut self) {
        self.store = None;
        self.shared.set_store(None);
    }

    fn recover(&mut self) -> Result<(), StoreError> {
        // Every handle must be gone first: sled locks its directory.
        self.fail();
        let store = Store::open(&self.dir)?;
        store.probe()?;
        self.store = Some(store.clone());
        // The replica may have missed changes the index has.
        if let Err(error) = self.reread() {
            self.store = None;
            return Err(error);
        }
        self.shared.set_store(Some(store));
        Ok(())
    }

    fn persist_last_used(&mut self) -> Result<(), StoreError> {
        // On demand, last-used times live in memory only (as the keys do).
        let Some(store) = self.local().cloned() else {
            return Ok(());
        };
        self.reflector.mirror().persist_last_used(&store)
    }

    fn replicate(&mut self, inbound: Inbound) -> Result<(), StoreError> {
        match inbound {
            Inbound::Watched { event, turn } => {
                let applied = self.watched(&event);
                drop(turn);
                applied
            }
            Inbound::Fetched(fetch) => {
                let outcome = match &mut self.cache {
                    Some(cache) => cache.fetched(&fetch, &mut self.reflector),
                    None => Fetched::Stale,
                };
                let _ = fetch.reply.send(outcome);
                Ok(())
            }
            Inbound::Evicted => {
                if let Some(cache) = &self.cache {
                    cache.evicted(&mut self.reflector);
                }
                Ok(())
            }
        }
    }

    fn close(&mut self) -> Result<(), StoreError> {
        self.shared.set_store(None);
        let Some(store) = self.store.take() else {
            return Err(StoreError::FailingAtClose);
        };
        if self.full {
            let replication = *self.shared.replication.borrow();
            store.set_replica(replication.revision, replication.synced_at)?;
        }
        store.flush()
    }
}

/// One change's step on etcd: the rules read through `view`; once the
/// transaction commits, the change is applied to the replica at once.
struct EtcdTxn<'a> {
    view: EtcdView<'a>,
    local: Option<&'a Store>,
    reflector: &'a mut Reflector,
    failure: &'a mut Option<StoreError>,
}

impl View for EtcdTxn<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        self.view.get(id)
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        self.view.count(account)
    }
}

impl Txn for EtcdTxn<'_> {
    fn commit(self: Box<Self>, staged: &Staged) -> Result<Outcome, KeyError> {
        let Self {
            view,
            local,
            reflector,
            failure,
        } = *self;
        let Some(revision) = view.commit(staged)? else {
            return Ok(Outcome::Raced);
        };
        let record = &staged.committed.after;
        // This sidecar's own write is ahead of its watch: noted before
        // the write itself, so a restarted replica that has the write
        // never replays older history over it. (Watched changes need no
        // note: the batch that applies them also raises the floor.)
        let noted = local.map_or(Ok(()), |store| store.note_revision(&record.id, revision));
        let applied = Applied::of(record, staged.write, staged.scopes);
        let local = local.map(|store| store as &dyn Local);
        if let Err(error) = noted.and_then(|()| reflector.apply(local, applied, Some(revision))) {
            // etcd has it, so it stands; the replica is read again from
            // etcd once the disk recovers.
            failure.get_or_insert(error);
        }
        Ok(Outcome::Committed)
    }
}
