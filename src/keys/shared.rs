//! What passes between the key writer's thread and everyone else: the
//! commands it takes ([`Command`]: a change to commit, what a replica's
//! watcher delivered, a key its on-demand cache fetched; [`deliver`] hands
//! them over) and what it shares with the async side ([`Shared`]: the store
//! handle for reads, store health, the replica's state, the backup in
//! progress).

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::change::{Change, Committed};
use super::change::{KeyError, Principal};
use super::watcher::Event;
use crate::clock::now_nanos;
use crate::domain::key::KeyId;
use crate::metrics::Metrics;
use crate::store::db::{Store, StoreError};
use crate::store::record::KeyRecord;

/// A change waiting for the writer.
#[derive(Debug)]
pub struct Job {
    /// Who asks.
    pub actor: Principal,
    /// What to change.
    pub change: Change,
    /// When the caller stops waiting (and is told nothing was acknowledged);
    /// a job still queued then is dropped unapplied.
    pub deadline: Instant,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<Committed, KeyError>>,
}

/// What the writer thread is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Commit a change.
    Commit(Box<Job>),
    /// Hand what reached the replica to the backend (replicated mode).
    Replica(Inbound),
    /// Fix a backup's point in time (standalone): between two batches.
    Snapshot(oneshot::Sender<Result<super::snapshot::Begun, super::snapshot::SnapshotError>>),
    /// Flush, release the store (and sled's directory lock) and stop.
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// What reaches a replica from outside the write path, for the writer to
/// hand its backend in arrival order.
#[derive(Debug)]
pub enum Inbound {
    /// What the replica's watcher delivered.
    Watched {
        /// The event.
        event: Event,
        /// A page's turn among those the writer has yet to apply,
        /// returned once it is applied.
        turn: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// On-demand cache: a key fetched at its first sight.
    Fetched(Box<Fetch>),
    /// On-demand cache: the eviction policy dropped keys.
    Evicted,
}

/// What the writer made of a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The key is held (it was already, or now is).
    Held,
    /// Absent, and remembered as such.
    Absent,
    /// The watch changed the key after the fetch's revision: read again.
    Stale,
}

/// A fetched key for the writer to apply.
#[derive(Debug)]
pub struct Fetch {
    /// The key.
    pub id: KeyId,
    /// Its record and the revision it was written at; `None`: absent.
    pub found: Option<(KeyRecord, i64)>,
    /// etcd's revision when it answered.
    pub revision: i64,
    /// Where the writer answers.
    pub reply: oneshot::Sender<Fetched>,
}

/// Hands `inbound` to the writer, waiting while its queue is full; `false`
/// once the writer is gone.
pub async fn deliver(commands: &SyncSender<Command>, inbound: Inbound) -> bool {
    let mut command = Command::Replica(inbound);
    loop {
        match commands.try_send(command) {
            Ok(()) => return true,
            Err(TrySendError::Full(back)) => {
                command = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// How current the local replica is (replicated mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replication {
    /// Serving is sound: a full read of etcd was applied in this process,
    /// or etcd could not be reached and the replica had one before a
    /// restart.
    pub ready: bool,
    /// The watch on etcd is up.
    pub connected: bool,
    /// When the replica was last known to hold everything etcd had (Unix
    /// nanos; 0: never).
    pub synced_at: i64,
    /// The etcd revision the replica holds everything through.
    pub revision: i64,
}

/// Whether the store takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    /// Writes succeed.
    Healthy,
    /// Writes are refused; decisions are unaffected.
    Failing(FailureKind),
}

/// Why the store is failing, without paths or other detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// ENOSPC.
    NoSpace,
    /// EROFS.
    ReadOnly,
    /// Any other I/O or storage error.
    Io,
    /// A write did not complete within the write timeout.
    NotResponding,
}

impl FailureKind {
    /// The reason as an operator reads it (also the health log and metric label).
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoSpace => "no space left on the data volume",
            Self::ReadOnly => "the data volume is read-only",
            Self::Io => "I/O error on the data volume",
            Self::NotResponding => "the data volume is not responding",
        }
    }

    pub(super) fn of(error: &StoreError) -> Self {
        let StoreError::Sled(sled::Error::Io(io)) = error else {
            return Self::Io;
        };
        match io.kind() {
            std::io::ErrorKind::StorageFull => Self::NoSpace,
            std::io::ErrorKind::ReadOnlyFilesystem => Self::ReadOnly,
            // sled wraps some errors once more; the text still names them.
            _ if io.to_string().contains("No space left") => Self::NoSpace,
            _ if io.to_string().contains("Read-only file system") => Self::ReadOnly,
            _ => Self::Io,
        }
    }
}

/// What the writer shares with the async side: the store handle for reads
/// (swapped on reopen) and the health it reports.
#[derive(Debug)]
pub struct Shared {
    pub(super) store: RwLock<Option<Store>>,
    pub(super) health: watch::Sender<StoreHealth>,
    pub(super) replication: watch::Sender<Replication>,
    pub(super) metrics: Arc<Metrics>,
    /// The backup in progress, if any (standalone).
    pub(super) snapshots: super::snapshot::Tracker,
}

impl Shared {
    /// What a writer over `store` shares, the replica in `replication`.
    #[must_use]
    pub fn new(
        store: Option<Store>,
        replication: Replication,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: RwLock::new(store),
            health: watch::Sender::new(StoreHealth::Healthy),
            replication: watch::Sender::new(replication),
            metrics: Arc::clone(metrics),
            snapshots: super::snapshot::Tracker::default(),
        })
    }

    /// The current store for a read, unless it is being reopened.
    pub fn store(&self) -> Option<Store> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_store(&self, store: Option<Store>) {
        *self.store.write().unwrap_or_else(PoisonError::into_inner) = store;
    }

    /// Follows health changes.
    pub fn subscribe(&self) -> watch::Receiver<StoreHealth> {
        self.health.subscribe()
    }

    /// Follows the replica's state (replicated mode).
    pub fn replication(&self) -> watch::Receiver<Replication> {
        self.replication.subscribe()
    }

    /// The replica holds everything through `revision`; `full` after a
    /// whole (linearizable) read, which also makes it current and the
    /// sidecar ready.
    pub(super) fn replicated(&self, revision: i64, full: bool) {
        self.replication.send_modify(|state| {
            state.revision = state.revision.max(revision);
            if full {
                state.synced_at = state.synced_at.max(now_nanos());
                state.ready = true;
            }
        });
    }

    /// The replica has applied everything the cluster had at `at` (Unix
    /// nanos).
    pub(super) fn confirmed(&self, at: i64) {
        self.replication.send_modify(|state| {
            state.connected = true;
            state.synced_at = state.synced_at.max(at);
        });
    }

    /// etcd cannot be reached at start, and the replica had synced before:
    /// serve from it. Whether it was not serving yet.
    pub fn serve_replica(&self) -> bool {
        self.replication
            .send_if_modified(|state| !std::mem::replace(&mut state.ready, true))
    }

    /// etcd (or its quorum) cannot be heard: the replica may fall behind.
    pub fn lost(&self) {
        self.replication
            .send_if_modified(|state| std::mem::replace(&mut state.connected, false));
    }

    /// Reports a new health state; logs and counts transitions only.
    pub fn publish(&self, health: StoreHealth) {
        let changed = self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
        if !changed {
            return;
        }
        self.metrics
            .set_store_healthy(health == StoreHealth::Healthy);
        match health {
            StoreHealth::Healthy => tracing::info!("storage recovered: writes accepted again"),
            StoreHealth::Failing(kind) => tracing::error!(
                reason = kind.describe(),
                "storage failing: writes are refused with UNAVAILABLE; decisions continue from memory"
            ),
        }
    }
}
