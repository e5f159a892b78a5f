//! The replica's watcher: etcd's key set as a [`Stream`] of [`Event`]s,
//! list-then-watch, as kube-rs's `watcher()` turns the Kubernetes API into
//! a stream (its `Init`, `InitApply`, `InitDone`, `Apply` and `Delete`).
//!
//! - **A full read** in pages at one revision ([`Listing`]): `Init`, one
//!   `InitPage` per page, `InitDone`; then a watch from the next revision.
//!   A failed page is asked for again a few times on the same listing.
//! - **The watch** delivers puts and deletes in revision order
//!   ([`Event::Changes`]), and once a second proves it is current: a
//!   linearizable read sees revision R at time T, the watch then confirms
//!   it has delivered everything through R ([`Event::Current`]). A member
//!   cut off from its quorum fails the read ([`Event::Unconfirmed`]).
//! - **After a compaction** (of the watch's history, or of a full read's
//!   revision while it runs) everything is read again; **after an error**
//!   the watch resumes from the last revision it delivered. Errors are
//!   items of the stream, which goes on: [`backoff`] wraps it to wait
//!   between attempts, as kube-rs's `StreamBackoff` does.
//! - **On demand** there is no full read: a watch from now
//!   ([`Event::Watching`]).
//!
//! The reflector (`keys::reflector`) is the stream's one consumer.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::stream::{self, Stream, StreamExt};
use tokio::time::Interval;

use crate::clock::now_nanos;
use crate::store::etcd::{Etcd, EtcdError, Listing, Page, Watch, Watched};

/// How often the watch asks etcd to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the linearizable read that proves a quorum answers.
const QUORUM_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch whose progress request goes unanswered this long is dead.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off bounds between failed attempts (and a failed page's retries).
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// Times a failed page of a full read is asked for again before the read
/// is given up (and started again once etcd answers).
const PAGE_RETRIES: usize = 5;
/// How often a full read in progress logs how far it has got.
const READ_LOG_EVERY: Duration = Duration::from_secs(5);

/// What the watcher delivers, in order.
#[derive(Debug)]
pub enum Event {
    /// A full read begins, at `revision`.
    Init {
        /// The revision every page is at.
        revision: i64,
    },
    /// One page of the full read.
    InitPage(Page),
    /// The full read is complete: it held everything etcd had at `revision`.
    InitDone {
        /// Its revision.
        revision: i64,
    },
    /// On demand: a watch starts after `revision`, with no full read.
    Watching {
        /// The revision the watch starts after.
        revision: i64,
    },
    /// Puts and deletes in revision order: everything through the last
    /// one's revision has been delivered.
    Changes(Vec<Watched>),
    /// Everything the cluster held at `read_at` (Unix nanos, a
    /// linearizable read) was delivered before this.
    Current {
        /// When the cluster's revision was read.
        read_at: i64,
    },
    /// etcd's quorum could not be heard: the watch goes on, but nothing
    /// proves it current.
    Unconfirmed,
}

/// How to follow etcd.
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    /// Keys per page of a full read.
    pub page_keys: u32,
    /// Hold only the keys presented: no full read, a watch from now.
    pub on_demand: bool,
    /// A replica restored from disk that had synced, at this revision: if
    /// etcd fails before a full read completes, the watch resumes from it
    /// (the replica serves meanwhile).
    pub restored: Option<i64>,
}

/// etcd's key set as a stream of events; errors are items, and the stream
/// goes on after them (wrap it in [`backoff`]).
pub fn watcher(etcd: Etcd, config: Config) -> impl Stream<Item = Result<Event, EtcdError>> + Send {
    let watcher = Watcher {
        etcd,
        config,
        fallback: config.restored,
        resume: None,
        state: State::Start,
        pending: VecDeque::new(),
    };
    stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.step().await;
        Some((item, watcher))
    })
}

/// Waits between attempts after an error: from [`BACKOFF`]'s lower bound,
/// doubling up to its upper one, reset by the next event. An expired etcd
/// token is renewed instead of waited out.
pub fn backoff<S>(events: S, etcd: Etcd) -> impl Stream<Item = Result<Event, EtcdError>> + Send
where
    S: Stream<Item = Result<Event, EtcdError>> + Send,
{
    let events = Box::pin(events);
    stream::unfold(
        (events, etcd, BACKOFF.0, None),
        |(mut events, etcd, mut delay, armed)| async move {
            if let Some(wait) = armed {
                tokio::time::sleep(wait).await;
            }
            let item = events.next().await?;
            let armed = match &item {
                Ok(_) => {
                    delay = BACKOFF.0;
                    None
                }
                Err(error) if etcd.renew_if_expired(error).await => None,
                Err(_) => {
                    let wait = delay;
                    delay = (delay * 2).min(BACKOFF.1);
                    Some(wait)
                }
            };
            Some((item, (events, etcd, delay, armed)))
        },
    )
}

/// The watcher's state machine.
struct Watcher {
    etcd: Etcd,
    config: Config,
    /// See [`Config::restored`]: used at most once, before a read completes.
    fallback: Option<i64>,
    /// The last revision delivered: a new watch starts after it.
    resume: Option<i64>,
    state: State,
    /// Events ready to hand out.
    pending: VecDeque<Event>,
}

enum State {
    /// Next: authenticate, then a full read, or a watch.
    Start,
    /// A full read in progress.
    Listing(Box<Read>),
    /// A watch in progress.
    Watching(Box<Following>),
}

/// A full read and how far it has got.
struct Read {
    listing: Listing,
    started: Instant,
    logged: Instant,
    keys: usize,
    pages: usize,
}

/// A watch, and its pending "is it current?" check.
struct Following {
    watch: Watch,
    check: Option<Check>,
    ticks: Interval,
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

impl Watcher {
    /// The next event, or the error that ended an attempt (the next call
    /// starts another).
    async fn step(&mut self) -> Result<Event, EtcdError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let state = std::mem::replace(&mut self.state, State::Start);
            let advanced = match state {
                State::Start => self.start().await,
                State::Listing(read) => self.read(read).await,
                State::Watching(following) => self.follow(*following).await,
            };
            if let Err(error) = advanced {
                self.failed(&error);
                return Err(error);
            }
        }
    }

    /// An attempt failed: the next one starts over, from the last revision
    /// delivered (or the restored replica's, before any read completed).
    fn failed(&mut self, error: &EtcdError) {
        self.state = State::Start;
        match error {
            EtcdError::Compacted(_) => {
                tracing::warn!(
                    "etcd compacted the revision of the full read in progress; reading everything again at a newer revision (the replica is not ready on a partial read)"
                );
                self.resume = None;
            }
            _ => {
                if let Some(revision) = self.fallback.take() {
                    tracing::info!(
                        revision,
                        "serving the replica; the watch will resume from its revision"
                    );
                    self.resume.get_or_insert(revision);
                }
            }
        }
    }

    /// Reachable, etcd is read in full unless a watch can resume: readiness
    /// needs proof that the replica caught up, and a resumed watch cannot
    /// give it at start (etcd before 3.5.8 may confirm progress on a watch
    /// still replaying its history: etcd-io/etcd#15220).
    async fn start(&mut self) -> Result<(), EtcdError> {
        self.etcd.authenticate().await?;
        if self.config.on_demand && self.resume.is_none() {
            // Nothing to read: keys are fetched as presented. Ready once
            // the watch is up, however many keys etcd holds.
            let revision = self.etcd.current_revision().await?;
            let watch = self.etcd.watch(revision + 1).await?;
            self.pending.push_back(Event::Watching { revision });
            self.resume = Some(revision);
            self.state = State::Watching(Box::new(Following::new(watch)));
            return Ok(());
        }
        if let Some(revision) = self.resume {
            let watch = self.etcd.watch(revision + 1).await?;
            self.state = State::Watching(Box::new(Following::new(watch)));
        } else {
            self.state = State::Listing(Box::new(Read {
                listing: self.etcd.list(self.config.page_keys),
                started: Instant::now(),
                logged: Instant::now(),
                keys: 0,
                pages: 0,
            }));
        }
        Ok(())
    }

    /// The next page of a full read.
    async fn read(&mut self, mut read: Box<Read>) -> Result<(), EtcdError> {
        let Some(page) = next_page(&mut read.listing).await? else {
            // A listing ends with a page marked last.
            return Err(EtcdError::Unexpected(
                "the full read ended without its last page",
            ));
        };
        let (revision, last) = (page.revision, page.last);
        if page.first {
            tracing::info!(
                revision,
                page_keys = read.listing.page_keys(),
                "reading the key set from etcd, page by page"
            );
            self.pending.push_back(Event::Init { revision });
        }
        read.keys += page.records.len();
        read.pages += 1;
        self.pending.push_back(Event::InitPage(page));
        if last {
            tracing::info!(
                keys = read.keys,
                pages = read.pages,
                revision,
                elapsed_ms = read.started.elapsed().as_millis(),
                "read the key set from etcd"
            );
            self.pending.push_back(Event::InitDone { revision });
            self.resume = Some(revision);
            self.fallback = None;
            return Ok(());
        }
        if read.logged.elapsed() >= READ_LOG_EVERY {
            read.logged = Instant::now();
            tracing::info!(
                keys = read.keys,
                pages = read.pages,
                elapsed_ms = read.started.elapsed().as_millis(),
                "reading the key set from etcd"
            );
        }
        self.state = State::Listing(read);
        Ok(())
    }

    /// What the watch brings next, or its once-a-second check.
    async fn follow(&mut self, mut following: Following) -> Result<(), EtcdError> {
        tokio::select! {
            batch = following.watch.next() => {
                let Some(batch) = batch? else {
                    return Err(EtcdError::WatchClosed);
                };
                if self.delivered(batch, &mut following.check) {
                    self.state = State::Watching(Box::new(following));
                }
            }
            _ = following.ticks.tick() => {
                self.check(&mut following).await?;
                self.state = State::Watching(Box::new(following));
            }
        }
        Ok(())
    }

    /// Queues one watch response's changes, and `Current` if it answers
    /// the pending check; `false` if etcd compacted the watch's history
    /// (everything is read again).
    fn delivered(&mut self, batch: Vec<Watched>, check: &mut Option<Check>) -> bool {
        let mut changes = Vec::with_capacity(batch.len());
        let mut confirmed = None;
        for watched in batch {
            match watched {
                Watched::Compacted { .. } => {
                    tracing::warn!(
                        "etcd compacted past the replica's revision; reading everything again"
                    );
                    self.resume = None;
                    return false;
                }
                Watched::Progress { revision } => {
                    if let Some(done) = check.take()
                        && revision >= done.revision
                    {
                        // Behind the changes already queued: current once
                        // they are applied.
                        confirmed = Some(done.read_at);
                    }
                }
                Watched::Put { revision, .. } | Watched::Deleted { revision, .. } => {
                    self.resume = Some(revision);
                    changes.push(watched);
                }
            }
        }
        if !changes.is_empty() {
            self.pending.push_back(Event::Changes(changes));
        }
        if let Some(read_at) = confirmed {
            self.pending.push_back(Event::Current { read_at });
        }
        true
    }

    /// Once a second: asks etcd's quorum for its revision and the watch
    /// for its progress; a progress request unanswered for too long ends
    /// the watch.
    async fn check(&mut self, following: &mut Following) -> Result<(), EtcdError> {
        if let Some(pending) = &following.check {
            if pending.asked.elapsed() >= PROGRESS_TIMEOUT {
                return Err(EtcdError::NoProgress(PROGRESS_TIMEOUT));
            }
            return Ok(());
        }
        let read_at = now_nanos();
        match tokio::time::timeout(QUORUM_TIMEOUT, self.etcd.current_revision()).await {
            Ok(Ok(revision)) => {
                following.watch.request_progress().await?;
                following.check = Some(Check {
                    revision,
                    read_at,
                    asked: Instant::now(),
                });
            }
            Ok(Err(error)) if !error.is_transient() => return Err(error),
            // No quorum (or no answer): keep the watch, not current.
            _ => self.pending.push_back(Event::Unconfirmed),
        }
        Ok(())
    }
}

impl Following {
    fn new(watch: Watch) -> Self {
        Self {
            watch,
            check: None,
            ticks: tokio::time::interval(PROGRESS_EVERY),
        }
    }
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
