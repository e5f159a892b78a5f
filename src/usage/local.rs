//! Per-key usage kept by one standalone sidecar itself, when it has no
//! usage store: the same minute and hour counts, in a sled database of
//! their own (`<data-dir>/usage`), flushed to disk each second.
//!
//! A standalone sidecar is the only one deciding for its keys, so its own
//! counts are the whole usage. A replicated sidecar without a usage store
//! keeps none: its counts would be one sidecar's share, shown as a total.

use std::path::Path;

use keyward_core::domain::key::KeyId;

use super::counts::{OUTCOMES, label};
use super::store::{HOURS_TTL_SECONDS, MINUTES_TTL_SECONDS};

/// Minute buckets (`b'm'`) and hour buckets (`b'h'`) of a key.
const MINUTES: u8 = b'm';
const HOURS: u8 = b'h';

/// Counts in sled: `id | kind | bucket start (big-endian seconds) |
/// outcome` → count (little-endian `u64`). One key's buckets are one
/// contiguous range, oldest first.
#[derive(Debug, Clone)]
pub struct LocalStore {
    db: sled::Db,
}

/// The counts' database, open while the data volume works: closed when the
/// key store reports it failing (or a write to it fails), so that no file
/// on a failed volume stays open (the volume can then be unmounted,
/// checked and mounted again), and opened again once the key store
/// recovers.
#[derive(Debug, Clone)]
pub struct LocalPlace {
    dir: std::path::PathBuf,
    open: std::sync::Arc<std::sync::Mutex<Option<LocalStore>>>,
}

impl LocalPlace {
    /// The counts under `dir`, opened now if they can be.
    #[must_use]
    pub fn new(dir: std::path::PathBuf) -> Self {
        let open = LocalStore::open(&dir)
            .inspect_err(|error| tracing::warn!(dir = %dir.display(), %error, "usage counts cannot be opened; retried once the store is healthy"))
            .ok();
        Self {
            dir,
            open: std::sync::Arc::new(std::sync::Mutex::new(open)),
        }
    }

    /// The database, if open.
    #[must_use]
    pub fn store(&self) -> Option<LocalStore> {
        self.open.lock().map_or(None, |open| open.clone())
    }

    /// Lets go of the database's files. The lock is never held across
    /// disk work (dropping sled flushes, and a stuck disk never returns):
    /// whoever asks for the store meanwhile finds it closed at once.
    pub fn close(&self) {
        let closing = self.open.lock().map_or(None, |mut open| open.take());
        drop(closing);
    }

    /// Opens the database again if it is closed (outside the lock, as
    /// [`Self::close`]).
    pub fn reopen(&self) {
        if self.open.lock().is_ok_and(|open| open.is_some()) {
            return;
        }
        let Ok(opened) = LocalStore::open(&self.dir) else {
            return;
        };
        if let Ok(mut open) = self.open.lock()
            && open.is_none()
        {
            *open = Some(opened);
        }
    }
}

fn bucket_key(id: &KeyId, kind: u8, start: i64, outcome: u8) -> [u8; 26] {
    let mut key = [0u8; 26];
    key[..16].copy_from_slice(id.as_bytes());
    key[16] = kind;
    key[17..25].copy_from_slice(&start.max(0).to_be_bytes());
    key[25] = outcome;
    key
}

fn count_of(value: &[u8]) -> u64 {
    value.try_into().map_or(0, u64::from_le_bytes)
}

impl LocalStore {
    /// Opens (creating) the counts under `dir`.
    pub fn open(dir: &Path) -> Result<Self, sled::Error> {
        Ok(Self {
            db: sled::Config::new()
                .path(dir)
                .cache_capacity(16 * 1024 * 1024)
                .open()?,
        })
    }

    /// Adds one key's counts for one minute (Unix seconds at its start) to
    /// its minute and hour buckets, all or nothing (a failure part-way
    /// must not leave some of them in, to be added again), then drops its
    /// buckets past their keeping time (as Redis's TTLs do; best effort,
    /// the next write tries again).
    pub fn add(&self, id: &KeyId, minute: i64, tally: &[u64; OUTCOMES]) -> Result<(), sled::Error> {
        let hour = minute - minute.rem_euclid(3600);
        let mut keys = Vec::new();
        for (outcome, count) in tally.iter().enumerate().filter(|(_, count)| **count > 0) {
            let outcome = u8::try_from(outcome).unwrap_or(u8::MAX);
            keys.push((bucket_key(id, MINUTES, minute, outcome), *count));
            keys.push((bucket_key(id, HOURS, hour, outcome), *count));
        }
        self.db
            .transaction(|tx| {
                for (key, count) in &keys {
                    let old = tx.get(key)?.map_or(0, |value| count_of(&value));
                    tx.insert(&key[..], &(old + count).to_le_bytes()[..])?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|error| match error {
                sled::transaction::TransactionError::Storage(error) => error,
                sled::transaction::TransactionError::Abort(()) => {
                    sled::Error::Unsupported("aborted".into())
                }
            })?;
        let _ = self.prune(id, MINUTES, minute - MINUTES_TTL_SECONDS);
        let _ = self.prune(id, HOURS, minute - HOURS_TTL_SECONDS);
        Ok(())
    }

    fn prune(&self, id: &KeyId, kind: u8, before: i64) -> Result<(), sled::Error> {
        let range = bucket_key(id, kind, 0, 0)..bucket_key(id, kind, before, 0);
        for entry in self.db.range(range) {
            self.db.remove(entry?.0)?;
        }
        Ok(())
    }

    /// Makes what was added durable.
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    /// One key's buckets from `from` (Unix seconds) on: (start, label,
    /// count), minutes or hours.
    pub fn counts(
        &self,
        id: &KeyId,
        from: i64,
        by_hour: bool,
    ) -> Result<Vec<(i64, String, u64)>, sled::Error> {
        let kind = if by_hour { HOURS } else { MINUTES };
        let range = bucket_key(id, kind, from, 0)..=bucket_key(id, kind, i64::MAX, u8::MAX);
        let mut buckets = Vec::new();
        for entry in self.db.range(range) {
            let (key, value) = entry?;
            let start = key
                .get(17..25)
                .and_then(|bytes| bytes.try_into().ok())
                .map_or(0, i64::from_be_bytes);
            let outcome = usize::from(key.get(25).copied().unwrap_or(0));
            if outcome < OUTCOMES {
                buckets.push((start, label(outcome).to_owned(), count_of(&value)));
            }
        }
        Ok(buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_by_minute_and_hour_survive_a_reopen_and_age_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = KeyId::from_bytes([7; 16]);
        let other = KeyId::from_bytes([8; 16]);
        let mut tally = [0; OUTCOMES];
        tally[0] = 3;
        tally[2] = 1;
        {
            let store = LocalStore::open(dir.path()).expect("opens");
            store.add(&id, 7200, &tally).expect("adds");
            store.add(&id, 7260, &tally).expect("adds");
            store.add(&other, 7260, &tally).expect("adds");
            store.flush().expect("flushes");
        }
        let store = LocalStore::open(dir.path()).expect("reopens");
        let minutes = store.counts(&id, 7200, false).expect("reads");
        assert_eq!(
            minutes.len(),
            4,
            "two minutes, two outcomes each: {minutes:?}"
        );
        assert_eq!(minutes[0], (7200, "allowed".to_owned(), 3));
        let hours = store.counts(&id, 7200, true).expect("reads");
        assert_eq!(hours[0], (7200, "allowed".to_owned(), 6));
        // Two hours on, the first minutes are gone; the hours are kept.
        store
            .add(&id, 7260 + MINUTES_TTL_SECONDS + 60, &tally)
            .expect("adds");
        let minutes = store.counts(&id, 0, false).expect("reads");
        assert!(
            minutes.iter().all(|(start, _, _)| *start > 7260),
            "{minutes:?}"
        );
        assert_eq!(store.counts(&id, 0, true).expect("reads").len(), 4);
    }
}
