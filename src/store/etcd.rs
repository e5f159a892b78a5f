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

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::record::{self, KeyRecord};
use crate::domain::key::KeyId;
use crate::pb::etcd::auth_client::AuthClient;
use crate::pb::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::request_op::Request as Op;
use crate::pb::etcd::watch_client::WatchClient;
use crate::pb::etcd::{
    AuthenticateRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use crate::pb::etcd::{WatchCreateRequest, WatchRequest, WatchResponse, watch_request};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::{Event, KeyValue};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/keyward/";

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections: a member that vanished (killed, or
/// cut off) is noticed in seconds, and the watch moves to another.
const KEEPALIVE: Duration = Duration::from_secs(2);

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
}

/// How to reach etcd: endpoints, and optionally TLS and a user.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Client URLs (`http://…` or `https://…`).
    pub endpoints: Vec<String>,
    /// The key prefix keyward's data lives under.
    pub prefix: String,
    /// PEM CA bundle that signs etcd's server certificates (required for
    /// `https://` endpoints).
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key, for etcd's client-certificate auth.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user and password, for etcd's own authentication.
    pub credentials: Option<(String, String)>,
    /// Keys per page of a full read (0: [`DEFAULT_PAGE_KEYS`]).
    pub page_keys: u32,
}

/// The token etcd issued for the configured user, sent with every call.
#[derive(Debug, Clone, Default)]
pub struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Token>;

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
            Self::Endpoint(_) | Self::Value { .. } | Self::TooLarge(_) | Self::Compacted(_) => {
                false
            }
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
    /// Connects lazily to plain-text `endpoints` (requests are spread over
    /// them, and move on from one that fails).
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self, EtcdError> {
        Self::open(&Connection {
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_owned(),
            ..Connection::default()
        })
    }

    /// Connects lazily as `connection` says. Must run inside a tokio
    /// runtime (the connection's balancer is a task on it).
    pub fn open(connection: &Connection) -> Result<Self, EtcdError> {
        let tls = match (&connection.ca, &connection.identity) {
            (None, None) => None,
            (ca, identity) => {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = ca {
                    tls = tls.ca_certificate(Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some(tls)
            }
        };
        let endpoints = connection
            .endpoints
            .iter()
            .map(|url| {
                let https = url.starts_with("https://");
                if https != tls.is_some() {
                    return Err(EtcdError::Endpoint(format!(
                        "{url}: https:// endpoints need --etcd-ca-file, and the TLS flags need https:// endpoints"
                    )));
                }
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|_| EtcdError::Endpoint(url.clone()))?
                    .connect_timeout(CALL_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE)
                    .keep_alive_timeout(KEEPALIVE)
                    .keep_alive_while_idle(true);
                match &tls {
                    Some(tls) => endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| EtcdError::Endpoint(format!("{url}: {e}"))),
                    None => Ok(endpoint),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoint("no endpoints given".into()));
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let token = Token::default();
        Ok(Self {
            kv: KvClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(REPLY_LIMIT_BYTES),
            watch: WatchClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(REPLY_LIMIT_BYTES),
            auth: AuthClient::new(channel),
            token,
            credentials: connection.credentials.clone(),
            prefix: connection.prefix.clone(),
        })
    }

    /// With a user configured: asks etcd for a fresh token (at start, and
    /// again whenever etcd says the token is no longer valid).
    pub async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = &self.credentials else {
            return Ok(());
        };
        let reply = self
            .auth
            .clone()
            .authenticate(AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            })
            .await?
            .into_inner();
        let token = MetadataValue::try_from(reply.token).map_err(|_| EtcdError::Value {
            key: "auth".into(),
            problem: "etcd issued a token that is not a header value".into(),
        })?;
        *self.token.0.write().unwrap_or_else(PoisonError::into_inner) = Some(token);
        Ok(())
    }

    /// Whether `error` means the etcd token must be renewed (then renews
    /// it, so the caller's retry can succeed).
    pub async fn renew_if_expired(&self, error: &EtcdError) -> bool {
        let EtcdError::Rpc(status) = error else {
            return false;
        };
        let expired = self.credentials.is_some()
            && (status.code() == tonic::Code::Unauthenticated
                || status.message().contains("invalid auth token"));
        expired && self.authenticate().await.is_ok()
    }

    /// The etcd key of a key record.
    #[must_use]
    pub fn key_path(&self, id: &KeyId) -> Vec<u8> {
        format!("{}keys/{id}", self.prefix).into_bytes()
    }

    /// Up to `limit` of `account`'s keys in creation order, strictly after
    /// `after` (creation time, id), from the ids its entry holds; when
    /// there are more, the position of the last one returned. `None` for
    /// an account whose entry holds a count only ([`Account::listed`]).
    pub async fn account_page(
        &self,
        account: &str,
        after: Option<(i64, KeyId)>,
        limit: usize,
    ) -> Result<Option<AccountPage>, EtcdError> {
        let held = self.account(&self.account_path(account)).await?;
        if !held.listed {
            return Ok(None);
        }
        let mut records = Vec::with_capacity(held.ids.len());
        // One transaction of reads per chunk, within etcd's op limit.
        for chunk in held.ids.chunks(64) {
            for kv in self
                .get_many(chunk.iter().map(|id| self.key_path(id)))
                .await?
                .into_iter()
                .flatten()
            {
                records.push(record::decode(&kv.value).map_err(|error| EtcdError::Value {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    problem: error.to_string(),
                })?);
            }
        }
        records.sort_by_key(|record| (record.created_at, record.id));
        records.retain(|record| after.is_none_or(|after| (record.created_at, record.id) > after));
        let more = records.len() > limit;
        records.truncate(limit);
        let last = records
            .last()
            .filter(|_| more)
            .map(|record| (record.created_at, record.id));
        Ok(Some((records, last)))
    }

    /// The etcd key of an account's key count.
    #[must_use]
    pub fn account_path(&self, account: &str) -> Vec<u8> {
        format!("{}accounts/{account}", self.prefix).into_bytes()
    }

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

    /// Reads every key record under the prefix, `page_keys` at a time, as
    /// of one revision ([`Listing`]).
    #[must_use]
    pub fn list(&self, page_keys: u32) -> Listing {
        let start = self.keys_prefix();
        Listing {
            kv: self.kv.clone(),
            end: prefix_end(&start),
            next: start.clone(),
            start,
            bounds: Vec::new(),
            window: 0,
            total: 0,
            done: false,
            pages: 0,
            window_keys: WINDOW_KEYS,
            revision: 0,
            page_keys: if page_keys == 0 {
                DEFAULT_PAGE_KEYS
            } else {
                page_keys
            } as usize,
        }
    }

    /// Every key record and the revision they are the state at, read in
    /// pages ([`Self::list`]) and held together: for tools and tests (a
    /// sidecar applies a listing page by page instead).
    pub async fn snapshot(&self) -> Result<(Vec<KeyRecord>, i64), EtcdError> {
        let mut listing = self.list(0);
        let mut records = Vec::new();
        let mut revision = 0;
        while let Some(page) = listing.next_page().await? {
            records.extend(page.records);
            revision = page.revision;
        }
        Ok((records, revision))
    }

    /// Follows changes to key records from `start_revision` on, in
    /// revision order. A revision etcd has compacted away is reported as
    /// [`Watched::Compacted`]: the caller must take a new snapshot.
    pub async fn watch(&self, start_revision: i64) -> Result<Watch, EtcdError> {
        let start = self.keys_prefix();
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    range_end: prefix_end(&start),
                    key: start,
                    start_revision,
                    // Responses over etcd's request limit come in pieces
                    // (see REPLY_LIMIT_BYTES); `next` joins them.
                    fragment: true,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        // The receiver is alive (held by the stream below), so this cannot fail.
        let _ = requests.send(create).await;
        let responses = self
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Watch {
            responses,
            requests,
        })
    }

    fn keys_prefix(&self) -> Vec<u8> {
        format!("{}keys/", self.prefix).into_bytes()
    }

    /// How many key records etcd holds (one `count_only` range: etcd
    /// counts the range, no value is sent).
    pub async fn count_keys(&self) -> Result<u64, EtcdError> {
        let start = self.keys_prefix();
        let reply = self
            .kv
            .clone()
            .range(RangeRequest {
                range_end: prefix_end(&start),
                key: start,
                count_only: true,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(u64::try_from(reply.count).unwrap_or_default())
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

    /// An account's key count and the revision it was last written at (0, 0
    /// when absent).
    pub async fn count(&self, account: &[u8]) -> Result<(u64, i64), EtcdError> {
        let held = self.account(account).await?;
        Ok((held.count, held.revision))
    }

    /// An account's count and key ids, and the revision they were written
    /// at (empty, 0 when absent).
    pub async fn account(&self, account: &[u8]) -> Result<Account, EtcdError> {
        self.get_kv(account)
            .await?
            .map_or_else(|| Ok(Account::default()), |kv| Account::parse(&kv))
    }
}

/// A page of an account's keys, and the position of its last key when
/// there are more.
pub type AccountPage = (Vec<KeyRecord>, Option<(i64, KeyId)>);

/// An account's entry: its key count, its key ids, and the revision it
/// was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Live keys.
    pub count: u64,
    /// Their ids (when `listed`).
    pub ids: Vec<KeyId>,
    /// Whether the ids are kept (a count alone was written by a keyward
    /// from before they were).
    pub listed: bool,
    /// The revision the entry was last written at (0: absent).
    pub revision: i64,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            count: 0,
            ids: Vec::new(),
            listed: true,
            revision: 0,
        }
    }
}

impl Account {
    fn parse(kv: &KeyValue) -> Result<Self, EtcdError> {
        let invalid = || EtcdError::Value {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            problem: "not a key count and key ids".into(),
        };
        let text = std::str::from_utf8(&kv.value).map_err(|_| invalid())?;
        let mut words = text.split(' ');
        let count: u64 = words
            .next()
            .and_then(|count| count.parse().ok())
            .ok_or_else(invalid)?;
        let ids = words
            .map(|id| id.parse().map_err(|_| invalid()))
            .collect::<Result<Vec<KeyId>, _>>()?;
        Ok(Self {
            count,
            listed: !ids.is_empty() || count == 0,
            ids,
            revision: kv.mod_revision,
        })
    }

    /// The value to write: the count, then the ids (the count alone for an
    /// account written before ids were kept: a partial list would pass for
    /// a whole one).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut text = self.count.to_string();
        if self.listed {
            for id in &self.ids {
                text.push(' ');
                text.push_str(&id.to_string());
            }
        }
        text.into_bytes()
    }

    /// The entry with `added` keys more.
    #[must_use]
    pub fn with(&self, added: &[KeyId]) -> Self {
        let mut ids = self.ids.clone();
        ids.extend_from_slice(added);
        Self {
            count: self.count + added.len() as u64,
            ids,
            ..self.clone()
        }
    }

    /// The entry without `id`.
    #[must_use]
    pub fn without(&self, id: &KeyId) -> Self {
        Self {
            count: self.count.saturating_sub(1),
            ids: self
                .ids
                .iter()
                .filter(|kept| *kept != id)
                .copied()
                .collect(),
            ..self.clone()
        }
    }
}

/// Changes to key records, from [`Etcd::watch`].
#[derive(Debug)]
pub struct Watch {
    responses: tonic::Streaming<WatchResponse>,
    /// The request stream: keeps the watch open, carries progress requests.
    requests: tokio::sync::mpsc::Sender<WatchRequest>,
}

/// What a watch delivered.
#[derive(Debug, Clone, PartialEq)]
pub enum Watched {
    /// A key record was written (created or replaced) at `revision`.
    Put {
        /// The record (boxed: records are large, the other variants not).
        record: Box<KeyRecord>,
        /// The etcd revision of the write.
        revision: i64,
    },
    /// A key record was removed at `revision`.
    Deleted {
        /// The key.
        id: KeyId,
        /// The etcd revision of the removal.
        revision: i64,
    },
    /// Every change through `revision` has been delivered (the answer to
    /// [`Watch::request_progress`]).
    Progress {
        /// etcd's revision when it answered.
        revision: i64,
    },
    /// The start revision was compacted: take a new snapshot.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

impl Watched {
    /// The revision of a put or delete.
    #[must_use]
    pub fn revision(&self) -> Option<i64> {
        match self {
            Self::Put { revision, .. } | Self::Deleted { revision, .. } => Some(*revision),
            Self::Progress { .. } | Self::Compacted { .. } => None,
        }
    }
}

impl Watch {
    /// Asks etcd to confirm how far the watch has delivered; the answer
    /// comes as [`Watched::Progress`]. Proves the watch is alive and the
    /// replica current, even when nothing changes.
    pub async fn request_progress(&self) -> Result<(), EtcdError> {
        let request = WatchRequest {
            request_union: Some(watch_request::RequestUnion::ProgressRequest(
                crate::pb::etcd::WatchProgressRequest {},
            )),
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| EtcdError::Value {
                key: "watch".into(),
                problem: "the watch stream is closed".into(),
            })
    }

    /// The next batch of changes (one etcd revision may carry several);
    /// `None` once etcd ended the watch. A response etcd sent in fragments
    /// is joined first: one revision's events are applied together.
    pub async fn next(&mut self) -> Result<Option<Vec<Watched>>, EtcdError> {
        let mut events = Vec::new();
        loop {
            let Some(response) = self.responses.message().await? else {
                return Ok(None);
            };
            if response.compact_revision != 0 {
                return Ok(Some(vec![Watched::Compacted {
                    compact_revision: response.compact_revision,
                }]));
            }
            if response.canceled {
                return Err(EtcdError::Value {
                    key: "watch".into(),
                    problem: format!("canceled by etcd: {}", response.cancel_reason),
                });
            }
            events.extend(response.events);
            if response.fragment {
                continue;
            }
            if events.is_empty() {
                if response.created {
                    continue;
                }
                return Ok(Some(vec![Watched::Progress {
                    revision: response.header.map_or(0, |h| h.revision),
                }]));
            }
            return events
                .into_iter()
                .map(watched)
                .collect::<Result<Vec<_>, _>>()
                .map(Some);
        }
    }
}

/// A full read of the key records in pages, every page at the first
/// read's revision, so the pages together are exactly the key set at that
/// revision (Kubernetes' paginated LIST). Reading on after etcd compacted
/// that revision fails with [`EtcdError::Compacted`]: the caller starts a
/// new listing, and must not take what it read as complete.
///
/// etcd counts every key from a range's start to its end to answer even a
/// limited range, so paging through one range is quadratic (measured here:
/// 19 ms for each of the first pages of 100,000 keys, and etcd-io/etcd#11057
/// saw minutes at 2M). The listing first counts the keys once, then pages
/// through contiguous windows that cover the prefix exactly, split on the
/// leading characters of the key ids (random, so windows are even): each
/// window holds at most about [`WINDOW_KEYS`] keys, and every key is in
/// exactly one window whatever its name.
#[derive(Debug)]
pub struct Listing {
    kv: KvClient<Authed>,
    /// Where the keys prefix starts and ends.
    start: Vec<u8>,
    end: Vec<u8>,
    /// Window boundaries after `start`, sorted; empty until counted.
    bounds: Vec<Vec<u8>>,
    /// The window being read (an index into the windows), and where in it.
    window: usize,
    next: Vec<u8>,
    /// The revision every page is read at (0 until the count answers).
    revision: i64,
    /// Keys at that revision.
    total: u64,
    page_keys: usize,
    window_keys: u64,
    done: bool,
    pages: usize,
}

/// The most keys a window of a [`Listing`] is meant to hold, on average.
const WINDOW_KEYS: u64 = 20_000;

/// The characters a key id is written with, in byte order.
const ID_ALPHABET: &[u8; 64] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/// One page of a [`Listing`].
#[derive(Debug)]
pub struct Page {
    /// Its records, in etcd key order.
    pub records: Vec<KeyRecord>,
    /// The revision the listing is at.
    pub revision: i64,
    /// How many keys the whole listing holds.
    pub total: u64,
    /// Whether it is the first page (a new listing).
    pub first: bool,
    /// Whether it is the last: the listing is complete.
    pub last: bool,
}

impl Listing {
    /// The next page, `None` after the last. A page too large for
    /// [`REPLY_LIMIT_BYTES`] is asked for again at half the size (down to
    /// one key). Every page holds at least one record, except a last one.
    pub async fn next_page(&mut self) -> Result<Option<Page>, EtcdError> {
        if self.done {
            return Ok(None);
        }
        if self.revision == 0 {
            self.count().await?;
        }
        loop {
            let window_end = self.bounds.get(self.window).unwrap_or(&self.end).clone();
            let reply = self.range(&window_end).await?;
            let more = reply.more;
            let records = reply
                .kvs
                .iter()
                .map(|kv| decode_value(&kv.key, &kv.value))
                .collect::<Result<Vec<_>, _>>()?;
            match reply.kvs.last() {
                Some(last) if more => {
                    // Strictly after the last key read, same window.
                    self.next.clone_from(&last.key);
                    self.next.push(0);
                }
                _ => {
                    self.next.clone_from(&window_end);
                    self.window += 1;
                }
            }
            self.done = self.window > self.bounds.len();
            if records.is_empty() && !self.done {
                continue;
            }
            self.pages += 1;
            return Ok(Some(Page {
                records,
                revision: self.revision,
                total: self.total,
                first: self.pages == 1,
                last: self.done,
            }));
        }
    }

    /// Counts the keys (a linearizable read, whose revision every page is
    /// then read at) and splits the prefix into windows for that many.
    async fn count(&mut self) -> Result<(), EtcdError> {
        let reply = self
            .kv
            .range(RangeRequest {
                key: self.start.clone(),
                range_end: self.end.clone(),
                count_only: true,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        self.revision = reply.header.map_or(0, |h| h.revision);
        self.total = u64::try_from(reply.count).unwrap_or_default();
        let mut depth = 0;
        while self.total / 64_u64.pow(depth) > self.window_keys && depth < 3 {
            depth += 1;
        }
        let mut bounds = vec![self.start.clone()];
        for _ in 0..depth {
            bounds = bounds
                .iter()
                .flat_map(|prefix| {
                    ID_ALPHABET.iter().map(move |c| {
                        let mut bound = prefix.clone();
                        bound.push(*c);
                        bound
                    })
                })
                .collect();
        }
        // Windows: [start, b0), [b0, b1), …, [b_last, end).
        self.bounds = if depth == 0 { Vec::new() } else { bounds };
        self.next.clone_from(&self.start);
        self.window = 0;
        Ok(())
    }

    /// One limited range from `next` to `window_end` at the revision.
    async fn range(
        &mut self,
        window_end: &[u8],
    ) -> Result<crate::pb::etcd::RangeResponse, EtcdError> {
        loop {
            let request = RangeRequest {
                key: self.next.clone(),
                range_end: window_end.to_vec(),
                limit: i64::try_from(self.page_keys).unwrap_or(i64::MAX),
                revision: self.revision,
                ..RangeRequest::default()
            };
            match self.kv.range(request).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) => match EtcdError::from(status) {
                    EtcdError::TooLarge(status) if self.page_keys > 1 => {
                        self.page_keys /= 2;
                        tracing::warn!(
                            page_keys = self.page_keys,
                            error = status.message(),
                            "an etcd page exceeded the reply limit; reading smaller pages"
                        );
                    }
                    error => return Err(error),
                },
            }
        }
    }

    /// Windows of at most about `keys` keys instead of [`WINDOW_KEYS`]
    /// (small ones let a test of a few thousand keys use many windows).
    #[must_use]
    pub fn with_window_keys(mut self, keys: u64) -> Self {
        self.window_keys = keys.max(1);
        self
    }

    /// The keys per page now asked for.
    #[must_use]
    pub fn page_keys(&self) -> usize {
        self.page_keys
    }
}

fn watched(event: Event) -> Result<Watched, EtcdError> {
    let kv = event.kv.unwrap_or_default();
    if event.r#type == EventType::Delete as i32 {
        let id = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|key| key.rsplit('/').next())
            .and_then(|text| text.parse::<KeyId>().ok())
            .ok_or_else(|| EtcdError::Value {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                problem: "not a key id".into(),
            })?;
        return Ok(Watched::Deleted {
            id,
            revision: kv.mod_revision,
        });
    }
    Ok(Watched::Put {
        record: Box::new(decode_value(&kv.key, &kv.value)?),
        revision: kv.mod_revision,
    })
}

fn decode_value(key: &[u8], value: &[u8]) -> Result<KeyRecord, EtcdError> {
    record::decode(value).map_err(|e| EtcdError::Value {
        key: String::from_utf8_lossy(key).into_owned(),
        problem: e.to_string(),
    })
}

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

    /// Several accounts ([`Self::account`]), read in one transaction.
    async fn accounts(
        &self,
        paths: impl Iterator<Item = Vec<u8>>,
    ) -> Result<Vec<Account>, EtcdError> {
        self.get_many(paths)
            .await?
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .map_or_else(|| Ok(Account::default()), Account::parse)
            })
            .collect()
    }

    /// The key-values at `keys` (each `None` when absent), read in one
    /// transaction: one revision, one round trip.
    async fn get_many(
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
                _ => Err(EtcdError::Value {
                    key: "keys".into(),
                    problem: "etcd answered a read with something else".into(),
                }),
            })
            .collect()
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

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })),
    }
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

    fn entry(value: &str) -> KeyValue {
        KeyValue {
            key: b"/keyward/accounts/acme".to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 7,
            ..KeyValue::default()
        }
    }

    #[test]
    fn an_account_entry_keeps_its_count_and_its_key_ids() {
        let (a, b) = (KeyId::from_bytes([1; 16]), KeyId::from_bytes([2; 16]));
        let held = Account::default().with(&[a, b]);
        assert_eq!((held.count, held.ids.clone()), (2, vec![a, b]));
        let read = Account::parse(&entry(std::str::from_utf8(&held.encode()).expect("text")))
            .expect("parses");
        assert_eq!(read.ids, vec![a, b]);
        assert!(read.listed);
        assert_eq!(read.revision, 7);
        let fewer = read.without(&a);
        assert_eq!((fewer.count, fewer.ids), (1, vec![b]));
    }

    #[test]
    fn a_count_alone_stays_a_count() {
        let legacy = Account::parse(&entry("3")).expect("parses");
        assert!(!legacy.listed, "written before ids were kept");
        let more = legacy.with(&[KeyId::from_bytes([9; 16])]);
        assert_eq!(more.encode(), b"4".to_vec(), "never a partial list");
        assert!(Account::parse(&entry("0")).expect("parses").listed);
        assert!(Account::parse(&entry("two")).is_err());
        assert!(Account::parse(&entry("1 not-an-id")).is_err());
    }
}
