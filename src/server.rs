//! Wiring only: load config, open the store, build the services, serve.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::access::Access;
use crate::authorizer::Authorizer;
use crate::config::{ListenAddr, ServeConfig};
use crate::domain::catalog::{Catalog, SENDGRID_CATALOG};
use crate::domain::key::SecretHash;
use crate::domain::load_error::LoadError;
use crate::domain::route::{RouteTable, SENDGRID_ROUTES};
use crate::envoy::CheckService;
use crate::feed::Feed;
use crate::front::FrontDoor;
use crate::grpc::authorize::AuthorizeService;
use crate::grpc::feed::{FeedService, Tables};
use crate::grpc::manage::ManageService;
use crate::guard::FailureGuard;
use crate::keys::StoreHealth;
use crate::keys::{Keys, Settings};
use crate::listen::{Bounds, Incoming};
use crate::metrics::{Metrics, Source};
use crate::pb;
use crate::store::db::StoreError;
use crate::store::index::Index;

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
    feed: Option<Arc<Feed>>,
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
    scanning: Option<(Arc<crate::scanning::KeyFile>, crate::keys::LeakAction)>,
    /// `--xff-trusted-hops`, for ext_authz's client address.
    xff_trusted_hops: u32,
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
    pub fn access(&self) -> Access {
        Access::new(self.authorizer.clone(), self.admin, Arc::clone(&self.guard))
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
        let (catalog, routes, tables) = load_tables(config)?;
        refuse_contradictions(config)?;
        let data_dir = &config.data.data_dir;
        create_private_dir(data_dir)?;
        // Settings that can be refused go first: a refusal then leaves no
        // store open.
        let admin = load_or_create_token(&config.data.admin_token_path(), Token::Admin)?;
        let feed_reader = match &config.feed_token_file {
            Some(path) => Some(load_or_create_token(path, Token::FeedReader)?),
            None => None,
        };
        let tls = load_tls(config)?;
        let rest_tls = match (&config.tls_cert, &config.tls_key, config.http_listen) {
            (Some(cert), Some(key), Some(_)) => Some(crate::tls::server_config(
                cert,
                key,
                config.tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        let scanning = config
            .secret_scanning_keys
            .as_deref()
            .map(crate::scanning::KeyFile::load)
            .transpose()?
            .map(|file| (Arc::new(file), config.leaked_key_action));
        let metrics = Arc::new(Metrics::new());
        describe(&metrics, config);
        // Decisions read the cached clock (expiry, rate limits, last use).
        crate::clock::start_clock();
        let opening = std::time::Instant::now();
        let (keys, index) = Keys::open(
            data_dir.join("db"),
            Arc::clone(&catalog),
            &Settings {
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
            },
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
            let feed = Arc::new(Feed::default());
            index.observe(Arc::clone(&feed) as Arc<dyn crate::store::index::Observer>);
            feed
        });
        let guard = FailureGuard::new(
            config.failed_auth_limit,
            Duration::from_secs(60),
            crate::guard::DEFAULT_CAPACITY,
            metrics.guessing_detected(),
        );
        Ok(Self {
            authorizer: Authorizer::new(Arc::clone(&index), routes)
                .with_on_demand(keys.on_demand()),
            index,
            feed,
            tables,
            feed_reader,
            keys: Arc::new(keys),
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
            limits: Limits {
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
            },
        })
    }
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

/// The sockets keyward serves on, bound before serving so that tests (and
/// the log) learn the real ports. Their connections are served within the
/// bounds of [`crate::listen`] (cap, idle timeout, TCP_NODELAY and
/// keepalive).
#[derive(Debug)]
pub struct Listeners {
    /// Authorize, Check, health, reflection (and KeyManager unless separate or disabled).
    pub grpc: GrpcListener,
    /// KeyManager alone, when `--manage-listen` is set.
    pub manage: Option<TcpListener>,
    /// Prometheus metrics, unless disabled.
    pub metrics: Option<TcpListener>,
    /// SendGrid's REST key API, when `--http-listen` is set.
    pub http: Option<TcpListener>,
    manage_enabled: bool,
    echo_enabled: bool,
}

impl Listeners {
    /// Binds every listener the configuration asks for.
    pub async fn bind(config: &ServeConfig) -> Result<Self, ServerError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(io_error(Path::new(&addr.to_string())))
        };
        Ok(Self {
            grpc: match &config.listen {
                ListenAddr::Tcp(addr) => GrpcListener::Tcp(bind(*addr).await?),
                ListenAddr::Unix(path) => bind_unix(path)?,
            },
            manage: match config.manage_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            metrics: if config.disable_metrics {
                None
            } else {
                Some(bind(config.metrics_listen).await?)
            },
            http: match config.http_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            manage_enabled: !config.disable_manage,
            echo_enabled: config.enable_echo,
        })
    }
}

/// Serves every keyward service until `shutdown` resolves; then reports
/// NOT_SERVING for the grace period, stops accepting, lets in-flight requests
/// finish, and closes the store.
pub async fn run(
    listeners: Listeners,
    app: App,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (reporter, health) = health_service(listeners.manage_enabled, &app.metrics).await;
    // KeyManager follows the store; Authorizer and Check never follow the
    // disk (decisions are served from memory whatever it does), only the
    // replica's sync in replicated mode.
    let store_health = tokio::spawn(follow_store_health(
        app.keys.health(),
        app.keys.replication(),
        app.max_staleness,
        reporter.clone(),
        listeners.manage_enabled,
        Arc::clone(&app.metrics),
    ));
    let stop = Stop::new();
    // Ends when the servers do, so a server that fails on its own is
    // reported at once instead of waiting for a shutdown signal.
    let (ended_tx, ended_rx) = tokio::sync::watch::channel(false);
    let coordinator = coordinate(
        shutdown,
        ended_rx,
        (reporter, store_health.abort_handle()),
        &app.metrics,
        app.limits.shutdown_grace,
        &stop,
    );

    let Listeners {
        grpc,
        manage,
        metrics,
        http,
        manage_enabled,
        echo_enabled,
    } = listeners;
    let socket_file = match &grpc {
        GrpcListener::Unix(_, path) => Some(path.clone()),
        GrpcListener::Tcp(_) => None,
    };
    let manage = manage.map(|listener| app.bounded(listener, "manage"));
    let metrics = metrics.map(|listener| app.bounded(listener, "metrics"));
    let http = http.map(|listener| app.bounded(listener, "rest"));
    let (grpc, manage) = grpc_servers(
        &app,
        grpc,
        manage,
        manage_enabled,
        echo_enabled,
        health,
        &stop,
    )?;
    let metrics = metrics.map(|listener| {
        if let Ok(local) = listener.get_ref().local_addr() {
            tracing::info!(%local, "serving metrics at /metrics");
        }
        crate::metrics::serve(listener, Arc::clone(&app.metrics), stop.stopped())
    });
    let rest = http.map(|listener| rest_server(&app, listener, &stop));

    let servers = async {
        let (grpc, manage, rest, ()) =
            tokio::join!(grpc, optional(manage), optional(rest), async {
                if let Some(metrics) = metrics {
                    metrics.await;
                }
            });
        grpc.and(manage).and(rest)
    };
    let served = async {
        let served = drain(servers, &stop, app.limits.drain_timeout).await;
        let _ = ended_tx.send(true);
        served
    };
    let (served, ()) = tokio::join!(served, coordinator);
    store_health.abort();
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

/// Health for every service, SERVING to start with (and so in
/// `keyward_serving`).
async fn health_service(
    manage_enabled: bool,
    metrics: &Metrics,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    use envoy_types::ext_authz::v3::pb::AuthorizationServer;
    use pb::v1::authorizer_server::AuthorizerServer;
    use pb::v1::key_manager_server::KeyManagerServer;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<AuthorizerServer<AuthorizeService>>()
        .await;
    reporter
        .set_serving::<AuthorizationServer<CheckService>>()
        .await;
    if manage_enabled {
        reporter
            .set_serving::<KeyManagerServer<ManageService>>()
            .await;
    }
    for service in SERVICES {
        if manage_enabled || service != MANAGE_SERVICE {
            metrics.set_serving(service, true);
        }
    }
    (reporter, health)
}

/// KeyManager's health service name.
const MANAGE_SERVICE: &str = "keyward.v1.KeyManager";

/// Every name health answers for (`""`: the server as a whole).
const SERVICES: [&str; 4] = [
    "",
    "keyward.v1.Authorizer",
    MANAGE_SERVICE,
    "envoy.service.auth.v3.Authorization",
];

/// One stop signal that fans out to every listener.
struct Stop {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Stop {
    fn new() -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Resolves once the listeners are to close.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// On `shutdown`: every service NOT_SERVING at once (and the store-health
/// follower stopped, so it cannot undo that), requests still served for
/// `grace` (Kubernetes and Envoy stop sending), then the stop signal.
/// Returns early if the servers end on their own.
async fn coordinate(
    shutdown: impl Future<Output = ()> + Send,
    mut ended: tokio::sync::watch::Receiver<bool>,
    (reporter, store_health): (
        tonic_health::server::HealthReporter,
        tokio::task::AbortHandle,
    ),
    metrics: &Metrics,
    grace: Duration,
    stop: &Stop,
) {
    tokio::select! {
        () = shutdown => {},
        _ = ended.wait_for(|ended| *ended) => return,
    }
    store_health.abort();
    tracing::info!(
        grace_ms = grace.as_millis(),
        "shutdown: reporting NOT_SERVING, then draining"
    );
    for service in SERVICES {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
        metrics.set_serving(service, false);
    }
    tokio::time::sleep(grace).await;
    let _ = stop.tx.send(true);
}

/// In-flight requests get `timeout` after the listeners close; a client
/// that never lets its connection go must not hold shutdown hostage (every
/// acknowledged write is already on disk).
async fn drain(
    servers: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop: &Stop,
    timeout: Duration,
) -> Result<(), tonic::transport::Error> {
    let deadline = async {
        stop.stopped().await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        served = servers => served,
        () = deadline => {
            tracing::warn!(timeout_ms = timeout.as_millis(), "drain timed out; closing remaining connections");
            Ok(())
        }
    }
}

async fn optional(server: Option<Serving>) -> Result<(), tonic::transport::Error> {
    match server {
        Some(server) => server.await,
        None => Ok(()),
    }
}

/// The gRPC servers: decisions, health, reflection (and KeyManager, unless
/// it has its own listener or is disabled), and KeyManager's own server.
/// Each request has a deadline, and a global in-flight limit sheds excess
/// load with RESOURCE_EXHAUSTED at once rather than queueing it.
fn grpc_servers(
    app: &App,
    grpc: GrpcListener,
    manage_listener: Option<Incoming<TcpListener>>,
    manage_enabled: bool,
    echo_enabled: bool,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: &Stop,
) -> Result<(Serving, Option<Serving>), ServerError> {
    use envoy_types::ext_authz::v3::pb::AuthorizationServer;
    use pb::v1::authorizer_server::AuthorizerServer;
    use pb::v1::key_manager_server::KeyManagerServer;

    let limits = app.limits;
    let concurrency =
        tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_concurrent_requests);
    // Outermost, so shed requests are counted as sent.
    let count_rpcs = crate::grpc::edge::CountRpcsLayer::new(&app.metrics);
    let base_server = || -> Result<_, ServerError> {
        let mut builder = bounded_server(limits);
        if let Some(tls) = &app.tls {
            builder = builder.tls_config(tls.clone())?;
        }
        Ok(builder.timeout(limits.request_timeout).layer(
            tower::ServiceBuilder::new()
                .layer(count_rpcs.clone())
                .layer(crate::trace::TraceLayer)
                .load_shed()
                .layer(concurrency.clone())
                .into_inner(),
        ))
    };
    let front = |source| {
        FrontDoor::new(
            app.authorizer.clone(),
            Arc::clone(&app.catalog),
            Arc::clone(&app.metrics),
            Arc::clone(&app.guard),
            source,
        )
    };
    let authorize = AuthorizerServer::new(AuthorizeService::new(front(Source::Authorize)))
        .max_decoding_message_size(limits.max_message_bytes);
    let check = AuthorizationServer::new(CheckService::new(
        front(Source::Check),
        app.xff_trusted_hops,
    ))
    .max_decoding_message_size(limits.max_message_bytes);
    let manage = manage_enabled.then(|| {
        let server = KeyManagerServer::new(ManageService::new(
            crate::manage::Manager::new(Arc::clone(&app.keys), app.access()),
            crate::keys::snapshot::Origin::new(&app.tables.catalog_source, &app.tables.catalog),
        ))
        .max_decoding_message_size(limits.max_message_bytes);
        tower::Layer::layer(
            &crate::grpc::caller::AuthenticateLayer::new(app.access()),
            server,
        )
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut router = base_server()?
        .add_service(health.clone())
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(authorize)
        .add_service(check);
    // The decision feed carries every key's decision fields: it is served
    // with key management (on `--manage-listen`, loopback in the shipped
    // manifests) when that has its own listener, never beside decisions on
    // a port the pod network reaches.
    let feed = feed_service(app, stop);
    if echo_enabled {
        router = router.add_service(pb::v1::diagnostics_server::DiagnosticsServer::new(
            crate::grpc::echo::EchoService,
        ));
    }
    if manage.is_none() {
        tracing::info!("KeyManager disabled");
    }
    let mut separate_manage: Option<Serving> = None;
    match (manage, manage_listener) {
        (manage, None) => {
            router = router.add_service(feed).add_optional_service(manage);
        }
        (manage, Some(listener)) => {
            tracing::info!(local = %local_addr(&listener)?, manage = manage.is_some(), "serving key management and the decision feed on their own listener");
            let manage_router = base_server()?
                .add_service(health)
                .add_service(feed)
                .add_optional_service(manage);
            separate_manage = Some(Box::pin(
                manage_router.serve_with_incoming_shutdown(listener, stop.stopped()),
            ));
        }
    }
    tracing::info!(local = %grpc.describe(), "serving gRPC");
    let grpc: Serving = match grpc {
        GrpcListener::Tcp(listener) => Box::pin(
            router.serve_with_incoming_shutdown(app.bounded(listener, "grpc"), stop.stopped()),
        ),
        GrpcListener::Unix(listener, _) => Box::pin(
            router.serve_with_incoming_shutdown(app.bounded(listener, "grpc"), stop.stopped()),
        ),
    };
    Ok((grpc, separate_manage))
}

/// The decision feed's service.
fn feed_service(
    app: &App,
    stop: &Stop,
) -> pb::v1::decision_feed_server::DecisionFeedServer<FeedService> {
    pb::v1::decision_feed_server::DecisionFeedServer::new(FeedService::new(
        Arc::clone(&app.index),
        app.feed.clone(),
        Arc::clone(&app.tables),
        app.access(),
        app.feed_reader,
        app.keys.replication(),
        stop.tx.subscribe(),
        app.metrics.feed(),
    ))
    .max_decoding_message_size(app.limits.max_message_bytes)
}

/// SendGrid's REST API, on tonic's server too (HTTP/1.1 accepted). Not
/// behind the gRPC deadline and load shedding: they answer in gRPC's form,
/// which a REST client cannot read; its calls are bounded by
/// `--store-timeout-ms`. TLS is terminated by [`crate::tls`] (see there why).
fn rest_server(app: &App, listener: Incoming<TcpListener>, stop: &Stop) -> Serving {
    if let Ok(local) = listener.get_ref().local_addr() {
        tracing::info!(%local, tls = app.rest_tls.is_some(), console = app.console, "serving SendGrid's REST key API");
        if app.rest_tls.is_none() && !local.ip().is_loopback() {
            // Credentials (the admin token, API keys) cross this listener.
            tracing::warn!(%local, "the REST listener and console are plain HTTP on a non-loopback address: serve them with --tls-cert and --tls-key, or on loopback");
        }
    }
    let router = crate::rest::router(
        Arc::clone(&app.keys),
        app.access(),
        crate::rest::BodyLimits {
            max_bytes: app.limits.max_message_bytes,
            read_timeout: app.limits.request_timeout,
        },
        crate::rest::Surface {
            console: app.console,
            tls: app.rest_tls.is_some(),
            scanning: app.scanning.as_ref().map(|(file, action)| {
                tokio::spawn(Arc::clone(file).follow(crate::scanning::RELOAD_EVERY));
                tracing::info!(
                    path = crate::rest::scanning::PATH,
                    action = action.label(),
                    "serving GitHub's secret scanning reports"
                );
                Arc::new(crate::rest::scanning::Scanning {
                    file: Arc::clone(file),
                    action: *action,
                    metrics: Arc::clone(&app.metrics),
                })
            }),
        },
    );
    let server = bounded_server(app.limits)
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(router));
    match &app.rest_tls {
        Some(tls) => Box::pin(server.serve_with_incoming_shutdown(
            crate::tls::incoming(listener, Arc::clone(tls)),
            stop.stopped(),
        )),
        None => Box::pin(server.serve_with_incoming_shutdown(listener, stop.stopped())),
    }
}

/// A server with the HTTP/2 bounds every listener shares: a small stream
/// limit advertised to the peer (a client with a zero flow-control window
/// can leave at most this many replies unsent per connection), and as the
/// per-connection in-flight limit.
fn bounded_server(limits: Limits) -> Server {
    Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .concurrency_limit_per_connection(limits.max_streams_per_connection as usize)
}

/// A server running until its shutdown signal.
type Serving = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The main gRPC listener: TCP, or a Unix domain socket.
#[derive(Debug)]
pub enum GrpcListener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket (and its path, removed at shutdown).
    Unix(UnixListener, PathBuf),
}

impl GrpcListener {
    /// The TCP address, for TCP listeners.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr(),
            Self::Unix(_, path) => Err(std::io::Error::other(format!(
                "{} is a Unix socket",
                path.display()
            ))),
        }
    }

    /// Where it listens, for the log.
    fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Self::Unix(_, path) => format!("unix://{}", path.display()),
        }
    }
}

/// Binds a Unix domain socket at `path`, replacing a stale socket left by
/// an earlier run (never any other kind of file). Mode 0660: Envoy in
/// another container of the pod reaches it through the shared volume and
/// the pod's fsGroup.
fn bind_unix(path: &Path) -> Result<GrpcListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path).map_err(io_error(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_error(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_error(path))?;
    Ok(GrpcListener::Unix(listener, path.to_owned()))
}

/// Keeps health current: KeyManager NOT_SERVING while the store is
/// failing (and, replicated, while etcd is unreachable: writes would be
/// refused); Authorizer and Check NOT_SERVING only in replicated mode, until
/// the replica's first full read, and once it is staler than
/// `max_staleness` (when set). Runs until the store closes or the server
/// ends (which aborts it, so it cannot undo the shutdown's NOT_SERVING).
async fn follow_store_health(
    mut health: tokio::sync::watch::Receiver<StoreHealth>,
    mut replication: Option<tokio::sync::watch::Receiver<crate::keys::Replication>>,
    max_staleness: Duration,
    reporter: tonic_health::server::HealthReporter,
    manage_enabled: bool,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut shown = None;
    loop {
        let store_ok = *health.borrow_and_update() == StoreHealth::Healthy;
        let (writes, decisions) = match &mut replication {
            None => (store_ok, true),
            Some(replication) => {
                let state = *replication.borrow_and_update();
                let age = crate::clock::now_nanos().saturating_sub(state.synced_at);
                let fresh = max_staleness.is_zero()
                    || (state.synced_at != 0
                        && u128::try_from(age).unwrap_or(0) <= max_staleness.as_nanos());
                (store_ok && state.connected, state.ready && fresh)
            }
        };
        if shown != Some((writes, decisions)) {
            if shown.is_some_and(|(_, was)| was != decisions) || !decisions {
                tracing::warn!(
                    serving = decisions,
                    "decisions health changes (replica not yet synced, or staler than --max-staleness)"
                );
            }
            let status = |ok: bool| {
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            if manage_enabled {
                reporter
                    .set_service_status(MANAGE_SERVICE, status(writes))
                    .await;
                metrics.set_serving(MANAGE_SERVICE, writes);
            }
            for service in [
                "keyward.v1.Authorizer",
                "envoy.service.auth.v3.Authorization",
            ] {
                reporter
                    .set_service_status(service, status(decisions))
                    .await;
                metrics.set_serving(service, decisions);
            }
            shown = Some((writes, decisions));
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            () = replica_changed(&mut replication) => {}
            _ = ticks.tick() => {}
        }
    }
}

/// Resolves when the replica's state changes; never without replication.
async fn replica_changed(
    replication: &mut Option<tokio::sync::watch::Receiver<crate::keys::Replication>>,
) {
    if let Some(receiver) = replication
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

fn local_addr(listener: &Incoming<TcpListener>) -> Result<std::net::SocketAddr, ServerError> {
    listener
        .get_ref()
        .local_addr()
        .map_err(io_error(Path::new("listener")))
}

/// The TLS settings, if TLS is configured: server identity, and for mutual
/// TLS the CA that client certificates must chain to.
fn load_tls(config: &ServeConfig) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read_bytes = |path: &Path| std::fs::read(path).map_err(io_error(path));
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read_bytes(cert)?, read_bytes(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_bytes(ca)?));
    }
    tracing::info!(mutual = config.tls_client_ca.is_some(), "TLS enabled");
    Ok(Some(tls))
}

/// A compiled catalog, routes against it, and both texts.
type Loaded = (Arc<Catalog>, Arc<RouteTable>, Arc<Tables>);

/// The catalog and routes (configured files, or the bundled SendGrid
/// ones), compiled, and their text for the decision feed.
fn load_tables(config: &ServeConfig) -> Result<Loaded, ServerError> {
    let (catalog_source, catalog_text) = match &config.catalog {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (
            "<bundled sendgrid.catalog>".to_owned(),
            SENDGRID_CATALOG.to_owned(),
        ),
    };
    let (routes_source, routes_text) = match &config.routes {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (
            "<bundled sendgrid.routes>".to_owned(),
            SENDGRID_ROUTES.to_owned(),
        ),
    };
    let catalog = Arc::new(Catalog::parse(&catalog_source, &catalog_text)?);
    let routes = Arc::new(RouteTable::parse(&routes_source, &routes_text, &catalog)?);
    let tables = Arc::new(Tables {
        catalog_source,
        catalog: catalog_text,
        routes_source,
        routes: routes_text,
    });
    Ok((catalog, routes, tables))
}

fn read(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(io_error(path))
}

fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))
}

/// Least estimated randomness of an admin token, in bits.
const MIN_TOKEN_BITS: f64 = 128.0;

/// Whether a token is long and varied enough to stand against guessing:
/// at least 32 characters, and at least [`MIN_TOKEN_BITS`] by the Shannon
/// entropy of its own character frequencies (32 `a`s score 0 bits; a
/// 32-byte random base64 token scores ~250). A screen for obvious mistakes,
/// not a proof of randomness.
fn strong_enough(token: &str) -> bool {
    let mut counts = [0u32; 256];
    for byte in token.bytes() {
        counts[usize::from(byte)] += 1;
    }
    let len = f64::from(u32::try_from(token.len()).unwrap_or(u32::MAX));
    let bits_per_char: f64 = counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let p = f64::from(n) / len;
            -p * p.log2()
        })
        .sum();
    token.len() >= 32 && bits_per_char * len >= MIN_TOKEN_BITS
}

/// Which token a file holds.
#[derive(Debug, Clone, Copy)]
enum Token {
    /// The operator's: every management call.
    Admin,
    /// The decision feed's reader: the feed only.
    FeedReader,
}

impl Token {
    /// Its name in the log, and the prefix of a token keyward makes.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Admin => ("admin", "kwadmin"),
            Self::FeedReader => ("feed reader", "kwfeed"),
        }
    }

    /// The refusal of a token file any local user can read: each file its
    /// own error, so the operator knows which flag's file to fix.
    fn exposed(self, path: &Path, mode: u32) -> ServerError {
        match self {
            Self::Admin => ServerError::ExposedAdminToken(path.to_owned(), mode),
            Self::FeedReader => ServerError::ExposedFeedToken(path.to_owned(), mode),
        }
    }

    /// The refusal of a weak token.
    fn weak(self, path: &Path) -> ServerError {
        match self {
            Self::Admin => ServerError::WeakAdminToken(path.to_owned()),
            Self::FeedReader => ServerError::WeakFeedToken(path.to_owned()),
        }
    }
}

/// Reads a token file (refusing a world-readable or weak one), or creates
/// it with a fresh random token, mode 0600. Only its hash is kept in
/// memory; the token itself is never logged.
fn load_or_create_token(path: &Path, kind: Token) -> Result<SecretHash, ServerError> {
    let (what, prefix) = kind.names();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                // Follows symlinks: a Kubernetes Secret's file is a link.
                let mode = std::fs::metadata(path)
                    .map_err(io_error(path))?
                    .permissions()
                    .mode();
                if mode & 0o004 != 0 {
                    return Err(kind.exposed(path, mode & 0o777));
                }
            }
            let token = text.trim();
            if !strong_enough(token) {
                return Err(kind.weak(path));
            }
            tracing::info!(path = %path.display(), token = what, "using the token file");
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| ServerError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let token = format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(raw));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io_error(path))?;
            file.write_all(token.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(io_error(path))?;
            match kind {
                Token::Admin => {
                    tracing::info!(path = %path.display(), "created the admin token file (mode 0600)");
                }
                Token::FeedReader => tracing::info!(
                    path = %path.display(),
                    "created the feed reader token file (mode 0600): give it to the Envoy module's token_file"
                ),
            }
            Ok(SecretHash::of(token.as_bytes()))
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{ServerError, Token, load_or_create_token, strong_enough};

    /// A feed token file is refused as the feed's, never as the admin
    /// token: the operator is told which flag's file to fix.
    #[test]
    fn a_bad_feed_token_file_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.token");
        std::fs::write(&path, "short\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let error = load_or_create_token(&path, Token::FeedReader).expect_err("weak");
        assert!(matches!(error, ServerError::WeakFeedToken(_)), "{error:?}");
        assert!(error.to_string().contains("--feed-token-file"), "{error}");
        let error = load_or_create_token(&path, Token::Admin).expect_err("weak");
        assert!(matches!(error, ServerError::WeakAdminToken(_)), "{error:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let error = load_or_create_token(&path, Token::FeedReader).expect_err("exposed");
            assert!(
                matches!(error, ServerError::ExposedFeedToken(_, 0o644)),
                "{error:?}"
            );
        }
    }

    #[test]
    fn obviously_weak_tokens_are_refused() {
        for weak in [
            "short",
            &"a".repeat(32),
            &"ab".repeat(40),
            "passwordpasswordpasswordpassword",
            "0123456789012345678901234567890123",
        ] {
            assert!(!strong_enough(weak), "{weak:?}");
        }
        for strong in [
            "kwadmin_3q2-7wAbYz9XkLmN0pQrStUvWxYz1a2B3c4D5e6F7g8",
            "Zq8vN1xW4mK7pR2tY5uB9cE3hJ6lO0sA",
        ] {
            assert!(strong_enough(strong), "{strong:?}");
        }
    }
}
