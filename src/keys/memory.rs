//! An in-memory backend, for unit tests of the logic above storage: the
//! writer's rules at the commit point, group commit, replies and recovery
//! ([`Memory`], a standalone truth in a map), and the reflector's ordering
//! and idempotence by revision ([`Disk`], a local replica in a map). Both
//! fail on demand.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::backend::{Backend, Flush, Outcome, Txn};
use super::change::{AccountCounts, KeyError};
use super::mirror::Mirror;
use super::reflector::Local;
use super::stage::{Staged, View, Write};
use crate::domain::catalog::Catalog;
use crate::domain::key::KeyId;
use crate::domain::record::KeyRecord;
use crate::metrics::Metrics;
use crate::store::db::{Put, StoreError};
use crate::store::index::Index;

/// A storage failure, as a test injects it.
fn io_error() -> StoreError {
    StoreError::Sled(sled::Error::Io(std::io::Error::other("injected")))
}

/// The truth in memory, shared with the test that drives it.
#[derive(Debug, Default)]
pub struct Truth {
    /// What is written (durable or not).
    pub keys: BTreeMap<KeyId, KeyRecord>,
    /// What the last successful flush made durable.
    pub durable: BTreeMap<KeyId, KeyRecord>,
    /// Flushes that succeeded.
    pub flushes: usize,
    /// Commits to report as lost races before one succeeds.
    pub races: usize,
    /// Writes fail.
    pub fail_writes: bool,
    /// Flushes fail.
    pub fail_flush: bool,
    /// Recoveries to fail before one succeeds.
    pub fail_recoveries: usize,
    /// Whether storage was let go of (a failure) and not recovered yet.
    pub failed: bool,
}

/// A standalone truth in memory.
#[derive(Debug)]
pub struct Memory {
    truth: Arc<Mutex<Truth>>,
    catalog: Arc<Catalog>,
    mirror: Mirror,
}

impl Memory {
    /// An empty truth, the index over it, and the truth for the test.
    pub fn new(catalog: Arc<Catalog>) -> (Self, Arc<Index>, Arc<Mutex<Truth>>) {
        let index = Arc::new(Index::default());
        let mirror = Mirror::new(
            Arc::clone(&index),
            Arc::clone(&catalog),
            AccountCounts::new(),
            Arc::new(Metrics::new()),
        );
        let truth = Arc::new(Mutex::new(Truth::default()));
        let backend = Self {
            truth: Arc::clone(&truth),
            catalog,
            mirror,
        };
        (backend, index, truth)
    }

    fn truth(&self) -> MutexGuard<'_, Truth> {
        lock(&self.truth)
    }
}

/// `truth`, locked.
pub fn lock(truth: &Mutex<Truth>) -> MutexGuard<'_, Truth> {
    truth.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend for Memory {
    fn begin(&mut self, _deadline: Instant) -> Result<Box<dyn Txn + '_>, KeyError> {
        if self.truth().failed {
            return Err(KeyError::Unavailable);
        }
        Ok(Box::new(MemoryTxn {
            truth: lock(&self.truth),
            mirror: &mut self.mirror,
        }))
    }

    fn flush(&mut self, failure: Option<StoreError>) -> Flush {
        let mut truth = self.truth();
        let flushed = match failure {
            Some(error) => Err(error),
            None if truth.fail_flush => Err(io_error()),
            None => {
                truth.durable = truth.keys.clone();
                truth.flushes += 1;
                Ok(())
            }
        };
        drop(truth);
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
        !self.truth().failed
    }

    fn fail(&mut self) {
        self.truth().failed = true;
    }

    fn recover(&mut self) -> Result<(), StoreError> {
        let keys = {
            let mut truth = self.truth();
            if truth.fail_recoveries > 0 {
                truth.fail_recoveries -= 1;
                return Err(io_error());
            }
            // What reached the disk is the truth now.
            truth.keys = truth.durable.clone();
            truth.failed = false;
            truth.keys.clone()
        };
        let fresh = Arc::new(Index::default());
        let mut rebuilt = Mirror::new(
            Arc::clone(&fresh),
            Arc::clone(&self.catalog),
            AccountCounts::new(),
            Arc::new(Metrics::new()),
        );
        for record in keys.values() {
            let scopes = rebuilt.scopes(record);
            rebuilt.put(record, scopes, Put::Created);
        }
        rebuilt.publish();
        self.mirror.reload(&fresh, recount(&keys));
        Ok(())
    }

    fn persist_last_used(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn close(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Live keys per account in `keys`.
fn recount(keys: &BTreeMap<KeyId, KeyRecord>) -> AccountCounts {
    let mut accounts = AccountCounts::new();
    for record in keys.values() {
        *accounts
            .entry(Arc::from(record.account.as_str()))
            .or_default() += 1;
    }
    accounts
}

/// One change's step on the truth in memory.
struct MemoryTxn<'a> {
    truth: MutexGuard<'a, Truth>,
    mirror: &'a mut Mirror,
}

impl View for MemoryTxn<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        Ok(self.truth.keys.get(id).cloned())
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        Ok(self.mirror.count(account))
    }
}

impl Txn for MemoryTxn<'_> {
    fn commit(mut self: Box<Self>, staged: &Staged) -> Result<Outcome, KeyError> {
        if self.truth.races > 0 {
            self.truth.races -= 1;
            return Ok(Outcome::Raced);
        }
        if self.truth.fail_writes {
            return Err(KeyError::Store(io_error()));
        }
        let record = &staged.committed.after;
        match staged.write {
            Write::Create | Write::Replace => {
                let put = match self.truth.keys.insert(record.id, record.clone()) {
                    Some(_) => Put::Replaced,
                    None => Put::Created,
                };
                self.mirror.put(record, staged.scopes, put);
            }
            Write::Remove => {
                let removed = self.truth.keys.remove(&record.id);
                self.mirror.remove(record.id, removed.as_ref());
            }
        }
        Ok(Outcome::Committed)
    }
}

/// A local replica in memory, for the reflector.
#[derive(Debug, Default)]
pub struct Disk {
    state: Mutex<DiskState>,
}

/// What a [`Disk`] holds.
#[derive(Debug, Default)]
pub struct DiskState {
    /// The records.
    pub keys: BTreeMap<KeyId, KeyRecord>,
    /// Revisions of this sidecar's own writes.
    pub noted: BTreeMap<KeyId, i64>,
    /// The revision the replica holds everything through.
    pub revision: i64,
    /// Writes fail.
    pub fail: bool,
}

impl Disk {
    /// Its state, locked.
    pub fn state(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writable(&self) -> Result<MutexGuard<'_, DiskState>, StoreError> {
        let state = self.state();
        if state.fail {
            return Err(io_error());
        }
        Ok(state)
    }
}

impl Local for Disk {
    fn put(&self, record: &KeyRecord) -> Result<Put, StoreError> {
        Ok(
            match self.writable()?.keys.insert(record.id, record.clone()) {
                Some(_) => Put::Replaced,
                None => Put::Created,
            },
        )
    }

    fn put_all(&self, records: &[&KeyRecord]) -> Result<Vec<Put>, StoreError> {
        records.iter().map(|record| self.put(record)).collect()
    }

    fn remove(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.writable()?.keys.remove(id))
    }

    fn ids(&self) -> Result<Vec<KeyId>, StoreError> {
        Ok(self.state().keys.keys().copied().collect())
    }

    fn note_revision(&self, id: &KeyId, revision: i64) -> Result<(), StoreError> {
        self.writable()?.noted.insert(*id, revision);
        Ok(())
    }

    fn set_replica(&self, revision: i64, _synced_at: i64) -> Result<(), StoreError> {
        self.writable()?.revision = revision;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.writable().map(drop)
    }
}
