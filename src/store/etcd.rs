//! etcd as the shared source of truth for replicated mode: the key layout,
//! a client of the few etcd v3 RPCs keyward needs (compiled from
//! `proto/etcd` with protox, so building needs no protoc), and the
//! one-command migration of a standalone data directory.
//!
//! Layout under the prefix (default `/keyward/`):
//! - `keys/<key id>`: the key's record, in the same versioned encoding as
//!   sled ([`super::record`]), so both stores hold byte-identical records;
//! - `accounts/<account id>`: the account's live key count (decimal). Every
//!   create and delete changes it in the same transaction as the key, with
//!   a compare on its revision: the per-account limit holds across every
//!   sidecar, not per process.
//!
//! Last-used times are not here: each sidecar keeps its own.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::db::{Store, StoreError};
use super::record::{self, KeyRecord};
use crate::domain::key::KeyId;
use crate::pb::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::request_op::Request as Op;
use crate::pb::etcd::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use crate::pb::mvccpb::KeyValue;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/keyward/";

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// An etcd failure.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not a URL.
    #[error("etcd endpoint {0:?} is not a URL like http://127.0.0.1:2379")]
    Endpoint(String),
    /// etcd answered with an error, or could not be reached.
    #[error("etcd: {0}")]
    Rpc(#[from] tonic::Status),
    /// A stored value keyward cannot read.
    #[error("etcd key {key}: {problem}")]
    Value {
        /// The etcd key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A connection to an etcd cluster, with keyward's layout under `prefix`.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    prefix: String,
}

impl Etcd {
    /// Connects lazily to `endpoints` (requests are spread over them, and
    /// move on from one that fails).
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self, EtcdError> {
        let endpoints = endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| e.connect_timeout(CALL_TIMEOUT).timeout(CALL_TIMEOUT))
                    .map_err(|_| EtcdError::Endpoint(url.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kv: KvClient::new(Channel::balance_list(endpoints.into_iter())),
            prefix: prefix.to_owned(),
        })
    }

    /// The etcd key of a key record.
    #[must_use]
    pub fn key_path(&self, id: &KeyId) -> Vec<u8> {
        format!("{}keys/{id}", self.prefix).into_bytes()
    }

    /// The etcd key of an account's key count.
    #[must_use]
    pub fn account_path(&self, account: &str) -> Vec<u8> {
        format!("{}accounts/{account}", self.prefix).into_bytes()
    }

    /// Writes `record` unless its key id is already there, adding one to
    /// its account's count in the same transaction, and only while the
    /// count is below `limit` (when given). The transaction compares the
    /// count's revision with the one read, so concurrent writers on any
    /// number of sidecars retry instead of overshooting: the limit holds
    /// globally, with no process-local lock.
    pub async fn put_new(
        &self,
        record: &KeyRecord,
        limit: Option<u64>,
    ) -> Result<PutNew, EtcdError> {
        let id = record_id(record)?;
        let key = self.key_path(&id);
        let account = self.account_path(&record.account_id);
        loop {
            let (count, count_revision) = self.count(&account).await?;
            if limit.is_some_and(|limit| count >= limit) {
                return Ok(if self.get(&key).await?.is_some() {
                    PutNew::Present
                } else {
                    PutNew::LimitReached
                });
            }
            let txn = TxnRequest {
                compare: vec![
                    Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Create as i32,
                        key: key.clone(),
                        target_union: Some(TargetUnion::CreateRevision(0)),
                        range_end: Vec::new(),
                    },
                    // The count is what was read (absent: revision 0).
                    Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Mod as i32,
                        key: account.clone(),
                        target_union: Some(TargetUnion::ModRevision(count_revision)),
                        range_end: Vec::new(),
                    },
                ],
                success: vec![
                    put(key.clone(), record::encode(record)),
                    put(account.clone(), (count + 1).to_string().into_bytes()),
                ],
                failure: Vec::new(),
            };
            if self.kv.clone().txn(txn).await?.into_inner().succeeded {
                return Ok(PutNew::Written);
            }
            if self.get(&key).await?.is_some() {
                return Ok(PutNew::Present);
            }
            // The count moved under us (another writer): read it again.
        }
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        Ok(self.get_kv(key).await?.map(|kv| kv.value))
    }

    /// The key-value at `key` with its revisions, if any.
    async fn get_kv(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                key: key.to_vec(),
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(reply.kvs.into_iter().next())
    }

    /// Every key record under the prefix, decoded.
    pub async fn records(&self) -> Result<Vec<KeyRecord>, EtcdError> {
        let start = format!("{}keys/", self.prefix).into_bytes();
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                range_end: prefix_end(&start),
                key: start,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        reply
            .kvs
            .into_iter()
            .map(|kv| {
                record::decode(&kv.value).map_err(|e| EtcdError::Value {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    problem: e.to_string(),
                })
            })
            .collect()
    }

    /// An account's key count and the revision it was last written at (0, 0
    /// when absent).
    pub async fn count(&self, account: &[u8]) -> Result<(u64, i64), EtcdError> {
        let Some(kv) = self.get_kv(account).await? else {
            return Ok((0, 0));
        };
        let count = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| EtcdError::Value {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                problem: "not a key count".into(),
            })?;
        Ok((count, kv.mod_revision))
    }
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

/// What a migration did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Keys written to etcd.
    pub written: usize,
    /// Keys etcd already had (from an earlier run): left as they are.
    pub present: usize,
}

/// Copies every key of a standalone store into etcd: ids, hashes, names,
/// scopes, creation times and lifecycle settings unchanged. Idempotent: a
/// key already in etcd is left alone, so a run interrupted half-way is
/// finished by running it again. The store must not be in use (sled locks
/// its directory).
pub async fn migrate(store: &Store, etcd: &Etcd) -> Result<Migrated, MigrateError> {
    let mut migrated = Migrated::default();
    for raw in store.partition(0, 1) {
        // No limit: the standalone store enforced it already.
        match etcd.put_new(&raw?.record()?, None).await? {
            PutNew::Written => migrated.written += 1,
            PutNew::Present | PutNew::LimitReached => migrated.present += 1,
        }
    }
    Ok(migrated)
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

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}

fn record_id(record: &KeyRecord) -> Result<KeyId, EtcdError> {
    <[u8; 16]>::try_from(record.key_id.as_slice())
        .map(KeyId::from_bytes)
        .map_err(|_| EtcdError::Value {
            key: record.name.clone(),
            problem: "the record has no valid key id".into(),
        })
}

/// The end of the range of every key starting with `prefix` (etcd's
/// convention: the prefix with its last byte incremented).
#[must_use]
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/keyward/keys/"), b"/keyward/keys0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0], "everything");
    }
}
