//! Replicated mode: etcd is the truth, the local store its replica.
//!
//! - **Writes** ([`Remote::commit`]) run the same rules as standalone
//!   ([`Rules`]) against etcd, then commit in one etcd transaction that
//!   compares every key the rules read (the caller's key, the target, the
//!   account's count) with the revision it was read at. If anything moved
//!   since, nothing is written and the rules run again on what is there
//!   now. So "the caller still holds its scopes", "never more than the
//!   limit" and "ids are unique" hold across every sidecar, with no lock.
//! - **Sync** ([`follow`]) is list-then-watch, as Kubernetes informers do:
//!   one full read in pages at one revision ([`Listing`]), then a watch
//!   from the next revision; both go to the key writer, the only writer of
//!   the replica and the index, at most [`PAGES_IN_FLIGHT`] pages ahead of
//!   it (memory follows a page, not the key set). After a compaction it
//!   reads everything again (also when the compaction lands during the
//!   read); after a lost connection it resumes from the last revision it
//!   delivered.
//! - **Revisions** ([`Revisions`]) make applying idempotent: a change the
//!   sidecar wrote itself is applied at once (read-your-writes) and again
//!   skipped when the watch brings it; an event at or below what the
//!   replica already holds changes nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};

use super::change::Change;
use super::change::{KeyError, Principal};
use super::shared::{Command, Shared, Synced, deliver};
use super::stage::{Rules, Staged, View, Write};
use crate::clock::now_nanos;
use crate::domain::key::KeyId;
use crate::metrics::Metrics;
use crate::store::db::StoreError;
use crate::store::etcd::{Account, Connection, Etcd, EtcdError, Listing, Mutation, Page, Watched};
use crate::store::record::{self, KeyRecord};

/// Most times a change is re-run after its transaction lost a race.
const MAX_ATTEMPTS: usize = 16;
/// How often the watch asks etcd to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the linearizable read that proves a quorum answers.
const QUORUM_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch whose progress request goes unanswered this long is dead.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect back-off bounds.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// While etcd is away, at most one log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// How much earlier than its caller's deadline a change gives up on etcd.
const REPLY_MARGIN: Duration = Duration::from_millis(100);
/// Pause between retries of a failed etcd call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for one page of a full read.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages of a full read handed to the writer and not yet applied: the
/// next page is fetched while one is applied, and no more are held.
pub const PAGES_IN_FLIGHT: usize = 2;
/// Times a failed page of a full read is asked for again before the read
/// is given up (and started again once etcd answers).
const PAGE_RETRIES: usize = 5;
/// How often a full read in progress logs how far it has got.
const READ_LOG_EVERY: Duration = Duration::from_secs(5);

/// The etcd connection and its own small runtime: etcd I/O never runs on
/// the workers that serve decisions, and the key writer thread can block
/// on it. Shut down in the background when dropped.
#[derive(Debug)]
pub struct EtcdRuntime {
    runtime: Option<Runtime>,
    etcd: Etcd,
    page_keys: u32,
}

impl EtcdRuntime {
    /// Starts the runtime and opens a (lazy) connection.
    pub fn start(connection: &Connection) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyward-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        let etcd = {
            let _entered = runtime.enter();
            Etcd::open(connection)?
        };
        Ok(Self {
            runtime: Some(runtime),
            etcd,
            page_keys: connection.page_keys,
        })
    }

    /// The writer's half.
    #[must_use]
    pub fn remote(&self) -> Remote {
        Remote {
            etcd: self.etcd.clone(),
            runtime: self.handle(),
            replica: Revisions::default(),
            page_keys: self.page_keys,
        }
    }

    /// Starts following etcd into the writer's queue, and reporting the
    /// replica's staleness.
    pub fn follow(
        &self,
        commands: SyncSender<Command>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        on_demand: bool,
    ) {
        let handle = self.handle();
        handle.spawn(report(Arc::clone(&shared), metrics));
        let reader = Reader {
            etcd: self.etcd.clone(),
            commands,
            page_keys: self.page_keys,
            pages: Arc::new(tokio::sync::Semaphore::new(PAGES_IN_FLIGHT)),
            on_demand,
        };
        handle.spawn(follow(reader, shared));
    }

    /// The etcd client.
    #[must_use]
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The runtime etcd I/O runs on.
    #[must_use]
    pub fn handle(&self) -> Handle {
        // Present until drop.
        self.runtime
            .as_ref()
            .map_or_else(Handle::current, |r| r.handle().clone())
    }
}

impl Drop for EtcdRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The key writer's connection to etcd.
#[derive(Debug)]
pub struct Remote {
    etcd: Etcd,
    runtime: Handle,
    /// What the replica holds, by revision.
    pub replica: Revisions,
    page_keys: u32,
}

impl Remote {
    /// Runs the rules against etcd and commits the change in one
    /// transaction conditioned on everything they read; returns the staged
    /// change and the revision it committed at. Waits at most until
    /// `deadline`, retrying through transient etcd errors (a member lost, a
    /// leader election); past it, [`KeyError::Unavailable`] with nothing
    /// acknowledged.
    pub fn commit(
        &mut self,
        rules: &Rules<'_>,
        actor: &Principal,
        change: &Change,
        deadline: Instant,
    ) -> Result<(Staged, i64), KeyError> {
        // Answer before the caller gives up: its timeout would report the
        // local disk as not responding.
        let deadline = deadline.checked_sub(REPLY_MARGIN).unwrap_or(deadline);
        // A transaction whose reply was lost may have committed: before
        // running the rules again, look whether its write is there.
        let mut unsure: Option<Staged> = None;
        for _ in 0..MAX_ATTEMPTS {
            if let Some(staged) = unsure.take()
                && let Some(revision) = self.landed(&staged, deadline)?
            {
                return Ok((staged, revision));
            }
            let mut view = EtcdView {
                remote: self,
                deadline,
                read: Vec::new(),
                accounts: HashMap::new(),
            };
            let staged = rules.stage(&mut view, actor, change.clone())?;
            let record = &staged.committed.after;
            let account = match staged.write {
                Write::Create | Write::Remove => view.account(&record.account)?,
                Write::Replace => Account::default(),
            };
            let mutation = match staged.write {
                Write::Create => {
                    // Ids are random; this makes uniqueness a guarantee.
                    view.read.push((view.remote.etcd.key_path(&record.id), 0));
                    Mutation::Create {
                        record,
                        account: &account,
                    }
                }
                Write::Replace => Mutation::Replace { record },
                Write::Remove => Mutation::Remove {
                    record,
                    account: &account,
                },
            };
            let read = std::mem::take(&mut view.read);
            let etcd = &self.etcd;
            match self.attempt(deadline, || etcd.commit(&read, &mutation)) {
                Ok(Some(revision)) => return Ok((staged, revision)),
                // Something the rules read changed meanwhile: run them again.
                Ok(None) => {}
                Err(Attempt::Transient) => {
                    unsure = Some(staged);
                    Self::pause(deadline)?;
                }
                Err(Attempt::Failed) => return Err(KeyError::Unavailable),
            }
        }
        tracing::warn!(
            attempts = MAX_ATTEMPTS,
            "a key change kept losing races in etcd; not acknowledged"
        );
        Err(KeyError::Unavailable)
    }

    /// Whether `staged`'s write is in etcd (then the revision to apply it
    /// at): the exact record for a create or replace, no record for a
    /// removal.
    fn landed(&self, staged: &Staged, deadline: Instant) -> Result<Option<i64>, KeyError> {
        let record = &staged.committed.after;
        let key = self.etcd.key_path(&record.id);
        let (kv, revision) = self.call(deadline, || self.etcd.get_at(&key))?;
        Ok(match (staged.write, kv) {
            (Write::Remove, None) => Some(revision),
            (Write::Create | Write::Replace, Some(kv)) if kv.value == record::encode(record) => {
                Some(kv.mod_revision)
            }
            _ => None,
        })
    }

    /// A full read of the key set, for rebuilding the replica on the
    /// writer thread ([`Self::next_page`]).
    #[must_use]
    pub fn list(&self) -> Listing {
        self.etcd.list(self.page_keys)
    }

    /// The next page of `listing`, waiting on the writer thread.
    pub fn next_page(&self, listing: &mut Listing) -> Result<Option<Page>, EtcdError> {
        self.runtime.block_on(async {
            tokio::time::timeout(PAGE_TIMEOUT, listing.next_page())
                .await
                .unwrap_or_else(|_| {
                    Err(EtcdError::Rpc(tonic::Status::deadline_exceeded(
                        "etcd did not answer a page of the full read in time",
                    )))
                })
        })
    }

    /// Runs a read from the writer thread until `deadline`, retrying
    /// through transient errors.
    fn call<T, F: Future<Output = Result<T, EtcdError>>>(
        &self,
        deadline: Instant,
        call: impl Fn() -> F,
    ) -> Result<T, KeyError> {
        loop {
            match self.attempt(deadline, &call) {
                Ok(value) => return Ok(value),
                Err(Attempt::Transient) => Self::pause(deadline)?,
                Err(Attempt::Failed) => return Err(KeyError::Unavailable),
            }
        }
    }

    /// One etcd call from the writer thread, until `deadline`; renews an
    /// expired etcd token once.
    fn attempt<T, F: Future<Output = Result<T, EtcdError>>>(
        &self,
        deadline: Instant,
        call: impl Fn() -> F,
    ) -> Result<T, Attempt> {
        self.runtime.block_on(async {
            let mut renewed = false;
            loop {
                match tokio::time::timeout_at(deadline.into(), call()).await {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(error)) => {
                        if !renewed && self.etcd.renew_if_expired(&error).await {
                            renewed = true;
                            continue;
                        }
                        tracing::debug!(%error, "etcd call failed");
                        return Err(if error.is_transient() {
                            Attempt::Transient
                        } else {
                            tracing::warn!(%error, "etcd refused a call; the change was not acknowledged");
                            Attempt::Failed
                        });
                    }
                    Err(_) => {
                        tracing::warn!(
                            "etcd did not answer in time; the change was not acknowledged"
                        );
                        return Err(Attempt::Failed);
                    }
                }
            }
        })
    }

    /// Waits a moment before retrying; `Unavailable` once past `deadline`.
    fn pause(deadline: Instant) -> Result<(), KeyError> {
        let next = Instant::now() + RETRY_PAUSE;
        if next >= deadline {
            tracing::warn!("etcd unreachable until the deadline; the change was not acknowledged");
            return Err(KeyError::Unavailable);
        }
        std::thread::sleep(RETRY_PAUSE);
        Ok(())
    }
}

/// How one etcd call failed.
enum Attempt {
    /// A lost member, a leader election, a dropped connection: try again.
    Transient,
    /// Refused, unreadable, or out of time.
    Failed,
}

/// etcd as a [`View`]: remembers every key read and its revision, for the
/// transaction's compares.
struct EtcdView<'a> {
    remote: &'a Remote,
    deadline: Instant,
    read: Vec<(Vec<u8>, i64)>,
    accounts: HashMap<String, Account>,
}

impl View for EtcdView<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        let key = self.remote.etcd.key_path(id);
        let etcd = &self.remote.etcd;
        let kv = self.remote.call(self.deadline, || etcd.get_kv(&key))?;
        self.read
            .push((key.clone(), kv.as_ref().map_or(0, |kv| kv.mod_revision)));
        kv.map(|kv| {
            record::decode(&kv.value).map_err(|error| {
                tracing::error!(key_id = %id, %error, "unreadable key record in etcd");
                KeyError::Unavailable
            })
        })
        .transpose()
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        Ok(usize::try_from(self.account(account)?.count).unwrap_or(usize::MAX))
    }
}

impl EtcdView<'_> {
    /// The account's entry as read for this change (read once, and noted
    /// for the transaction's compares).
    fn account(&mut self, account: &str) -> Result<Account, KeyError> {
        if let Some(held) = self.accounts.get(account) {
            return Ok(held.clone());
        }
        let path = self.remote.etcd.account_path(account);
        let etcd = &self.remote.etcd;
        let held = self.remote.call(self.deadline, || etcd.account(&path))?;
        self.read.push((path, held.revision));
        self.accounts.insert(account.to_owned(), held.clone());
        Ok(held)
    }
}

/// The revisions the replica holds: everything through `floor`, and some
/// keys further ahead (changes this sidecar wrote, not yet back from the
/// watch).
#[derive(Debug, Default)]
pub struct Revisions {
    floor: i64,
    ahead: HashMap<KeyId, i64>,
}

impl Revisions {
    /// What a replica held when it was last closed (or killed).
    #[must_use]
    pub fn restored(floor: i64, ahead: impl IntoIterator<Item = (KeyId, i64)>) -> Self {
        let mut restored = Self {
            floor,
            ahead: ahead.into_iter().collect(),
        };
        restored.advance(floor);
        restored
    }

    /// Whether a change to `id` at `revision` is new to the replica; if so
    /// it is noted as applied.
    pub fn admit(&mut self, id: KeyId, revision: i64) -> bool {
        if revision <= self.floor || self.ahead.get(&id).is_some_and(|r| *r >= revision) {
            return false;
        }
        self.ahead.insert(id, revision);
        true
    }

    /// Every change through `revision` has been applied.
    pub fn advance(&mut self, revision: i64) {
        self.floor = self.floor.max(revision);
        let floor = self.floor;
        self.ahead.retain(|_, r| *r > floor);
    }

    /// Whether this sidecar changed `id` after `revision` (a full read at
    /// `revision` must not overwrite it).
    #[must_use]
    pub fn changed_after(&self, id: &KeyId, revision: i64) -> bool {
        self.ahead.get(id).is_some_and(|r| *r > revision)
    }

    /// A full read as of `revision` replaces the replica; returns the keys
    /// changed here after it, whose newer state stays.
    pub fn reset(&mut self, revision: i64) -> HashSet<KeyId> {
        self.advance(revision);
        self.ahead.keys().copied().collect()
    }

    /// The revision the replica holds everything through.
    #[must_use]
    pub fn floor(&self) -> i64 {
        self.floor
    }
}

/// What follows etcd into the writer's queue.
struct Reader {
    etcd: Etcd,
    commands: SyncSender<Command>,
    page_keys: u32,
    /// Turns for pages handed to the writer ([`PAGES_IN_FLIGHT`]).
    pages: Arc<tokio::sync::Semaphore>,
    /// An on-demand replica: no full read, a watch from now.
    on_demand: bool,
}

/// Follows etcd into the writer's queue until the writer is gone:
/// list-then-watch, reconnecting with back-off.
async fn follow(reader: Reader, shared: Arc<Shared>) {
    // A replica that synced before a restart serves (is ready) only once
    // etcd proves unreachable: while etcd answers, readiness waits for the
    // first full read, so keys revoked meanwhile are never served as ready.
    let (replica_synced, revision) = {
        let state = *shared.replication().borrow();
        (state.synced_at != 0, state.revision)
    };
    // Reachable at start, etcd is read in full: readiness needs proof that
    // the replica caught up, and a resumed watch cannot give it (etcd
    // before 3.5.8 may confirm progress on a watch still replaying its
    // history: etcd-io/etcd#15220). Unreachable, the replica serves, and
    // once etcd is back the watch resumes where the replica left off (a
    // full read only if that history was compacted).
    let etcd = &reader.etcd;
    let mut resume = None;
    let mut backoff = BACKOFF.0;
    let mut lost: Option<Instant> = None;
    loop {
        match follow_once(&reader, &shared, &mut resume).await {
            Ok(Followed::WriterGone) => return,
            Ok(Followed::Compacted) => {
                tracing::warn!(
                    "etcd compacted past the replica's revision; reading everything again"
                );
                resume = None;
            }
            Err(EtcdError::Compacted(_)) => {
                tracing::warn!(
                    retry_ms = backoff.as_millis(),
                    "etcd compacted the revision of the full read in progress; reading everything again at a newer revision (the replica is not ready on a partial read)"
                );
                resume = None;
                // Compaction that keeps outrunning the read: back off, so
                // the retries do not add to etcd's load (keep etcd's
                // history longer than a full read takes).
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
            Err(error) => {
                shared.lost();
                if replica_synced && shared.serve_replica() {
                    tracing::info!(
                        revision,
                        "serving the replica; the watch will resume from its revision"
                    );
                    resume.get_or_insert(revision);
                }
                if lost.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    if error.is_transient() {
                        tracing::warn!(%error, "etcd unreachable: decisions continue from the local replica, writes are refused");
                    } else {
                        tracing::error!(%error, "etcd refused the replica's read: decisions continue from the local replica, writes are refused");
                    }
                    lost = Some(Instant::now());
                }
                if !etcd.renew_if_expired(&error).await {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
                continue;
            }
        }
        backoff = BACKOFF.0;
    }
}

/// Why one watch ended without an error.
enum Followed {
    Compacted,
    WriterGone,
}

/// Reads the whole key set in pages into the writer's queue; the revision
/// it is the state at, or `None` once the writer is gone.
async fn read_everything(reader: &Reader) -> Result<Option<i64>, EtcdError> {
    let mut listing = reader.etcd.list(reader.page_keys);
    let started = Instant::now();
    let mut logged = started;
    let (mut keys, mut pages) = (0_usize, 0_usize);
    while let Some(page) = next_page(&mut listing).await? {
        let permit = Arc::clone(&reader.pages)
            .acquire_owned()
            .await
            .map_err(|_| EtcdError::Value {
                key: "keys".into(),
                problem: "the page turns were closed".into(),
            })?;
        if page.first {
            tracing::info!(
                revision = page.revision,
                page_keys = listing.page_keys(),
                "reading the key set from etcd, page by page"
            );
        }
        keys += page.records.len();
        pages += 1;
        let (revision, last) = (page.revision, page.last);
        if !deliver(&reader.commands, Synced::Page { page, permit }).await {
            return Ok(None);
        }
        if last {
            tracing::info!(
                keys,
                pages,
                revision,
                elapsed_ms = started.elapsed().as_millis(),
                "read the key set from etcd"
            );
            return Ok(Some(revision));
        }
        if logged.elapsed() >= READ_LOG_EVERY {
            logged = Instant::now();
            tracing::info!(
                keys,
                pages,
                elapsed_ms = started.elapsed().as_millis(),
                "reading the key set from etcd"
            );
        }
    }
    // A listing ends with a page marked last.
    Err(EtcdError::Value {
        key: "keys".into(),
        problem: "the full read ended without its last page".into(),
    })
}

/// The next page of `listing`, retrying a transient failure (a member
/// lost, a leader election) a few times on the same listing: the pages
/// already applied stay good, so the read goes on from where it was.
async fn next_page(listing: &mut Listing) -> Result<Option<Page>, EtcdError> {
    let mut backoff = BACKOFF.0;
    let mut tries = 0;
    loop {
        match listing.next_page().await {
            Err(error) if error.is_transient() && tries < PAGE_RETRIES => {
                tries += 1;
                tracing::debug!(%error, tries, "a page of the full read failed; asking again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
            outcome => return outcome,
        }
    }
}

async fn follow_once(
    reader: &Reader,
    shared: &Shared,
    resume: &mut Option<i64>,
) -> Result<Followed, EtcdError> {
    let (etcd, commands) = (&reader.etcd, &reader.commands);
    etcd.authenticate().await?;
    if reader.on_demand && resume.is_none() {
        // Nothing to read: keys are fetched as presented. Ready once the
        // watch is up, however many keys etcd holds.
        let revision = etcd.current_revision().await?;
        let watch = etcd.watch(revision + 1).await?;
        if !deliver(commands, Synced::Reset { revision }).await {
            return Ok(Followed::WriterGone);
        }
        *resume = Some(revision);
        return watch_from(reader, shared, watch, resume).await;
    }
    let start = if let Some(revision) = *resume {
        revision + 1
    } else {
        let Some(revision) = read_everything(reader).await? else {
            return Ok(Followed::WriterGone);
        };
        *resume = Some(revision);
        revision + 1
    };
    let watch = etcd.watch(start).await?;
    watch_from(reader, shared, watch, resume).await
}

/// Delivers what `watch` brings until it fails (or the writer is gone),
/// and proves once a second that it is current.
async fn watch_from(
    reader: &Reader,
    shared: &Shared,
    mut watch: crate::store::etcd::Watch,
    resume: &mut Option<i64>,
) -> Result<Followed, EtcdError> {
    let (etcd, commands) = (&reader.etcd, &reader.commands);
    // Current means: a linearizable read saw revision R at time T, and the
    // watch then confirmed it had delivered everything through R. A member
    // cut off from its quorum fails the read, so its staleness grows.
    let mut check: Option<Check> = None;
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            batch = watch.next() => {
                let Some(batch) = batch? else {
                    return Err(EtcdError::Value { key: "watch".into(), problem: "etcd closed the watch".into() });
                };
                let mut changes = Vec::with_capacity(batch.len());
                let mut confirmed = None;
                for watched in batch {
                    match watched {
                        Watched::Compacted { .. } => return Ok(Followed::Compacted),
                        Watched::Progress { revision } => {
                            if let Some(done) = check.take() && revision >= done.revision {
                                // Behind the events already queued: current
                                // once the writer has applied them.
                                confirmed = Some(done.read_at);
                            }
                        }
                        Watched::Put { revision, .. } | Watched::Deleted { revision, .. } => {
                            *resume = Some(revision);
                            changes.push(watched);
                        }
                    }
                }
                if !changes.is_empty() && !deliver(commands, Synced::Events(changes)).await {
                    return Ok(Followed::WriterGone);
                }
                if let Some(read_at) = confirmed
                    && !deliver(commands, Synced::Current { read_at }).await
                {
                    return Ok(Followed::WriterGone);
                }
            }
            _ = ticks.tick() => {
                if let Some(pending) = &check {
                    if pending.asked.elapsed() >= PROGRESS_TIMEOUT {
                        return Err(EtcdError::Value { key: "watch".into(), problem: "no progress from etcd".into() });
                    }
                    continue;
                }
                let read_at = now_nanos();
                match tokio::time::timeout(QUORUM_TIMEOUT, etcd.current_revision()).await {
                    Ok(Ok(revision)) => {
                        watch.request_progress().await?;
                        check = Some(Check { revision, read_at, asked: Instant::now() });
                    }
                    Ok(Err(error)) if !error.is_transient() => return Err(error),
                    // No quorum (or no answer): keep the watch, not current.
                    _ => shared.lost(),
                }
            }
        }
    }
}

/// A pending "is the watch current?" check.
struct Check {
    /// The cluster's revision at `read_at`.
    revision: i64,
    /// When it was read (Unix nanos).
    read_at: i64,
    /// When the watch was asked for its progress.
    asked: Instant,
}

/// Keeps the replica metrics current: at every change, and once a second
/// (staleness grows with time alone).
async fn report(shared: Arc<Shared>, metrics: Arc<Metrics>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut replication = shared.replication();
    loop {
        let state = *replication.borrow_and_update();
        metrics.set_replication(
            state.synced_at,
            state.connected,
            state.revision,
            now_nanos(),
        );
        tokio::select! {
            changed = replication.changed() => if changed.is_err() { return },
            _ = ticks.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    #[test]
    fn a_change_is_applied_once_and_never_rolled_back() {
        let mut replica = Revisions::default();
        replica.advance(10);
        assert!(!replica.admit(id(1), 9), "below the floor: already held");
        assert!(!replica.admit(id(1), 10));
        // This sidecar's own write at 20, ahead of the watch...
        assert!(replica.admit(id(1), 20));
        // ...then the watch brings an older change to the same key, and the
        // write itself: neither applies again.
        assert!(!replica.admit(id(1), 17));
        assert!(!replica.admit(id(1), 20));
        // Other keys in between still apply, each once.
        assert!(replica.admit(id(2), 18));
        assert!(!replica.admit(id(2), 18));
        replica.advance(20);
        assert!(
            replica.ahead.is_empty(),
            "nothing ahead of the floor is kept"
        );
        assert!(replica.admit(id(1), 21));
    }

    #[test]
    fn a_full_read_keeps_only_what_this_sidecar_wrote_after_it() {
        let mut replica = Revisions::default();
        assert!(replica.admit(id(1), 5));
        assert!(replica.admit(id(2), 30));
        let newer = replica.reset(25);
        assert_eq!(newer, HashSet::from([id(2)]), "written after the read");
        assert!(!replica.admit(id(1), 25), "the read covers it");
        assert!(!replica.admit(id(2), 28), "older than the local write");
        assert!(replica.admit(id(3), 26));
    }

    #[test]
    fn a_restored_replica_skips_what_it_held_before_the_restart() {
        let mut replica = Revisions::restored(10, [(id(1), 12), (id(2), 9)]);
        assert_eq!(replica.floor, 10);
        assert!(!replica.admit(id(1), 11), "older than the key's own write");
        assert!(!replica.admit(id(1), 12), "the write itself, replayed");
        assert!(replica.admit(id(1), 13));
        assert!(!replica.admit(id(2), 10), "at the floor");
        assert!(replica.admit(id(3), 11));
    }
}
