//! Wiring only: load config, open the store, build the services, serve.
//! Each job of the wiring has its own file under `server/`:
//! - [`tokens`]: the admin and feed reader token files.
//! - [`tables`]: the catalog and route table, configured or bundled.
//! - [`listeners`]: the sockets, bound before serving.
//! - [`servers`]: what each listener serves, behind which layers, with
//!   which TLS.
//! - [`health`]: `grpc.health.v1` and `keyward_serving`, kept current.
//! - [`shutdown`]: NOT_SERVING for the grace period, stop, drain.
//!
//! This file holds what a running keyward is ([`App`], opened from the
//! configuration) and [`run`], which serves it until shutdown.

mod health;
mod listeners;
mod servers;
mod shutdown;
mod tables;
mod tokens;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::ServerTlsConfig;

use crate::access::Authenticator;
use crate::authorizer::Authorizer;
use crate::change_log::ChangeLog;
use crate::config::ServeConfig;
use crate::domain::catalog::Catalog;
use crate::domain::key::SecretHash;
use crate::domain::load_error::LoadError;
use crate::grpc::feed::Tables;
use crate::guessing::FailureGuard;
use crate::keys::{Keys, Settings};
use crate::listen::{Bounds, Incoming};
use crate::metrics::Metrics;
use crate::store::db::StoreError;
use crate::store::index::Index;
use crate::usage::credits::CreditKeeper;

pub use listeners::{GrpcListener, Listeners};

/// Why keyward could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A catalog or route file is invalid.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin token file holds no usable token.
    #[error(
        "{0}: the admin token is too weak: it needs at least 32 characters and about 128 bits of randomness (e.g. `openssl rand -base64 32`)"
    )]
    WeakAdminToken(PathBuf),
    /// The admin token file can be read by any local user.
    #[error(
        "{0}: the admin token file is readable by every user (mode {1:o}); make it 0600 or 0440 (chmod o-rwx)"
    )]
    ExposedAdminToken(PathBuf, u32),
    /// The decision feed's token file (`--feed-token-file`) holds no
    /// usable token.
    #[error(
        "{0}: the feed reader token (--feed-token-file) is too weak: it needs at least 32 characters and about 128 bits of randomness (e.g. `openssl rand -base64 32`)"
    )]
    WeakFeedToken(PathBuf),
    /// The decision feed's token file can be read by any local user.
    #[error(
        "{0}: the feed reader token file (--feed-token-file) is readable by every user (mode {1:o}); make it 0600 or 0440 (chmod o-rwx)"
    )]
    ExposedFeedToken(PathBuf, u32),
    /// The store could not be opened or loaded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The usage store settings cannot work (the URL, a CA file without TLS).
    #[error(transparent)]
    UsageStore(#[from] crate::usage::UsageStoreError),
    /// Settings that contradict each other.
    #[error("{0}")]
    Settings(&'static str),
    /// The gRPC transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The REST listener's TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The final flush at shutdown failed or timed out. Every acknowledged
    /// change was already durable; this only reports the disk's state.
    #[error(
        "the final store flush could not complete (storage failing or not responding); every acknowledged change was already durable"
    )]
    FinalFlush,
    /// GitHub's secret scanning key file (`--secret-scanning-keys`) is
    /// unusable.
    #[error("--secret-scanning-keys: {0}")]
    ScanningKeys(#[from] crate::scanning::KeysError),
    /// Reflection descriptors are invalid (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Turns an I/O error on `path` into a [`ServerError`] naming it.
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything a running keyward holds: loaded, validated, ready to serve.
#[derive(Debug, Clone)]
pub struct App {
    /// The write path.
    pub keys: Arc<Keys>,
    /// Replicated mode: how stale the replica may get before decisions
    /// report NOT_SERVING (zero: never).
    pub max_staleness: Duration,
    /// The read path.
    pub authorizer: Authorizer,
    /// The catalog in force.
    pub catalog: Arc<Catalog>,
    /// Every exported metric.
    pub metrics: Arc<Metrics>,
    /// Guessing detection shared by every front door.
    pub guard: Arc<FailureGuard>,
    /// The live index decisions read.
    index: Arc<Index>,
    /// Its changes, for the decision feed (`None` on an on-demand replica).
    feed: Option<Arc<ChangeLog>>,
    /// The catalog and routes as loaded, for the decision feed.
    tables: Arc<Tables>,
    /// The feed reader token's hash, when one is configured.
    feed_reader: Option<SecretHash>,
    admin: SecretHash,
    limits: Limits,
    tls: Option<ServerTlsConfig>,
    /// TLS for the REST listener, when both are configured.
    rest_tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether the REST listener serves the web console.
    console: bool,
    /// GitHub's secret scanning keys, and what a verified leak does, when
    /// `--secret-scanning-keys` is set.
    scanning: Option<Scanning>,
    /// `--xff-trusted-hops`, for ext_authz's client address.
    xff_trusted_hops: u32,
    /// The usage plane, with `--usage-store`.
    pub usage: Option<Arc<crate::usage::UsagePlane>>,
    /// This sidecar's credit leases.
    credits: Arc<CreditKeeper>,
}

impl App {
    /// `listener`'s connections within the configured bounds, counted
    /// under `name`.
    fn bounded<L: crate::listen::Accept>(&self, listener: L, name: &'static str) -> Incoming<L> {
        Incoming::new(
            listener,
            name,
            self.limits.connections,
            self.metrics.listener(name),
        )
    }

    /// How management callers are authenticated (gRPC and REST alike).
    #[must_use]
    pub fn access(&self) -> Authenticator {
        Authenticator::new(self.authorizer.clone(), self.admin, Arc::clone(&self.guard))
    }
}

/// Transport limits, from the configuration.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_concurrent_requests: usize,
    request_timeout: Duration,
    max_message_bytes: usize,
    max_streams_per_connection: u32,
    connections: Bounds,
    shutdown_grace: Duration,
    drain_timeout: Duration,
}

impl App {
    /// Loads catalog and routes, opens the store, loads the index and the
    /// admin token (creating the data directory and token if missing).
    pub fn open(config: &ServeConfig) -> Result<Self, ServerError> {
        let (catalog, routes, tables) = tables::load_tables(config)?;
        refuse_contradictions(config)?;
        let data_dir = &config.data.data_dir;
        create_private_dir(data_dir)?;
        // Settings that can be refused go first: a refusal then leaves no
        // store open.
        let (admin, feed_reader) = tokens::load(config)?;
        let (tls, rest_tls) = servers::load(config)?;
        let scanning = scanning(config)?;
        let usage_store = config
            .usage
            .connection()
            .map_err(|(path, source)| ServerError::Io { path, source })?;
        if let Some(store) = &usage_store {
            crate::usage::store::check(store)?;
        }
        let metrics = Arc::new(Metrics::new());
        describe(&metrics, config);
        // Decisions read the cached clock (expiry, rate limits, last use).
        crate::clock::start_clock();
        let opening = std::time::Instant::now();
        let (keys, index) = Keys::open(
            data_dir.join("db"),
            Arc::clone(&catalog),
            &key_settings(config)?,
            Arc::clone(&metrics),
        )?;
        tracing::info!(
            keys = index.len(),
            scopes = catalog.len(),
            routes = routes.len(),
            data_dir = %data_dir.display(),
            load_ms = opening.elapsed().as_millis(),
            "loaded"
        );
        // Every change to a whole key set, for the decision feed.
        let feed = keys.on_demand().is_none().then(|| {
            let feed = Arc::new(ChangeLog::default());
            index.observe(Arc::clone(&feed) as Arc<dyn crate::store::index::Observer>);
            feed
        });
        let guard = FailureGuard::new(
            config.failed_auth_limit,
            Duration::from_secs(60),
            crate::guessing::DEFAULT_CAPACITY,
            metrics.guessing_detected(),
        );
        let usage = usage_plane(config, usage_store, &metrics);
        let keys = Arc::new(keys);
        let credits = CreditKeeper::new(Arc::clone(&keys), Arc::clone(&index), metrics.usage());
        Ok(Self {
            authorizer: Authorizer::new(Arc::clone(&index), routes)
                .with_on_demand(keys.on_demand())
                .with_usage(usage.as_deref())
                .with_credits(Arc::clone(&credits)),
            credits,
            usage,
            index,
            feed,
            tables,
            feed_reader,
            keys,
            catalog,
            metrics,
            guard: Arc::new(guard),
            admin,
            tls,
            rest_tls,
            console: !config.disable_ui,
            scanning,
            max_staleness: config.max_staleness,
            xff_trusted_hops: config.xff_trusted_hops,
            limits: Limits::new(config),
        })
    }
}

impl Limits {
    fn new(config: &ServeConfig) -> Self {
        Self {
            max_concurrent_requests: config.max_concurrent_requests as usize,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            max_message_bytes: config.max_message_bytes as usize,
            max_streams_per_connection: config.max_streams_per_connection,
            connections: Bounds {
                max_connections: config.max_connections as usize,
                idle_timeout: config.idle_timeout,
            },
            shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
        }
    }
}

/// GitHub's secret scanning keys, and what a verified leak does, when
/// `--secret-scanning-keys` is set.
type Scanning = (Arc<crate::scanning::KeyFile>, crate::keys::LeakAction);

/// How the key store runs, as `config` says.
fn key_settings(config: &ServeConfig) -> Result<Settings, ServerError> {
    Ok(Settings {
        max_per_account: config.max_keys_per_account as usize,
        write_timeout: Duration::from_millis(config.store_timeout_ms),
        last_used_every: Duration::from_millis(config.last_used_flush_ms),
        replication: config
            .etcd
            .connection()
            .map_err(|(path, source)| ServerError::Io { path, source })?,
        on_demand: (config.replica_mode == crate::config::ReplicaMode::OnDemand).then_some(
            crate::keys::demand::Demand {
                cache_keys: config.replica_cache_keys,
                fetch_rate: config.replica_fetch_rate,
            },
        ),
    })
}

/// The usage plane: over the usage store when there is one; else, on a
/// standalone sidecar (the only one deciding for its keys), its own counts
/// in `<data-dir>/usage`; else (a replica without a store) none.
fn usage_plane(
    config: &ServeConfig,
    store: Option<crate::usage::Connection>,
    metrics: &Metrics,
) -> Option<Arc<crate::usage::UsagePlane>> {
    if let Some(store) = store {
        return Some(crate::usage::UsagePlane::new(store, metrics.usage()));
    }
    if !config.etcd.etcd_endpoints.is_empty() {
        return None;
    }
    Some(crate::usage::UsagePlane::local(
        config.data.data_dir.join("usage"),
        metrics.usage(),
    ))
}

/// Loads `--secret-scanning-keys`, if set.
fn scanning(config: &ServeConfig) -> Result<Option<Scanning>, ServerError> {
    Ok(config
        .secret_scanning_keys
        .as_deref()
        .map(crate::scanning::KeyFile::load)
        .transpose()?
        .map(|file| (Arc::new(file), config.leaked_key_action)))
}

/// Exports what the configuration says about this sidecar that alerts
/// need: its storage mode, and when its TLS certificate expires (read
/// once: it is served until the next restart, so that is the expiry that
/// matters).
fn describe(metrics: &Metrics, config: &ServeConfig) {
    metrics.set_mode(
        match (config.etcd.etcd_endpoints.is_empty(), config.replica_mode) {
            (true, _) => "standalone",
            (false, crate::config::ReplicaMode::Full) => "full",
            (false, crate::config::ReplicaMode::OnDemand) => "on_demand",
        },
    );
    if let Some(cert) = &config.tls_cert {
        if let Some(not_after) = crate::tls::not_after(cert) {
            metrics.set_certificate_expiry(cert, not_after);
        } else {
            tracing::warn!(
                file = %cert.display(),
                "cannot read the TLS certificate's expiry; keyward_tls_certificate_expiry_timestamp_seconds is not exported"
            );
        }
    }
}

/// Settings that contradict each other, refused before anything opens.
fn refuse_contradictions(config: &ServeConfig) -> Result<(), ServerError> {
    if config.max_streams_per_connection > (config.max_concurrent_requests / 2).max(1) {
        // One connection must never take the whole in-flight budget.
        return Err(ServerError::Settings(
            "--max-streams-per-connection must be at most half of --max-concurrent-requests",
        ));
    }
    if config.store_timeout_ms >= config.request_timeout_ms {
        // Otherwise a slow write is cut off as CANCELLED by the request
        // timeout instead of answering UNAVAILABLE.
        return Err(ServerError::Settings(
            "--store-timeout-ms must be below --request-timeout-ms",
        ));
    }
    Ok(())
}

/// Serves every keyward service until `shutdown` resolves; then reports
/// NOT_SERVING for the grace period, stops accepting, lets in-flight requests
/// finish, and closes the store.
pub async fn run(
    listeners: Listeners,
    app: App,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (reporter, health) = health::health_service(listeners.manage_enabled, &app.metrics).await;
    // KeyManager follows the store; Authorizer and Check never follow the
    // disk (decisions are served from memory whatever it does), only the
    // replica's sync in replicated mode.
    let store_health = tokio::spawn(health::follow_store_health(
        app.keys.health(),
        app.keys.replication(),
        app.max_staleness,
        reporter.clone(),
        listeners.manage_enabled,
        Arc::clone(&app.metrics),
    ));
    let usage_health = app
        .usage
        .as_ref()
        .map(|usage| tokio::spawn(health::follow_usage_store(usage.up(), reporter.clone())));
    let usage = app.usage.as_ref().map(|usage| {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(Arc::clone(usage).run(
            Arc::clone(&app.index),
            app.keys.health(),
            stop.clone(),
        ));
        (task, stop)
    });
    let credits_stop = tokio_util::sync::CancellationToken::new();
    let credits = tokio::spawn(Arc::clone(&app.credits).run(credits_stop.clone()));
    let stop = shutdown::Stop::new();
    // Ends when the servers do, so a server that fails on its own is
    // reported at once instead of waiting for a shutdown signal.
    let (ended_tx, ended_rx) = tokio::sync::watch::channel(false);
    let coordinator = shutdown::coordinate(
        shutdown,
        ended_rx,
        (
            reporter,
            store_health.abort_handle(),
            usage_health
                .as_ref()
                .map(tokio::task::JoinHandle::abort_handle),
        ),
        &app.metrics,
        app.limits.shutdown_grace,
        &stop,
    );

    let socket_file = match &listeners.grpc {
        GrpcListener::Unix(_, path) => Some(path.clone()),
        GrpcListener::Tcp(_) => None,
    };
    let servers = servers::serve(&app, listeners, health, &stop)?;
    let served = async {
        let served = shutdown::drain(servers, &stop, app.limits.drain_timeout).await;
        let _ = ended_tx.send(true);
        served
    };
    let (served, ()) = tokio::join!(served, coordinator);
    store_health.abort();
    if let Some(usage_health) = usage_health {
        usage_health.abort();
    }
    // The task stops between rounds (a round under way ends within its
    // commands' timeouts), so no lease or count it took is lost.
    if let Some((task, stop)) = usage {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // After the last decision: its counts are written, not lost; within a
    // bound, as a stuck disk or a hung usage store must not hold the exit.
    if let Some(usage) = &app.usage
        && tokio::time::timeout(USAGE_CLOSE_WITHIN, usage.close())
            .await
            .is_err()
    {
        tracing::warn!("the last usage counts were not written in time");
    }
    // After the last decision: unspent credits go back to the records
    // (bounded: see `CreditKeeper::run`), before the store closes.
    credits_stop.cancel();
    let _ = credits.await;
    if let Some(path) = socket_file {
        let _ = std::fs::remove_file(path);
    }
    served?;
    app.keys
        .close()
        .await
        .map_err(|_| ServerError::FinalFlush)?;
    tracing::info!("stopped; store flushed");
    Ok(())
}

/// How long shutdown waits for the last usage counts to be written.
const USAGE_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// Creates `dir` (and its parents) readable by its owner only.
fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))
}
