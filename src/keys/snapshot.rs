//! Online backups: every key at one point in time while writes go on,
//! encoded as a backup file ([`crate::store::backup`]) and handed out in
//! chunks.
//!
//! Standalone, sled is the truth, and sled has no snapshots: a walk of the
//! keys tree sees each key as it is when the walk reaches it. So the writer
//! thread fixes the point in time between two batches (everything before
//! is flushed, nothing after is staged yet), and from then on, before it
//! changes a key the walk has not reached, it saves the key's record as it
//! was, or that it was absent ([`Tracker::before_write`]). The walk skips
//! saved keys and adds the saved records at its end: every key exactly as
//! it was at that point, while the writer is held only for the moment it
//! takes to start. Keys behind the walk need nothing saved: the walk read
//! them before they changed.
//!
//! Replicated, etcd is the truth, and its paginated read at one revision
//! (the read a replica syncs with, [`super::remote::Remote`]) is already a
//! point in time.
//!
//! Either way the header's count is taken at that point, and the file is
//! finished only if the walk wrote exactly that many keys.
//!
//! Bounds: one backup at a time; at most [`CHUNKS_IN_FLIGHT`] chunks of
//! [`CHUNK_BYTES`] wait for the client, which abandons the backup if it
//! takes none for [`STALL`]; at most [`MAX_SAVED`] records saved, past
//! which (that many changes during one backup) the backup is abandoned
//! rather than grow.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sha2::Digest;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::remote::Remote;
use crate::clock::now_nanos;
use crate::domain::key::KeyId;
use crate::store::backup::{BackupError, Encoder, Header};
use crate::store::db::{RawRecord, Store, StoreError};
use crate::store::etcd::EtcdError;
use crate::store::index::Index;
use crate::store::record;

/// The most bytes in one chunk of a backup.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks encoded ahead of the client.
pub const CHUNKS_IN_FLIGHT: usize = 4;
/// Longest a backup waits for its client to take a chunk.
pub const STALL: Duration = Duration::from_secs(60);
/// The most records a standalone backup saves from changes made while it
/// runs.
pub const MAX_SAVED: usize = 100_000;

/// A backup's chunks, in order; an error ends it (the bytes so far are not
/// a backup).
pub type Chunks = mpsc::Receiver<Result<Vec<u8>, SnapshotError>>;

/// Why a backup was not taken. Mapped to gRPC codes in
/// [`crate::refusal`].
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Another backup is running.
    #[error("another backup is running; one runs at a time")]
    Busy,
    /// More keys changed during the backup than it saves.
    #[error(
        "more than {MAX_SAVED} keys changed while the backup ran; run it again when writes are quieter"
    )]
    Overrun,
    /// The walk did not find what the point in time counted (a bug: the
    /// file is not finished).
    #[error("the snapshot is inconsistent ({0}); no backup was written")]
    Inconsistent(BackupError),
    /// The client took no chunk for [`STALL`], or went away.
    #[error("the client stopped reading the backup")]
    Abandoned,
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The store is failing or the writer did not answer in time.
    #[error("storage is unavailable; no backup was taken")]
    Unavailable,
}

/// What a backup file says of the sidecar it came from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Where the catalog came from (a path, or the bundled name).
    pub catalog_source: String,
    /// The SHA-256 of the catalog's text.
    pub catalog_sha256: Vec<u8>,
}

impl Origin {
    /// The origin of a sidecar running the catalog `text` from `source`.
    #[must_use]
    pub fn new(source: &str, text: &str) -> Self {
        Self {
            catalog_source: source.to_owned(),
            catalog_sha256: sha2::Sha256::digest(text.as_bytes()).to_vec(),
        }
    }

    fn header(&self, keys: u64, source: &str, etcd_revision: i64) -> Header {
        Header {
            keys,
            taken_at_unix_nanos: now_nanos(),
            source: source.to_owned(),
            etcd_revision,
            catalog_source: self.catalog_source.clone(),
            catalog_sha256: self.catalog_sha256.clone(),
            keyward_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------
// The writer's side (standalone)

/// The backup in progress, as the writer thread sees it.
#[derive(Debug, Default)]
pub struct Tracker {
    active: Mutex<Weak<Saved>>,
}

impl Tracker {
    /// Called by the writer before it changes key `id` in `store`: saves
    /// the key as it was if a backup has yet to walk it.
    pub fn before_write(&self, store: &Store, id: &KeyId) {
        let active = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        if let Some(saved) = active {
            saved.save(store, id);
        }
    }

    /// Called by the writer between batches: a backup's point in time.
    pub fn begin(&self) -> Arc<Saved> {
        let saved = Arc::new(Saved::default());
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&saved);
        saved
    }
}

/// Keys as they were at a backup's point in time, saved before they
/// changed. Dropped with the backup, which ends the saving.
#[derive(Debug, Default)]
pub struct Saved {
    state: Mutex<SavedState>,
}

#[derive(Debug, Default)]
struct SavedState {
    /// The last key id the walk reached.
    walked: Option<[u8; 16]>,
    /// Key id → its record at the point in time (`None`: absent then).
    records: BTreeMap<[u8; 16], Option<RawRecord>>,
    /// Why the backup cannot be finished, if it cannot.
    broken: Option<SnapshotError>,
    /// The walk is over.
    done: bool,
}

impl Saved {
    fn state(&self) -> std::sync::MutexGuard<'_, SavedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, store: &Store, id: &KeyId) {
        let mut state = self.state();
        let key = *id.as_bytes();
        if state.done
            || state.broken.is_some()
            || state.walked.is_some_and(|walked| key <= walked)
            || state.records.contains_key(&key)
        {
            return;
        }
        if state.records.len() >= MAX_SAVED {
            state.records.clear();
            state.broken = Some(SnapshotError::Overrun);
            return;
        }
        match store.get_raw(id) {
            Ok(before) => {
                state.records.insert(key, before);
            }
            Err(error) => {
                state.records.clear();
                state.broken = Some(error.into());
            }
        }
    }

    /// The walk reached `id`: whether to write the record it read (a key
    /// saved before is written from what was saved, at the end).
    fn walk(&self, id: &KeyId) -> bool {
        let mut state = self.state();
        state.walked = Some(*id.as_bytes());
        !state.records.contains_key(id.as_bytes())
    }

    /// The walk is over: the saved records that existed at the point in
    /// time, in key order.
    fn finish(&self) -> Result<Vec<RawRecord>, SnapshotError> {
        let mut state = self.state();
        state.done = true;
        if let Some(broken) = state.broken.take() {
            return Err(broken);
        }
        Ok(std::mem::take(&mut state.records)
            .into_values()
            .flatten()
            .collect())
    }
}

/// A standalone backup's point in time, fixed by the writer.
#[derive(Debug)]
pub struct Begun {
    /// The store to walk.
    pub store: Store,
    /// What the writer saves from then on.
    pub saved: Arc<Saved>,
    /// Keys at that point.
    pub keys: u64,
}

// ---------------------------------------------------------------------------
// The walk (on a blocking thread)

/// Where a backup reads from.
#[derive(Debug)]
pub enum Source {
    /// The standalone store, from the point the writer fixed.
    Store(Begun),
    /// etcd, at the revision of its first page.
    Etcd(Box<Remote>),
}

/// Where a backup's chunks go: the client's stream, through the server's
/// runtime (the walk runs on a blocking thread).
#[derive(Debug)]
pub struct Sink {
    /// The stream's sender.
    pub chunks: mpsc::Sender<Result<Vec<u8>, SnapshotError>>,
    /// The server's runtime.
    pub runtime: Handle,
}

impl Sink {
    fn send(&self, chunk: Result<Vec<u8>, SnapshotError>) -> Result<(), SnapshotError> {
        self.runtime.block_on(async {
            match tokio::time::timeout(STALL, self.chunks.send(chunk)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) | Err(_) => Err(SnapshotError::Abandoned),
            }
        })
    }
}

/// Takes the backup: walks `source`, encodes every key with its last use
/// from `index`, and sends the file in chunks, or ends the stream with the
/// reason it stopped. Blocks: run it on a blocking thread.
pub fn take(source: Source, index: &Index, origin: &Origin, sink: &Sink) {
    let walked = match source {
        Source::Store(begun) => walk_store(&begun, index, origin, sink),
        Source::Etcd(remote) => walk_etcd(&remote, index, origin, sink),
    };
    match walked {
        Ok(()) | Err(SnapshotError::Abandoned) => {}
        Err(error) => {
            tracing::warn!(%error, "backup failed");
            let _ = sink.send(Err(error));
        }
    }
}

fn walk_store(
    begun: &Begun,
    index: &Index,
    origin: &Origin,
    sink: &Sink,
) -> Result<(), SnapshotError> {
    let mut file = File::new(&origin.header(begun.keys, "standalone", 0), sink);
    // The whole keys tree, in key order (part 0 of 1).
    for raw in begun.store.partition(0, 1) {
        let raw = raw?;
        let Some(id) = raw.id() else { continue };
        if begun.saved.walk(&id) {
            file.raw(&raw, &id, index)?;
        }
    }
    for raw in begun.saved.finish()? {
        if let Some(id) = raw.id() {
            file.raw(&raw, &id, index)?;
        }
    }
    file.finish()
}

fn walk_etcd(
    remote: &Remote,
    index: &Index,
    origin: &Origin,
    sink: &Sink,
) -> Result<(), SnapshotError> {
    let mut listing = remote.list();
    let mut page = remote.next_page(&mut listing)?;
    let (keys, revision) = page.as_ref().map_or((0, 0), |p| (p.total, p.revision));
    let mut file = File::new(&origin.header(keys, "etcd", revision), sink);
    while let Some(current) = page {
        for record in &current.records {
            file.entry(&record::encode(record), index.last_used(&record.id))?;
        }
        page = remote.next_page(&mut listing)?;
    }
    file.finish()
}

/// A backup file on its way to the client.
struct File<'a> {
    encoder: Encoder,
    sink: &'a Sink,
}

impl<'a> File<'a> {
    fn new(header: &Header, sink: &'a Sink) -> Self {
        Self {
            encoder: Encoder::new(header),
            sink,
        }
    }

    /// A stored record, checked as a restore will check it.
    fn raw(&mut self, raw: &RawRecord, id: &KeyId, index: &Index) -> Result<(), SnapshotError> {
        raw.record()?;
        self.entry(raw.bytes(), index.last_used(id))
    }

    fn entry(&mut self, record: &[u8], last_used: i64) -> Result<(), SnapshotError> {
        self.encoder.entry(record, last_used);
        while self.encoder.pending() >= CHUNK_BYTES {
            self.sink.send(Ok(self.encoder.take(CHUNK_BYTES)))?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), SnapshotError> {
        let rest = self.encoder.finish().map_err(SnapshotError::Inconsistent)?;
        for chunk in rest.chunks(CHUNK_BYTES) {
            self.sink.send(Ok(chunk.to_vec()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalog::KeyKind;
    use crate::domain::key::SecretHash;
    use crate::domain::record::{Access, KeyRecord};

    fn record(byte: u8, name: &str) -> KeyRecord {
        KeyRecord {
            id: KeyId::from_bytes([byte; 16]),
            account: "acme".into(),
            name: name.into(),
            kind: KeyKind::RestrictedAccess,
            scopes: vec!["mail.send".into()],
            created_at: i64::from(byte),
            updated_at: 0,
            access: Access::new(SecretHash::from_bytes([byte; 32])),
            leak: None,
        }
    }

    /// The walk as [`walk_store`] does it, from key `from` on: the records
    /// it writes (names).
    fn walk(store: &Store, saved: &Saved, from: u8, to: u8) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        for raw in store.partition(0, 1) {
            let raw = raw.expect("reads");
            let id = raw.id().expect("a key id");
            let byte = id.as_bytes()[0];
            if (from..=to).contains(&byte) && saved.walk(&id) {
                out.push((byte, raw.record().expect("decodes").name));
            }
        }
        out
    }

    #[test]
    fn the_walk_sees_every_key_as_it_was_at_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for byte in 1..=10 {
            store.put(&record(byte, "before")).expect("put");
        }
        let tracker = Tracker::default();
        let saved = tracker.begin();
        let mut seen = walk(&store, &saved, 1, 4);
        // Writes behind the walk, and ahead of it: changed, created,
        // removed; each saved (if ahead) before the write, as the writer
        // does.
        for byte in [3, 7] {
            tracker.before_write(&store, &KeyId::from_bytes([byte; 16]));
            store.put(&record(byte, "after")).expect("put");
        }
        for byte in [2, 20] {
            tracker.before_write(&store, &KeyId::from_bytes([byte; 16]));
            store.put(&record(byte, "after")).expect("create");
        }
        tracker.before_write(&store, &KeyId::from_bytes([8; 16]));
        store.remove(&KeyId::from_bytes([8; 16])).expect("remove");
        // Changed twice: the first state saved stands.
        tracker.before_write(&store, &KeyId::from_bytes([7; 16]));
        store.put(&record(7, "again")).expect("put");
        seen.extend(walk(&store, &saved, 5, 255));
        for raw in saved.finish().expect("not broken") {
            let record = raw.record().expect("decodes");
            seen.push((record.id.as_bytes()[0], record.name));
        }
        seen.sort();
        let expected: Vec<(u8, String)> = (1..=10).map(|b| (b, "before".to_owned())).collect();
        assert_eq!(seen, expected);
        // Once the walk is over, nothing more is saved.
        tracker.before_write(&store, &KeyId::from_bytes([9; 16]));
        assert!(saved.finish().expect("finished").is_empty());
    }

    #[test]
    fn a_backup_dropped_saves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let tracker = Tracker::default();
        drop(tracker.begin());
        tracker.before_write(&store, &KeyId::from_bytes([1; 16]));
        assert!(tracker.active.lock().expect("lock").upgrade().is_none());
    }
}
