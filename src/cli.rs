//! `keyward keys …`: the operator's client for the KeyManager RPCs, so daily
//! work needs no grpcurl. Uses the local admin token unless given a key.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::DataArgs;
use crate::pb::v1 as pb;
use crate::pb::v1::key_manager_client::KeyManagerClient;

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
    Create {
        /// The key's name.
        #[arg(long)]
        name: String,
        /// A scope to grant (repeatable). With neither --scope nor --access:
        /// Full Access.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A category access level, `category=none|read|write|full` (repeatable).
        #[arg(long = "access")]
        access: Vec<String>,
        /// Account to create in (admin token only).
        #[arg(long, default_value = "")]
        account: String,
        /// Expire the key after this long, e.g. `30d`, `12h`, `90m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Allow the key only from this address range (repeatable), e.g.
        /// `10.0.0.0/8`. Default: any address.
        #[arg(long = "allow-cidr")]
        allowed_cidrs: Vec<String>,
        /// A rate limit per sidecar, `requests/period`: `100/s`, `5000/h`,
        /// `10/30s`.
        #[arg(long, value_parser = parse_rate)]
        rate: Option<Rate>,
        /// How many requests may pass at once (default: the rate's
        /// requests).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
    },
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
    /// Set a key's rate limit per sidecar (`--rate 100/s --burst 20`), or
    /// remove it (`--none`).
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

/// Runs one `keyward keys` command, printing its result to stdout.
#[allow(
    clippy::too_many_lines,
    reason = "one arm per subcommand reads best in one place"
)]
pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    let (mut client, bearer) = connect(&args.client).await?;
    let out = match args.command {
        KeysCommand::Create {
            name,
            scopes,
            access,
            account,
            expires_in,
            allowed_cidrs,
            rate,
            burst,
        } => {
            let response = client
                .create_key(authed(
                    &bearer,
                    pb::CreateKeyRequest {
                        name,
                        scopes,
                        access: parse_access(&access)?,
                        account_id: account,
                        expires_at: expires_in.map(from_now),
                        allowed_cidrs,
                        rate_limit: rate.map(|rate| rate.with_burst(burst)),
                    },
                ))
                .await?
                .into_inner();
            show_new_secret(response.key.as_ref(), &response.secret)
        }
        KeysCommand::List {
            account,
            page_size,
            unused_for,
        } => {
            let unused_for = unused_for
                .map(prost_types::Duration::try_from)
                .transpose()
                .context("--unused-for is too long")?;
            let mut out = String::new();
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_keys(authed(
                        &bearer,
                        pb::ListKeysRequest {
                            account_id: account.clone(),
                            page_size,
                            page_token,
                            unused_for,
                        },
                    ))
                    .await?
                    .into_inner();
                for key in &page.keys {
                    keys.push(key_json(key));
                    let state = match (key.enabled, key.expired) {
                        (_, true) => "expired",
                        (false, false) => "disabled",
                        (true, false) => "enabled",
                    };
                    let _ = writeln!(
                        out,
                        "{}  {:<18}  {:<8}  {:<17}  {}",
                        key.key_id,
                        kind_name(key.kind),
                        state,
                        key.last_used_at
                            .as_ref()
                            .map_or_else(|| "never used".to_owned(), to_the_minute),
                        key.name
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            Shown {
                text: out,
                json: serde_json::json!({ "keys": keys }),
            }
        }
        KeysCommand::Get { key_id } => show_key(
            &client
                .get_key(authed(&bearer, pb::GetKeyRequest { key_id }))
                .await?
                .into_inner(),
        ),
        KeysCommand::Update {
            key_id,
            name,
            scopes,
            access,
        } => show_key(
            &client
                .update_key(authed(
                    &bearer,
                    pb::UpdateKeyRequest {
                        key_id,
                        name,
                        scopes,
                        access: parse_access(&access)?,
                    },
                ))
                .await?
                .into_inner(),
        ),
        KeysCommand::Rename { key_id, name } => show_key(
            &client
                .rename_key(authed(&bearer, pb::RenameKeyRequest { key_id, name }))
                .await?
                .into_inner(),
        ),
        KeysCommand::Delete { key_id } => {
            client
                .delete_key(authed(
                    &bearer,
                    pb::DeleteKeyRequest {
                        key_id: key_id.clone(),
                    },
                ))
                .await?;
            Shown {
                text: format!("revoked {key_id}\n"),
                json: serde_json::json!({ "revoked": key_id }),
            }
        }
        KeysCommand::Rotate { key_id, overlap } => {
            let response = client
                .rotate_key(authed(
                    &bearer,
                    pb::RotateKeyRequest {
                        key_id,
                        overlap: Some(
                            prost_types::Duration::try_from(overlap)
                                .context("--overlap is too long")?,
                        ),
                    },
                ))
                .await?
                .into_inner();
            show_new_secret(response.key.as_ref(), &response.secret)
        }
        KeysCommand::Allow {
            key_id,
            cidrs,
            any: _,
        } => show_key(
            &client
                .set_key_allowlist(authed(
                    &bearer,
                    pb::SetKeyAllowlistRequest {
                        key_id,
                        allowed_cidrs: cidrs,
                    },
                ))
                .await?
                .into_inner(),
        ),
        KeysCommand::Limit {
            key_id,
            rate,
            burst,
            none: _,
        } => show_key(
            &client
                .set_key_rate_limit(authed(
                    &bearer,
                    pb::SetKeyRateLimitRequest {
                        key_id,
                        rate_limit: rate.map(|rate| rate.with_burst(burst)),
                    },
                ))
                .await?
                .into_inner(),
        ),
        KeysCommand::Disable { key_id } => show_key(
            &client
                .disable_key(authed(&bearer, pb::DisableKeyRequest { key_id }))
                .await?
                .into_inner(),
        ),
        KeysCommand::Enable { key_id } => show_key(
            &client
                .enable_key(authed(&bearer, pb::EnableKeyRequest { key_id }))
                .await?
                .into_inner(),
        ),
        KeysCommand::Expire {
            key_id,
            after,
            never: _,
        } => show_key(
            &client
                .set_key_expiry(authed(
                    &bearer,
                    pb::SetKeyExpiryRequest {
                        key_id,
                        expires_at: after.map(from_now),
                    },
                ))
                .await?
                .into_inner(),
        ),
        KeysCommand::Scopes => {
            let scopes = client
                .get_scopes(authed(&bearer, pb::GetScopesRequest {}))
                .await?
                .into_inner()
                .scopes;
            Shown {
                text: scopes.iter().fold(String::new(), |mut out, s| {
                    let _ = writeln!(out, "{s}");
                    out
                }),
                json: serde_json::json!({ "scopes": scopes }),
            }
        }
        KeysCommand::Catalog => {
            let catalog = client
                .list_catalog(authed(&bearer, pb::ListCatalogRequest {}))
                .await?
                .into_inner();
            let mut out = String::new();
            let mut categories = Vec::new();
            for category in catalog.categories {
                let levels: Vec<&str> = category.levels.iter().map(|l| level_name(*l)).collect();
                categories.push(serde_json::json!({
                    "id": category.id,
                    "title": category.title,
                    "levels": levels,
                    "exclusive": category.exclusive,
                    "scopes": category.scopes,
                }));
                let _ = writeln!(
                    out,
                    "[{}] {} (levels: {}{})",
                    category.id,
                    category.title,
                    levels.join(", "),
                    if category.exclusive {
                        "; exclusive"
                    } else {
                        ""
                    }
                );
                for scope in category.scopes {
                    let _ = writeln!(out, "  {scope}");
                }
            }
            Shown {
                text: out,
                json: serde_json::json!({ "categories": categories }),
            }
        }
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

fn parse_access(pairs: &[String]) -> anyhow::Result<HashMap<String, i32>> {
    pairs
        .iter()
        .map(|pair| {
            let Some((category, level)) = pair.split_once('=') else {
                bail!("--access {pair:?}: expected category=level");
            };
            let level = match level.to_ascii_lowercase().as_str() {
                "none" => pb::AccessLevel::None,
                "read" => pb::AccessLevel::Read,
                "write" => pb::AccessLevel::Write,
                "full" => pb::AccessLevel::Full,
                other => {
                    bail!("--access {pair:?}: unknown level {other:?} (none, read, write, full)")
                }
            };
            Ok((category.to_owned(), level as i32))
        })
        .collect()
}

fn show_key(key: &pb::ApiKey) -> Shown {
    Shown {
        text: key_text(key),
        json: key_json(key),
    }
}

/// A key for scripts: stable field names (README, "Output for scripts").
fn key_json(key: &pb::ApiKey) -> serde_json::Value {
    let time = |t: Option<&prost_types::Timestamp>| t.map(ToString::to_string);
    serde_json::json!({
        "key_id": key.key_id,
        "name": key.name,
        "kind": kind_name(key.kind),
        "account_id": key.account_id,
        "scopes": key.scopes,
        "enabled": key.enabled,
        "expired": key.expired,
        "created_at": time(key.created_at.as_ref()),
        "expires_at": time(key.expires_at.as_ref()),
        "last_used_at": time(key.last_used_at.as_ref()),
        "previous_secret_valid_until": time(key.previous_secret_valid_until.as_ref()),
        "allowed_cidrs": key.allowed_cidrs,
        "rate_limit": key.rate_limit.as_ref().map(|limit| serde_json::json!({
            "requests": limit.requests,
            "period_seconds": limit
                .period
                .and_then(|p| std::time::Duration::try_from(p).ok())
                .map(|p| p.as_secs_f64()),
            "burst": limit.burst,
        })),
        "leak": key.leak.as_ref().map(|leak| serde_json::json!({
            "reported_at": time(leak.reported_at.as_ref()),
            "url": leak.url,
            "source": leak.source,
            "type": leak.r#type,
            "previous_secret": leak.previous_secret,
        })),
    })
}

fn key_text(key: &pb::ApiKey) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "key_id:     {}", key.key_id);
    let _ = writeln!(out, "name:       {}", key.name);
    let _ = writeln!(out, "kind:       {}", kind_name(key.kind));
    let _ = writeln!(out, "account_id: {}", key.account_id);
    if let Some(created) = &key.created_at {
        let _ = writeln!(out, "created_at: {created}");
    }
    let _ = writeln!(out, "scopes:     {}", key.scopes.join(" "));
    let _ = writeln!(out, "enabled:    {}", key.enabled);
    match &key.expires_at {
        Some(at) => {
            let _ = writeln!(
                out,
                "expires_at: {at}{}",
                if key.expired { " (expired)" } else { "" }
            );
        }
        None => out.push_str("expires_at: never\n"),
    }
    if key.allowed_cidrs.is_empty() {
        out.push_str("allowed_from: any address\n");
    } else {
        let _ = writeln!(out, "allowed_from: {}", key.allowed_cidrs.join(" "));
    }
    match &key.rate_limit {
        Some(limit) => {
            let period = limit
                .period
                .and_then(|p| std::time::Duration::try_from(p).ok())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "rate_limit: {}/{} per sidecar, burst {}",
                limit.requests,
                humantime::format_duration(period),
                limit.burst
            );
        }
        None => out.push_str("rate_limit: none\n"),
    }
    match &key.last_used_at {
        Some(at) => {
            let _ = writeln!(out, "last_used:  {}", to_the_minute(at));
        }
        None => out.push_str("last_used:  never\n"),
    }
    if let Some(until) = &key.previous_secret_valid_until {
        let _ = writeln!(out, "previous secret valid until: {until}");
    }
    if let Some(leak) = &key.leak {
        let _ = writeln!(
            out,
            "leaked:     {} secret found in public at {} ({}, {}), reported {}; {}",
            if leak.previous_secret {
                "its previous"
            } else {
                "its"
            },
            if leak.url.is_empty() {
                "an unknown URL"
            } else {
                &leak.url
            },
            if leak.source.is_empty() {
                "unknown source"
            } else {
                &leak.source
            },
            leak.r#type,
            leak.reported_at
                .as_ref()
                .map_or_else(|| "at an unknown time".to_owned(), ToString::to_string),
            if leak.previous_secret {
                "its rotation overlap was ended"
            } else if key.enabled {
                "rotate it: `keyward keys rotate`"
            } else {
                "disabled: rotate it, then the admin enables it"
            }
        );
    }
    out
}

/// A key with its new secret, which is shown this once (create, rotate).
fn show_new_secret(key: Option<&pb::ApiKey>, secret: &str) -> Shown {
    let mut out = key.map(key_text).unwrap_or_default();
    let _ = writeln!(out, "secret:     {secret}");
    out.push_str("Store the secret now: keyward keeps only its hash and cannot show it again.\n");
    Shown {
        text: out,
        json: serde_json::json!({ "key": key.map(key_json), "secret": secret }),
    }
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

/// `100/s`, `5000/h`, `10/30s`: requests per a unit (`s`, `m`, `h`, `d`)
/// or a duration. The server checks the range.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let (requests, period) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected requests/period, e.g. 100/s"))?;
    let requests = requests
        .trim()
        .parse()
        .map_err(|_| format!("{requests:?}: not a number of requests"))?;
    let period = match period.trim() {
        "s" | "sec" | "second" => std::time::Duration::from_secs(1),
        "m" | "min" | "minute" => std::time::Duration::from_secs(60),
        "h" | "hour" => std::time::Duration::from_secs(3600),
        "d" | "day" => std::time::Duration::from_secs(86_400),
        other => humantime::parse_duration(other).map_err(|e| format!("{other:?}: {e}"))?,
    };
    Ok(Rate { requests, period })
}

/// A timestamp as `2026-11-23T17:42Z` (last-used times are kept to the
/// minute).
fn to_the_minute(at: &prost_types::Timestamp) -> String {
    let text = at.to_string();
    text.get(..16)
        .map_or(text.clone(), |minute| format!("{minute}Z"))
}

/// `now + after` as a protobuf timestamp.
fn from_now(after: std::time::Duration) -> prost_types::Timestamp {
    let at = std::time::SystemTime::now() + after;
    prost_types::Timestamp::from(at)
}

fn kind_name(kind: i32) -> &'static str {
    match pb::KeyKind::try_from(kind) {
        Ok(pb::KeyKind::FullAccess) => "full_access",
        Ok(pb::KeyKind::RestrictedAccess) => "restricted_access",
        Ok(pb::KeyKind::Billing) => "billing",
        _ => "unspecified",
    }
}

fn level_name(level: i32) -> &'static str {
    match pb::AccessLevel::try_from(level) {
        Ok(pb::AccessLevel::None) => "none",
        Ok(pb::AccessLevel::Read) => "read",
        Ok(pb::AccessLevel::Write) => "write",
        Ok(pb::AccessLevel::Full) => "full",
        _ => "unspecified",
    }
}
