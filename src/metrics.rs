//! Prometheus metrics, and the loopback HTTP endpoint that serves them.
//!
//! Hot-path handles (one counter per decision source × outcome) are resolved
//! once at start-up, so recording a decision is an atomic add and one
//! histogram observation: no label hashing, no allocation.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio_stream::StreamExt;

mod slots;
mod usage;
pub use usage::UsageMetrics;

use crate::domain::decision::{Decision, DenyReason};
use slots::{DECISION_SLOTS, decision_slot, slot_reason};

/// Which front door a decision came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `keyward.v1.Authorizer/Authorize`.
    Authorize = 0,
    /// Envoy's `Authorization/Check`.
    Check = 1,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    source: &'static str,
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitsLabels {
    limits: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// Every metric keyward exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: [[Counter; DECISION_SLOTS]; 2],
    decision_seconds: Histogram,
    rpcs: Family<RpcLabels, Counter>,
    keys: Gauge,
    store_write_seconds: Family<OperationLabels, Histogram>,
    store_errors: Counter,
    store_healthy: Gauge,
    guessing_detected: Counter,
    replica: ReplicaMetrics,
    listeners: ListenerFamilies,
    operations: Operations,
    scanning_reports: Family<ResultLabels, Counter>,
    leaked_keys: Family<ActionLabels, Counter>,
    usage: UsageMetrics,
}

/// What an operator's alerts watch beyond decisions and the store: health
/// as served, the decision feed's readers, the TLS certificate's expiry,
/// and the storage mode (which tells replica alerts where they apply).
#[derive(Debug)]
struct Operations {
    serving: Family<ServiceLabels, Gauge>,
    feed: FeedCounters,
    certificate_expiry: Family<FileLabels, Gauge>,
    mode: Family<ModeLabels, Gauge>,
}

impl Operations {
    fn register(registry: &mut Registry) -> Self {
        let serving = registered(
            registry,
            "serving",
            "What grpc.health.v1 reports for each service: 1 SERVING, 0 NOT_SERVING (a failing store, a replica not caught up or too stale, shutting down)",
            Family::<ServiceLabels, Gauge>::default(),
        );
        let feed = FeedCounters {
            readers: registered(
                registry,
                "feed_readers",
                "Decision feed streams open now (an Envoy module keeps its copy current through one)",
                Gauge::default(),
            ),
            cut_off: registered(
                registry,
                "feed_readers_cut_off",
                "Decision feed streams ended with ABORTED because their reader fell more than 4096 changes behind (it reads again from a snapshot)",
                Counter::default(),
            ),
            lease_trades: registered(
                registry,
                "feed_lease_trade_calls",
                "TradeLeases calls answered (an Envoy module trading its leases on global rate limits each 50 ms), by what they answered: limits `global`, or `local` (no usage store here, or it is away)",
                Family::<LimitsLabels, Counter>::default(),
            ),
        };
        let certificate_expiry = registered(
            registry,
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the TLS certificate loaded at start-up from `file` (--tls-cert; read once, so a renewed file takes effect at the next restart), as Unix seconds; no sample without TLS",
            Family::<FileLabels, Gauge>::default(),
        );
        let mode = registered(
            registry,
            "mode",
            "1 for the storage mode this sidecar runs in: standalone (sled is the truth), full (a full replica of etcd) or on_demand (an on-demand replica of etcd)",
            Family::<ModeLabels, Gauge>::default(),
        );
        Self {
            serving,
            feed,
            certificate_expiry,
            mode,
        }
    }
}

/// The decision feed's readers, for [`crate::grpc::feed`].
#[derive(Debug, Clone, Default)]
pub struct FeedCounters {
    /// Streams open now (each an Envoy module's copy being kept current).
    pub readers: Gauge,
    /// Streams cut off because their reader fell behind the changes.
    pub cut_off: Counter,
    /// `TradeLeases` calls answered, by whether limits were global.
    lease_trades: Family<LimitsLabels, Counter>,
}

impl FeedCounters {
    /// A `TradeLeases` call answered: limits `global` or not.
    pub fn lease_trade_call(&self, global: bool) {
        let limits = if global { "global" } else { "local" };
        self.lease_trades
            .get_or_create(&LimitsLabels { limits })
            .inc();
    }
}

/// Connections by listener.
#[derive(Debug)]
struct ListenerFamilies {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
}

impl ListenerFamilies {
    fn register(registry: &mut Registry) -> Self {
        Self {
            open: registered(
                registry,
                "connections_open",
                "Connections each listener holds now (at most --max-connections)",
                Family::default(),
            ),
            refused: registered(
                registry,
                "connections_refused",
                "Connections closed at once because their listener was at --max-connections",
                Family::default(),
            ),
            accept_errors: registered(
                registry,
                "accept_errors",
                "Failed accepts (e.g. out of file descriptors), each followed by a pause",
                Family::default(),
            ),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    #[allow(
        clippy::too_many_lines,
        reason = "a data table: one registration (name, help) per metric"
    )]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyward");
        let decision_family = registered(
            &mut registry,
            "decisions",
            "Authorization decisions by source, result and deny reason",
            Family::<DecisionLabels, Counter>::default(),
        );
        let decisions = [Source::Authorize, Source::Check].map(|source| {
            std::array::from_fn(|slot| {
                let reason = slot_reason(slot);
                decision_family
                    .get_or_create(&DecisionLabels {
                        source: match source {
                            Source::Authorize => "authorize",
                            Source::Check => "check",
                        },
                        result: if reason.is_some() { "deny" } else { "allow" },
                        reason: reason.map_or("none", DenyReason::label),
                    })
                    .clone()
            })
        });
        let decision_seconds = registered(
            &mut registry,
            "decision_duration_seconds",
            "Time to decide one request in process (key, index, verify, route, AND); sampled, one decision in 64 per thread",
            Histogram::new(exponential_buckets(250e-9, 2.0, 16)),
        );
        let rpcs = registered(
            &mut registry,
            "rpcs",
            "gRPC requests handled, by method and status code",
            Family::<RpcLabels, Counter>::default(),
        );
        let keys = registered(
            &mut registry,
            "keys",
            "Live keys in the index",
            Gauge::default(),
        );
        let store_write_seconds = registered(
            &mut registry,
            "store_write_duration_seconds",
            "Durable store writes (commit and flush), by operation",
            Family::<OperationLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(50e-6, 2.0, 16))
            }),
        );
        let store_errors = registered(
            &mut registry,
            "store_errors",
            "Store operations that failed",
            Counter::default(),
        );
        let store_healthy = registered(
            &mut registry,
            "store_healthy",
            "1 while the store takes writes, 0 while it is failing (full, read-only, I/O errors or not responding); decisions are unaffected",
            Gauge::default(),
        );
        let guessing_detected = registered(
            &mut registry,
            "guessing_detected",
            "Key ids (or the admin token) that crossed --failed-auth-limit wrong credentials in a minute",
            Counter::default(),
        );
        let scanning_reports = registered(
            &mut registry,
            "secret_scanning_reports",
            "GitHub secret scanning reports by result: accepted; refused for their signature (missing_identifier, missing_signature, unknown_identifier, malformed_signature, wrong_signature), too_large, timeout or malformed (nothing in them was acted on); failed (storage failed part-way: GitHub sends it again)",
            Family::<ResultLabels, Counter>::default(),
        );
        let leaked_keys = registered(
            &mut registry,
            "leaked_keys",
            "Live keys whose secret a verified secret scanning report found in public, by what was done (disabled, revoked, reported, overlap_ended: its previous secret was found and its rotation overlap ended)",
            Family::<ActionLabels, Counter>::default(),
        );
        let usage = UsageMetrics::register(&mut registry);
        let replica = ReplicaMetrics::register(&mut registry);
        let listeners = ListenerFamilies::register(&mut registry);
        let operations = Operations::register(&mut registry);
        registry.register_collector(Box::new(DroppedLogLines));
        Self {
            registry,
            decisions,
            decision_seconds,
            rpcs,
            keys,
            store_write_seconds,
            store_errors,
            store_healthy,
            guessing_detected,
            replica,
            listeners,
            operations,
            scanning_reports,
            leaked_keys,
            usage,
        }
    }

    /// The usage plane's metrics.
    #[must_use]
    pub fn usage(&self) -> UsageMetrics {
        self.usage.clone()
    }

    /// Counts one secret scanning report by its result.
    pub fn scanning_report(&self, result: &'static str) {
        self.scanning_reports
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts one leaked key by what was done to it.
    pub fn leaked_key(&self, action: &'static str) {
        self.leaked_keys
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// Records the storage mode: `standalone`, `full` or `on_demand`.
    pub fn set_mode(&self, mode: &'static str) {
        self.operations
            .mode
            .get_or_create(&ModeLabels { mode })
            .set(1);
    }

    /// Records what health reports for `service` (`""` is the server as a
    /// whole).
    pub fn set_serving(&self, service: &'static str, serving: bool) {
        self.operations
            .serving
            .get_or_create(&ServiceLabels { service })
            .set(i64::from(serving));
    }

    /// The decision feed's reader gauge and cut-off counter.
    #[must_use]
    pub fn feed(&self) -> FeedCounters {
        self.operations.feed.clone()
    }

    /// Exports the TLS certificate's notAfter (Unix seconds), so an alert
    /// can fire weeks before clients start refusing the handshake.
    pub fn set_certificate_expiry(&self, file: &std::path::Path, not_after_unix: i64) {
        self.operations
            .certificate_expiry
            .get_or_create(&FileLabels {
                file: file.display().to_string(),
            })
            .set(not_after_unix);
    }

    /// Counts a first sight on an on-demand replica, and times it when it
    /// read etcd and got an answer.
    pub fn first_sight(&self, outcome: &'static str, took: Option<Duration>) {
        self.replica
            .first_sights
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(took) = took {
            self.replica.first_sight_seconds.observe(took.as_secs_f64());
        }
    }

    /// On demand: one etcd read key management asked for, by outcome.
    pub fn manage_read(&self, outcome: &'static str) {
        self.replica
            .manage_reads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// On demand: the membership filter holds `count` ids from a complete
    /// listing.
    pub fn set_member_ids(&self, count: u64) {
        self.replica
            .member_ids
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one decision by source and outcome.
    #[inline]
    pub fn decision(&self, source: Source, decision: &Decision) {
        self.decisions[source as usize][decision_slot(decision.deny)].inc();
    }

    /// Records how long one sampled decision took. prometheus-client's
    /// histogram takes a mutex per observation, shared by every core: on
    /// each decision it cost more than the decision itself.
    pub fn decision_duration(&self, took: Duration) {
        self.decision_seconds.observe(took.as_secs_f64());
    }

    /// The counter for one method and code, to resolve once for a hot path.
    #[must_use]
    pub fn rpc_counter(&self, method: &str, code: tonic::Code) -> Counter {
        self.rpcs
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code_label(code),
            })
            .clone()
    }

    /// Sets the live key count.
    pub fn set_keys(&self, count: usize) {
        self.keys.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records one durable write.
    pub fn store_write(&self, operation: &'static str, took: Duration, ok: bool) {
        self.store_write_seconds
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.inc();
        }
    }

    /// What one listener counts, under its `name`.
    #[must_use]
    pub fn listener(&self, name: &'static str) -> crate::listen::Counters {
        let labels = ListenerLabels { listener: name };
        crate::listen::Counters {
            open: self.listeners.open.get_or_create(&labels).clone(),
            refused: self.listeners.refused.get_or_create(&labels).clone(),
            accept_errors: self.listeners.accept_errors.get_or_create(&labels).clone(),
        }
    }

    /// The counter guessing detection increments.
    #[must_use]
    pub fn guessing_detected(&self) -> Counter {
        self.guessing_detected.clone()
    }

    /// Records whether the store takes writes.
    pub fn set_store_healthy(&self, healthy: bool) {
        self.store_healthy.set(i64::from(healthy));
    }

    /// Replicated mode: how current the local replica is at `now` (Unix
    /// nanos): when it was last known current (0: never), whether its
    /// watch is up, and the etcd revision it holds everything through.
    pub fn set_replication(&self, synced_at: i64, connected: bool, revision: i64, now: i64) {
        #[allow(clippy::cast_precision_loss, reason = "seconds for a dashboard")]
        let staleness = now.saturating_sub(synced_at).max(0) as f64 / 1e9;
        self.replica.staleness.set(if synced_at == 0 {
            f64::INFINITY
        } else {
            staleness
        });
        self.replica.connected.set(i64::from(connected));
        self.replica.revision.set(revision);
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Registers `metric` under `name` and returns a handle to it.
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// `keyward_log_lines_dropped_total`, read from the log writer at each
/// scrape.
#[derive(Debug)]
struct DroppedLogLines;

impl prometheus_client::collector::Collector for DroppedLogLines {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let counter =
            prometheus_client::metrics::counter::ConstCounter::new(crate::log::dropped_lines());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because the log destination refused them (full disk, closed pipe) or fell behind",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A scrape's request head must arrive within this: a peer trickling a
/// partial header holds its connection no longer.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    mut listener: crate::listen::Incoming<tokio::net::TcpListener>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.next() => match accepted {
                Some(Ok(stream)) => stream,
                // The listener pauses and logs failed accepts itself.
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if request.method() == Method::GET && request.uri().path() == "/metrics" {
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Replicated mode's metrics.
#[derive(Debug)]
struct ReplicaMetrics {
    staleness: Gauge<f64, AtomicU64>,
    connected: Gauge,
    revision: Gauge,
    first_sights: Family<OutcomeLabels, Counter>,
    first_sight_seconds: Histogram,
    member_ids: Gauge,
    manage_reads: Family<OutcomeLabels, Counter>,
}

impl ReplicaMetrics {
    fn register(registry: &mut Registry) -> Self {
        let replica_staleness = registered(
            registry,
            "replica_staleness_seconds",
            "Replicated mode: seconds since the local replica was last known to hold everything etcd has (about 1 while connected; grows while etcd is away)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let replica_connected = registered(
            registry,
            "replica_connected",
            "Replicated mode: 1 while the watch on etcd is up",
            Gauge::default(),
        );
        let replica_revision = registered(
            registry,
            "replica_revision",
            "Replicated mode: the etcd revision the local replica holds everything through",
            Gauge::default(),
        );
        let first_sights = registered(
            registry,
            "replica_first_sights",
            "On-demand replica: keys presented that the replica did not hold, by outcome (held: fetched from etcd; absent: etcd has none; absent_remembered: known absent, no etcd read; over_rate: refused, first sights of listed ids over --replica-fetch-rate; over_rate_unlisted: refused, first sights of ids etcd did not list over a tenth of it; etcd_unreachable: refused, etcd did not answer; kept_changing: refused, the key changed under every fetch)",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let first_sight_seconds = registered(
            registry,
            "replica_first_sight_duration_seconds",
            "On-demand replica: time from a first sight to the key held (or known absent), etcd read included",
            Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
        );
        let member_ids = registered(
            registry,
            "replica_member_ids",
            "On-demand replica: key ids listed from etcd into the membership filter at its last build (-1 until a build completes); first sights of ids it does not hold never spend the budget of ids it does",
            Gauge::default(),
        );
        member_ids.set(-1);
        let manage_reads = registered(
            registry,
            "replica_manage_reads",
            "On-demand replica: etcd reads key management asked for (a key's record, a page of an account's keys), by outcome (read; over_rate: refused UNAVAILABLE, over --replica-fetch-rate; unlisted: an id the membership filter does not list, not found without a read)",
            Family::<OutcomeLabels, Counter>::default(),
        );
        Self {
            staleness: replica_staleness,
            connected: replica_connected,
            revision: replica_revision,
            first_sights,
            first_sight_seconds,
            member_ids,
            manage_reads,
        }
    }
}
