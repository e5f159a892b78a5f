//! The usage plane: a key's rate limit held for every sidecar at once, and
//! per-key decision counts summed over all of them, in a usage store
//! (Redis) that no decision ever waits on.
//!
//! A decision spends from a lease this sidecar holds on the key's budget
//! (`keyward_core::domain::lease`: one atomic subtraction) and is counted
//! here ([`counts`]). A background task ([`sync`]) trades every active
//! lease with the store each [`sync::TICK`] (unused tokens back, credit
//! paid, the next share taken: one script call per key, many in flight on
//! one connection) and
//! sums the counts into the store each second. While the store is away,
//! rate limits are each sidecar's own again (as without a usage store),
//! counts wait (an hour at most), and the state change is logged once and
//! exported as `keyward_usage_store_up`.

pub use keyward_core::counts;
pub mod credits;
pub mod local;
pub mod series;
pub mod store;
mod sync;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dashmap::DashMap;

use keyward_core::domain::decision::Decision;
use keyward_core::domain::key::KeyId;
use keyward_core::domain::lease::Roster;

pub use series::{KeyUsage, Range};
pub use store::{Connection, UsageStoreError};
pub use sync::Ask;

use crate::metrics::UsageMetrics;

/// The usage plane of one sidecar.
#[derive(Debug)]
pub struct UsagePlane {
    place: Place,
    /// Leases are in force (the store answered the last trade round).
    global_limits: Arc<AtomicBool>,
    counts: counts::Counts,
    /// Keys whose rate limit reached a decision while leases were in
    /// force, with the trade rounds each has been idle.
    leased: DashMap<KeyId, u32, rustc_hash::FxBuildHasher>,
    /// Where decisions enlist keys whose leases to trade (each once, until
    /// its trade retires it), and the trading task's end of it.
    roster: Roster,
    enlisted: std::sync::Mutex<std::sync::mpsc::Receiver<KeyId>>,
    /// Tokens granted to other holders through the decision feed and not
    /// yet given back, per key (what a caller may give back at most).
    lent: DashMap<KeyId, u64, rustc_hash::FxBuildHasher>,
    /// The store, once connected (management reads it too).
    store: std::sync::Mutex<Option<store::Store>>,
    metrics: UsageMetrics,
    /// Whether the usage store answers (`None`: not yet asked, or no
    /// store): what health reports under [`HEALTH_SERVICE`].
    up: tokio::sync::watch::Sender<Option<bool>>,
}

/// Keys enlisted and not yet taken by the trading task; more wait for
/// their next decision.
const ROSTER_BOUND: usize = 65_536;

/// The health (`grpc.health.v1`) name that follows the usage store:
/// SERVING while it answers, NOT_SERVING while it is away. Only a detail:
/// the server as a whole (`""`) and the decision services stay SERVING,
/// since decisions go on without it.
pub const HEALTH_SERVICE: &str = "keyward.v1.UsageStore";

/// Where the counts (and, shared, the budgets) are kept.
#[derive(Debug)]
enum Place {
    /// A usage store every sidecar shares.
    Shared(Connection),
    /// This standalone sidecar's own database.
    Local(local::LocalPlace),
}

impl std::fmt::Debug for store::Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Store::Single",
            Self::Cluster(_) => "Store::Cluster",
        })
    }
}

impl UsagePlane {
    /// A plane for the store at `connection`; [`Self::run`] connects.
    #[must_use]
    pub fn new(connection: Connection, metrics: UsageMetrics) -> Arc<Self> {
        metrics.up.set(0);
        Self::at(Place::Shared(connection), metrics)
    }

    /// A standalone sidecar's plane without a usage store: counts kept in
    /// `store`, rate limits its own (it is the only sidecar).
    #[must_use]
    pub fn local(dir: std::path::PathBuf, metrics: UsageMetrics) -> Arc<Self> {
        Self::at(Place::Local(local::LocalPlace::new(dir)), metrics)
    }

    fn at(place: Place, metrics: UsageMetrics) -> Arc<Self> {
        let (roster, enlisted) = Roster::new(ROSTER_BOUND);
        Arc::new(Self {
            place,
            global_limits: Arc::default(),
            counts: counts::Counts::default(),
            leased: DashMap::default(),
            roster,
            enlisted: std::sync::Mutex::new(enlisted),
            lent: DashMap::default(),
            store: std::sync::Mutex::default(),
            metrics,
            up: tokio::sync::watch::channel(None).0,
        })
    }

    /// Whether the usage store answers, as it changes (`None` until the
    /// first round, and always without a shared store).
    #[must_use]
    pub fn up(&self) -> tokio::sync::watch::Receiver<Option<bool>> {
        self.up.subscribe()
    }

    /// The switch decisions read: rate limits are global while it holds.
    #[must_use]
    pub fn global_limits(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.global_limits)
    }

    /// Where decisions enlist the keys whose leases they spend (the
    /// decider sends each key once: one atomic load per decision after).
    #[must_use]
    pub fn roster(&self) -> Roster {
        self.roster.clone()
    }

    /// Records one decision's count.
    pub fn record(&self, decision: &Decision) {
        self.counts.record(
            decision,
            keyward_core::clock::recent_now_nanos() / 1_000_000_000,
        );
    }

    /// Decision counts another decider reported (an Envoy module, through
    /// the decision feed), for live keys: summed with this sidecar's own.
    pub fn add_reported(&self, counts: Vec<counts::KeyMinute>) {
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        let dropped = self.counts.put_back(counts, now);
        self.metrics.dropped.inc_by(dropped);
    }

    /// One key's usage over `range`, summed over every sidecar.
    pub async fn usage(&self, id: &KeyId, range: Range) -> Result<KeyUsage, UsageStoreError> {
        let now = keyward_core::clock::now_nanos() / 1_000_000_000;
        let from = range.start(now);
        let buckets = match &self.place {
            Place::Shared(_) => {
                let store = self.store.lock().map_or(None, |store| store.clone());
                let mut store = store.ok_or(UsageStoreError::NotConnected)?;
                tokio::time::timeout(
                    store::RESPONSE_TIMEOUT * 2,
                    store.counts(id, from, range.by_hour()),
                )
                .await
                .map_err(|_| UsageStoreError::Timeout)??
            }
            Place::Local(place) => {
                let local = place.store().ok_or(UsageStoreError::NotConnected)?;
                let id = *id;
                tokio::task::spawn_blocking(move || local.counts(&id, from, range.by_hour()))
                    .await
                    .map_err(|_| UsageStoreError::Thread)??
            }
        };
        Ok(KeyUsage::from_buckets(range, from, now, &buckets))
    }
}
