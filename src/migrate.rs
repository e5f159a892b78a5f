//! `keyward migrate`: moves a standalone data directory's keys into etcd,
//! for replicated mode. Idempotent: run it again after an interruption.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

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
    let mut progress = Progress::new(store.len());
    let migrated = crate::store::copy::migrate(&store, &etcd, &mut |done| progress.show(done))
        .await
        .context("migration stopped; keys already written stay, run it again to continue")?;
    progress.finish();
    // Keys are walked through the store's account listing: a key missing
    // from it would be silently left behind, so count against the keys.
    let stored = store.len();
    anyhow::ensure!(
        migrated.written + migrated.present == stored,
        "the store holds {stored} keys but its account listing led to {}: {} keys were not migrated (nothing in etcd is wrong; report this)",
        migrated.written + migrated.present,
        stored.saturating_sub(migrated.written + migrated.present)
    );
    println!(
        "migrated {} keys to etcd under {}; {} were already there",
        migrated.written, args.etcd.etcd_prefix, migrated.present
    );
    Ok(())
}

/// Progress on stderr (stdout carries the summary): a bar with rate and ETA
/// on a terminal; elsewhere (a pipe, a CI log, `kubectl logs`) a plain line
/// at the start and every [`LINE_EVERY`].
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: usize,
        started: Instant,
        last: Instant,
    },
}

/// How often a plain progress line is written.
const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(total: usize) -> Self {
        let total_u64 = u64::try_from(total).unwrap_or(u64::MAX);
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total_u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} keys  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            return Self::Bar(bar);
        }
        let _ = writeln!(std::io::stderr(), "migrating {total} keys to etcd");
        let now = Instant::now();
        Self::Lines {
            total,
            started: now,
            last: now,
        }
    }

    fn show(&mut self, done: &etcd::Migrated) {
        let count = done.written + done.present;
        match self {
            Self::Bar(bar) => bar.set_position(u64::try_from(count).unwrap_or(u64::MAX)),
            Self::Lines {
                total,
                started,
                last,
            } => {
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    #[allow(clippy::cast_precision_loss, reason = "a rate for people")]
                    let rate = count as f64 / started.elapsed().as_secs_f64();
                    let _ = writeln!(
                        std::io::stderr(),
                        "migrated {count} of {total} keys ({rate:.0} keys/s)"
                    );
                }
            }
        }
    }

    fn finish(&self) {
        match self {
            Self::Bar(bar) => bar.finish_and_clear(),
            Self::Lines { started, .. } => {
                let _ = writeln!(
                    std::io::stderr(),
                    "done in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
}
