//! sled, the durable truth: every write is flushed before it is acknowledged.
//!
//! Trees:
//! - `keys`: 16-byte key id → versioned record ([`super::record`]).
//! - `by_account`: account id, `0x00`, created-at (u64 big-endian nanos),
//!   key id → empty; gives each account's keys in creation order for paging.
//! - `last_used`: 16-byte key id → when it last authorized a request (i64
//!   big-endian Unix nanos). Kept apart from the record: it is this
//!   sidecar's observation, written in batches, not part of the key.
//!
//! A create writes both trees in one transaction, so neither is ever visible
//! without the other, even after a crash.
//!
//! Every call here blocks on the disk. The server calls them only from the
//! key writer's thread or the blocking pool (`keys::writer`), never from an
//! async worker: a stuck disk must cost writes, never decisions.
//!
//! sled 0.34 poisons a database on its first I/O error (ENOSPC, EIO, EROFS):
//! every later write fails with that error, even once the disk recovers,
//! while reads keep working. Only dropping every handle and opening the
//! directory again clears it; the writer does exactly that.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sled::Transactional;
use sled::transaction::TransactionError;

use super::record::{self, Indexed, KeyRecord, RecordError};
use crate::domain::key::KeyId;

/// sled's page cache: management reads and writes only.
const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// The file sled keeps its log in, inside its directory.
const SLED_LOG_FILE: &str = "db";

/// The key [`Store::probe`] writes in sled's default tree.
const PROBE_KEY: &[u8] = b"keyward.probe";

/// A storage failure. Messages never contain secrets (records hold none).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, ...).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A record keyward cannot read.
    #[error("unreadable record for key {key}: {source}")]
    Record {
        /// The affected key id (or raw bytes when not even that is valid).
        key: String,
        /// What is wrong.
        source: RecordError,
    },
    /// The data directory is for the other mode (standalone or replica),
    /// or a replica cannot be rebuilt.
    #[error("the data directory cannot be used this way: {0}")]
    Mode(&'static str),
    /// etcd could not be set up (replicated mode).
    #[error(transparent)]
    Etcd(#[from] super::etcd::EtcdError),
    /// The OS random source failed while making the page-token key.
    #[error("page_token key: the OS random source failed: {0}")]
    Random(getrandom::Error),
    /// A thread the store needs could not be started (the key writer,
    /// the etcd runtime's worker).
    #[error("could not start {what}: {source}")]
    Thread {
        /// What was being started.
        what: &'static str,
        /// Why the OS refused.
        source: std::io::Error,
    },
    /// Closing found the store already failing: there was nothing left to
    /// flush.
    #[error("the store was already failing when it was closed")]
    FailingAtClose,
}

impl From<TransactionError<()>> for StoreError {
    fn from(e: TransactionError<()>) -> Self {
        match e {
            TransactionError::Storage(e) => Self::Sled(e),
            TransactionError::Abort(()) => {
                Self::Sled(sled::Error::Unsupported("transaction aborted".into()))
            }
        }
    }
}

/// What [`Store::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// A new key.
    Created,
    /// A stored key changed.
    Replaced,
    /// The stored record was already exactly this one: nothing written.
    Unchanged,
}

/// What a replica of etcd holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Every change through this etcd revision.
    pub revision: i64,
    /// When it was last known current (Unix nanos; 0: never).
    pub synced_at: i64,
    /// Keys held as of a later revision (changes this sidecar wrote ahead
    /// of its watch).
    pub ahead: Vec<(KeyId, i64)>,
}

/// One stored record, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawRecord {
    key: sled::IVec,
    value: sled::IVec,
}

impl RawRecord {
    /// Decodes the fields the index needs.
    pub fn indexed(&self) -> Result<Indexed, StoreError> {
        record::decode_indexed(&self.value).map_err(|source| StoreError::Record {
            key: key_label(&self.key),
            source,
        })
    }

    /// Decodes the whole record.
    pub fn record(&self) -> Result<KeyRecord, StoreError> {
        decode(&self.key, &self.value)
    }

    /// The key id it is stored under (`None`: not a key id).
    #[must_use]
    pub fn id(&self) -> Option<KeyId> {
        <[u8; 16]>::try_from(self.key.as_ref())
            .ok()
            .map(KeyId::from_bytes)
    }

    /// The record's bytes as stored (see [`super::record`]).
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.value
    }
}

/// A position in an account's key listing, opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    created_nanos: u64,
    id: KeyId,
}

impl Cursor {
    const LEN: usize = 24;

    /// The position just after the key created at `created_at` with `id`,
    /// in its account's creation order.
    #[must_use]
    pub fn after((created_at, id): (i64, KeyId)) -> Self {
        Self {
            created_nanos: u64::try_from(created_at).unwrap_or(0),
            id,
        }
    }

    /// The creation time and id this position is after.
    #[must_use]
    pub fn position(&self) -> (i64, KeyId) {
        (
            i64::try_from(self.created_nanos).unwrap_or(i64::MAX),
            self.id,
        )
    }
    /// Bytes of the tag that binds a token to its account and to the key
    /// of the process that issued it (128 bits: forging one means guessing).
    const TAG: usize = 16;
    /// Characters of a token: base64 (no padding) of the position and tag.
    const TOKEN_CHARS: usize = ((Self::LEN + Self::TAG) * 4).div_ceil(3);

    /// Encodes as a page token for `account`'s listing: the position and an
    /// HMAC-SHA256 tag over it and the account under `key`, so a token that
    /// no listing of this process issued (a typo, a made-up or edited
    /// string, another account's token) is refused.
    #[must_use]
    pub fn token(&self, account: &str, key: &PageKey) -> String {
        use hmac::Mac;
        let mut raw = [0u8; Self::LEN + Self::TAG];
        raw[..8].copy_from_slice(&self.created_nanos.to_be_bytes());
        raw[8..Self::LEN].copy_from_slice(self.id.as_bytes());
        let tag = key.mac(account, &raw[..Self::LEN]).finalize().into_bytes();
        raw[Self::LEN..].copy_from_slice(&tag[..Self::TAG]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Decodes a page token of `account`'s listing; `None` unless a listing
    /// of it issued the token under `key` (the tag is compared in constant
    /// time).
    #[must_use]
    pub fn parse(token: &str, account: &str, key: &PageKey) -> Option<Self> {
        use hmac::Mac;
        if token.len() != Self::TOKEN_CHARS {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        let (position, tag) = raw.split_at_checked(Self::LEN)?;
        key.mac(account, position).verify_truncated_left(tag).ok()?;
        let created_nanos = u64::from_be_bytes(position.get(..8)?.try_into().ok()?);
        let id = KeyId::from_bytes(position.get(8..)?.try_into().ok()?);
        Some(Self { created_nanos, id })
    }
}

/// The secret that keys page tokens' tags: random per process, never
/// stored, so only tokens this process issued are accepted, and none
/// survives a restart (a client then lists again from the start). One
/// SHA-256 block long, HMAC's own key size.
#[derive(Clone)]
pub struct PageKey([u8; 64]);

impl PageKey {
    /// A fresh key from the OS random source.
    pub fn random() -> Result<Self, StoreError> {
        let mut key = [0u8; 64];
        getrandom::fill(&mut key).map_err(StoreError::Random)?;
        Ok(Self(key))
    }

    /// The MAC over `account` and `position`, domain-separated from any
    /// other use of the key.
    fn mac(&self, account: &str, position: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        use hmac::digest::KeyInit;
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new(&self.0.into());
        mac.update(b"keyward page token\0");
        mac.update(account.as_bytes());
        mac.update(b"\0");
        mac.update(position);
        mac
    }
}

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(..)")
    }
}

/// The sled database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    keys: sled::Tree,
    by_account: sled::Tree,
    last_used: sled::Tree,
    /// Replicated mode: how far this replica has followed etcd.
    replica: sled::Tree,
    /// sled's log file, for a real fsync after sled's flush (see [`Self::flush`]).
    log: std::sync::Arc<std::fs::File>,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // The index, not sled's page cache, serves reads; a small cache keeps
        // resident memory proportional to the keys, not to the data on disk.
        // No periodic background flush: the key writer flushes every batch
        // it acknowledges, so a change becomes durable only through that
        // flush, never half-way through a batch that then fails.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(None);
        // sled's background threads let go of the directory lock a moment
        // after the last handle is dropped: a reopen in the same process
        // (recovery after a disk failure, a restart in tests) waits that
        // moment out instead of failing.
        let mut waited = Duration::ZERO;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(error))
                    if error.to_string().contains("could not acquire lock")
                        && waited < LOCK_WAIT =>
                {
                    std::thread::sleep(LOCK_RETRY);
                    waited += LOCK_RETRY;
                }
                opened => break opened?,
            }
        };
        let log = std::fs::File::open(dir.join(SLED_LOG_FILE)).map_err(sled::Error::Io)?;
        Ok(Self {
            keys: db.open_tree("keys")?,
            by_account: db.open_tree("by_account")?,
            last_used: db.open_tree("last_used")?,
            replica: db.open_tree("replica")?,
            db,
            log: std::sync::Arc::new(log),
        })
    }

    /// Part `part` of `parts` of the stored records, still encoded, for
    /// loading the index at start-up: key ids are uniformly random, so
    /// splitting on the first byte gives parts of equal size that threads
    /// can read and decode in parallel.
    pub fn partition(
        &self,
        part: usize,
        parts: usize,
    ) -> impl Iterator<Item = Result<RawRecord, StoreError>> + '_ {
        let bound = |p: usize| u8::try_from(p * 256 / parts.max(1)).ok();
        let range = match (bound(part), bound(part + 1)) {
            (Some(lo), Some(hi)) => self.keys.range([lo]..[hi]),
            (Some(lo), None) => self.keys.range([lo]..),
            (None, _) => self.keys.range([0xff, 0xff]..[0xff, 0xff]),
        };
        range.map(|item| {
            let (key, value) = item?;
            Ok(RawRecord { key, value })
        })
    }

    /// How many keys the store holds (a walk of the keys tree).
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// One record.
    pub fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.keys
            .get(id.as_bytes())?
            .map(|value| decode(id.as_bytes(), &value))
            .transpose()
    }

    /// One record, still encoded (what a backup saves of a key about to
    /// change).
    pub fn get_raw(&self, id: &KeyId) -> Result<Option<RawRecord>, StoreError> {
        Ok(self.keys.get(id.as_bytes())?.map(|value| RawRecord {
            key: sled::IVec::from(id.as_bytes().as_slice()),
            value,
        }))
    }

    /// Stages `record`, new or in place of the stored one (account and
    /// creation time never change, so an existing listing entry stays), in
    /// both trees atomically. Not durable until [`Self::flush`] returns:
    /// never acknowledge before that.
    pub fn put(&self, record: &KeyRecord) -> Result<Put, StoreError> {
        let value = record::encode(record);
        let listing = listing_key(record);
        let id = record.id.as_bytes();
        let put = (&self.keys, &self.by_account).transaction(|(keys, by_account)| {
            Ok(match keys.get(id)? {
                Some(stored) if stored == value.as_slice() => Put::Unchanged,
                Some(_) => {
                    keys.insert(id, value.as_slice())?;
                    Put::Replaced
                }
                None => {
                    keys.insert(id, value.as_slice())?;
                    by_account.insert(listing.as_slice(), &[] as &[u8])?;
                    Put::Created
                }
            })
        })?;
        Ok(put)
    }

    /// Stages many records as [`Self::put`] does, in one transaction (a
    /// full read of etcd writes the replica a page at a time).
    pub fn put_all(&self, records: &[&KeyRecord]) -> Result<Vec<Put>, StoreError> {
        let mut keys = sled::Batch::default();
        let mut listings = sled::Batch::default();
        let mut puts = Vec::with_capacity(records.len());
        for record in records {
            let value = record::encode(record);
            let id = record.id.as_bytes();
            puts.push(match self.keys.get(id)? {
                Some(stored) if stored == value.as_slice() => Put::Unchanged,
                Some(_) => {
                    keys.insert(id, value);
                    Put::Replaced
                }
                None => {
                    keys.insert(id, value);
                    listings.insert(listing_key(record), &[] as &[u8]);
                    Put::Created
                }
            });
        }
        (&self.keys, &self.by_account).transaction(|(tx_keys, tx_listings)| {
            tx_keys.apply_batch(&keys)?;
            tx_listings.apply_batch(&listings)?;
            Ok(())
        })?;
        Ok(puts)
    }

    /// Stages the removal of a key from every tree atomically; returns the
    /// record removed, if it was there. Durable after [`Self::flush`].
    pub fn remove(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let Some(record) = self.get(id)? else {
            return Ok(None);
        };
        let listing = listing_key(&record);
        (&self.keys, &self.by_account, &self.last_used).transaction(
            |(keys, by_account, last_used)| {
                keys.remove(id.as_bytes())?;
                by_account.remove(listing.as_slice())?;
                last_used.remove(id.as_bytes())?;
                Ok(())
            },
        )?;
        Ok(Some(record))
    }

    /// Every record, account by account (in creation order within one):
    /// what a migration writes many of per transaction.
    pub fn records_by_account(&self) -> impl Iterator<Item = Result<KeyRecord, StoreError>> + '_ {
        self.by_account.iter().keys().filter_map(|key| {
            let key = match key {
                Ok(key) => key,
                Err(error) => return Some(Err(error.into())),
            };
            let id = <[u8; 16]>::try_from(&key[key.len().saturating_sub(16)..]).ok()?;
            self.get(&KeyId::from_bytes(id)).transpose()
        })
    }

    /// Every stored key id, for comparing the replica with etcd.
    pub fn ids(&self) -> impl Iterator<Item = Result<KeyId, StoreError>> + '_ {
        self.keys.iter().keys().filter_map(|key| match key {
            Ok(key) => <[u8; 16]>::try_from(key.as_ref())
                .ok()
                .map(|id| Ok(KeyId::from_bytes(id))),
            Err(error) => Some(Err(error.into())),
        })
    }

    /// Stages last-used times (durable after [`Self::flush`]). Keys deleted
    /// meanwhile are skipped, so no time outlives its key.
    pub fn record_last_used(&self, times: &[(KeyId, i64)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (id, nanos) in times {
            if self.keys.contains_key(id.as_bytes())? {
                batch.insert(id.as_bytes(), &nanos.to_be_bytes());
            }
        }
        self.last_used.apply_batch(batch)?;
        Ok(())
    }

    /// Every stored last-used time.
    pub fn stored_last_used(&self) -> Result<Vec<(KeyId, i64)>, StoreError> {
        let mut times = Vec::with_capacity(self.last_used.len());
        for item in &self.last_used {
            let (key, value) = item?;
            if let (Ok(id), Some(nanos)) = (<[u8; 16]>::try_from(key.as_ref()), be_i64(&value)) {
                times.push((KeyId::from_bytes(id), nanos));
            }
        }
        Ok(times)
    }

    /// A durable write that changes nothing keyward reads: proves the disk
    /// takes writes again after a failure.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.db.insert(PROBE_KEY, &[] as &[u8])?;
        self.flush()
    }

    /// Up to `limit` records of `account` after `after`, in creation order,
    /// and the cursor for the next page if there may be one.
    pub fn page(
        &self,
        account: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, Option<Cursor>), StoreError> {
        let prefix = account_prefix(account);
        let start = match after {
            Some(cursor) => {
                let mut start = prefix.clone();
                start.extend_from_slice(&cursor.created_nanos.to_be_bytes());
                start.extend_from_slice(cursor.id.as_bytes());
                start.push(0); // strictly after the cursor
                start
            }
            None => prefix.clone(),
        };
        let mut records = Vec::with_capacity(limit.min(1024));
        let mut last = None;
        for item in self.by_account.range(start..) {
            let (key, _) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            if records.len() == limit {
                return Ok((records, last));
            }
            let suffix = &key[prefix.len()..];
            let (Ok(created), Ok(id)) = (
                <[u8; 8]>::try_from(&suffix[..8.min(suffix.len())]),
                <[u8; 16]>::try_from(&suffix[8.min(suffix.len())..]),
            ) else {
                continue;
            };
            let id = KeyId::from_bytes(id);
            if let Some(record) = self.get(&id)? {
                last = Some(Cursor {
                    created_nanos: u64::from_be_bytes(created),
                    id,
                });
                records.push(record);
            }
        }
        Ok((records, None))
    }

    /// Whether no key is stored.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// For a replica of etcd: what it holds (`None`: not a replica).
    pub fn replica(&self) -> Result<Option<Replica>, StoreError> {
        let read = |name: &[u8]| -> Result<Option<i64>, StoreError> {
            Ok(self.replica.get(name)?.as_deref().and_then(be_i64))
        };
        let Some(revision) = read(b"revision")? else {
            return Ok(None);
        };
        let mut ahead = Vec::new();
        for marker in self.replica.scan_prefix(AHEAD) {
            let (key, value) = marker?;
            if let (Ok(id), Some(at)) = (<[u8; 16]>::try_from(&key[AHEAD.len()..]), be_i64(&value))
            {
                ahead.push((KeyId::from_bytes(id), at));
            }
        }
        Ok(Some(Replica {
            revision,
            synced_at: read(b"synced_at")?.unwrap_or(0),
            ahead,
        }))
    }

    /// Notes that the replica holds key `id` as of `revision`, which may be
    /// ahead of the revision it holds everything through. Staged before the
    /// key's own write, so a replica that has the write has the note: a
    /// watch resumed after a restart then cannot replay an older version
    /// of the key over it.
    pub fn note_revision(&self, id: &KeyId, revision: i64) -> Result<(), StoreError> {
        let mut key = AHEAD.to_vec();
        key.extend_from_slice(id.as_bytes());
        self.replica.insert(key, &revision.to_be_bytes())?;
        Ok(())
    }

    /// Forgets every key and the replica's progress (an on-demand replica
    /// keeps nothing on disk: what a full replica left must not pass for
    /// current later). Durable after [`Self::flush`].
    pub fn clear_replica(&self) -> Result<(), StoreError> {
        self.keys.clear()?;
        self.by_account.clear()?;
        self.last_used.clear()?;
        self.replica.clear()?;
        self.set_replica(0, 0)
    }

    /// Marks the store as etcd's replica, holding everything through
    /// `revision`, known current at `synced_at`; notes at or below
    /// `revision` are no longer needed. Durable after [`Self::flush`].
    pub fn set_replica(&self, revision: i64, synced_at: i64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert("revision", &revision.to_be_bytes());
        batch.insert("synced_at", &synced_at.to_be_bytes());
        for marker in self.replica.scan_prefix(AHEAD) {
            let (key, value) = marker?;
            if be_i64(&value).is_none_or(|at| at <= revision) {
                batch.remove(key);
            }
        }
        self.replica.apply_batch(batch)?;
        Ok(())
    }

    /// Makes everything staged so far durable. Blocks on the disk: call it
    /// only from the store's writer thread (or offline tools).
    ///
    /// On Linux, sled 0.34's flush ends with `sync_file_range`, which writes
    /// the log's data pages but commits no file metadata (new extents, the
    /// file size): on ext4 a write acknowledged in the seconds before a crash
    /// or a filesystem error was lost (tests/storage_faults.rs found it). An
    /// fsync of the log file commits both; fsync acts on the inode, so our
    /// own read-only handle serves.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.log.sync_all().map_err(sled::Error::Io)?;
        Ok(())
    }
}

/// Longest a reopen waits for sled's lock on the directory.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Pause between attempts to take it.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// Prefix of the replica's per-key revision notes.
const AHEAD: &[u8] = b"ahead/";

fn be_i64(bytes: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(bytes).ok().map(i64::from_be_bytes)
}

fn account_prefix(account: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(account.len() + 1 + 24);
    prefix.extend_from_slice(account.as_bytes());
    prefix.push(0);
    prefix
}

fn listing_key(record: &KeyRecord) -> Vec<u8> {
    let mut key = account_prefix(&record.account);
    // Creation times are after 1970: never negative.
    let created = u64::try_from(record.created_at).unwrap_or_default();
    key.extend_from_slice(&created.to_be_bytes());
    key.extend_from_slice(record.id.as_bytes());
    key
}

fn decode(key: &[u8], value: &[u8]) -> Result<KeyRecord, StoreError> {
    record::decode(value).map_err(|source| StoreError::Record {
        key: key_label(key),
        source,
    })
}

fn key_label(key: &[u8]) -> String {
    <[u8; 16]>::try_from(key).map_or_else(
        |_| format!("{key:02x?}"),
        |id| KeyId::from_bytes(id).to_string(),
    )
}

#[cfg(test)]
mod tests;
