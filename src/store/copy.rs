//! `keyward migrate`'s work: a standalone store's keys copied into etcd,
//! account by account, many keys per transaction, several transactions at
//! once.

use super::db::{Store, StoreError};
use super::etcd::{Etcd, EtcdError, Migrated};
use super::record::{self, KeyRecord};

/// etcd's default limit on the operations of one transaction
/// (`--max-txn-ops`): a migration transaction's compares and its writes
/// each stay within it.
const MAX_TXN_OPS: usize = 128;
/// Record bytes in one migration transaction: well under etcd's default
/// request limit (`--max-request-bytes`, 1.5 MiB).
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// Migration transactions in flight at once: etcd commits concurrent
/// proposals together (one raft round, one fsync), which is where the
/// speed comes from.
const MIGRATE_IN_FLIGHT: usize = 8;

/// Copies every key of a standalone store into etcd: ids, hashes, names,
/// scopes, creation times and lifecycle settings unchanged. Idempotent: a
/// key already in etcd is left alone, so a run interrupted half-way is
/// finished by running it again. The store must not be in use (sled locks
/// its directory).
///
/// Keys go in account order, many per transaction ([`Etcd::put_batch`]),
/// several transactions at once. `progress` hears the running totals after
/// every transaction.
pub async fn migrate(
    store: &Store,
    etcd: &Etcd,
    progress: &mut dyn FnMut(&Migrated),
) -> Result<Migrated, MigrateError> {
    let mut migrated = Migrated::default();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut batch = Batch::default();
    let mut records = store.records_by_account();
    loop {
        let record = records.next().transpose()?;
        let full = record.as_ref().is_none_or(|record| !batch.fits(record));
        if full && !batch.records.is_empty() {
            if in_flight.len() == MIGRATE_IN_FLIGHT {
                migrated.add(joined(in_flight.join_next().await)?);
                progress(&migrated);
            }
            let etcd = etcd.clone();
            let records = std::mem::take(&mut batch).records;
            in_flight.spawn(async move { etcd.put_batch(&records).await });
        }
        match record {
            Some(record) => batch.push(record),
            None => break,
        }
    }
    while let Some(done) = in_flight.join_next().await {
        migrated.add(joined(Some(done))?);
        progress(&migrated);
    }
    Ok(migrated)
}

fn joined(
    done: Option<Result<Result<Migrated, EtcdError>, tokio::task::JoinError>>,
) -> Result<Migrated, MigrateError> {
    match done {
        Some(Ok(result)) => Ok(result?),
        Some(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
        None => Ok(Migrated::default()),
    }
}

impl Migrated {
    fn add(&mut self, other: Self) {
        self.written += other.written;
        self.present += other.present;
    }
}

/// Records for one migration transaction, grouped by account.
#[derive(Default)]
struct Batch {
    records: Vec<KeyRecord>,
    accounts: usize,
    bytes: usize,
}

impl Batch {
    /// Whether `record` fits: a key's compare and put, and one more of
    /// each for its account's entry if it is a new account here.
    fn fits(&self, record: &KeyRecord) -> bool {
        let new_account = self
            .records
            .last()
            .is_none_or(|last| last.account != record.account);
        let ops = self.records.len() + 1 + self.accounts + usize::from(new_account);
        self.records.is_empty()
            || (ops <= MAX_TXN_OPS && self.bytes + record_bytes(record) <= MAX_TXN_BYTES)
    }

    fn push(&mut self, record: KeyRecord) {
        if self
            .records
            .last()
            .is_none_or(|last| last.account != record.account)
        {
            self.accounts += 1;
        }
        self.bytes += record_bytes(&record);
        self.records.push(record);
    }
}

/// What a record costs in a transaction (its encoding, its etcd key).
fn record_bytes(record: &KeyRecord) -> usize {
    record::encode(record).len() + 64
}

/// Why a migration stopped. Keys written before it stay written; running
/// it again continues.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Reading the standalone store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing to etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}
