//! The `keyward` binary: `keyward serve` (the sidecar), `keyward keys …`
//! (the operator's client), `keyward backup` and `keyward restore` (an
//! online backup, a data directory from one) and `keyward migrate`
//! (standalone → etcd).

use clap::{Parser, Subcommand};
use keyward::backup::{self, BackupArgs, RestoreArgs};
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
    /// Take an online, consistent backup of a running sidecar's keys
    /// (admin token).
    Backup(BackupArgs),
    /// Create a data directory from a backup file (checked whole first).
    Restore(RestoreArgs),
    /// Copy a stopped standalone sidecar's keys into etcd (idempotent).
    Migrate(MigrateArgs),
    /// Print a shell completion script (e.g. `keyward completions bash >
    /// /etc/bash_completion.d/keyward`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `keyward man > keyward.1; man ./keyward.1`.
    Man,
}

#[tokio::main]
async fn main() {
    let command = Cli::parse().command;
    // What an "unreachable" error names.
    let peer = match &command {
        Command::Keys(args) => args.client.server.clone(),
        Command::Backup(args) => args.client.server.clone(),
        Command::Migrate(_) => "etcd".to_owned(),
        _ => "the server".to_owned(),
    };
    // Expected failures are one line for a person, never a backtrace.
    if let Err(error) = run(command).await {
        std::process::exit(cli::report(&error, &peer));
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
        Command::Backup(args) => backup::backup(args).await?,
        Command::Restore(args) => backup::restore(&args)?,
        Command::Migrate(args) => migrate::run(args).await?,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "keyward", &mut script);
            print_all(&script)?;
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page)?;
            print_all(&page)?;
        }
    }
    Ok(())
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is not an
/// error.
fn print_all(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
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
