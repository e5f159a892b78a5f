//! The thread that keeps the copy: reads the sidecar's decision feed
//! (tables, snapshot, `synced`, then changes), builds a fresh copy on every
//! (re)connect and swaps it in whole at `synced` (the old copy decides
//! until then), applies changes to the live copy, reports uses back, and
//! trades leases on global rate limits ([`crate::trade`]).
//! It owns a small single-threaded tokio runtime; Envoy's workers never
//! wait for it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use keyward_core::clock;
use keyward_core::decide::Decider;
use keyward_core::domain::allowlist::Allowlist;
use keyward_core::domain::catalog::Catalog;
use keyward_core::domain::key::{KeyId, SecretHash};
use keyward_core::domain::rate::{Gcra, GcraParts};
use keyward_core::domain::route::RouteTable;
use keyward_core::domain::scope_set::ScopeSet;
use keyward_core::index::{CreditsHeld, Entry, Index, Usage};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::copy::{Copy, Shared};
use crate::pb::decision_feed_client::DecisionFeedClient;
use crate::pb::feed_event::Event;
use crate::pb::{FeedEvent, KeyCounts, KeyState, KeyUse, ReportUseRequest, WatchRequest};
use keyward_core::counts::label;

/// Longest wait between attempts to reach the sidecar.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A stream up this long was healthy: the next attempt starts at once.
const STEADY: Duration = Duration::from_secs(30);
/// The sidecar sends a heartbeat each second: this long without a word
/// means the stream is dead, however alive the connection looks.
const SILENCE: Duration = Duration::from_secs(5);
/// While the sidecar is away, how often the log says how stale the copy is.
const STALE_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest a report may take, connecting included.
const REPORT_DEADLINE: Duration = Duration::from_secs(5);
/// Uses sent per report at most (the sidecar's limit).
const MAX_USES_PER_REPORT: usize = 10_000;

/// One line on Envoy's stderr, marked as the module's. (Envoy's log
/// callback is for worker threads; this runs on the module's own.)
pub fn log(message: &str) {
    eprintln!("keyward-envoy: {message}");
}

/// Starts the sync thread for `shared`; `uses` is the receiving end of its
/// use reports, `enlisted` of its roster (keys whose leases to trade).
pub fn start(
    shared: Arc<Shared>,
    uses: Receiver<(KeyId, i64)>,
    enlisted: Receiver<KeyId>,
    waiting: Receiver<crate::credits::Waiter>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keyward-sync".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => return log(&format!("cannot start: {error}")),
            };
            runtime.block_on(run(shared, uses, enlisted, waiting));
        })
        .map(drop)
}

async fn run(
    shared: Arc<Shared>,
    uses: Receiver<(KeyId, i64)>,
    enlisted: Receiver<KeyId>,
    waiting: Receiver<crate::credits::Waiter>,
) {
    let reporter = tokio::spawn(report_uses(Arc::clone(&shared), uses));
    let trader = tokio::spawn(crate::trade::trade_leases(Arc::clone(&shared), enlisted));
    let keeper = tokio::spawn(crate::credits::keep_credits(Arc::clone(&shared), waiting));
    let mut backoff = Duration::from_millis(50);
    let mut last_stale_log: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut synced_at = None;
        if let Err(problem) = follow(&shared, &mut synced_at).await {
            let was_live = shared.live.swap(false, Ordering::Relaxed);
            // A stream that stayed up a while: try again at once. One that
            // synced and broke at once keeps backing off (no snapshot storm).
            if synced_at.is_some_and(|at: Instant| at.elapsed() >= STEADY) {
                backoff = Duration::from_millis(50);
            }
            if was_live || last_stale_log.is_none_or(|at| at.elapsed() >= STALE_LOG_EVERY) {
                last_stale_log = Some(Instant::now());
                log_staleness(&shared, &problem);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    reporter.abort();
    trader.abort();
    // The keeper gives every credit lease back once it sees the stop (a
    // loan call under way first: 2.5 s at most each).
    let _ = tokio::time::timeout(Duration::from_secs(6), keeper).await;
}

/// Says what decisions are made from while the sidecar is away.
fn log_staleness(shared: &Shared, problem: &str) {
    let heard = shared.heard.load(Ordering::Relaxed);
    let silent_ms = if heard == 0 {
        0
    } else {
        (clock::now_nanos() - heard) / 1_000_000
    };
    match shared.copy.load().as_ref() {
        Some(copy) => log(&format!(
            "sidecar feed lost ({problem}): deciding from the copy of {} keys, last heard from {silent_ms} ms ago",
            copy.decider.index().len()
        )),
        None => log(&format!(
            "sidecar feed unavailable ({problem}): refusing every request until the first sync"
        )),
    }
}

pub(crate) async fn connect(shared: &Shared) -> Result<Channel, String> {
    Endpoint::from_str(&shared.settings.sidecar)
        .map_err(|e| format!("sidecar address: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // The sidecar closes connections it reads nothing from: pings
        // keep a quiet feed open.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))
}

pub(crate) fn bearer<T>(shared: &Shared, message: T) -> Result<tonic::Request<T>, String> {
    let path = &shared.settings.token_file;
    let token =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| format!("token file {}: not a token", path.display()))?;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// Why a call to the sidecar failed: whether the sidecar may have applied
/// it (anything but a refusal made before anything moved), and whether the
/// connection is to be dropped (the transport failed, or no answer came).
#[derive(Clone, Debug)]
pub(crate) struct CallFailed {
    pub problem: String,
    pub maybe_applied: bool,
    pub reconnect: bool,
}

impl std::fmt::Display for CallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problem)
    }
}

/// One unary call to the sidecar (`rpc`, on a client for `client`'s
/// connection, made first if need be), with the token, within `deadline`
/// in all.
pub(crate) async fn call_sidecar<T, R, Fut>(
    shared: &Shared,
    client: &mut Option<DecisionFeedClient<Channel>>,
    deadline: Duration,
    message: T,
    rpc: impl FnOnce(DecisionFeedClient<Channel>, tonic::Request<T>) -> Fut,
) -> Result<R, CallFailed>
where
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let failed = |problem: String, maybe_applied: bool, reconnect: bool| CallFailed {
        problem,
        maybe_applied,
        reconnect,
    };
    let called = tokio::time::timeout(deadline, async {
        if client.is_none() {
            // Not connected: nothing was sent.
            let channel = connect(shared)
                .await
                .map_err(|problem| failed(problem, false, true))?;
            *client = Some(DecisionFeedClient::new(channel));
        }
        let feed = client
            .clone()
            .ok_or_else(|| failed("no connection".into(), false, true))?;
        let request = bearer(shared, message).map_err(|problem| failed(problem, false, false))?;
        rpc(feed, request).await.map_err(|status| {
            let code = status.code();
            failed(
                if code == tonic::Code::Unimplemented {
                    "the sidecar does not know this call (a version older than this module)".into()
                } else {
                    status.message().to_owned()
                },
                !matches!(
                    code,
                    tonic::Code::InvalidArgument
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unimplemented
                ),
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
            )
        })
    })
    .await
    .unwrap_or_else(|_| Err(failed(format!("no answer within {deadline:?}"), true, true)));
    if called.as_ref().is_err_and(|failure| failure.reconnect) {
        *client = None;
    }
    called.map(tonic::Response::into_inner)
}

/// One stream, from connect to its end (always an error: the feed never
/// ends on its own).
async fn follow(shared: &Shared, synced_at: &mut Option<Instant>) -> Result<(), String> {
    let channel = connect(shared).await?;
    let mut stream = DecisionFeedClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .watch(bearer(shared, WatchRequest {})?)
        .await
        .map_err(|status| format!("watch: {}", status.message()))?
        .into_inner();
    let started = Instant::now();
    let mut building: Option<Building> = None;
    // One shared name per account, as the sidecar's index keeps them.
    let mut accounts: HashMap<String, Arc<str>> = HashMap::new();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let message = tokio::time::timeout(SILENCE, stream.message())
            .await
            .map_err(|_| format!("no word from the sidecar for {SILENCE:?}"))?;
        let event = match message {
            Ok(Some(FeedEvent { event: Some(event) })) => event,
            Ok(Some(FeedEvent { event: None })) => continue,
            Ok(None) => return Err("the sidecar ended the feed".into()),
            Err(status) => return Err(format!("feed: {}", status.message())),
        };
        // The copy deciding is current only while it takes this stream's
        // changes: a resync that never completes must not look fresh.
        if building.is_none() {
            shared.heard.store(clock::now_nanos(), Ordering::Relaxed);
        }
        match event {
            Event::Tables(tables) => {
                let catalog = Catalog::parse(&tables.catalog_source, &tables.catalog)
                    .map_err(|e| format!("the sidecar's catalog: {e}"))?;
                let routes = RouteTable::parse(&tables.routes_source, &tables.routes, &catalog)
                    .map_err(|e| format!("the sidecar's routes: {e}"))?;
                building = Some(Building {
                    catalog: Arc::new(catalog),
                    routes: Arc::new(routes),
                    index: Arc::new(Index::default()),
                });
            }
            Event::Put(key) => {
                let account = Arc::clone(
                    accounts
                        .entry(key.account.clone())
                        .or_insert_with(|| Arc::from(key.account.as_str())),
                );
                let (id, entry) = entry_of(&key, account)?;
                apply(shared, building.as_ref(), id, Some(entry))?;
            }
            Event::Delete(id) => apply(shared, building.as_ref(), key_id(&id)?, None)?,
            Event::Synced(synced) => {
                let Some(built) = building.take() else {
                    return Err("synced before the tables".into());
                };
                let keys = built.index.len();
                shared.copy.store(Some(Arc::new(Copy {
                    decider: Decider::new(built.index, built.routes)
                        .with_global_limits(Arc::clone(&shared.global))
                        .with_roster(shared.roster.clone()),
                    catalog: built.catalog,
                })));
                shared.live.store(true, Ordering::Relaxed);
                shared.heard.store(clock::now_nanos(), Ordering::Relaxed);
                *synced_at = Some(Instant::now());
                log(&format!(
                    "synced {keys} keys (snapshot said {}) in {} ms",
                    synced.keys,
                    started.elapsed().as_millis()
                ));
            }
            Event::Heartbeat(_) => {}
        }
    }
}

/// A key's new state (`None`: no longer live) into the copy deciding, and
/// into the one being read if any: while a new copy is read, the old one
/// decides and takes every key state too (a revocation reaches it at once).
fn apply(
    shared: &Shared,
    building: Option<&Building>,
    id: KeyId,
    entry: Option<Entry>,
) -> Result<(), String> {
    let live = live_index(shared);
    let Some(building) = building else {
        let live = live?;
        match entry {
            Some(entry) => live.replace(id, entry),
            None => live.remove(&id),
        }
        return Ok(());
    };
    let mut entry = entry;
    if let Ok(live) = live {
        match &mut entry {
            Some(entry) => {
                live.replace(id, entry.clone());
                // The new copy takes over the key's per-request state (its
                // leases, its limiter): a resync neither forgets a debt to
                // the shared budget nor starts a budget afresh.
                if let Some((_, usage)) = live.limit_and_usage(&id) {
                    entry.usage = usage;
                }
            }
            None => live.remove(&id),
        }
    }
    match entry {
        Some(entry) => building.index.insert(id, entry),
        None => building.index.remove(&id),
    }
    Ok(())
}

/// A copy being read, not yet deciding.
struct Building {
    catalog: Arc<Catalog>,
    routes: Arc<RouteTable>,
    index: Arc<Index>,
}

fn live_index(shared: &Shared) -> Result<Arc<Index>, String> {
    shared
        .live_index()
        .ok_or_else(|| "a change before the first sync".to_owned())
}

fn key_id(bytes: &[u8]) -> Result<KeyId, String> {
    <[u8; 16]>::try_from(bytes)
        .map(KeyId::from_bytes)
        .map_err(|_| "a key id that is not 16 bytes".to_owned())
}

fn hash(bytes: &[u8], what: &str) -> Result<SecretHash, String> {
    <[u8; 32]>::try_from(bytes)
        .map(SecretHash::from_bytes)
        .map_err(|_| format!("{what} is not 32 bytes"))
}

/// A key from the feed, checked: anything malformed ends the stream (and
/// the copy being built), never a key half-read.
fn entry_of(key: &KeyState, account: Arc<str>) -> Result<(KeyId, Entry), String> {
    let id = key_id(&key.id)?;
    let (previous_hash, previous_until) = if key.previous_hash.is_empty() {
        (SecretHash::from_bytes([0; 32]), 0)
    } else {
        (
            hash(&key.previous_hash, "a previous secret hash")?,
            key.previous_until_unix_nanos,
        )
    };
    let limit = match &key.rate_limit {
        None => None,
        Some(limit) => Some(
            Gcra::from_parts(GcraParts {
                interval: limit.interval_nanos,
                tolerance: limit.tolerance_nanos,
                requests: limit.requests,
                burst: limit.burst,
            })
            .ok_or("a rate limit out of range")?,
        ),
    };
    let secret_hash = if key.credits {
        &key.credits_secret_hash
    } else {
        &key.secret_hash
    };
    let entry = Entry {
        hash: hash(secret_hash, "a secret hash")?,
        scopes: ScopeSet::from_le_bytes(&key.scopes).ok_or("a scope set of the wrong width")?,
        account,
        disabled: key.disabled,
        expires_at: if key.expires_at_unix_nanos == 0 {
            clock::NEVER
        } else {
            key.expires_at_unix_nanos
        },
        previous_hash,
        previous_until,
        allowlist: Allowlist::from_ranges(&key.allowed_cidrs, key.allowlist_restricted),
        limit,
        credits: key.credits.then(|| {
            Box::new(CreditsHeld {
                unreserved: key.credits_unreserved,
                next_refill: if key.credits_next_refill_unix_nanos == 0 {
                    i64::MAX
                } else {
                    key.credits_next_refill_unix_nanos
                },
                period: key.credits_period,
            })
        }),
        usage: Arc::new(Usage::default()),
    };
    Ok((id, entry))
}

/// Every `report_use_every_ms`, sends the uses waiting and the decisions
/// counted (a failed report is dropped: the next minute's use reports
/// again; its counts are lost, rather than risk counting them twice).
async fn report_uses(shared: Arc<Shared>, uses: Receiver<(KeyId, i64)>) {
    let every = Duration::from_millis(shared.settings.report_use_every_ms);
    let mut client: Option<DecisionFeedClient<Channel>> = None;
    loop {
        tokio::time::sleep(every).await;
        let batch: Vec<KeyUse> = uses
            .try_iter()
            .take(MAX_USES_PER_REPORT)
            .map(|(id, at)| KeyUse {
                id: id.as_bytes().to_vec(),
                at_unix_nanos: at,
            })
            .collect();
        let counts: Vec<KeyCounts> = shared
            .counts
            .take()
            .into_iter()
            .take(MAX_USES_PER_REPORT)
            .map(|((id, minute), tally)| KeyCounts {
                id: id.as_bytes().to_vec(),
                minute_unix: minute,
                outcomes: tally
                    .iter()
                    .enumerate()
                    .filter(|(_, count)| **count > 0)
                    .map(|(outcome, count)| (label(outcome).to_owned(), *count))
                    .collect(),
            })
            .collect();
        if batch.is_empty() && counts.is_empty() {
            continue;
        }
        // A report that fails is dropped, never sent again: it may have
        // been applied.
        let _ = call_sidecar(
            &shared,
            &mut client,
            REPORT_DEADLINE,
            ReportUseRequest {
                uses: batch,
                counts,
            },
            |mut feed, request| async move { feed.report_use(request).await },
        )
        .await;
    }
}
