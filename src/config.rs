//! Settings for `keyward serve`, each a flag and an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where keyward keeps its data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "keyward-data";

/// Settings shared by the server and the CLI client (to find the admin token).
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Directory for the sled store and the admin token; created if missing.
    #[arg(long, env = "KEYWARD_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// The admin token file [default: <data-dir>/admin.token]. Created (mode
    /// 0600) on first start if missing.
    #[arg(long, env = "KEYWARD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

impl DataArgs {
    /// The admin token file in force.
    #[must_use]
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.token"))
    }
}

/// How to reach etcd (replicated mode, and `keyward migrate`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (`http://127.0.0.1:2379,...`).
    /// Given: replicated mode (etcd is the truth, the data directory holds
    /// this sidecar's replica). Not given: standalone.
    #[arg(long, env = "KEYWARD_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// The etcd key prefix keyward's keys live under.
    #[arg(long, env = "KEYWARD_ETCD_PREFIX", default_value = crate::store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// PEM CA bundle for etcd's server certificates (`https://` endpoints).
    #[arg(long, env = "KEYWARD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// PEM client certificate for etcd (mutual TLS).
    #[arg(long, env = "KEYWARD_ETCD_CERT_FILE", requires_all = ["etcd_key_file", "etcd_ca_file"])]
    pub etcd_cert_file: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(long, env = "KEYWARD_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user (etcd's own authentication), with --etcd-password-file.
    #[arg(long, env = "KEYWARD_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (trailing newline ignored).
    #[arg(long, env = "KEYWARD_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,

    /// Keys per page when a sidecar reads the whole key set from etcd (at
    /// start, after a compaction): every page at one revision. Smaller
    /// pages hold less memory per step; larger ones take fewer round trips.
    #[arg(long, env = "KEYWARD_ETCD_PAGE_KEYS", default_value_t = crate::store::etcd::DEFAULT_PAGE_KEYS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub etcd_page_keys: u32,
}

impl EtcdArgs {
    /// The connection these flags describe; `None` without endpoints
    /// (standalone). Reads the certificate, key and password files.
    pub fn connection(
        &self,
    ) -> Result<Option<crate::store::etcd::Connection>, (PathBuf, std::io::Error)> {
        if self.etcd_endpoints.is_empty() {
            return Ok(None);
        }
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| (path.clone(), e));
        let ca = self.etcd_ca_file.as_ref().map(read).transpose()?;
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        let credentials = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = String::from_utf8_lossy(&read(file)?)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                Some((user.clone(), password))
            }
            _ => None,
        };
        Ok(Some(crate::store::etcd::Connection {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca,
            identity,
            credentials,
            page_keys: self.etcd_page_keys,
        }))
    }
}

/// Where rate limits and per-key usage are shared by every sidecar.
#[derive(Clone, Default, clap::Args)]
pub struct UsageArgs {
    /// The usage store: `redis://[user:password@]host:port[/db]`, or
    /// `rediss://…` for TLS. Given: a key's rate limit holds across every
    /// sidecar using this store, and per-key usage is summed there. Not
    /// given: each sidecar enforces rate limits on its own. The URL is never
    /// logged whole; prefer --usage-store-password-file to a password in it.
    #[arg(long, env = "KEYWARD_USAGE_STORE", hide_env_values = true)]
    pub usage_store: Option<String>,

    /// The usage store is a Redis Cluster; --usage-store names one node.
    #[arg(long, env = "KEYWARD_USAGE_STORE_CLUSTER", requires = "usage_store")]
    pub usage_store_cluster: bool,

    /// File holding the usage store's password (trailing newline ignored);
    /// the user, if any, is the URL's.
    #[arg(
        long,
        env = "KEYWARD_USAGE_STORE_PASSWORD_FILE",
        requires = "usage_store"
    )]
    pub usage_store_password_file: Option<PathBuf>,

    /// PEM CA bundle for the usage store's certificate (`rediss://`).
    #[arg(long, env = "KEYWARD_USAGE_STORE_CA_FILE", requires = "usage_store")]
    pub usage_store_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for UsageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only where it points is shown.
        f.debug_struct("UsageArgs")
            .field(
                "usage_store",
                &self.usage_store.as_deref().map(crate::usage::store::redact),
            )
            .field("usage_store_cluster", &self.usage_store_cluster)
            .field("usage_store_password_file", &self.usage_store_password_file)
            .field("usage_store_ca_file", &self.usage_store_ca_file)
            .finish()
    }
}

impl UsageArgs {
    /// The connection these flags describe; `None` without a store. Reads
    /// the password and CA files.
    pub fn connection(
        &self,
    ) -> Result<Option<crate::usage::Connection>, (PathBuf, std::io::Error)> {
        let Some(url) = &self.usage_store else {
            return Ok(None);
        };
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| (path.clone(), e));
        let password = self
            .usage_store_password_file
            .as_ref()
            .map(|file| {
                read(file).map(|bytes| {
                    String::from_utf8_lossy(&bytes)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned()
                })
            })
            .transpose()?;
        Ok(Some(crate::usage::Connection {
            url: url.clone(),
            cluster: self.usage_store_cluster,
            password,
            ca: self.usage_store_ca_file.as_ref().map(read).transpose()?,
        }))
    }
}

/// `keyward serve` settings.
#[derive(Debug, Clone, clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "command-line switches, each its own flag"
)]
pub struct ServeConfig {
    /// Data directory and admin token.
    #[command(flatten)]
    pub data: DataArgs,

    /// Address to serve gRPC on: `host:port`, or `unix:///path/to/socket`
    /// (a Unix domain socket, e.g. on a volume shared with Envoy in the pod).
    /// Loopback by default: a sidecar is reached from inside its pod.
    #[arg(long, env = "KEYWARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: ListenAddr,

    /// A scope catalog file replacing the bundled SendGrid catalog.
    #[arg(long, env = "KEYWARD_CATALOG")]
    pub catalog: Option<PathBuf>,

    /// A route table file replacing the bundled SendGrid routes.
    #[arg(long, env = "KEYWARD_ROUTES")]
    pub routes: Option<PathBuf>,

    /// Most keys one account may hold.
    #[arg(long, env = "KEYWARD_MAX_KEYS_PER_ACCOUNT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_keys_per_account: u32,

    /// Serve KeyManager on this separate address instead of `--listen`
    /// (e.g. loopback only, while Authorize and Check face the pod network).
    #[arg(long, env = "KEYWARD_MANAGE_LISTEN", conflicts_with = "disable_manage")]
    pub manage_listen: Option<SocketAddr>,

    /// Serve SendGrid's key-management REST API (`/v3/api_keys`,
    /// `/v3/scopes`), its OpenAPI document (`/openapi.json`) and the web
    /// console (`/`) on this address, e.g. `127.0.0.1:8081`. Off unless set.
    #[arg(long, env = "KEYWARD_HTTP_LISTEN", conflicts_with = "disable_manage")]
    pub http_listen: Option<SocketAddr>,

    /// Do not serve the web console on `--http-listen` (the REST API and
    /// its OpenAPI document stay).
    #[arg(long, env = "KEYWARD_DISABLE_UI")]
    pub disable_ui: bool,

    /// GitHub's secret scanning public keys, saved as GitHub serves them
    /// (`https://api.github.com/meta/public_keys/secret_scanning`): serves
    /// `POST /secret-scanning/github` on `--http-listen`, where GitHub
    /// reports keys found in public. keyward never fetches the file:
    /// refresh it (docs/secret-scanning.md); changes are picked up within
    /// seconds, and an unusable file keeps the keys in force.
    #[arg(long, env = "KEYWARD_SECRET_SCANNING_KEYS", requires = "http_listen")]
    pub secret_scanning_keys: Option<PathBuf>,

    /// What a verified report of a live key found in public does: disable
    /// it (reversible by the admin only), revoke (delete) it, or only
    /// report it (mark, log, count).
    #[arg(long, env = "KEYWARD_LEAKED_KEY_ACTION", value_enum, default_value_t = crate::keys::LeakAction::Disable)]
    pub leaked_key_action: crate::keys::LeakAction,

    /// A token that reads the decision feed (`keyward.v1.DecisionFeed`,
    /// what the Envoy module follows) and nothing else: give the module
    /// this file instead of the admin token. Created (mode 0600) on first
    /// start if missing. Unset: only the admin token reads the feed.
    #[arg(long, env = "KEYWARD_FEED_TOKEN_FILE")]
    pub feed_token_file: Option<PathBuf>,

    /// Do not serve KeyManager at all: this sidecar only decides, on the
    /// keys its data directory holds (sled locks the directory, so no other
    /// process can manage them while it runs).
    #[arg(long, env = "KEYWARD_DISABLE_MANAGE")]
    pub disable_manage: bool,

    /// Address for Prometheus metrics (`GET /metrics`).
    #[arg(long, env = "KEYWARD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// Do not serve metrics.
    #[arg(long, env = "KEYWARD_DISABLE_METRICS")]
    pub disable_metrics: bool,

    /// Requests in flight across all connections before new ones are shed
    /// with RESOURCE_EXHAUSTED (instead of queueing without bound).
    #[arg(long, env = "KEYWARD_MAX_CONCURRENT_REQUESTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// HTTP/2 streams one connection may have open at once (advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS, on the gRPC and REST listeners):
    /// what one connection can hold, and its share of
    /// `--max-concurrent-requests`. At most half of that budget.
    #[arg(long, env = "KEYWARD_MAX_STREAMS_PER_CONNECTION", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// Connections each listener holds at once; one more is accepted and
    /// closed at once (counted in `keyward_connections_refused_total`).
    #[arg(long, env = "KEYWARD_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A connection from which nothing has arrived for this long is closed
    /// (as is one whose writes have made no progress for this long).
    #[arg(long, env = "KEYWARD_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,

    /// Per-request deadline in milliseconds (a client's shorter grpc-timeout wins).
    #[arg(long, env = "KEYWARD_REQUEST_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    /// Largest request message (gRPC) or body (REST) accepted, in bytes.
    /// keyward's own requests fit in a few KiB (a 1,024-entry scope list is
    /// ~40 KiB) and Envoy's Check carries at most its 60 KiB of headers by
    /// default; buffered requests in flight are bounded by
    /// `--max-concurrent-requests` times this (64 MiB by default).
    #[arg(long, env = "KEYWARD_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_message_bytes: u32,

    /// Longest a KeyManager change (or read) waits for the store, in
    /// milliseconds; past it the caller gets UNAVAILABLE and nothing is
    /// acknowledged. Keep it below `--request-timeout-ms`.
    #[arg(long, env = "KEYWARD_STORE_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub store_timeout_ms: u64,

    /// How often keys' last-used times (kept to the minute, in memory) are
    /// written to the store, in milliseconds. A crash loses at most this
    /// much of them; a graceful shutdown loses none.
    #[arg(long, env = "KEYWARD_LAST_USED_FLUSH_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub last_used_flush_ms: u64,

    /// On SIGTERM, how long health reports NOT_SERVING (while still serving)
    /// before the listeners close, in milliseconds.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE_MS", default_value_t = 1000)]
    pub shutdown_grace_ms: u64,

    /// After the listeners close, how long in-flight requests may take
    /// before remaining connections are dropped, in milliseconds.
    #[arg(long, env = "KEYWARD_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,

    /// PEM certificate chain: serve gRPC over TLS (needs `--tls-key`).
    #[arg(long, env = "KEYWARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "KEYWARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "KEYWARD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Failed verifications per key id, live or not (and invalid
    /// credentials at KeyManager) per minute before keyward warns and counts a detection
    /// (0: off). Replies are never delayed: see `guard`.
    #[arg(long, env = "KEYWARD_FAILED_AUTH_LIMIT", default_value_t = 20)]
    pub failed_auth_limit: u32,

    /// ext_authz: how many proxies in front of Envoy append the address
    /// they saw to `X-Forwarded-For` and are trusted to (a load balancer:
    /// 1). Must equal Envoy's `xff_num_trusted_hops` (with
    /// `use_remote_address: true`), so that allowlists are checked against
    /// the address Envoy and the module see. 0: the direct peer, and
    /// `X-Forwarded-For` is never read. See docs/security.md, "Which
    /// client address".
    #[arg(long, env = "KEYWARD_XFF_TRUSTED_HOPS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub xff_trusted_hops: u32,

    /// Serve `keyward.v1.Diagnostics/Echo` (a no-op RPC for load tests).
    #[arg(long, env = "KEYWARD_ENABLE_ECHO")]
    pub enable_echo: bool,

    /// Log format.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Replicated mode: etcd endpoints, prefix, TLS and user.
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// The usage store shared by every sidecar.
    #[command(flatten)]
    pub usage: UsageArgs,

    /// Replicated mode: once the replica has not been confirmed current for
    /// this long (etcd unreachable), report `keyward.v1.Authorizer` and
    /// Envoy's `Authorization` NOT_SERVING, so readiness takes the pod out
    /// of rotation. `0s` (the default): keep serving from the replica
    /// however long etcd is away (see README, "etcd away").
    #[arg(long, env = "KEYWARD_MAX_STALENESS", default_value = "0s", value_parser = humantime::parse_duration)]
    pub max_staleness: std::time::Duration,

    /// Replicated mode: `full` holds every key in memory and on disk (ready
    /// once it has read them all); `on-demand` holds only the keys callers
    /// present, fetched from etcd at their first sight (ready at once,
    /// memory follows the working set). See README, "Replica modes".
    #[arg(long, env = "KEYWARD_REPLICA_MODE", value_enum, default_value_t = ReplicaMode::Full)]
    pub replica_mode: ReplicaMode,

    /// On-demand replica: the most keys held in memory; past it the least
    /// used are evicted (and fetched again when presented).
    #[arg(long, env = "KEYWARD_REPLICA_CACHE_KEYS", default_value_t = crate::keys::demand::DEFAULT_CACHE_KEYS,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub replica_cache_keys: u64,

    /// On-demand replica: the most etcd reads a second for keys seen for
    /// the first time (burst the same). Past it a new key is refused as
    /// unverifiable: a flood of made-up key ids costs etcd at most this.
    #[arg(long, env = "KEYWARD_REPLICA_FETCH_RATE", default_value_t = crate::keys::demand::DEFAULT_FETCH_RATE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub replica_fetch_rate: u32,
}

/// How much of etcd's key set a replicated sidecar holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplicaMode {
    /// Every key, in memory and in the data directory.
    Full,
    /// The keys presented, in memory, fetched at their first sight.
    OnDemand,
}

impl ServeConfig {
    /// Defaults for a data directory, as tests and embedders want them:
    /// every listener on an ephemeral loopback port, no shutdown grace.
    #[must_use]
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        Self {
            data: DataArgs {
                data_dir,
                admin_token_file: None,
            },
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            catalog: None,
            routes: None,
            max_keys_per_account: 100,
            manage_listen: None,
            feed_token_file: None,
            http_listen: None,
            disable_ui: false,
            secret_scanning_keys: None,
            leaked_key_action: crate::keys::LeakAction::Disable,
            disable_manage: false,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            disable_metrics: false,
            max_concurrent_requests: 256,
            request_timeout_ms: 2000,
            store_timeout_ms: 1000,
            last_used_flush_ms: 60_000,
            max_message_bytes: 256 * 1024,
            max_streams_per_connection: 100,
            max_connections: 1024,
            idle_timeout: std::time::Duration::from_secs(300),
            shutdown_grace_ms: 0,
            drain_timeout_ms: 5000,
            enable_echo: false,
            xff_trusted_hops: 0,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            failed_auth_limit: 20,
            log_format: LogFormat::Human,
            usage: UsageArgs::default(),
            etcd: EtcdArgs {
                etcd_prefix: crate::store::etcd::DEFAULT_PREFIX.to_owned(),
                ..EtcdArgs::default()
            },
            max_staleness: std::time::Duration::ZERO,
            replica_mode: ReplicaMode::Full,
            replica_cache_keys: crate::keys::demand::DEFAULT_CACHE_KEYS,
            replica_fetch_rate: crate::keys::demand::DEFAULT_FETCH_RATE,
        }
    }
}

/// Where the gRPC listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket at this path.
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text
            .strip_prefix("unix://")
            .or_else(|| text.strip_prefix("unix:"))
        {
            if !path.starts_with('/') {
                return Err(format!(
                    "{text:?}: a Unix socket path must be absolute (unix:///run/keyward.sock)"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        text.parse()
            .map(Self::Tcp)
            .map_err(|_| format!("{text:?}: expected host:port or unix:///absolute/path"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

pub use crate::log::LogFormat;
