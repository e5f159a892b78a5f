//! etcd as the shared source of truth for replicated mode: the key layout,
//! a client of the few etcd v3 RPCs keyward needs (compiled from
//! `proto/etcd` with protox, so building needs no protoc), the paginated
//! full read ([`Listing`]) and the watch. Copying a standalone store in is
//! [`super::copy`].
//!
//! Layout under the prefix (default `/keyward/`):
//! - `keys/<key id>`: the key's record, in the same versioned encoding as
//!   sled ([`super::record`]), so both stores hold byte-identical records;
//! - `accounts/<account id>`: the account's live key count (decimal),
//!   then its key ids, space-separated ([`Account`]). Every create and
//!   delete rewrites it in the same transaction as the key, with a compare
//!   on its revision: the per-account limit holds across every sidecar, not
//!   per process, and one account's keys are listed without reading every
//!   key (an on-demand replica's ListKeys). A value of the count alone was
//!   written by a keyward from before the ids were kept.
//!
//! Last-used times are not here: each sidecar keeps its own.
//!
//! The client is split by job:
//! - [`connection`]: reaching etcd (endpoints, TLS, the user's token);
//! - [`account`]: the per-account entries ([`Account`]) and account pages;
//! - [`listing`]: the paged full read ([`Listing`]);
//! - [`watch`]: following changes ([`Watch`], [`Watched`]);
//! - [`txn`]: writes in transactions ([`Mutation`], [`Etcd::put_batch`]).
//!
//! This file holds the layout's paths, the plain reads and [`EtcdError`].

mod account;
mod connection;
mod listing;
mod txn;
mod watch;

pub use account::{Account, AccountPage};
pub use connection::{Connection, Token};
pub use listing::{Listing, Page};
pub use txn::{Migrated, Mutation, PutNew};
pub use watch::{Watch, Watched};

use std::time::Duration;

use tonic::transport::Channel;

use super::record::{self, KeyRecord};
use crate::domain::key::KeyId;
use crate::pb::etcd::auth_client::AuthClient;
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::request_op::Request as Op;
use crate::pb::etcd::watch_client::WatchClient;
use crate::pb::etcd::{RangeRequest, RequestOp, TxnRequest};
use crate::pb::mvccpb::KeyValue;
use connection::Authed;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/keyward/";

/// Keys per page of a full read (kube-rs's watcher uses 500 too): a page
/// of ordinary records (≈ 170 bytes) is ≈ 85 KB, and of the largest a
/// record can be (256 scope names, 16 CIDRs: under 16 KiB) under 8 MiB.
pub const DEFAULT_PAGE_KEYS: u32 = 500;

/// The largest etcd reply keyward decodes, for Range pages and watch
/// responses alike. A page of [`DEFAULT_PAGE_KEYS`] of the largest records
/// fits twice over; a watch response is split by etcd into fragments of
/// its own request limit (`--max-request-bytes`, 1.5 MiB by default:
/// watches ask for fragments), so one fragment is far below this. tonic's
/// default, 4 MiB, was what stopped a 25,000-key first read. A reply still
/// above it is [`EtcdError::TooLarge`], and a full read then halves its
/// page.
pub const REPLY_LIMIT_BYTES: usize = 16 * 1024 * 1024;

/// An etcd failure.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not a URL.
    #[error("etcd endpoint {0:?} is not a URL like http://127.0.0.1:2379")]
    Endpoint(String),
    /// etcd answered with more bytes than keyward decodes in one reply.
    #[error("an etcd reply exceeded keyward's limit of {limit} bytes: {status}", limit = REPLY_LIMIT_BYTES, status = .0.message())]
    TooLarge(tonic::Status),
    /// The revision asked for is older than etcd's compaction.
    #[error("etcd compacted the revision being read: {}", .0.message())]
    Compacted(tonic::Status),
    /// etcd answered with an error, or could not be reached.
    #[error("etcd: {0}")]
    Rpc(tonic::Status),
    /// A stored value keyward cannot read.
    #[error("etcd key {key}: {problem}")]
    Value {
        /// The etcd key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// etcd answered in a form keyward cannot use (not a stored value).
    #[error("unexpected answer from etcd: {0}")]
    Unexpected(&'static str),
    /// The watch's stream ended: etcd (or the connection to it) closed it.
    #[error("etcd closed the watch")]
    WatchClosed,
    /// etcd canceled the watch, for the reason it gave.
    #[error("etcd canceled the watch: {0}")]
    WatchCanceled(String),
    /// A progress request on the watch went unanswered for this long.
    #[error("etcd did not confirm the watch's progress within {0:?}")]
    NoProgress(Duration),
}

impl From<tonic::Status> for EtcdError {
    /// Tells the failures a caller handles differently apart: a reply too
    /// large to decode (tonic's limit) and a compacted revision (etcd's
    /// `ErrCompacted`) both arrive as OUT_OF_RANGE, and neither means that
    /// etcd cannot be reached.
    fn from(status: tonic::Status) -> Self {
        if status.code() == tonic::Code::OutOfRange {
            if status.message().contains("message length too large") {
                return Self::TooLarge(status);
            }
            if status.message().contains("compacted") {
                return Self::Compacted(status);
            }
        }
        Self::Rpc(status)
    }
}

impl EtcdError {
    /// Whether trying again may succeed: a member lost, a leader being
    /// elected, a connection dropped. Refusals and unreadable values are
    /// not.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Rpc(status) => matches!(
                status.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::Internal
                    | Code::Cancelled
            ),
            // A lost or stalled watch is started again all the same; these
            // stay apart from an unreachable etcd as they always were.
            Self::Endpoint(_)
            | Self::Value { .. }
            | Self::Unexpected(_)
            | Self::WatchClosed
            | Self::WatchCanceled(_)
            | Self::NoProgress(_)
            | Self::TooLarge(_)
            | Self::Compacted(_) => false,
        }
    }
}

/// A connection to an etcd cluster, with keyward's layout under `prefix`.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: KvClient<Authed>,
    watch: WatchClient<Authed>,
    auth: AuthClient<Channel>,
    token: Token,
    credentials: Option<(String, String)>,
    prefix: String,
}

impl Etcd {
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

    /// The cluster's current revision, by a linearizable read: answers only
    /// while a quorum does, so it proves this sidecar can hear the truth.
    ///
    /// It reads one key (the prefix itself), not the key records: etcd
    /// counts every key in a range even for `count_only`, and every
    /// sidecar asks once a second, so a read over the records would cost
    /// etcd O(keys) per sidecar per second.
    pub async fn current_revision(&self) -> Result<i64, EtcdError> {
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                key: self.prefix.clone().into_bytes(),
                count_only: true,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(reply.header.map_or(0, |h| h.revision))
    }

    /// The key-value at `key`, if any, and etcd's revision when it answered.
    pub async fn get_at(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                key: key.to_vec(),
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        let revision = reply.header.map_or(0, |h| h.revision);
        Ok((reply.kvs.into_iter().next(), revision))
    }

    /// The key-value at `key` with its revisions, if any.
    pub async fn get_kv(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        Ok(self.get_at(key).await?.0)
    }

    pub(super) fn keys_prefix(&self) -> Vec<u8> {
        format!("{}keys/", self.prefix).into_bytes()
    }

    /// How many key records etcd holds (one `count_only` range: etcd
    /// counts the range, no value is sent).
    pub async fn count_keys(&self) -> Result<u64, EtcdError> {
        let start = self.keys_prefix();
        let end = prefix_end(&start);
        count_range(&mut self.kv.clone(), start, end)
            .await
            .map(|(count, _)| count)
    }

    /// Up to `limit` key ids after `after` (from the start when `None`),
    /// read keys-only (no record is sent) at `revision` (0: now); the
    /// revision read at, and whether there are more.
    pub async fn key_ids_page(
        &self,
        after: Option<&KeyId>,
        limit: u32,
        revision: i64,
    ) -> Result<(Vec<KeyId>, i64, bool), EtcdError> {
        let start = self.keys_prefix();
        let key = match after {
            Some(id) => {
                let mut key = self.key_path(id);
                key.push(0);
                key
            }
            None => start.clone(),
        };
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                key,
                range_end: prefix_end(&start),
                limit: i64::from(limit),
                revision,
                keys_only: true,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        let ids = reply
            .kvs
            .iter()
            .filter_map(|kv| {
                let id = kv.key.get(start.len()..)?;
                std::str::from_utf8(id).ok()?.parse().ok()
            })
            .collect();
        Ok((
            ids,
            reply.header.map_or(revision, |h| h.revision),
            reply.more,
        ))
    }

    /// The key-values at `keys` (each `None` when absent), read in one
    /// transaction: one revision, one round trip.
    pub(super) async fn get_many(
        &self,
        keys: impl Iterator<Item = Vec<u8>>,
    ) -> Result<Vec<Option<KeyValue>>, EtcdError> {
        let reads = keys
            .map(|key| RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key,
                    ..RangeRequest::default()
                })),
            })
            .collect();
        let reply = self
            .kv
            .clone()
            .txn(TxnRequest {
                compare: Vec::new(),
                success: reads,
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        reply
            .responses
            .into_iter()
            .map(|response| match response.response {
                Some(crate::pb::etcd::response_op::Response::ResponseRange(range)) => {
                    Ok(range.kvs.into_iter().next())
                }
                _ => Err(EtcdError::Unexpected(
                    "a read in a transaction answered with something else",
                )),
            })
            .collect()
    }
}

/// Decodes a key record read from etcd `key`.
fn decode_value(key: &[u8], value: &[u8]) -> Result<KeyRecord, EtcdError> {
    record::decode(value).map_err(|e| EtcdError::Value {
        key: String::from_utf8_lossy(key).into_owned(),
        problem: e.to_string(),
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

/// How many keys etcd holds in `[start, end)`, and the revision it counted
/// at (one linearizable `count_only` range: no value is sent).
async fn count_range(
    kv: &mut KvClient<Authed>,
    start: Vec<u8>,
    end: Vec<u8>,
) -> Result<(u64, i64), EtcdError> {
    let reply = kv
        .range(RangeRequest {
            key: start,
            range_end: end,
            count_only: true,
            ..RangeRequest::default()
        })
        .await?
        .into_inner();
    Ok((
        u64::try_from(reply.count).unwrap_or_default(),
        reply.header.map_or(0, |h| h.revision),
    ))
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

    #[test]
    fn a_lost_watch_says_so_and_is_not_a_bad_value() {
        let closed = EtcdError::WatchClosed;
        let stalled = EtcdError::NoProgress(Duration::from_secs(5));
        assert_eq!(closed.to_string(), "etcd closed the watch");
        assert_eq!(
            stalled.to_string(),
            "etcd did not confirm the watch's progress within 5s"
        );
        assert!(!closed.is_transient() && !stalled.is_transient());
    }
}
