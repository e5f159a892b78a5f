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

/// `keyward serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Data directory and admin token.
    #[command(flatten)]
    pub data: DataArgs,

    /// Address to serve gRPC on. Loopback by default: a sidecar is reached
    /// from inside its pod.
    #[arg(long, env = "KEYWARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

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

    /// Log format.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl ServeConfig {
    /// Defaults for a data directory, as tests and embedders want them.
    #[must_use]
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        Self {
            data: DataArgs {
                data_dir,
                admin_token_file: None,
            },
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            catalog: None,
            routes: None,
            max_keys_per_account: 100,
            log_format: LogFormat::Human,
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}
