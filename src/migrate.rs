//! `keyward migrate`: moves a standalone data directory's keys into etcd,
//! for replicated mode. Idempotent: run it again after an interruption.

use anyhow::Context;

use crate::config::{DataArgs, EtcdArgs};
use crate::store::db::Store;
use crate::store::etcd::{self, Etcd};

/// `keyward migrate` arguments.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The standalone data directory to read (keyward must be stopped).
    #[command(flatten)]
    pub data: DataArgs,

    /// Where to move them (endpoints required).
    #[command(flatten)]
    pub etcd: EtcdArgs,
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
    let connection = args
        .etcd
        .connection()
        .map_err(|(path, e)| anyhow::anyhow!("{}: {e}", path.display()))?
        .context("--etcd-endpoints is required")?;
    let etcd = Etcd::open(&connection)?;
    etcd.authenticate().await?;
    let migrated = etcd::migrate(&store, &etcd)
        .await
        .context("migration stopped; keys already written stay, run it again to continue")?;
    println!(
        "migrated {} keys to etcd under {}; {} were already there",
        migrated.written, args.etcd.etcd_prefix, migrated.present
    );
    Ok(())
}
