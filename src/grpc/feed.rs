//! `keyward.v1.DecisionFeed`: the key set as decisions see it, then every
//! change, for a decision point outside this process (the Envoy module,
//! `keyward-envoy`), the uses it reports back, and its leases on global
//! rate limits, traded with this sidecar's usage store. For the feed reader
//! token (`--feed-token-file`, nothing else) and the admin token.
//!
//! Bounds: at most [`MAX_WATCHERS`] streams at once; each holds the ids of
//! the snapshot it is sending (16 bytes a key), at most [`STREAM_BUFFER`]
//! events not yet taken by its reader, and its place in the change
//! broadcast ([`crate::change_log::CHANGE_LOG_BUFFER`] changes shared by all); a reader
//! that falls further behind is cut off (ABORTED) and reads again, as is
//! one that has taken nothing for [`STALL_LIMIT`] while events wait.
//!
//! Idle readers cannot lock live ones out: at the cap, a new stream
//! displaces the oldest (told ABORTED; a module reconnects, its last copy
//! deciding meanwhile). Streams that hold a slot without reading are thus
//! pushed out by every newer reader, and a reader that keeps reconnecting
//! to push others out spends a snapshot each time it does.

use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use super::feed_input::MAX_USES_PER_REPORT;
use super::feed_input::{parse_counts, parse_loans, parse_trades};
use crate::access::Authenticator;
use crate::authorizer::bearer_credential;
use crate::change_log::{Change, ChangeLog};
use crate::domain::key::{KeyId, SecretHash};
use crate::grpc::caller::authenticate;
use crate::keys::Principal;
use crate::keys::Replication;
use crate::metrics::FeedCounters;
use crate::pb::v1 as pb;
use crate::pb::v1::feed_event::Event;
use crate::refusal::invalid;
use crate::store::index::{Entry, Index};

/// Feed streams open at once (each is a whole snapshot's read).
pub const MAX_WATCHERS: usize = 16;
/// Events queued for one reader before the sender waits for it.
pub const STREAM_BUFFER: usize = 256;
/// `TradeLeases` calls served at once, and `LendCredits` calls (each up
/// to [`MAX_USES_PER_REPORT`] entries; a module makes one of each at a
/// time).
pub const MAX_LEASE_TRADE_CALLS: usize = 4;
/// How long a `LendCredits` call lends for: loans not made by then (the
/// key's turn or its reservation not in time) are answered unavailable,
/// well before a module stops waiting (2.5 s), so no loan is made to a
/// caller gone.
const LEND_PATIENCE: Duration = Duration::from_millis(1500);
/// Loans of one `LendCredits` call under way at once.
const LOANS_IN_FLIGHT: usize = 64;
/// How often an idle stream says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest a stream waits for its reader to take an event while its
/// buffer is full, before it is cut off.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Keys read from the index per step of a snapshot.
const SNAPSHOT_STEP: usize = 256;
/// How far in the future a reported use may be (clock skew).
const USE_SKEW_NANOS: i64 = 60_000_000_000;

/// The catalog and routes as loaded, sent first on every stream.
#[derive(Debug, Clone)]
pub struct Tables {
    /// Where the catalog came from (a path, or the bundled name).
    pub catalog_source: String,
    /// Its text.
    pub catalog: String,
    /// Where the routes came from.
    pub routes_source: String,
    /// Their text.
    pub routes: String,
}

/// The service. `feed` is `None` on an on-demand replica (its index holds
/// only the keys it has seen, so it has no key set to send).
#[derive(Debug, Clone)]
pub struct FeedService {
    index: Arc<Index>,
    feed: Option<Arc<ChangeLog>>,
    tables: Arc<Tables>,
    access: Authenticator,
    /// The feed reader token's hash: reads the feed, nothing else.
    reader: Option<SecretHash>,
    /// Replicated mode: whether the replica has caught up with etcd.
    replication: Option<tokio::sync::watch::Receiver<Replication>>,
    watchers: Arc<Watchers>,
    stop: tokio::sync::watch::Receiver<bool>,
    counters: FeedCounters,
    /// Where reported decision counts go (none: they are dropped).
    usage: Option<Arc<crate::usage::UsagePlane>>,
    /// `TradeLeases` calls under way.
    lease_trades: Arc<tokio::sync::Semaphore>,
    /// `LendCredits` calls under way.
    loans: Arc<tokio::sync::Semaphore>,
    /// Lends credits to modules (none: this sidecar keeps no credits).
    credits: Option<Arc<crate::usage::credits::CreditKeeper>>,
}

/// The streams open now, oldest first, each with the token that displaces
/// it.
#[derive(Debug, Default)]
struct Watchers {
    open: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Watchers {
    /// A slot for a new stream: its id and displacement token. At the cap,
    /// the oldest stream is told to end.
    fn admit(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= MAX_WATCHERS
            && let Some((_, oldest)) = open.pop_front()
        {
            oldest.cancel();
        }
        open.push_back((id, token.clone()));
        (id, token)
    }

    /// Stream `id` ended.
    fn release(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(open, _)| *open != id);
    }
}

impl FeedService {
    /// The feed of `index` (with its change `feed`), for the admin and the
    /// holder of the `reader` token; streams end when `stop` turns true.
    /// Readers are counted in `counters`.
    #[must_use]
    #[allow(clippy::too_many_arguments, reason = "wiring, called once")]
    pub fn new(
        index: Arc<Index>,
        feed: Option<Arc<ChangeLog>>,
        tables: Arc<Tables>,
        access: Authenticator,
        reader: Option<SecretHash>,
        replication: Option<tokio::sync::watch::Receiver<Replication>>,
        stop: tokio::sync::watch::Receiver<bool>,
        counters: FeedCounters,
    ) -> Self {
        Self {
            index,
            feed,
            tables,
            access,
            reader,
            replication,
            watchers: Arc::default(),
            stop,
            counters,
            usage: None,
            lease_trades: Arc::new(tokio::sync::Semaphore::new(MAX_LEASE_TRADE_CALLS)),
            loans: Arc::new(tokio::sync::Semaphore::new(MAX_LEASE_TRADE_CALLS)),
            credits: None,
        }
    }

    /// The same, lending credits out of `credits`' leases.
    #[must_use]
    pub fn with_credits(mut self, credits: Arc<crate::usage::credits::CreditKeeper>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// The same, reported decision counts summed into `usage`.
    #[must_use]
    pub fn with_usage(mut self, usage: Option<Arc<crate::usage::UsagePlane>>) -> Self {
        self.usage = usage;
        self
    }

    /// Admits the feed reader token (compared as hashes, in constant
    /// time) or the admin token; refuses API keys.
    async fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if let (Some(reader), Some(header)) =
            (&self.reader, request.metadata().get("authorization"))
        {
            let credential = bearer_credential(header.to_str().unwrap_or_default());
            if SecretHash::of(credential.as_bytes()).matches(reader) {
                return Ok(());
            }
        }
        match authenticate(&self.access, request).await? {
            Principal::Admin => Ok(()),
            Principal::Key { .. } => Err(Status::permission_denied(
                "the decision feed is for the feed reader and admin tokens only",
            )),
        }
    }
}

#[tonic::async_trait]
impl pb::decision_feed_server::DecisionFeed for FeedService {
    type WatchStream = Events;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.admin(&request).await?;
        let Some(feed) = self.feed.clone() else {
            return Err(Status::failed_precondition(
                "an on-demand replica holds only the keys it has seen: watch a standalone sidecar or a full replica",
            ));
        };
        // A replica not yet caught up with etcd (its disk copy may hold
        // keys revoked while it was down) is not a key set to copy.
        if self
            .replication
            .as_ref()
            .is_some_and(|replication| !replication.borrow().ready)
        {
            return Err(Status::unavailable(
                "the replica has not caught up with etcd yet: watch again shortly",
            ));
        }
        let (slot, displaced) = self.watchers.admit();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let events = Events {
            queued: ReceiverStream::new(rx),
            displaced: displaced.clone().cancelled_owned(),
            ended: false,
        };
        let stream = Stream {
            index: Arc::clone(&self.index),
            feed,
            tables: Arc::clone(&self.tables),
            tx,
            stop: self.stop.clone(),
            displaced,
        };
        let watchers = Arc::clone(&self.watchers);
        let counters = self.counters.clone();
        counters.readers.inc();
        tokio::spawn(async move {
            let outcome = stream.run().await;
            watchers.release(slot);
            counters.readers.dec();
            if matches!(outcome, Ended::FellBehind | Ended::Stalled) {
                counters.cut_off.inc();
            }
            tracing::debug!(?outcome, "decision feed stream ended");
        });
        Ok(Response::new(events))
    }

    async fn report_use(
        &self,
        request: Request<pb::ReportUseRequest>,
    ) -> Result<Response<pb::ReportUseResponse>, Status> {
        self.admin(&request).await?;
        let request = request.into_inner();
        let counts = parse_counts(&request.counts)?;
        let uses = request.uses;
        if uses.len() > MAX_USES_PER_REPORT {
            return Err(invalid(
                "uses",
                format!("at most {MAX_USES_PER_REPORT} per report"),
            ));
        }
        let mut parsed = Vec::with_capacity(uses.len());
        let now = crate::clock::now_nanos();
        let latest = now + USE_SKEW_NANOS;
        for (at, used) in uses.iter().enumerate() {
            let id = <[u8; 16]>::try_from(used.id.as_slice())
                .map_err(|_| invalid("uses.id", format!("entry {at}: must be 16 bytes")))?;
            if !(1..=latest).contains(&used.at_unix_nanos) {
                return Err(invalid(
                    "uses.at_unix_nanos",
                    format!("entry {at}: must be after 1970 and not in the future"),
                ));
            }
            parsed.push((KeyId::from_bytes(id), used.at_unix_nanos));
        }
        // Only uses the reporter could have decided: the key enabled and
        // not expired at the reported time (within the skew, noted as now).
        let applied = parsed
            .iter()
            .filter(|(id, at)| self.index.note_use(id, *at, now))
            .count();
        // Counts of live keys only: a key deleted since is not charged.
        let counted = self.usage.as_ref().map_or(0, |usage| {
            let live: Vec<_> = counts
                .into_iter()
                .filter(|((id, _), _)| self.index.contains(id))
                .collect();
            let applied = live.len();
            usage.add_reported(live);
            applied
        });
        Ok(Response::new(pb::ReportUseResponse {
            applied: u32::try_from(applied).unwrap_or(u32::MAX),
            counts_applied: u32::try_from(counted).unwrap_or(u32::MAX),
        }))
    }

    async fn trade_leases(
        &self,
        request: Request<pb::TradeLeasesRequest>,
    ) -> Result<Response<pb::TradeLeasesResponse>, Status> {
        self.admin(&request).await?;
        let asks = parse_trades(&request.into_inner().trades)?;
        let Ok(_turn) = self.lease_trades.try_acquire() else {
            return Err(Status::resource_exhausted(format!(
                "at most {MAX_LEASE_TRADE_CALLS} lease trade calls at once: call again next tick"
            )));
        };
        let local = || {
            self.counters.lease_trade_call(false);
            Ok(Response::new(pb::TradeLeasesResponse::default()))
        };
        let Some(usage) = &self.usage else {
            return local();
        };
        let Some(trades) = usage.trade_for(&self.index, asks).await.map_err(|error| {
            Status::unavailable(format!("the usage store did not answer: {error}"))
        })?
        else {
            return local();
        };
        self.counters.lease_trade_call(true);
        let grants = trades
            .into_iter()
            .map(|trade| {
                trade.map_or_else(pb::LeaseGrant::default, |trade| pb::LeaseGrant {
                    traded: true,
                    granted: trade.granted,
                    remaining: trade.remaining,
                    retry_after_ms: trade.retry_after_ms,
                })
            })
            .collect();
        Ok(Response::new(pb::TradeLeasesResponse {
            global: true,
            grants,
        }))
    }

    async fn lend_credits(
        &self,
        request: Request<pb::LendCreditsRequest>,
    ) -> Result<Response<pb::LendCreditsResponse>, Status> {
        self.admin(&request).await?;
        let loans = parse_loans(&request.into_inner().loans)?;
        let Some(keeper) = &self.credits else {
            return Err(Status::failed_precondition(
                "this sidecar keeps no usage credits",
            ));
        };
        let Ok(_turn) = self.loans.try_acquire() else {
            return Err(Status::resource_exhausted(format!(
                "at most {MAX_LEASE_TRADE_CALLS} loan calls at once: call again next tick"
            )));
        };
        let deadline = tokio::time::Instant::now() + LEND_PATIENCE;
        let grants = futures_util::stream::iter(loans)
            .map(|(id, loan)| async move {
                match keeper
                    .lend(id, loan.want, (loan.give, loan.period), deadline)
                    .await
                {
                    Ok((granted, period)) => pb::CreditGrant {
                        granted,
                        period,
                        unavailable: false,
                    },
                    Err(
                        crate::keys::KeyError::NotFound(_) | crate::keys::KeyError::NoCreditsLeft,
                    ) => pb::CreditGrant::default(),
                    Err(_) => pb::CreditGrant {
                        unavailable: true,
                        ..pb::CreditGrant::default()
                    },
                }
            })
            .buffered(LOANS_IN_FLIGHT)
            .collect()
            .await;
        Ok(Response::new(pb::LendCreditsResponse { grants }))
    }
}

pin_project_lite::pin_project! {
    /// What a reader receives: the stream's queued events, until it is
    /// displaced; then ABORTED at once, and the events still queued are
    /// dropped with it (a displaced reader holds nothing of keyward's).
    pub struct Events {
        #[pin]
        queued: ReceiverStream<Result<pb::FeedEvent, Status>>,
        #[pin]
        displaced: tokio_util::sync::WaitForCancellationFutureOwned,
        ended: bool,
    }
}

impl tokio_stream::Stream for Events {
    type Item = Result<pb::FeedEvent, Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.project();
        if *this.ended {
            return std::task::Poll::Ready(None);
        }
        if this.displaced.poll(cx).is_ready() {
            *this.ended = true;
            return std::task::Poll::Ready(Some(Err(displaced_status())));
        }
        this.queued.poll_next(cx)
    }
}

/// What a displaced reader is told.
fn displaced_status() -> Status {
    Status::aborted(format!(
        "displaced by a newer reader (at most {MAX_WATCHERS} decision feed streams at once): watch again"
    ))
}

/// Why a stream ended (for the debug log).
#[derive(Debug)]
enum Ended {
    ReaderGone,
    FellBehind,
    Stalled,
    Displaced,
    Stopped,
}

/// One reader's stream.
struct Stream {
    index: Arc<Index>,
    feed: Arc<ChangeLog>,
    tables: Arc<Tables>,
    tx: mpsc::Sender<Result<pb::FeedEvent, Status>>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Cancelled when a newer stream takes this one's slot.
    displaced: CancellationToken,
}

impl Stream {
    /// Queues one event for the reader: at once while the reader keeps up;
    /// otherwise waits for room, until the reader has taken nothing for
    /// [`STALL_LIMIT`] or the stream is displaced.
    async fn send(&self, event: Event) -> Result<(), Ended> {
        let event = Ok(pb::FeedEvent { event: Some(event) });
        let event = match self.tx.try_send(event) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Ended::ReaderGone),
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        tokio::select! {
            sent = tokio::time::timeout(STALL_LIMIT, self.tx.send(event)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Ended::ReaderGone),
                Err(_) => Err(self
                    .fail(Status::aborted("this reader took nothing for too long: watch again"), Ended::Stalled)),
            },
            () = self.displaced.cancelled() => Err(Ended::Displaced),
        }
    }

    fn fail(&self, status: Status, ended: Ended) -> Ended {
        let _ = self.tx.try_send(Err(status));
        ended
    }

    /// Tables, snapshot, `synced` once the changes made during the
    /// snapshot have been sent, then changes and heartbeats.
    async fn run(self) -> Ended {
        let (start, mut changes) = self.feed.subscribe();
        let tables = &self.tables;
        let sent = self
            .send(Event::Tables(pb::Tables {
                catalog_source: tables.catalog_source.clone(),
                catalog: tables.catalog.clone(),
                routes_source: tables.routes_source.clone(),
                routes: tables.routes.clone(),
            }))
            .await;
        if let Err(ended) = sent {
            return ended;
        }
        let keys = match self.snapshot().await {
            Ok(keys) => keys,
            Err(ended) => return ended,
        };
        let end = self.feed.last();
        let mut synced = false;
        if end <= start {
            if let Err(ended) = self.send(Event::Synced(pb::Synced { keys })).await {
                return ended;
            }
            synced = true;
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        if let Err(ended) = self.send(event_of(&change)).await {
                            return ended;
                        }
                        if !synced && change.seq >= end {
                            if let Err(ended) = self.send(Event::Synced(pb::Synced { keys })).await {
                                return ended;
                            }
                            synced = true;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return self
                            .fail(
                                Status::aborted("this reader fell behind the changes: watch again"),
                                Ended::FellBehind,
                            );
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ended::Stopped,
                },
                _ = heartbeat.tick() => {
                    let at = crate::clock::now_nanos();
                    if let Err(ended) = self.send(Event::Heartbeat(pb::Heartbeat { at_unix_nanos: at })).await {
                        return ended;
                    }
                }
                () = &mut stopped => {
                    return self
                        .fail(Status::unavailable("keyward is shutting down"), Ended::Stopped);
                }
                () = self.displaced.cancelled() => return Ended::Displaced,
            }
        }
    }

    /// Every live key, read a step at a time (no index guard is held
    /// across an await); returns how many were sent.
    async fn snapshot(&self) -> Result<u64, Ended> {
        let mut ids = Vec::with_capacity(self.index.len());
        self.index.for_each_id(|id| ids.push(*id));
        let mut keys = 0;
        for step in ids.chunks(SNAPSHOT_STEP) {
            let events: Vec<Event> = step
                .iter()
                .filter_map(|id| self.index.entry(id).map(|entry| put(id, &entry)))
                .collect();
            for event in events {
                self.send(event).await?;
                keys += 1;
            }
        }
        Ok(keys)
    }
}

fn event_of(change: &Change) -> Event {
    match &change.entry {
        Some(entry) => put(&change.id, entry),
        None => Event::Delete(change.id.as_bytes().to_vec()),
    }
}

/// A key's decision fields. Never a secret: hashes only.
fn put(id: &KeyId, entry: &Entry) -> Event {
    let (allowed_cidrs, allowlist_restricted) = entry.allowlist.ranges();
    // A key with credits: hashes where only a module that knows credits
    // looks (see `KeyState.credits`).
    let credits = entry.credits.is_some();
    let open = entry.previous_until > 0 && !credits;
    let hash = entry.hash.as_bytes().to_vec();
    let (secret_hash, credits_secret_hash) = if credits {
        (vec![0; 32], hash)
    } else {
        (hash, Vec::new())
    };
    Event::Put(pb::KeyState {
        id: id.as_bytes().to_vec(),
        secret_hash,
        credits_secret_hash,
        scopes: entry.scopes.to_le_bytes().to_vec(),
        account: entry.account.to_string(),
        disabled: entry.disabled,
        expires_at_unix_nanos: if entry.expires_at == crate::clock::NEVER {
            0
        } else {
            entry.expires_at
        },
        previous_hash: if open {
            entry.previous_hash.as_bytes().to_vec()
        } else {
            Vec::new()
        },
        previous_until_unix_nanos: if open { entry.previous_until } else { 0 },
        allowed_cidrs,
        allowlist_restricted,
        rate_limit: entry.limit.map(|limit| {
            let parts = limit.parts();
            pb::FeedRateLimit {
                interval_nanos: parts.interval,
                tolerance_nanos: parts.tolerance,
                requests: parts.requests,
                burst: parts.burst,
            }
        }),
        credits,
        credits_unreserved: entry.credits.as_ref().map_or(0, |held| held.unreserved),
        credits_next_refill_unix_nanos: entry.credits.as_ref().map_or(0, |held| {
            if held.next_refill == i64::MAX {
                0
            } else {
                held.next_refill
            }
        }),
        credits_period: entry.credits.as_ref().map_or(0, |held| held.period),
    })
}
