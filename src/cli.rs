//! `keyward keys …`: the operator's client for the KeyManager RPCs, so daily
//! work needs no grpcurl. Uses the local admin token unless given a key.
//!
//! This file holds the command line (its arguments, [`run`]'s dispatch,
//! the connection); `cli/commands.rs` has one function per subcommand and
//! `cli/show.rs` how results are printed.

mod commands;
mod show;

use std::path::PathBuf;

use anyhow::Context;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::DataArgs;
use crate::pb::v1 as pb;
use crate::pb::v1::key_manager_client::KeyManagerClient;
use commands::Session;

/// Exit codes of `keyward keys`, by what went wrong (2, a usage error, is
/// clap's).
pub mod exit {
    /// Anything else (a bug, a local file).
    pub const OTHER: i32 = 1;
    /// The server refused the request (invalid, forbidden, unauthenticated,
    /// a limit).
    pub const REFUSED: i32 = 3;
    /// The key (or other resource) does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// The server could not be reached or did not answer.
    pub const UNREACHABLE: i32 = 5;
}

/// Prints `error` as one line for a person on stderr (never a backtrace,
/// never tonic's debug form) and returns the exit code of its class.
#[must_use]
pub fn report(error: &anyhow::Error, server: &str) -> i32 {
    use std::io::Write;
    use tonic::Code;
    let (code, line) = if let Some(status) = error.downcast_ref::<tonic::Status>() {
        let message = status.message();
        match status.code() {
            Code::NotFound => (exit::NOT_FOUND, format!("not found: {message}")),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => (
                exit::UNREACHABLE,
                format!("{server} did not answer ({message}); is `keyward serve` running there?"),
            ),
            Code::Unauthenticated => (
                exit::REFUSED,
                format!("{message} (pass --token, or --data-dir to find the admin token)"),
            ),
            _ if message.contains("unknown scope") => (
                exit::REFUSED,
                format!("{message} (`keyward keys catalog` lists every scope)"),
            ),
            _ => (exit::REFUSED, message.to_owned()),
        }
    } else if error
        .chain()
        .any(|cause| cause.downcast_ref::<tonic::transport::Error>().is_some())
    {
        (
            exit::UNREACHABLE,
            format!("cannot reach {server}: {error:#}; is `keyward serve` running there?"),
        )
    } else {
        (exit::OTHER, format!("{error:#}"))
    };
    let _ = writeln!(std::io::stderr(), "error: {line}");
    code
}

/// How `keyward keys` prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Lines for people.
    Text,
    /// One JSON document.
    Json,
}

/// A result in both forms.
struct Shown {
    text: String,
    json: serde_json::Value,
}

/// How a client command (`keyward keys`, `keyward backup`) reaches a
/// running sidecar and which credential it sends.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The keyward server (`http://host:port`, `https://…`, or `unix:///path`).
    #[arg(
        long,
        env = "KEYWARD_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,

    /// Credential to act with (an API key or the admin token). Default: the
    /// admin token file.
    #[arg(long, env = "KEYWARD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,

    /// PEM CA to verify the server's TLS certificate (use an https:// server).
    #[arg(long, env = "KEYWARD_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with --tls-client-key).
    #[arg(
        long,
        env = "KEYWARD_TLS_CLIENT_CERT",
        global = true,
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key for --tls-client-cert.
    #[arg(
        long,
        env = "KEYWARD_TLS_CLIENT_KEY",
        global = true,
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,

    /// Where the admin token lives.
    #[command(flatten)]
    pub data: DataArgs,
}

/// `keyward keys` arguments.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The server and the credential.
    #[command(flatten)]
    pub client: ClientArgs,

    /// Output: `text` for people, `json` for scripts (one JSON document on
    /// stdout; field names in README).
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub output: OutputFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// A key management operation.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown this once only).
    Create(CreateArgs),
    /// List an account's keys.
    List {
        /// Account to list (required with the admin token).
        #[arg(long, default_value = "")]
        account: String,
        /// Keys per page.
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// Only keys not used for this long (never-used keys count from
        /// their creation), e.g. `90d`.
        #[arg(long, value_parser = humantime::parse_duration)]
        unused_for: Option<std::time::Duration>,
    },
    /// Show one key.
    Get {
        /// The key id (22 characters).
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
    },
    /// Replace a key's name and scopes (PUT).
    Update {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// The new name.
        #[arg(long)]
        name: String,
        /// The complete new scope list (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Or the complete new access levels, `category=level` (repeatable).
        #[arg(long = "access")]
        access: Vec<String>,
    },
    /// Change a key's name only (PATCH).
    Rename {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// The new name.
        #[arg(long)]
        name: String,
    },
    /// Revoke a key.
    Delete {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
    },
    /// Issue a new secret for a key (same id, scopes and name), shown once;
    /// the previous secret keeps working for `--overlap`.
    Rotate {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// How long the previous secret keeps working, e.g. `24h` (0: not at all).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        overlap: std::time::Duration,
    },
    /// Replace the address ranges a key may be used from.
    Allow {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// An address range (repeatable).
        #[arg(long = "cidr", required_unless_present = "any", conflicts_with = "any")]
        cidrs: Vec<String>,
        /// Any address (remove the allowlist).
        #[arg(long)]
        any: bool,
    },
    /// A key's usage: requests allowed and denied (denied by reason),
    /// summed over every sidecar sharing the usage store, as totals and a
    /// chart (text) or every bucket (`-o json`).
    Usage {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// `1h` (by minute), `24h`, `7d` or `30d` (by hour).
        #[arg(long, default_value = "1h")]
        range: String,
    },
    /// Set a key's rate limit (`--rate 100/s --burst 20`), or remove it
    /// (`--none`): per sidecar, or across every sidecar sharing a usage
    /// store (`--usage-store`).
    Limit {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// Requests per period, e.g. `100/s`.
        #[arg(long, value_parser = parse_rate, required_unless_present = "none", conflicts_with = "none")]
        rate: Option<Rate>,
        /// How many requests may pass at once (default: the rate's requests).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// No limit.
        #[arg(long)]
        none: bool,
    },
    /// Set a key's usage credits (`--remaining 10000 [--refill
    /// 10000/1d]`: each allowed request spends one; a refill sets the
    /// remaining credits to its amount every period), or remove them
    /// (`--none`).
    Credits {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// Credits to start with.
        #[arg(long, required_unless_present = "none", conflicts_with = "none")]
        remaining: Option<u64>,
        /// Set the remaining credits to `amount` every period, e.g.
        /// `10000/1d`, `500/h`.
        #[arg(long, value_parser = parse_refill, requires = "remaining")]
        refill: Option<Refill>,
        /// No credits (unlimited use).
        #[arg(long)]
        none: bool,
    },
    /// Disable a key: every decision denies it until `enable`.
    Disable {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
    },
    /// Enable a disabled key.
    Enable {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
    },
    /// Set when a key expires (`--in 30d`), or clear it (`--never`).
    Expire {
        /// The key id.
        // Ids are base64url: one in 64 starts with "-".
        #[arg(allow_hyphen_values = true)]
        key_id: String,
        /// Expire this long from now.
        #[arg(long = "in", value_parser = humantime::parse_duration, conflicts_with = "never", required_unless_present = "never")]
        after: Option<std::time::Duration>,
        /// Never expire.
        #[arg(long)]
        never: bool,
    },
    /// Show the calling credential's scopes.
    Scopes,
    /// Show the scope catalog.
    Catalog,
}

/// What `keyward keys create` asks for.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The key's name.
    #[arg(long)]
    pub name: String,
    /// A scope to grant (repeatable). With neither --scope nor --access:
    /// Full Access.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// A category access level, `category=none|read|write|full` (repeatable).
    #[arg(long = "access")]
    pub access: Vec<String>,
    /// Account to create in (admin token only).
    #[arg(long, default_value = "")]
    pub account: String,
    /// Expire the key after this long, e.g. `30d`, `12h`, `90m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires_in: Option<std::time::Duration>,
    /// Allow the key only from this address range (repeatable), e.g.
    /// `10.0.0.0/8`. Default: any address.
    #[arg(long = "allow-cidr")]
    pub allowed_cidrs: Vec<String>,
    /// A rate limit per sidecar, `requests/period`: `100/s`, `5000/h`,
    /// `10/30s`.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// How many requests may pass at once (default: the rate's
    /// requests).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Usage credits: how many requests the key may make in all.
    /// Default: what the creating key has left, if it has credits.
    #[arg(long)]
    pub credits: Option<u64>,
    /// Set the remaining credits to `amount` every period, e.g.
    /// `10000/1d`.
    #[arg(long, value_parser = parse_refill, requires = "credits")]
    pub refill: Option<Refill>,
}

/// Runs one `keyward keys` command, printing its result to stdout.
pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    let (client, bearer) = connect(&args.client).await?;
    let mut session = Session { client, bearer };
    let out = match args.command {
        KeysCommand::Create(create) => session.create(create).await?,
        KeysCommand::List {
            account,
            page_size,
            unused_for,
        } => session.list(account, page_size, unused_for).await?,
        KeysCommand::Get { key_id } => session.get(key_id).await?,
        KeysCommand::Update {
            key_id,
            name,
            scopes,
            access,
        } => session.update(key_id, name, scopes, &access).await?,
        KeysCommand::Rename { key_id, name } => session.rename(key_id, name).await?,
        KeysCommand::Delete { key_id } => session.delete(key_id).await?,
        KeysCommand::Rotate { key_id, overlap } => session.rotate(key_id, overlap).await?,
        KeysCommand::Allow {
            key_id,
            cidrs,
            any: _,
        } => session.allow(key_id, cidrs).await?,
        KeysCommand::Usage { key_id, range } => session.usage(key_id, range).await?,
        KeysCommand::Limit {
            key_id,
            rate,
            burst,
            none: _,
        } => session.limit(key_id, rate, burst).await?,
        KeysCommand::Credits {
            key_id,
            remaining,
            refill,
            none: _,
        } => session.credits(key_id, credits(remaining, refill)).await?,
        KeysCommand::Disable { key_id } => session.disable(key_id).await?,
        KeysCommand::Enable { key_id } => session.enable(key_id).await?,
        KeysCommand::Expire {
            key_id,
            after,
            never: _,
        } => session.expire(key_id, after).await?,
        KeysCommand::Scopes => session.scopes().await?,
        KeysCommand::Catalog => session.catalog().await?,
    };
    match args.output {
        OutputFormat::Text => print!("{}", out.text),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out.json)?),
    }
    Ok(())
}

/// The KeyManager client `args` point at, and the credential to send.
pub async fn connect(
    args: &ClientArgs,
) -> anyhow::Result<(
    KeyManagerClient<tonic::transport::Channel>,
    MetadataValue<Ascii>,
)> {
    let token = if let Some(token) = &args.token {
        token.clone()
    } else {
        let path = args.data.admin_token_path();
        std::fs::read_to_string(&path)
            .with_context(|| {
                format!(
                    "reading the admin token {} (pass --token or KEYWARD_TOKEN to use a key)",
                    path.display()
                )
            })?
            .trim()
            .to_owned()
    };
    let bearer: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .context("the token contains characters not allowed in a header")?;
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .context("--server must be a URL like http://127.0.0.1:50051 or unix:///path/to/socket")?;
    if args.tls_ca.is_some() || args.tls_client_cert.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        }
        if let (Some(cert), Some(key)) = (&args.tls_client_cert, &args.tls_client_key) {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
            ));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    Ok((KeyManagerClient::new(channel), bearer))
}

/// `message` with the credential.
pub fn authed<T>(bearer: &MetadataValue<Ascii>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    request
}

/// A rate limit as given on the command line, before its burst.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    requests: u32,
    period: std::time::Duration,
}

impl Rate {
    fn with_burst(self, burst: Option<u32>) -> pb::RateLimit {
        pb::RateLimit {
            requests: self.requests,
            period: prost_types::Duration::try_from(self.period).ok(),
            burst: burst.unwrap_or(0),
        }
    }
}

/// A refill as given on the command line: `amount/period`.
#[derive(Debug, Clone, Copy)]
pub struct Refill {
    amount: u64,
    period: std::time::Duration,
}

/// Credits as given on the command line (`None`: none).
fn credits(remaining: Option<u64>, refill: Option<Refill>) -> Option<pb::Credits> {
    remaining.map(|remaining| pb::Credits {
        remaining,
        refill: refill.map(|refill| pb::CreditRefill {
            amount: refill.amount,
            period: prost_types::Duration::try_from(refill.period).ok(),
        }),
        next_refill_at: None,
    })
}

/// `10000/1d`, `500/h`: an amount per a unit or a duration, as
/// [`parse_rate`] reads a rate.
fn parse_refill(text: &str) -> Result<Refill, String> {
    let (amount, period) = per(text, "amount")?;
    Ok(Refill { amount, period })
}

/// `100/s`, `5000/h`, `10/30s`: requests per a unit (`s`, `m`, `h`, `d`)
/// or a duration. The server checks the range.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let (requests, period) = per(text, "requests")?;
    let requests = u32::try_from(requests).map_err(|_| format!("{requests}: too many requests"))?;
    Ok(Rate { requests, period })
}

/// `N/period`: a count of `what` per a unit (`s`, `m`, `h`, `d`) or a
/// duration.
fn per(text: &str, what: &str) -> Result<(u64, std::time::Duration), String> {
    let (count, period) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected {what}/period, e.g. 100/s"))?;
    let count = count
        .trim()
        .parse()
        .map_err(|_| format!("{count:?}: not a number of {what}"))?;
    let period = match period.trim() {
        "s" | "sec" | "second" => std::time::Duration::from_secs(1),
        "m" | "min" | "minute" => std::time::Duration::from_secs(60),
        "h" | "hour" => std::time::Duration::from_secs(3600),
        "d" | "day" => std::time::Duration::from_secs(86_400),
        other => humantime::parse_duration(other).map_err(|e| format!("{other:?}: {e}"))?,
    };
    Ok((count, period))
}
