//! Writes, each in one etcd transaction with compares on what it read:
//! [`Etcd::commit`] of a [`Mutation`], [`Etcd::put_new`] and the
//! migration's [`Etcd::put_batch`].

use super::record::{self, KeyRecord};
use super::{Account, Etcd, EtcdError};
use crate::domain::key::KeyId;
use crate::pb::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcd::request_op::Request as Op;
use crate::pb::etcd::{Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};

/// One key change for [`Etcd::commit`], with the account's key count as
/// read (creates and removals change it in the same transaction).
#[derive(Debug)]
pub enum Mutation<'a> {
    /// A new key.
    Create {
        /// Its record.
        record: &'a KeyRecord,
        /// Its account before it.
        account: &'a Account,
    },
    /// A changed key.
    Replace {
        /// Its new record.
        record: &'a KeyRecord,
    },
    /// A removed key.
    Remove {
        /// The record removed.
        record: &'a KeyRecord,
        /// Its account before the removal.
        account: &'a Account,
    },
}

/// What [`Etcd::put_new`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutNew {
    /// The key was written and counted.
    Written,
    /// The key id was already there: nothing changed.
    Present,
    /// The account was at its limit: nothing changed.
    LimitReached,
}

/// What a migration ([`super::copy::migrate`]) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Keys written to etcd.
    pub written: usize,
    /// Keys etcd already had (from an earlier run): left as they are.
    pub present: usize,
}

impl Etcd {
    /// Writes `record` unless its key id is already there, adding one to
    /// its account's count in the same transaction ([`Self::commit`]), and
    /// only while the count is below `limit` (when given). A transaction
    /// that lost a race with another writer reads the count again: the
    /// limit holds globally, with no process-local lock.
    pub async fn put_new(
        &self,
        record: &KeyRecord,
        limit: Option<u64>,
    ) -> Result<PutNew, EtcdError> {
        let key = self.key_path(&record.id);
        let account = self.account_path(&record.account);
        loop {
            let held = self.account(&account).await?;
            let count = held.count;
            if limit.is_none_or(|limit| count < limit) {
                let read = [(key.clone(), 0), (account.clone(), held.revision)];
                let create = Mutation::Create {
                    record,
                    account: &held,
                };
                if self.commit(&read, &create).await?.is_some() {
                    return Ok(PutNew::Written);
                }
            }
            if self.get_kv(&key).await?.is_some() {
                return Ok(PutNew::Present);
            }
            if limit.is_some_and(|limit| count >= limit) {
                return Ok(PutNew::LimitReached);
            }
            // The count moved under us (another writer): read it again.
        }
    }

    /// Runs `ops` in one transaction if every compare holds; returns the
    /// revision the transaction committed at, or `None` when a compare
    /// failed (nothing was written).
    async fn txn(
        &self,
        compare: Vec<Compare>,
        ops: Vec<RequestOp>,
    ) -> Result<Option<i64>, EtcdError> {
        let reply = self
            .kv
            .clone()
            .txn(TxnRequest {
                compare,
                success: ops,
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        Ok(reply
            .succeeded
            .then(|| reply.header.map_or(0, |h| h.revision)))
    }

    /// Commits `mutation` if every key in `read` is still at the revision
    /// it was read at (0: absent): the revision it committed at, or `None`
    /// when something changed since (nothing was written).
    pub async fn commit(
        &self,
        read: &[(Vec<u8>, i64)],
        mutation: &Mutation<'_>,
    ) -> Result<Option<i64>, EtcdError> {
        let compare = read
            .iter()
            .map(|(key, revision)| unchanged(key, *revision))
            .collect();
        let (record, account) = match mutation {
            Mutation::Create { record, account } => (record, Some(account.with(&[record.id]))),
            Mutation::Replace { record } => (record, None),
            Mutation::Remove { record, account } => (record, Some(account.without(&record.id))),
        };
        let key = self.key_path(&record.id);
        let mut ops = vec![match mutation {
            Mutation::Remove { .. } => delete(key),
            _ => put(key, record::encode(record)),
        }];
        if let Some(account) = account {
            let path = self.account_path(&record.account);
            ops.push(if account.count == 0 {
                delete(path)
            } else {
                put(path, account.encode())
            });
        }
        self.txn(compare, ops).await
    }

    /// Writes `records` (grouped by account: each account's records next to
    /// each other, else etcd refuses the duplicate count key) in one
    /// transaction, adding each account's new keys to its count, if none
    /// of the keys is there yet and no count moved since it was read.
    /// Otherwise (a rerun finds
    /// keys already there, or a sidecar changed a count meanwhile) each key
    /// goes on its own ([`Self::put_new`]), so the outcome is the same.
    pub async fn put_batch(&self, records: &[KeyRecord]) -> Result<Migrated, EtcdError> {
        let mut accounts: Vec<(&str, Vec<KeyId>)> = Vec::new();
        for record in records {
            match accounts.last_mut() {
                Some((account, added)) if *account == record.account => added.push(record.id),
                _ => accounts.push((&record.account, vec![record.id])),
            }
        }
        let held = self
            .accounts(
                accounts
                    .iter()
                    .map(|(account, _)| self.account_path(account)),
            )
            .await?;
        let mut compare: Vec<Compare> = records
            .iter()
            .map(|record| unchanged(&self.key_path(&record.id), 0))
            .collect();
        let mut ops: Vec<RequestOp> = records
            .iter()
            .map(|record| put(self.key_path(&record.id), record::encode(record)))
            .collect();
        for ((account, added), held) in accounts.iter().zip(&held) {
            let path = self.account_path(account);
            compare.push(unchanged(&path, held.revision));
            ops.push(put(path, held.with(added).encode()));
        }
        if self.txn(compare, ops).await?.is_some() {
            return Ok(Migrated {
                written: records.len(),
                present: 0,
            });
        }
        let mut migrated = Migrated::default();
        for record in records {
            // No limit: the standalone store enforced it already.
            match self.put_new(record, None).await? {
                PutNew::Written => migrated.written += 1,
                PutNew::Present | PutNew::LimitReached => migrated.present += 1,
            }
        }
        Ok(migrated)
    }
}

/// `key` was last written at `revision` (absent: 0): nobody changed it
/// since it was read.
fn unchanged(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::ModRevision(revision)),
        range_end: Vec::new(),
    }
}

/// Removes `key`.
fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })),
    }
}

/// Writes `value` at `key`.
fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}
