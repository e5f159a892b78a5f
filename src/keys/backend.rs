//! The write path's storage seam: what the key writer needs of the truth.
//!
//! The writer (`keys::writer`) queues, batches, group-commits, answers
//! and recovers; everything that depends on where the keys live is behind
//! [`Backend`]: a [`Txn`] to run the rules on (a view of the truth as of
//! one atomic step) that then commits what they staged, a flush that makes
//! a batch durable and shows it to decisions, and recovery after a failure.
//! The implementations: sled as the standalone truth
//! (`keys::standalone`), etcd as the replicated truth with a local
//! replica (`keys::replicated`), and memory for the writer's unit tests.
//!
//! Why the writer holds a `Box<dyn Backend>` rather than being generic:
//! the backend is picked at run time from the configuration, and
//! everything above the writer (`keys::Keys`, the services) stays one
//! type whatever it is; a virtual call per change costs nothing next to a
//! disk flush or an etcd round trip.

use std::time::Instant;

use super::change::KeyError;
use super::shared::Inbound;
use super::snapshot::{Begun, SnapshotError};
use super::stage::{Staged, View};
use crate::store::db::StoreError;

/// Where keys are stored, as the key writer uses it. Every method runs on
/// the writer thread, one at a time.
pub trait Backend: Send {
    /// A view of the truth for one change's rules, which then commits what
    /// they staged atomically with what they read. Fails while the backend
    /// is failing (see [`Self::ready`]) or the truth cannot be reached.
    fn begin(&mut self, deadline: Instant) -> Result<Box<dyn Txn + '_>, KeyError>;

    /// Makes the batch committed since the last flush durable; if it
    /// stands, decisions see it from now on. `failure`: a storage error a
    /// change of the batch met (the batch cannot be made durable locally).
    fn flush(&mut self, failure: Option<StoreError>) -> Flush;

    /// Whether the backend takes changes (false from a failure until
    /// [`Self::recover`] succeeds).
    fn ready(&self) -> bool;

    /// Lets go of local storage after a failure (sled poisons a database at
    /// its first I/O error); [`Self::recover`] opens it again.
    fn fail(&mut self);

    /// Reopens local storage, proves it takes a durable write, and
    /// reconciles what decisions see with the truth.
    fn recover(&mut self) -> Result<(), StoreError>;

    /// Writes the last-used times decisions recorded since the last call
    /// (at most one write per key per call), if this backend keeps them.
    fn persist_last_used(&mut self) -> Result<(), StoreError>;

    /// Applies what arrived from outside the write path (a replica's
    /// watch, its on-demand cache); a standalone truth gets nothing.
    fn replicate(&mut self, inbound: Inbound) -> Result<(), StoreError> {
        drop(inbound);
        Ok(())
    }

    /// Fixes an online backup's point in time (between two batches), if
    /// the writer is where that happens for this backend.
    fn begin_snapshot(&mut self) -> Result<Begun, SnapshotError> {
        Err(SnapshotError::Unavailable)
    }

    /// Flushes and releases local storage (and its directory lock).
    fn close(&mut self) -> Result<(), StoreError>;
}

/// One change's atomic step: a [`View`] of the truth, then the commit of
/// what the rules staged over it.
pub trait Txn: View {
    /// Commits `staged` atomically with everything this view read, and
    /// queues it for the index (shown at the batch's flush if it stands).
    /// [`Outcome::Raced`]: something read moved meanwhile and nothing was
    /// written; the rules run again on a new view.
    fn commit(self: Box<Self>, staged: &Staged) -> Result<Outcome, KeyError>;
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written.
    Committed,
    /// Lost a race: nothing written; run the rules again.
    Raced,
}

/// What a batch's flush made of it.
#[derive(Debug)]
pub struct Flush {
    /// The batch stands: acknowledged, and decisions see it.
    pub stands: bool,
    /// A storage failure to report and recover from, if any (with
    /// `stands`: the truth has the batch, the local replica may not).
    pub failure: Option<StoreError>,
}
