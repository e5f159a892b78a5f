//! The key writer: one dedicated thread that owns every change to the
//! keys, over a storage [`Backend`] (see `keys::backend` for which).
//!
//! Why a thread of its own: storage blocks (on a disk, which can fill up,
//! turn read-only or stall; on the network). Run on the async workers,
//! two stuck writes park the whole runtime and every decision with it;
//! here they cost writes only.
//!
//! What it guarantees, whatever the backend:
//! - **Rules at the commit point.** Each change's rules ([`Rules`]) run on
//!   the backend's view of the truth and the change commits atomically
//!   with what they read, so a key revoked or narrowed a moment ago cannot
//!   act on what it held before; the per-account limit, "never grant more
//!   than you hold" and "never touch a key holding scopes you lack" are
//!   checked there too. A commit that lost a race runs the rules again.
//! - **Group commit.** Every change waiting when the thread wakes is staged,
//!   then one flush makes the batch durable: one tenant's burst shares
//!   flushes instead of queueing one flush per write in front of everyone.
//! - **Acknowledge after durable.** The index (and so every decision) sees a
//!   change only once its batch stands; a batch that does not fails.
//! - **In arrival order.** Whatever else reaches the writer (a replica's
//!   watch, a backup's point in time, close) runs after what was queued
//!   before it is committed.
//! - **Recovery.** After a storage failure the backend lets go of its
//!   storage; the writer has it recover every [`RETRY`] until it does,
//!   refusing writes meanwhile, and health reports the failure.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backend::{Backend, Outcome};
use super::change::{Committed, KeyError, Operation};
use super::shared::{Command, FailureKind, Job, Shared, StoreHealth};
use super::stage::{Rules, Staged};
use crate::domain::catalog::Catalog;
use crate::metrics::Metrics;
use crate::store::db::StoreError;

/// How often a failed backend is asked to recover.
pub const RETRY: Duration = Duration::from_secs(1);
/// While storage keeps failing, at most one log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// Most changes committed by one flush.
const MAX_BATCH: usize = 256;
/// Most times a change runs its rules again after its commit lost a race.
const MAX_ATTEMPTS: usize = 16;

/// The writer thread's state.
pub struct Writer {
    backend: Box<dyn Backend>,
    shared: Arc<Shared>,
    catalog: Arc<Catalog>,
    max_per_account: usize,
    metrics: Arc<Metrics>,
    last_failure_log: Option<Instant>,
    last_used_every: Duration,
    next_last_used: Instant,
}

/// An acknowledged change waiting for its batch's flush.
struct Acked {
    reply: oneshot::Sender<Result<Committed, KeyError>>,
    operation: Operation,
    committed: Committed,
}

impl Writer {
    /// A writer over `backend` (to run on its own thread): at most
    /// `max_per_account` keys per account, last-used times written every
    /// `last_used_every`.
    #[must_use]
    pub fn new(
        backend: Box<dyn Backend>,
        shared: Arc<Shared>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        (max_per_account, last_used_every): (usize, Duration),
    ) -> Self {
        Self {
            backend,
            shared,
            catalog,
            max_per_account,
            metrics,
            last_failure_log: None,
            last_used_every,
            next_last_used: Instant::now() + last_used_every,
        }
    }

    /// Commits changes until closed (or every sender is gone).
    pub fn run(mut self, commands: &Receiver<Command>) {
        while let Some(first) = self.next(commands) {
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Commit(job) => batch.push(*job),
                    Command::Replica(inbound) => {
                        // In arrival order: what was queued before it first.
                        self.commit(std::mem::take(&mut batch));
                        if let Err(error) = self.backend.replicate(inbound) {
                            self.fail(&error);
                        }
                    }
                    Command::Snapshot(reply) => {
                        // A point in time: what was queued before it is
                        // committed (and flushed) first.
                        self.commit(std::mem::take(&mut batch));
                        let _ = reply.send(self.backend.begin_snapshot());
                    }
                    Command::Close(reply) => {
                        self.commit(batch);
                        self.persist_last_used();
                        let _ = reply.send(self.backend.close());
                        return;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = commands.try_recv().ok();
                }
            }
            self.commit(batch);
            if Instant::now() >= self.next_last_used {
                self.persist_last_used();
            }
        }
        self.persist_last_used();
        let _ = self.backend.close();
    }

    /// The next command, writing last-used times when they are due and
    /// recovering a failed backend meanwhile; `None` once every sender is
    /// gone.
    fn next(&mut self, commands: &Receiver<Command>) -> Option<Command> {
        loop {
            if self.backend.ready() {
                let wait = self
                    .next_last_used
                    .saturating_duration_since(Instant::now());
                match commands.recv_timeout(wait) {
                    Ok(command) => return Some(command),
                    Err(RecvTimeoutError::Timeout) => self.persist_last_used(),
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            } else {
                let received = commands.recv_timeout(RETRY);
                self.recover();
                match received {
                    Ok(command) => return Some(command),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        }
    }

    /// Writes the last-used times decisions recorded since the previous
    /// run, in one batch and one flush: however many decisions there were,
    /// at most one write per key per period. Best effort: a failure leaves
    /// them in memory for the next run (and starts recovery).
    fn persist_last_used(&mut self) {
        self.next_last_used = Instant::now() + self.last_used_every;
        if !self.backend.ready() {
            return;
        }
        if let Err(error) = self.backend.persist_last_used() {
            self.fail(&error);
        }
    }

    /// Commits a batch: each change is checked and committed through the
    /// backend, one flush makes the batch durable, then the index shows it
    /// and everyone is answered.
    fn commit(&mut self, batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        if !self.backend.ready() {
            for job in batch {
                let _ = job.reply.send(Err(KeyError::Unavailable));
            }
            return;
        }
        let started = Instant::now();
        let mut acked = Vec::with_capacity(batch.len());
        let mut failure = None;
        for job in batch {
            // The caller has been told "not acknowledged": do not apply it.
            if job.deadline <= started || job.reply.is_closed() {
                continue;
            }
            let operation = job.change.operation();
            match self.stage(&job) {
                Ok(staged) => acked.push(Acked {
                    reply: job.reply,
                    operation,
                    committed: staged.committed,
                }),
                Err(KeyError::Store(error)) => {
                    let _ = job.reply.send(Err(KeyError::Unavailable));
                    failure.get_or_insert(error);
                }
                Err(refused) => {
                    let _ = job.reply.send(Err(refused));
                }
            }
        }
        if acked.is_empty() && failure.is_none() {
            // Storage answered (every change was refused on its merits):
            // whatever stall was reported is over.
            self.shared.publish(StoreHealth::Healthy);
            return;
        }
        let flush = self.backend.flush(failure);
        let took = started.elapsed();
        for change in acked {
            self.metrics
                .store_write(change.operation.label(), took, flush.stands);
            let outcome = if flush.stands {
                Ok(change.committed)
            } else {
                Err(KeyError::Unavailable)
            };
            let _ = change.reply.send(outcome);
        }
        match flush.failure {
            None => self.shared.publish(StoreHealth::Healthy),
            Some(error) => self.fail(&error),
        }
    }

    /// Runs a change's rules on the backend's view of the truth and
    /// commits what they staged; again on a fresh view when the commit
    /// lost a race.
    fn stage(&mut self, job: &Job) -> Result<Staged, KeyError> {
        let rules = Rules {
            catalog: &self.catalog,
            max_per_account: self.max_per_account,
        };
        for _ in 0..MAX_ATTEMPTS {
            let mut txn = self.backend.begin(job.deadline)?;
            let staged = rules.stage(&mut *txn, &job.actor, job.change.clone())?;
            if txn.commit(&staged)? == Outcome::Committed {
                return Ok(staged);
            }
        }
        tracing::warn!(
            attempts = MAX_ATTEMPTS,
            "a key change kept losing races; not acknowledged"
        );
        Err(KeyError::Unavailable)
    }

    /// Has the backend give up its failed storage; [`Self::recover`]
    /// brings it back.
    fn fail(&mut self, error: &StoreError) {
        // Details (paths, OS messages) stay in this log line.
        tracing::error!(%error, "store write failed");
        self.shared
            .publish(StoreHealth::Failing(FailureKind::of(error)));
        self.backend.fail();
        self.last_failure_log = Some(Instant::now());
    }

    /// Has the backend reopen its storage, prove it, and reconcile what
    /// decisions see with the truth.
    fn recover(&mut self) {
        match self.backend.recover() {
            Ok(()) => self.shared.publish(StoreHealth::Healthy),
            Err(error) => {
                if self
                    .last_failure_log
                    .is_none_or(|at| at.elapsed() >= LOG_EVERY)
                {
                    tracing::warn!(%error, retry_ms = RETRY.as_millis(), "store still failing");
                    self.last_failure_log = Some(Instant::now());
                }
                self.shared
                    .publish(StoreHealth::Failing(FailureKind::of(&error)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::sync_channel;

    use super::*;
    use crate::domain::key;
    use crate::domain::scope_set::ScopeSet;
    use crate::keys::change::{Change, Lifecycle, Principal};
    use crate::keys::memory::{Memory, Truth, lock};
    use crate::keys::shared::Replication;
    use crate::store::index::Index;

    type Reply = oneshot::Receiver<Result<Committed, KeyError>>;

    struct Harness {
        writer: Writer,
        index: Arc<Index>,
        truth: Arc<Mutex<Truth>>,
        shared: Arc<Shared>,
    }

    fn harness(max_per_account: usize) -> Harness {
        let catalog = Arc::new(Catalog::sendgrid());
        let (backend, index, truth) = Memory::new(Arc::clone(&catalog));
        let metrics = Arc::new(Metrics::new());
        let shared = Shared::new(None, Replication::default(), &metrics);
        let writer = Writer::new(
            Box::new(backend),
            Arc::clone(&shared),
            catalog,
            metrics,
            (max_per_account, Duration::from_secs(3600)),
        );
        Harness {
            writer,
            index,
            truth,
            shared,
        }
    }

    fn job(change: Change, deadline: Instant) -> (Command, Reply) {
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            actor: Principal::Admin,
            change,
            deadline,
            reply,
        };
        (Command::Commit(Box::new(job)), outcome)
    }

    fn create(account: &str) -> (Command, Reply) {
        let change = Change::Create {
            account: Arc::from(account),
            name: "key".into(),
            grant: ScopeSet::default(),
            key: key::generate().expect("rng"),
            lifecycle: Lifecycle::default(),
        };
        job(change, Instant::now() + Duration::from_secs(10))
    }

    /// Queues `commands` and a close, then runs the writer until it closes.
    fn run(writer: Writer, commands: Vec<Command>) {
        let (sender, queue) = sync_channel(commands.len() + 1);
        for command in commands {
            sender.send(command).expect("queued");
        }
        let (close, _closed) = oneshot::channel();
        sender.send(Command::Close(close)).expect("queued");
        writer.run(&queue);
    }

    fn outcome(reply: Reply) -> Result<Committed, KeyError> {
        reply.blocking_recv().expect("answered")
    }

    fn healthy(shared: &Shared) -> bool {
        *shared.subscribe().borrow() == StoreHealth::Healthy
    }

    #[test]
    fn a_batch_is_committed_with_one_flush_and_answered_in_order() {
        let h = harness(10);
        let (commands, replies): (Vec<_>, Vec<_>) = (0..3).map(|_| create("acme")).unzip();
        run(h.writer, commands);
        let ids: Vec<_> = replies
            .into_iter()
            .map(|reply| outcome(reply).expect("committed").after.id)
            .collect();
        assert_eq!(lock(&h.truth).flushes, 1, "one flush for the batch");
        assert_eq!(h.index.len(), 3);
        assert!(ids.iter().all(|id| h.index.contains(id)));
    }

    #[test]
    fn the_account_limit_is_checked_at_the_commit_point() {
        let h = harness(2);
        let (commands, replies): (Vec<_>, Vec<_>) = (0..3).map(|_| create("acme")).unzip();
        let (other, other_reply) = create("other");
        let mut commands = commands;
        commands.push(other);
        run(h.writer, commands);
        let outcomes: Vec<_> = replies.into_iter().map(outcome).collect();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
        assert!(
            matches!(outcomes[2], Err(KeyError::LimitReached { limit: 2, .. })),
            "the third key of the batch sees the first two"
        );
        assert!(
            outcome(other_reply).is_ok(),
            "another account is not held up"
        );
        assert_eq!(h.index.len(), 3);
    }

    #[test]
    fn a_batch_that_is_not_durable_is_refused_shown_to_no_decision_then_recovered() {
        let h = harness(10);
        {
            let mut truth = lock(&h.truth);
            truth.fail_flush = true;
            truth.fail_recoveries = usize::MAX;
        }
        let (first, first_reply) = create("acme");
        let (sender, queue) = sync_channel(8);
        sender.send(first).expect("queued");
        let shared = Arc::clone(&h.shared);
        let truth = Arc::clone(&h.truth);
        let writer = std::thread::spawn(move || h.writer.run(&queue));
        assert!(matches!(outcome(first_reply), Err(KeyError::Unavailable)));
        assert_eq!(h.index.len(), 0, "never shown");
        let mut health = shared.subscribe();
        let failing = health.wait_for(|health| *health != StoreHealth::Healthy);
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), failing).await })
            .expect("the failure is reported")
            .expect("the writer is alive");
        lock(&truth).fail_flush = false;
        // While recovery fails, changes are refused, never attempted.
        let (second, second_reply) = create("acme");
        sender.send(second).expect("queued");
        assert!(matches!(outcome(second_reply), Err(KeyError::Unavailable)));
        lock(&truth).fail_recoveries = 0;
        // The next recovery succeeds before the change is committed.
        let (third, third_reply) = create("acme");
        sender.send(third).expect("queued");
        let id = outcome(third_reply).expect("committed").after.id;
        assert!(healthy(&shared), "recovered");
        assert_eq!(h.index.len(), 1);
        assert!(h.index.contains(&id));
        assert_eq!(
            lock(&truth).keys.len(),
            1,
            "what never became durable is gone"
        );
        drop(sender);
        writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    }

    #[test]
    fn a_commit_that_lost_a_race_runs_its_rules_again_a_bounded_number_of_times() {
        let h = harness(10);
        lock(&h.truth).races = 3;
        let (first, first_reply) = create("acme");
        run(h.writer, vec![first]);
        assert!(outcome(first_reply).is_ok());

        let h = harness(10);
        lock(&h.truth).races = MAX_ATTEMPTS;
        let (first, first_reply) = create("acme");
        run(h.writer, vec![first]);
        assert!(matches!(outcome(first_reply), Err(KeyError::Unavailable)));
        assert!(lock(&h.truth).keys.is_empty());
    }

    #[test]
    fn a_change_past_its_deadline_is_dropped_unapplied() {
        let h = harness(10);
        let change = Change::Delete {
            id: key::KeyId::from_bytes([1; 16]),
        };
        let (late, late_reply) = job(change, Instant::now());
        run(h.writer, vec![late]);
        assert!(late_reply.blocking_recv().is_err(), "no answer: dropped");
        assert_eq!(lock(&h.truth).flushes, 0, "nothing to flush");
    }

    #[test]
    fn a_failed_write_fails_its_change_and_starts_recovery() {
        let h = harness(10);
        lock(&h.truth).fail_writes = true;
        let (first, first_reply) = create("acme");
        run(h.writer, vec![first]);
        assert!(matches!(outcome(first_reply), Err(KeyError::Unavailable)));
        assert!(!healthy(&h.shared));
        assert!(lock(&h.truth).failed, "the backend let go of its storage");
        assert_eq!(h.index.len(), 0);
    }
}
