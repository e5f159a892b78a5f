//! The usage store, end to end against a real `redis-server` (an ACL user
//! with its password in a file): a key's rate limit held across three
//! replicated sidecars under uneven load, per-key usage summed over all of
//! them, and the faults (Redis stopped, killed, restarted empty). Skipped
//! locally without Redis or etcd; required in CI.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]
#![allow(
    clippy::cast_precision_loss,
    reason = "request counts far below 2^52, compared with a rate"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::etcd::{Cluster, Sidecar};
use common::redis::Redis;
use common::{TestServer, bearer, connect};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Each test runs Redis and several sidecars: one at a time, so two on
/// two cores do not measure the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The rate limit under test: 50 a second, a burst of 50.
const RATE: u32 = 50;

/// A deadline for one decision: bounds a hang, asserts no speed.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn rate_limit(requests: u32) -> pb::RateLimit {
    limit_of(requests, 1, 0)
}

/// `requests` every `seconds`, with `burst` (0: as many as `requests`).
fn limit_of(requests: u32, seconds: i64, burst: u32) -> pb::RateLimit {
    pb::RateLimit {
        requests,
        period: Some(prost_types::Duration { seconds, nanos: 0 }),
        burst,
    }
}

fn send(key: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        key: key.to_owned(),
        method: "POST".into(),
        path: "/v3/mail/send".into(),
        client_ip: String::new(),
    }
}

/// What clients saw.
#[derive(Default)]
struct Seen {
    allowed: AtomicU64,
    rate_limited: AtomicU64,
    other: AtomicU64,
}

/// `workers` clients on `channel` asking for `key` until `until`.
fn hammer(
    channel: &Channel,
    key: &str,
    workers: usize,
    until: Instant,
    seen: &Arc<Seen>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|_| {
            let mut client = AuthorizerClient::new(channel.clone());
            let (key, seen) = (key.to_owned(), Arc::clone(seen));
            tokio::spawn(async move {
                while Instant::now() < until {
                    let reply = tokio::time::timeout(ANSWER_WITHIN, client.authorize(send(&key)))
                        .await
                        .expect("answered within its deadline")
                        .expect("authorize replies")
                        .into_inner();
                    let counter = match (reply.allowed, reply.reason()) {
                        (true, _) => &seen.allowed,
                        (false, pb::DenyReason::RateLimited) => &seen.rate_limited,
                        (false, _) => &seen.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// `id`'s usage over the last hour, read through `channel` as `admin`.
async fn usage(channel: &Channel, admin: &str, id: &str) -> Result<pb::KeyUsage, tonic::Status> {
    KeyManagerClient::new(channel.clone())
        .get_key_usage(bearer(
            admin,
            pb::GetKeyUsageRequest {
                key_id: id.to_owned(),
                range: String::new(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_three_sidecars_and_usage_sums_them() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let Some(redis) = Redis::start() else {
        return;
    };
    let flags = redis.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sidecars: Vec<Sidecar> = (0..3)
        .map(|_| Sidecar::start(BIN, &cluster.endpoints(), &flags))
        .collect();
    for sidecar in &sidecars {
        common::await_log(|| sidecar.log(), &["usage store reachable"]).await;
    }
    let mut channels = Vec::new();
    for sidecar in &sidecars {
        channels.push(connect(&sidecar.url()).await);
    }
    let admin = sidecars[0].admin.clone();
    let created = KeyManagerClient::new(channels[0].clone())
        .create_key(bearer(
            &admin,
            pb::CreateKeyRequest {
                name: "global".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                rate_limit: Some(rate_limit(RATE)),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let (id, key) = (created.key.expect("key").key_id, created.secret);
    // Every sidecar holds the key before the clock starts (these first
    // decisions are counted in the usage below, as any would be).
    let warmup = common::until_every_sidecar_allows(&channels, &key).await;
    // The budget refills (a burst's worth at 50/s) before the measure.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Demand far above the limit, spread 70/20/10 over the sidecars.
    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(4);
    let mut workers = Vec::new();
    for (channel, share) in channels.iter().zip([7, 2, 1]) {
        workers.extend(hammer(channel, &key, share, until, &seen));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    // Decisions may land until the last call returns; demand lasted until
    // `until`. The upper bound counts the first, the lower the second.
    let elapsed = started.elapsed().as_secs_f64();
    let demanded = (until - started).as_secs_f64();
    let allowed = seen.allowed.load(Ordering::Relaxed);
    let limited = seen.rate_limited.load(Ordering::Relaxed);
    assert_eq!(
        seen.other.load(Ordering::Relaxed),
        0,
        "only allowed or rate limited"
    );
    // What the limit allows over the window: the burst, then the rate.
    let limit = f64::from(RATE) * elapsed + f64::from(RATE);
    eprintln!(
        "admitted {allowed} of {} over {elapsed:.2} s where the limit allows {limit:.0} ({:.3}×)",
        allowed + limited,
        allowed as f64 / limit
    );
    assert!(limited > allowed, "demand was far above the limit");
    assert!(
        allowed as f64 <= 1.05 * limit,
        "admitted {allowed}, limit {limit:.0}"
    );
    let demand_limit = f64::from(RATE) * demanded + f64::from(RATE);
    assert!(
        allowed as f64 >= 0.95 * demand_limit,
        "admitted {allowed}, limit over the demand {demand_limit:.0}"
    );

    // Usage: every sidecar's counts, summed, equal what clients saw once
    // the last flush is in (a second apart).
    let expected_allowed = allowed + warmup;
    let deadline = Instant::now() + Duration::from_secs(30);
    let totals = loop {
        let totals = usage(&channels[1], &sidecars[1].admin, &id)
            .await
            .expect("usage")
            .totals
            .expect("totals");
        // Each sidecar flushes on its own second: wait for every count.
        if (totals.allowed >= expected_allowed && totals.denied >= limited)
            || Instant::now() > deadline
        {
            break totals;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(totals.allowed, expected_allowed);
    assert_eq!(totals.denied, limited);
    assert_eq!(totals.denied_by_reason.get("rate_limited"), Some(&limited));

    // A flood of made-up ids (valid in form) creates no Redis state.
    let mut authorizer = AuthorizerClient::new(channels[2].clone());
    for n in 0..300u32 {
        let made_up = format!("SG.{:0>22}.{}", n, &key[26..]);
        let reply = authorizer
            .authorize(send(&made_up))
            .await
            .expect("replies")
            .into_inner();
        assert!(!reply.allowed);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = redis.cli(&["KEYS", "*"]);
    assert!(!held.trim().is_empty(), "the real key's state is there");
    for redis_key in held.lines() {
        assert!(
            redis_key.starts_with(&format!("keyward:{{{id}}}:")),
            "only the verified key has state in Redis: {redis_key}"
        );
    }
}

/// A standalone sidecar over `redis`, in process.
async fn standalone(dir: &tempfile::TempDir, redis: &Redis) -> TestServer {
    standalone_with(dir, redis, false).await
}

/// [`standalone`], the store a Redis Cluster `redis` is a node of when
/// `cluster`.
async fn standalone_with(dir: &tempfile::TempDir, redis: &Redis, cluster: bool) -> TestServer {
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    let flags = redis.flags();
    config.usage.usage_store = Some(flags[1].clone());
    config.usage.usage_store_password_file = Some(flags[3].clone().into());
    config.usage.usage_store_ca_file = flags.get(5).map(Into::into);
    config.usage.usage_store_cluster = cluster;
    TestServer::start_with(config).await
}

/// A `mail.send` key limited to [`RATE`] on `server`: (id, secret).
async fn limited_key(server: &TestServer) -> (String, String) {
    key_limited_to(server, rate_limit(RATE)).await
}

/// A `mail.send` key limited to `limit` on `server`: (id, secret).
async fn key_limited_to(server: &TestServer, limit: pb::RateLimit) -> (String, String) {
    server
        .create(pb::CreateKeyRequest {
            name: "limited".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            rate_limit: Some(limit),
            ..Default::default()
        })
        .await
}

/// Waits until `id`'s usage totals on `server` satisfy `done`.
async fn await_totals(server: &TestServer, id: &str, done: impl Fn(&pb::UsageCounts) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let totals = usage(&connect(&server.url()).await, &server.admin, id)
            .await
            .expect("usage")
            .totals
            .expect("totals");
        if done(&totals) {
            return;
        }
        assert!(Instant::now() < deadline, "usage never summed: {totals:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A key limited to [`RATE`] on `server`, spent past its limit, and its
/// usage read back once flushed: the store works end to end.
async fn limit_and_usage_work(server: &TestServer) -> String {
    await_store_up(server, "1").await;
    let (id, key) = limited_key(server).await;
    // The first request, before any trade: the budget is full, and the
    // client is told so (not 0 remaining).
    let first = AuthorizerClient::new(connect(&server.url()).await)
        .authorize(send(&key))
        .await
        .expect("answered")
        .into_inner();
    assert!(first.allowed);
    assert_eq!(
        first
            .rate_limit
            .expect("a rate-limited key's quota")
            .remaining,
        RATE - 1
    );
    let (allowed, limited) = burst_of_requests(server, &key, Duration::from_millis(500)).await;
    assert!(
        allowed > 0 && limited > 0,
        "{allowed} allowed, {limited} limited"
    );
    await_totals(server, &id, |totals| {
        totals.allowed == allowed + 1 && totals.denied == limited
    })
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_store_over_tls() {
    let _serial = SERIAL.lock().await;
    let pki = common::pki::pki();
    let Some(redis) = Redis::start_tls(&pki.server, &pki.ca) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = standalone(&dir, &redis).await;
    limit_and_usage_work(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_holds_each_keys_state_on_one_slot() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = common::redis::Cluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = standalone_with(&dir, &cluster.nodes[1], true).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(limit_and_usage_work(&server).await);
    }
    let keys = cluster.keys();
    for id in &ids {
        let slots: std::collections::BTreeSet<String> = keys
            .iter()
            .filter(|key| key.contains(&format!("{{{id}}}")))
            .map(|key| cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]))
            .collect();
        assert_eq!(slots.len(), 1, "{id}'s state on one slot: {keys:?}");
    }
    server.stop().await;
}

/// `keyward_usage_store_up` as the server exports it.
fn store_up(server: &TestServer) -> String {
    server
        .metrics
        .render()
        .lines()
        .find(|line| line.starts_with("keyward_usage_store_up "))
        .map(|line| {
            line.trim_start_matches("keyward_usage_store_up ")
                .to_owned()
        })
        .unwrap_or_default()
}

async fn await_store_up(server: &TestServer, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store_up(server) != value {
        assert!(
            Instant::now() < deadline,
            "keyward_usage_store_up never became {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` requests for `key` one after another; how many were allowed (the
/// rest refused for credits, and nothing else).
async fn credits_spent(server: &TestServer, key: &str, n: usize) -> u64 {
    let mut client = AuthorizerClient::new(connect(&server.url()).await);
    let mut allowed = 0;
    for _ in 0..n {
        let reply = tokio::time::timeout(ANSWER_WITHIN, client.authorize(send(key)))
            .await
            .expect("answered within its deadline")
            .expect("authorize replies")
            .into_inner();
        if reply.allowed {
            allowed += 1;
        } else {
            assert_eq!(reply.reason(), pb::DenyReason::CreditsExhausted);
        }
    }
    allowed
}

/// What health says of `service` on `server`.
async fn health(server: &TestServer, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(connect(&server.url()).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Waits until health says `status` of the usage store; the server as a
/// whole stays SERVING throughout.
async fn await_store_health(server: &TestServer, status: tonic_health::ServingStatus) {
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    let wanted = match status {
        tonic_health::ServingStatus::Serving => Wire::Serving,
        _ => Wire::NotServing,
    } as i32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(server, keyward::usage::HEALTH_SERVICE).await != wanted {
        assert!(
            Instant::now() < deadline,
            "usage store health never became {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health(server, "").await, Wire::Serving as i32);
}

/// Requests for `key` on `server` during `window`: (allowed, rate limited).
async fn burst_of_requests(server: &TestServer, key: &str, window: Duration) -> (u64, u64) {
    let seen = Arc::new(Seen::default());
    let channel = connect(&server.url()).await;
    for worker in hammer(&channel, key, 4, Instant::now() + window, &seen) {
        worker.await.expect("worker");
    }
    assert_eq!(seen.other.load(Ordering::Relaxed), 0);
    (
        seen.allowed.load(Ordering::Relaxed),
        seen.rate_limited.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_go_on_while_redis_is_stopped_killed_or_restarted_empty() {
    let _serial = SERIAL.lock().await;
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = standalone(&dir, &redis).await;
    await_store_up(&server, "1").await;
    let (id, key) = limited_key(&server).await;
    // A key with credits: they live in the key store, not in Redis.
    let (_, metered) = server
        .create(pb::CreateKeyRequest {
            name: "metered".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            credits: Some(pb::Credits {
                remaining: 30,
                refill: None,
                next_refill_at: None,
            }),
            ..Default::default()
        })
        .await;
    let mut spent = credits_spent(&server, &metered, 10).await;
    let (allowed, limited) = burst_of_requests(&server, &key, Duration::from_millis(500)).await;
    assert!(
        allowed > 0 && limited > 0,
        "{allowed} allowed, {limited} limited"
    );

    // Stopped: every request is still answered, the limit is this
    // sidecar's own, and the state change is exported and logged.
    await_store_health(&server, tonic_health::ServingStatus::Serving).await;
    redis.signal("STOP");
    let (allowed, _) = burst_of_requests(&server, &key, Duration::from_secs(2)).await;
    assert!(allowed > 0, "requests pass while Redis is stopped");
    spent += credits_spent(&server, &metered, 10).await;
    await_store_up(&server, "0").await;
    await_store_health(&server, tonic_health::ServingStatus::NotServing).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let (allowed, limited) = burst_of_requests(&server, &key, Duration::from_secs(1)).await;
    let limit = f64::from(RATE) * started.elapsed().as_secs_f64() + f64::from(RATE);
    assert!(limited > 0, "the per-sidecar limit still holds");
    assert!(
        allowed as f64 <= 1.05 * limit + 1.0,
        "{allowed} allowed, per-sidecar limit {limit:.0}"
    );
    assert_eq!(
        usage(&connect(&server.url()).await, &server.admin, &id)
            .await
            .expect_err("no answer from a stopped store")
            .code(),
        Code::Unavailable
    );

    // Continued: back to global, no operator.
    redis.signal("CONT");
    await_store_up(&server, "1").await;
    await_store_health(&server, tonic_health::ServingStatus::Serving).await;

    // Killed and restarted empty: decisions go on, then it is used again.
    redis.kill();
    let (allowed, _) = burst_of_requests(&server, &key, Duration::from_millis(500)).await;
    assert!(allowed > 0);
    await_store_up(&server, "0").await;
    redis.restart();
    await_store_up(&server, "1").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (allowed, limited) = burst_of_requests(&server, &key, Duration::from_millis(500)).await;
    assert!(
        allowed > 0 && limited > 0,
        "{allowed} allowed, {limited} limited"
    );
    // The counts reach the new, empty Redis.
    await_totals(&server, &id, |totals| totals.allowed > 0).await;
    // Credits survived Redis stopped, killed and restarted empty: exactly
    // what was granted, over the whole story.
    spent += credits_spent(&server, &metered, 20).await;
    assert_eq!(spent, 30, "every credit used once, Redis or not");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_sidecar_keeps_its_own_usage_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, key) = server.create_key("acme", &["mail.send"]).await;
    for _ in 0..7 {
        assert!(
            server
                .authorize(&key, "POST", "/v3/mail/send")
                .await
                .allowed
        );
    }
    for _ in 0..2 {
        assert!(!server.authorize(&key, "GET", "/v3/alerts").await.allowed);
    }
    let counted = |totals: &pb::UsageCounts| {
        totals.allowed == 7
            && totals.denied == 2
            && totals.denied_by_reason.get("insufficient_scope") == Some(&2)
    };
    await_totals(&server, &id, counted).await;
    // A restart loses none of it: the counts are on disk.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    await_totals(&server, &id, counted).await;
    let bad_range = KeyManagerClient::new(connect(&server.url()).await)
        .get_key_usage(bearer(
            &server.admin,
            pb::GetKeyUsageRequest {
                key_id: id,
                range: "2h".into(),
            },
        ))
        .await
        .expect_err("refused");
    assert_eq!(bad_range.code(), Code::InvalidArgument);
    assert!(
        bad_range.message().starts_with("range:"),
        "{}",
        bad_range.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_usage_store_refuses_usage_with_the_reason() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let sidecar = Sidecar::start(BIN, &cluster.endpoints(), &[]);
    let channel = connect(&sidecar.url()).await;
    let created = KeyManagerClient::new(channel.clone())
        .create_key(bearer(
            &sidecar.admin,
            pb::CreateKeyRequest {
                name: "replicated".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let refused = usage(&channel, &sidecar.admin, &created.key.expect("key").key_id)
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("--usage-store"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_smaller_than_a_trade_tick_still_reaches_its_rate() {
    let _serial = SERIAL.lock().await;
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = standalone(&dir, &redis).await;
    await_store_up(&server, "1").await;
    // 200/s with a burst of 2: a sidecar trading every 50 ms could pass
    // only the burst (and its credit) per trade, 60/s, if the shared
    // budget were held to the burst.
    let (_, key) = key_limited_to(&server, limit_of(200, 1, 2)).await;
    let _ = burst_of_requests(&server, &key, Duration::from_millis(300)).await;
    let started = Instant::now();
    let (allowed, limited) = burst_of_requests(&server, &key, Duration::from_secs(2)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let rate = 200.0 * elapsed;
    eprintln!("admitted {allowed} ({limited} limited) over {elapsed:.2} s at 200/s burst 2");
    assert!(limited > 0, "demand was above the rate");
    assert!(
        allowed as f64 >= 0.8 * rate,
        "{allowed} admitted, the rate allows {rate:.0}"
    );
    assert!(
        allowed as f64 <= 1.05 * (rate + 20.0) + 2.0,
        "{allowed} admitted, the rate allows {rate:.0} and a widened burst of 20"
    );
    server.stop().await;
}

/// `TradeLeases` with the admin token, as a hostile feed-token holder
/// would call it: nothing it asks can refill a budget with tokens it never
/// took, or lock a key out for longer than an honest holder's debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_caller_cannot_refill_or_lock_out_a_budget() {
    use keyward::pb::v1::decision_feed_client::DecisionFeedClient;
    use std::str::FromStr;
    let _serial = SERIAL.lock().await;
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = standalone(&dir, &redis).await;
    await_store_up(&server, "1").await;
    // Five a minute: a token every 12 s, so nothing refills meanwhile.
    let (id, key) = key_limited_to(&server, limit_of(5, 60, 0)).await;
    let channel = connect(&server.url()).await;
    let mut authorizer = AuthorizerClient::new(channel.clone());
    // Asks every 20 ms for a second (across many trades): what passed.
    let mut spend = async || {
        let mut allowed = 0;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let reply = authorizer
                .authorize(send(&key))
                .await
                .expect("replies")
                .into_inner();
            allowed += usize::from(reply.allowed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        allowed
    };
    let first = spend().await;
    assert!(
        (5..=6).contains(&first),
        "the burst (and a credit), then refused: {first}"
    );
    let bytes = keyward::domain::key::KeyId::from_str(&id)
        .expect("an id")
        .as_bytes()
        .to_vec();
    let mut feed = DecisionFeedClient::new(channel.clone());
    let mut trade = async |give: u64, owed: u64| {
        feed.trade_leases(bearer(
            &server.admin,
            pb::TradeLeasesRequest {
                trades: vec![pb::LeaseTrade {
                    id: bytes.clone(),
                    give,
                    owed,
                    want: 0,
                }],
            },
        ))
        .await
        .expect("answered")
        .into_inner()
    };
    for _ in 0..20 {
        let answer = trade(1_000_000, 0).await;
        assert!(answer.global && answer.grants[0].traded, "{answer:?}");
    }
    // The sidecar's own lease may hold what it took before the refusals:
    // at most its credit (a sixty-fourth of the burst, so 1) passes.
    let after = spend().await;
    assert!(
        after <= 1,
        "tokens never taken refilled the budget: {after} passed"
    );
    let answer = trade(0, 1_000_000_000).await;
    assert!(answer.grants[0].traded);
    let ttl_ms: u64 = redis
        .cli(&["PTTL", &format!("keyward:{{{id}}}:rate")])
        .trim()
        .parse()
        .expect("a TTL");
    // An honest holder owes at most its share (5), its credit (1) and two
    // seconds of stalled admissions (0 here): about 12 tokens of 12 s
    // with what was spent, not 10^9 of them (380 years).
    assert!(
        ttl_ms < 15 * 12_000,
        "a forged debt locked the key out for {ttl_ms} ms"
    );
}
