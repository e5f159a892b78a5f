//! What decisions see of the keys: the index, with live keys counted per
//! account. Every backend changes it through a [`Mirror`], which queues
//! index changes while a batch is written and makes them at once when the
//! batch stands ([`Mirror::publish`]): a change is visible the moment it
//! is acknowledged, never before it is durable. Where a policy decides
//! which keys the index may hold (an on-demand replica), it also tells the
//! policy what was written and removed ([`HoldPolicy`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::change::{AccountCounts, intern};
use crate::domain::catalog::Catalog;
use crate::domain::key::KeyId;
use crate::domain::record::{Access, KeyRecord};
use crate::domain::scope_set::ScopeSet;
use crate::metrics::Metrics;
use crate::store::db::{Put, RawRecord, Store, StoreError};
use crate::store::index::{Entry, Index};

/// The index and the account counts, as the writer thread changes them.
#[derive(Debug)]
pub struct Mirror {
    index: Arc<Index>,
    catalog: Arc<Catalog>,
    accounts: AccountCounts,
    metrics: Arc<Metrics>,
    /// Index changes waiting for their batch to stand.
    pending: Vec<IndexChange>,
    /// The policy of which keys the index holds, if any (on demand).
    policy: Option<Arc<dyn HoldPolicy>>,
}

/// Decides which keys the index holds (an on-demand replica's eviction
/// policy), and hears what the writer put there and took away.
pub trait HoldPolicy: Send + Sync + std::fmt::Debug {
    /// A key was written here: the index holds it from now on (an update
    /// of a held key is not a use).
    fn written(&self, id: KeyId);
    /// A key was revoked: ids are never reused, so its next presentations
    /// may be answered without asking the truth.
    fn revoked(&self, id: KeyId);
    /// Keys evicted since the last call, to drop from the index.
    fn take_evicted(&self) -> Vec<KeyId>;
}

/// A change to the index, made once its batch stands.
#[derive(Debug)]
enum IndexChange {
    /// Boxed: an entry is ten times the size of a removal.
    Put(KeyId, Box<Entry>),
    Remove(KeyId),
}

impl Mirror {
    /// Over `index`, whose keys `accounts` counts.
    #[must_use]
    pub fn new(
        index: Arc<Index>,
        catalog: Arc<Catalog>,
        accounts: AccountCounts,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            index,
            catalog,
            accounts,
            metrics,
            pending: Vec::new(),
            policy: None,
        }
    }

    /// The index holds what `policy` decides (an on-demand replica).
    pub fn hold_by(&mut self, policy: Arc<dyn HoldPolicy>) {
        self.policy = Some(policy);
    }

    /// The live index.
    #[must_use]
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// How many keys `account` holds.
    #[must_use]
    pub fn count(&self, account: &str) -> usize {
        self.accounts.get(account).copied().unwrap_or_default()
    }

    /// A stored record's scopes under the catalog in force.
    #[must_use]
    pub fn scopes(&self, record: &KeyRecord) -> ScopeSet {
        self.catalog.resolve_stored(&record.scopes).0
    }

    /// Queues the index entry of a key `put` in the store, and counts it
    /// for its account if the store did not have it.
    pub fn put(&mut self, record: &KeyRecord, scopes: ScopeSet, put: Put) {
        let account = intern(&self.accounts, &record.account);
        self.pending.push(IndexChange::Put(
            record.id,
            Box::new(Entry::new(&record.access, scopes, Arc::clone(&account))),
        ));
        if put == Put::Created {
            *self.accounts.entry(account).or_default() += 1;
        }
    }

    /// Queues a key's removal; `removed`: what the store held, if it did
    /// (then it is no longer counted).
    pub fn remove(&mut self, id: KeyId, removed: Option<&KeyRecord>) {
        self.pending.push(IndexChange::Remove(id));
        if let Some(removed) = removed
            && let Some(count) = self.accounts.get_mut(removed.account.as_str())
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.accounts.remove(removed.account.as_str());
            }
        }
    }

    /// Puts a key into the index at once, outside any batch and without
    /// telling the eviction policy (an on-demand fetch: its caller does).
    pub fn show(&mut self, record: &KeyRecord) {
        let account = intern(&self.accounts, &record.account);
        let entry = Entry::new(&record.access, self.scopes(record), account);
        self.index.replace(record.id, entry);
        self.metrics.set_keys(self.index.len());
    }

    /// The batch stands: makes its index changes.
    pub fn publish(&mut self) {
        let policy = self.policy.as_ref();
        for change in self.pending.drain(..) {
            match change {
                IndexChange::Put(id, entry) => {
                    self.index.replace(id, *entry);
                    if let Some(policy) = policy {
                        policy.written(id);
                    }
                }
                IndexChange::Remove(id) => {
                    self.index.remove(&id);
                    if let Some(policy) = policy {
                        policy.revoked(id);
                    }
                }
            }
        }
        self.drop_evicted();
    }

    /// The batch did not stand: forgets its index changes.
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    /// Drops from the index what the policy evicted.
    pub fn drop_evicted(&self) {
        if let Some(policy) = &self.policy {
            for id in policy.take_evicted() {
                self.index.remove(&id);
            }
        }
        self.metrics.set_keys(self.index.len());
    }

    /// Makes the index and the counts what `fresh` (read from the truth
    /// again) says.
    pub fn reload(&mut self, fresh: &Index, accounts: AccountCounts) {
        self.pending.clear();
        self.index.reconcile(fresh);
        self.accounts = accounts;
        self.metrics.set_keys(self.index.len());
    }

    /// Writes the last-used times decisions recorded to `store`, in one
    /// batch and one flush; a failure leaves them in memory for the next
    /// run.
    pub fn persist_last_used(&self, store: &Store) -> Result<(), StoreError> {
        let times = self.index.unpersisted_last_used();
        if times.is_empty() {
            return Ok(());
        }
        store.record_last_used(&times)?;
        store.flush()?;
        self.index.persisted_last_used(&times);
        Ok(())
    }

    /// Keeps only the keys `keep` names.
    pub fn retain(&self, keep: impl Fn(&KeyId) -> bool) {
        self.index.retain(keep);
        self.metrics.set_keys(self.index.len());
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
