//! `usage`: the usage store (a real `redis-server`) as users would measure
//! it. Overhead: Authorize for a key with a global rate limit (never
//! reached) beside a plain key, on one sidecar, driven by h2load and k6
//! (clients this project did not write), alternating rounds. Accuracy:
//! three replicated sidecars (a real etcd) sharing the store, a key at
//! 50/s (burst 50), demand far above it spread 70/20/10, counted by the
//! clients and read back from the usage API. The same keys through an
//! Envoy running the module price what the module's leases and borrowed
//! credits cost inside Envoy.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::envoy_bench::{ModuleEnvoy, free_port};
use super::external::{K6, Target, cpu_seconds, framed, h2load, k6, median};
use super::replicated::{Etcd, ready};
use super::{BIN, KeyManagerClient, Server, authorize_request, channel, pb};

#[derive(Debug, Clone, clap::Args)]
pub(super) struct UsageArgs {
    /// Requests per h2load run.
    #[arg(short = 'n', long, default_value_t = 200_000)]
    total: u64,
    /// Alternating rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// k6's constant arrival rate, requests per second (k6 itself needs
    /// a core for much more on this machine).
    #[arg(long, default_value_t = 1000)]
    k6_rate: u32,
    /// Seconds per k6 run.
    #[arg(long, default_value_t = 10)]
    k6_seconds: u32,
    /// Seconds of 70/20/10 demand for the accuracy run.
    #[arg(long, default_value_t = 6)]
    accuracy_seconds: u64,
}

/// One redis-server on a loopback port, no persistence, killed on drop.
struct Redis {
    child: Child,
    url: String,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// `redis-cli` against it; its output.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The Redis keys of keyward key `id`, and the bytes Redis says they
    /// take (`MEMORY USAGE`, overhead included).
    fn footprint(&self, id: &str) -> anyhow::Result<(usize, u64)> {
        let keys = self.cli(&["--scan", "--pattern", &format!("keyward:{{{id}}}:*")])?;
        let mut bytes = 0;
        let mut count = 0;
        for key in keys.lines().filter(|line| !line.is_empty()) {
            count += 1;
            bytes += self
                .cli(&["MEMORY", "USAGE", key])?
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
        Ok((count, bytes))
    }

    fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let child =
            Command::new(std::env::var("KEYWARD_REDIS").unwrap_or_else(|_| "redis-server".into()))
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-server (apt-get install redis-server)")?;
        let redis = Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(redis)
    }
}

/// Waits until the sidecar's log says the usage store answered.
async fn await_store(server: &Server) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(server.dir.join("serve.log"))
        .unwrap_or_default()
        .contains("usage store reachable")
    {
        if Instant::now() > deadline {
            bail!("the usage store never answered");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A sidecar on a fresh directory with `flags`, once its usage store
/// answered.
async fn sidecar(flags: &[&str]) -> anyhow::Result<Server> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path().to_owned();
    let server = Server::start_listening(Path::new(BIN), &dir, Some(temp), "127.0.0.1:0", flags)?;
    await_store(&server).await?;
    Ok(server)
}

/// Creates a `mail.send` key on `server`, limited to `limit` a second
/// (burst the same) when given: (key id, secret).
async fn create(server: &Server, limit: Option<u32>) -> anyhow::Result<(String, String)> {
    create_with(server, limit, None).await
}

/// [`create`], with `credits` usage credits when given.
async fn create_with(
    server: &Server,
    limit: Option<u32>,
    credits: Option<u64>,
) -> anyhow::Result<(String, String)> {
    let manage = server.manage_addr.as_deref().unwrap_or(&server.addr);
    let reply = KeyManagerClient::new(channel(manage).await?)
        .create_key(server.as_admin(pb::CreateKeyRequest {
            name: "usage".into(),
            scopes: vec!["mail.send".into()],
            account_id: "load".into(),
            rate_limit: limit.map(|requests| pb::RateLimit {
                requests,
                period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                burst: 0,
            }),
            credits: credits.map(|remaining| pb::Credits {
                remaining,
                refill: None,
                next_refill_at: None,
            }),
            ..Default::default()
        })?)
        .await?
        .into_inner();
    Ok((reply.key.context("key")?.key_id, reply.secret))
}

fn target(name: &'static str, key: &str) -> Target {
    Target {
        name,
        path: "/keyward.v1.Authorizer/Authorize",
        body: framed(&authorize_request(key)),
        json: Some(
            serde_json::json!({ "key": key, "method": "POST", "path": "/v3/mail/send" })
                .to_string(),
        ),
    }
}

pub(super) async fn run(args: UsageArgs) -> anyhow::Result<()> {
    let redis = Redis::start()?;
    overhead(&args, &redis).await?;
    accuracy(&args, &redis).await
}

/// A globally limited key beside a plain one, on a sidecar with the
/// usage store; a locally limited key beside a plain one, on a sidecar
/// without (the cost of a rate limit itself, and the baseline).
async fn overhead(args: &UsageArgs, redis: &Redis) -> anyhow::Result<()> {
    let shared = sidecar(&["--usage-store", &redis.url]).await?;
    let temp = tempfile::tempdir()?;
    let dir = temp.path().to_owned();
    let alone = Server::start_listening(Path::new(BIN), &dir, Some(temp), "127.0.0.1:0", &[])?;
    // Limits far above any rate reached here: every request spends a lease
    // (or the local budget), none is refused.
    let shared_keys = [
        ("plain+r", create(&shared, None).await?.1),
        ("global", create(&shared, Some(1_000_000)).await?.1),
        (
            "credit",
            create_with(&shared, None, Some(1_000_000_000_000)).await?.1,
        ),
        // Both: a global limit and credits (far more than any run spends).
        (
            "g+credit",
            create_with(&shared, Some(1_000_000), Some(1_000_000_000_000))
                .await?
                .1,
        ),
    ];
    let mut targets = vec![
        (target("plain", &create(&alone, None).await?.1), &alone),
        (
            target("local", &create(&alone, Some(1_000_000)).await?.1),
            &alone,
        ),
    ];
    targets.extend(
        shared_keys
            .iter()
            .map(|(name, key)| (target(name, key), &shared)),
    );
    let bodies = tempfile::tempdir()?;
    for (target, _) in &targets {
        std::fs::write(bodies.path().join(target.name), &target.body)?;
    }
    let shapes = [(1u32, 50u32), (8, 8)];
    let mut rates = vec![vec![Vec::new(); targets.len()]; shapes.len()];
    for _ in 0..args.rounds.max(1) {
        for (s, (connections, streams)) in shapes.iter().enumerate() {
            for (t, (target, server)) in targets.iter().enumerate() {
                let url = format!("http://{}{}", server.addr, target.path);
                let body = bodies.path().join(target.name);
                let run = h2load(
                    &url,
                    &body,
                    args.total,
                    *connections,
                    *streams,
                    server.child.id(),
                )?;
                rates[s][t].push((run.rps, run.cpu_us));
            }
        }
    }
    println!(
        "usage store overhead: Authorize, h2load {} requests per run, {} alternating rounds (median)",
        args.total, args.rounds
    );
    println!("plain, local: a sidecar without a usage store (no limit; a per-sidecar limit)");
    println!("plain+r, global: a sidecar with Redis (no limit; a global limit, spent from leases)");
    println!("credit: usage credits alone (spent from a credit lease)");
    println!("g+credit: a global limit and usage credits");
    println!(
        "{:<8} {:>12} {:>8} {:>10} {:>12} {:>8} {:>10}",
        "key", "1x50 req/s", "vs plain", "cpu us", "8x8 req/s", "vs plain", "cpu us"
    );
    for (t, (target, _)) in targets.iter().enumerate() {
        let mut line = format!("{:<8}", target.name);
        for runs in &rates {
            let rps = median(runs[t].iter().map(|r| r.0).collect());
            let base = median(runs[0].iter().map(|r| r.0).collect());
            let cpu = median(runs[t].iter().map(|r| r.1).collect());
            let _ = write!(line, " {rps:>12.0} {:>7.3}x {cpu:>10.1}", rps / base);
        }
        println!("{line}");
    }
    let ratio = |s: usize, a: usize, b: usize| {
        median(rates[s][a].iter().map(|r| r.0).collect())
            / median(rates[s][b].iter().map(|r| r.0).collect())
    };
    println!(
        "global vs local: {:.3}x (1x50), {:.3}x (8x8): what the usage store adds to a rate limit",
        ratio(0, 3, 1),
        ratio(1, 3, 1)
    );
    println!(
        "global + credits vs plain+r: {:.3}x (1x50), {:.3}x (8x8): what a global limit and credits cost together",
        ratio(0, 5, 2),
        ratio(1, 5, 2)
    );
    println!(
        "credits vs plain+r: {:.3}x (1x50), {:.3}x (8x8): what credits alone cost",
        ratio(0, 4, 2),
        ratio(1, 4, 2)
    );
    module_overhead(args, &shared, &shared_keys)?;
    println!(
        "\nk6 gRPC, constant arrival {} req/s for {} s, alternating",
        args.k6_rate, args.k6_seconds
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10}",
        "key", "req/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    for (target, server) in &targets {
        // k6 fails a run whose arrivals it could not keep up with (its own
        // VUs connecting on a loaded machine): that is reported, and the
        // comparison goes on.
        match k6(
            &server.addr,
            target,
            (args.k6_rate, args.k6_seconds, false),
            bodies.path(),
        ) {
            Ok(K6 {
                p50,
                p99,
                p999,
                rps,
            }) => println!(
                "{:<8} {rps:>10.0} {p50:>10.3} {p99:>10.3} {p999:>10.3}",
                target.name
            ),
            Err(error) => println!(
                "{:<8} k6 thresholds crossed: {}",
                target.name,
                error
                    .to_string()
                    .lines()
                    .find(|line| line.contains("level=error"))
                    .unwrap_or("did not run")
            ),
        }
    }
    Ok(())
}

/// The sidecar-with-Redis keys through an Envoy running the module, fed
/// by that sidecar: the module decides from its copy, its leases on the
/// global limit and its borrowed credits, as the sidecar does.
fn module_overhead(
    args: &UsageArgs,
    shared: &Server,
    keys: &[(&'static str, String)],
) -> anyhow::Result<()> {
    let envoy = ModuleEnvoy::start(shared)?;
    let dir = tempfile::tempdir()?;
    let body = dir.path().join("body.json");
    std::fs::write(
        &body,
        br#"{"personalizations":[{"to":[{"email":"a@example.com"}]}]}"#,
    )?;
    let shapes = [(1u32, 50u32), (8, 8)];
    let mut rates = vec![vec![Vec::new(); keys.len()]; shapes.len()];
    let mut cpu = vec![vec![Vec::new(); keys.len()]; shapes.len()];
    for _ in 0..args.rounds.max(1) {
        for (s, shape) in shapes.iter().enumerate() {
            for (k, (_, key)) in keys.iter().enumerate() {
                let before = cpu_seconds(envoy.pid());
                rates[s][k].push(envoy.rate(key, &body, args.total, *shape)?);
                #[allow(clippy::cast_precision_loss, reason = "request counts far below 2^52")]
                cpu[s][k].push((cpu_seconds(envoy.pid()) - before) * 1e6 / args.total as f64);
            }
        }
    }
    println!(
        "\nthe Envoy module (1 worker, direct_response upstream, fed by the sidecar with Redis), HTTP/2 POST /v3/mail/send, h2load {} requests per run, {} alternating rounds (median)",
        args.total, args.rounds
    );
    println!(
        "{:<8} {:>12} {:>8} {:>10} {:>12} {:>8} {:>10}",
        "key", "1x50 req/s", "vs plain", "envoy us", "8x8 req/s", "vs plain", "envoy us"
    );
    for (k, (name, _)) in keys.iter().enumerate() {
        let mut line = format!("{name:<8}");
        for (runs, cpus) in rates.iter().zip(&cpu) {
            let rps = median(runs[k].clone());
            let base = median(runs[0].clone());
            let us = median(cpus[k].clone());
            let _ = write!(line, " {rps:>12.0} {:>7.3}x {us:>10.1}", rps / base);
        }
        println!("{line}");
    }
    Ok(())
}

/// What the accuracy run's clients saw.
#[derive(Default)]
struct Seen {
    allowed: AtomicU64,
    limited: AtomicU64,
}

/// Three replicated sidecars sharing the store; 70/20/10 demand on a key
/// at 50/s.
async fn accuracy(args: &UsageArgs, redis: &Redis) -> anyhow::Result<()> {
    const RATE: u32 = 50;
    let etcd = Etcd::start()?;
    let mut servers = Vec::new();
    for _ in 0..3 {
        let server = sidecar(&["--etcd-endpoints", &etcd.url, "--usage-store", &redis.url]).await?;
        ready(&server).await?;
        servers.push(server);
    }
    let (id, key) = create(&servers[0], Some(RATE)).await?;
    // Every sidecar holds the key; then the budget refills.
    for server in &servers {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel(&server.addr).await?);
        while client
            .authorize(authorize_request(&key))
            .await?
            .into_inner()
            .reason()
            == pb::DenyReason::UnknownKey
        {
            ensure!(Instant::now() < deadline, "the key never reached a sidecar");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(args.accuracy_seconds);
    let mut workers = Vec::new();
    for (server, clients) in servers.iter().zip([7, 2, 1]) {
        let channel = channel(&server.addr).await?;
        for _ in 0..clients {
            let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
            let (key, seen) = (key.clone(), Arc::clone(&seen));
            workers.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let reply = client
                        .authorize(authorize_request(&key))
                        .await?
                        .into_inner();
                    let counter = if reply.allowed {
                        &seen.allowed
                    } else {
                        &seen.limited
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
    }
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = seen.allowed.load(Ordering::Relaxed);
    let limited = seen.limited.load(Ordering::Relaxed);
    let limit = f64::from(RATE) * elapsed + f64::from(RATE);
    println!(
        "\naccuracy: 3 replicated sidecars, one key at {RATE}/s burst {RATE}, 10 clients 7/2/1 for {elapsed:.2} s"
    );
    println!(
        "admitted {allowed} of {} requests; the limit allows {limit:.0} (50 x t + burst): {:.3}x",
        allowed + limited,
        allowed as f64 / limit
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let usage = KeyManagerClient::new(channel(&servers[2].addr).await?)
        .get_key_usage(servers[2].as_admin(pb::GetKeyUsageRequest {
            key_id: id.clone(),
            range: String::new(),
        })?)
        .await?
        .into_inner()
        .totals
        .unwrap_or_default();
    println!(
        "usage API (read on the third sidecar): {} allowed, {} denied (clients saw {} allowed incl. 3 warm-up, {limited} denied)",
        usage.allowed,
        usage.denied,
        allowed + 3
    );
    let (keys, bytes) = redis.footprint(&id)?;
    println!(
        "Redis for this key: {keys} keys, {bytes} bytes (MEMORY USAGE: its budget, and this minute's and hour's counts of 2 outcomes)"
    );
    Ok(())
}
