//! The `keyward` binary: `keyward serve` (the sidecar), `keyward keys …`
//! (the operator's client) and `keyward migrate` (standalone → etcd).

use clap::{Parser, Subcommand};
use keyward::cli::{self, KeysArgs};
use keyward::config::ServeConfig;
use keyward::migrate::{self, MigrateArgs};
use keyward::server::{self, App, Listeners};

#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Authorization sidecar for scoped API keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve(Box<ServeConfig>),
    /// Manage keys on a running sidecar.
    Keys(KeysArgs),
    /// Copy a stopped standalone sidecar's keys into etcd (idempotent).
    Migrate(MigrateArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(config) => {
            let log = keyward::log::init(config.log_format);
            let app = App::open(&config)?;
            let listeners = Listeners::bind(&config).await?;
            let served = Box::pin(server::run(listeners, app, shutdown_signal())).await;
            // Exit here rather than return: dropping the runtime would wait
            // for blocking storage calls, and on a stuck disk they never end.
            // Every acknowledged change is already durable.
            let code = match served {
                Ok(()) => 0,
                Err(error) => {
                    tracing::error!(%error, "keyward stopped with an error");
                    1
                }
            };
            drop(log); // writes the queued lines
            std::process::exit(code);
        }
        Command::Keys(args) => cli::run(args).await?,
        Command::Migrate(args) => migrate::run(args).await?,
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
