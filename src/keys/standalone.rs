//! sled as the standalone truth, behind the writer's [`Backend`] seam.
//!
//! The writer thread is the store's only writer and runs each change's
//! reads and write serially, so what the rules read is still true when the
//! change is written: the [`Txn`] is the store itself. sled poisons a
//! database at its first I/O error, so recovery drops the store, reopens
//! it, proves it with a durable probe write, and reconciles the index and
//! the account counts with what is on disk (a write that failed may still
//! have reached it). An online backup's point in time is fixed here,
//! between two batches, and every write first saves what the backup has
//! yet to read ([`super::snapshot`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::backend::{Backend, Flush, Outcome, Txn};
use super::change::KeyError;
use super::mirror::{Mirror, load};
use super::shared::{Replication, Shared};
use super::snapshot::{Begun, SnapshotError};
use super::stage::{Staged, View, Write};
use crate::domain::catalog::Catalog;
use crate::domain::key::KeyId;
use crate::domain::record::KeyRecord;
use crate::metrics::Metrics;
use crate::store::db::{Store, StoreError};
use crate::store::index::Index;

/// The standalone truth: a sled store in a data directory.
#[derive(Debug)]
pub struct Standalone {
    dir: PathBuf,
    /// `None` from a failure until recovery.
    store: Option<Store>,
    catalog: Arc<Catalog>,
    mirror: Mirror,
    shared: Arc<Shared>,
}

impl Standalone {
    /// Opens the store in `dir` and loads every key; returns the backend,
    /// what it shares with the async side, and the live index.
    pub fn open(
        dir: PathBuf,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Arc<Shared>, Arc<Index>), StoreError> {
        let store = Store::open(&dir)?;
        if store.replica()?.is_some() {
            return Err(StoreError::Mode(
                "it is a replica of etcd (it was started with --etcd-endpoints): start it with --etcd-endpoints again, or use another data directory",
            ));
        }
        let (index, accounts) = load(&store, &catalog)?;
        let index = Arc::new(index);
        metrics.set_keys(index.len());
        metrics.set_store_healthy(true);
        let shared = Shared::new(Some(store.clone()), Replication::default(), &metrics);
        let mirror = Mirror::new(Arc::clone(&index), Arc::clone(&catalog), accounts, metrics);
        let backend = Self {
            dir,
            store: Some(store),
            catalog,
            mirror,
            shared: Arc::clone(&shared),
        };
        Ok((backend, shared, index))
    }
}

impl Backend for Standalone {
    fn begin(&mut self, _deadline: Instant) -> Result<Box<dyn Txn + '_>, KeyError> {
        let store = self.store.as_ref().ok_or(KeyError::Unavailable)?;
        Ok(Box::new(Local {
            store,
            mirror: &mut self.mirror,
            shared: &self.shared,
        }))
    }

    fn flush(&mut self, failure: Option<StoreError>) -> Flush {
        let flushed = match (failure, &self.store) {
            (Some(error), _) => Err(error),
            (None, Some(store)) => store.flush(),
            (None, None) => Err(StoreError::Mode("the store is failing")),
        };
        // The store is the truth: a batch stands only once it is durable.
        if flushed.is_ok() {
            self.mirror.publish();
        } else {
            self.mirror.discard();
        }
        Flush {
            stands: flushed.is_ok(),
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
        let (fresh, accounts) = load(&store, &self.catalog)?;
        self.mirror.reload(&fresh, accounts);
        self.shared.set_store(Some(store.clone()));
        self.store = Some(store);
        Ok(())
    }

    fn persist_last_used(&mut self) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        self.mirror.persist_last_used(store)
    }

    fn begin_snapshot(&mut self) -> Result<Begun, SnapshotError> {
        let store = self.store.clone().ok_or(SnapshotError::Unavailable)?;
        Ok(Begun {
            saved: self.shared.snapshots.begin(),
            keys: self.mirror.index().len() as u64,
            store,
        })
    }

    fn close(&mut self) -> Result<(), StoreError> {
        self.shared.set_store(None);
        match self.store.take() {
            Some(store) => store.flush(),
            None => Err(StoreError::FailingAtClose),
        }
    }
}

/// One change's step on the standalone store: read, then written in
/// place (the batch's flush makes it durable).
struct Local<'a> {
    store: &'a Store,
    mirror: &'a mut Mirror,
    shared: &'a Shared,
}

impl View for Local<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        Ok(self.store.get(id)?)
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        Ok(self.mirror.count(account))
    }
}

impl Txn for Local<'_> {
    fn commit(self: Box<Self>, staged: &Staged) -> Result<Outcome, KeyError> {
        let record = &staged.committed.after;
        // A backup may be reading the store.
        self.shared.snapshots.before_write(self.store, &record.id);
        match staged.write {
            Write::Create | Write::Replace => {
                let put = self.store.put(record)?;
                self.mirror.put(record, staged.scopes, put);
            }
            Write::Remove => {
                let removed = self.store.remove(&record.id)?;
                self.mirror.remove(record.id, removed.as_ref());
            }
        }
        Ok(Outcome::Committed)
    }
}
