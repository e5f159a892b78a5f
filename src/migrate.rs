//! `keyward migrate`: moves a standalone data directory's keys into etcd,
//! for replicated mode. Idempotent: run it again after an interruption.

use anyhow::Context;

use crate::config::DataArgs;
use crate::store::db::Store;
use crate::store::etcd::{self, Etcd};

/// `keyward migrate` arguments.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The standalone data directory to read (keyward must be stopped).
    #[command(flatten)]
    pub data: DataArgs,

    /// etcd client URLs, comma-separated (`http://127.0.0.1:2379,...`).
    #[arg(
        long,
        env = "KEYWARD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,

    /// The etcd key prefix keyward's keys live under.
    #[arg(long, env = "KEYWARD_ETCD_PREFIX", default_value = etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
}

/// Runs the migration and prints what it did.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let dir = args.data.data_dir.join("db");
    anyhow::ensure!(
        dir.is_dir(),
        "{} holds no keyward store (is --data-dir right?)",
        dir.display()
    );
    let store = Store::open(&dir).with_context(|| {
        format!(
            "opening {} (stop keyward first: the store is locked while it runs)",
            dir.display()
        )
    })?;
    let etcd = Etcd::connect(&args.etcd_endpoints, &args.etcd_prefix)?;
    let migrated = etcd::migrate(&store, &etcd)
        .await
        .context("migration stopped; keys already written stay, run it again to continue")?;
    println!(
        "migrated {} keys to etcd under {}; {} were already there",
        migrated.written, args.etcd_prefix, migrated.present
    );
    Ok(())
}
