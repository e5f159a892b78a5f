//! Following etcd: the connection's own small runtime ([`EtcdRuntime`]),
//! the task that drives the replica's watcher ([`super::watcher`]) into
//! the key writer's queue, where the reflector applies each event on the
//! writer thread, and the replica's readiness and metrics.
//!
//! At most [`PAGES_IN_FLIGHT`] pages of a full read wait for the writer
//! (memory follows a page, not the key set). A replica that synced before
//! a restart serves (is ready) only once etcd proves unreachable: while
//! etcd answers, readiness waits for the first full read, so keys revoked
//! meanwhile are never served as ready.

use std::pin::pin;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::runtime::{Handle, Runtime};

use super::remote::Remote;
use super::shared::{Command, Inbound, Shared, deliver};
use super::watcher::{Config, Event, backoff, watcher};
use crate::clock::now_nanos;
use crate::metrics::Metrics;
use crate::store::db::StoreError;
use crate::store::etcd::{Connection, Etcd, EtcdError};

/// Pages of a full read handed to the writer and not yet applied: the
/// next page is fetched while one is applied, and no more are held.
pub const PAGES_IN_FLIGHT: usize = 2;
/// While etcd is away, at most one log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(30);

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
            .map_err(|source| StoreError::Thread {
                what: "the etcd runtime",
                source,
            })?;
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
        Remote::new(self.etcd.clone(), self.handle(), self.page_keys)
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
        let state = *shared.replication().borrow();
        let config = Config {
            page_keys: self.page_keys,
            on_demand,
            restored: (state.synced_at != 0).then_some(state.revision),
        };
        handle.spawn(follow(self.etcd.clone(), config, commands, shared));
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

/// Drives the watcher into the writer's queue until the writer is gone,
/// keeping readiness: etcd unreachable, the replica may fall behind (and a
/// replica restored from disk serves).
async fn follow(etcd: Etcd, config: Config, commands: SyncSender<Command>, shared: Arc<Shared>) {
    let pages = Arc::new(tokio::sync::Semaphore::new(PAGES_IN_FLIGHT));
    let mut events = pin!(backoff(watcher(etcd.clone(), config), etcd));
    let mut lost: Option<Instant> = None;
    while let Some(item) = events.next().await {
        let event = match item {
            Ok(Event::Unconfirmed) => {
                shared.lost();
                continue;
            }
            Ok(event) => event,
            // The watcher reads everything again (and said so).
            Err(EtcdError::Compacted(_)) => continue,
            Err(error) => {
                shared.lost();
                if config.restored.is_some() {
                    shared.serve_replica();
                }
                if lost.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    if error.is_transient() {
                        tracing::warn!(%error, "etcd unreachable: decisions continue from the local replica, writes are refused");
                    } else {
                        tracing::error!(%error, "etcd refused the replica's read: decisions continue from the local replica, writes are refused");
                    }
                    lost = Some(Instant::now());
                }
                continue;
            }
        };
        // A page holds a turn until the writer has applied it.
        let turn = match &event {
            Event::InitPage(_) => match Arc::clone(&pages).acquire_owned().await {
                Ok(turn) => Some(turn),
                Err(_) => return,
            },
            _ => None,
        };
        if !deliver(&commands, Inbound::Watched { event, turn }).await {
            return;
        }
    }
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
