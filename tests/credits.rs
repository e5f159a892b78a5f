//! Usage credits end to end: spent exactly (never one more than granted,
//! every one usable), kept across a restart and a crash, refilled, held to
//! least privilege, and shared by three replicated sidecars hammering one
//! key at once.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::etcd::{Cluster, Sidecar};
use common::{TestServer, assert_status, bearer, connect, rest_call};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn credits(remaining: u64, refill: Option<(u64, i64)>) -> pb::Credits {
    pb::Credits {
        remaining,
        refill: refill.map(|(amount, seconds)| pb::CreditRefill {
            amount,
            period: Some(prost_types::Duration { seconds, nanos: 0 }),
        }),
        next_refill_at: None,
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

/// `n` requests one after another: (allowed, refused for credits). Any
/// other answer fails the test.
async fn spend(channel: &Channel, key: &str, n: usize) -> (u64, u64) {
    let mut client = AuthorizerClient::new(channel.clone());
    let (mut allowed, mut exhausted) = (0, 0);
    for _ in 0..n {
        let reply = client
            .authorize(send(key))
            .await
            .expect("replies")
            .into_inner();
        match (reply.allowed, reply.reason()) {
            (true, _) => allowed += 1,
            (false, pb::DenyReason::CreditsExhausted) => {
                assert!(reply.message.contains("credits"), "{}", reply.message);
                assert_eq!(reply.http_status, 429);
                exhausted += 1;
            }
            (false, reason) => panic!("unexpected {reason:?}: {}", reply.message),
        }
    }
    (allowed, exhausted)
}

/// One request, refused for credits: the reply.
async fn refused(channel: &Channel, key: &str) -> pb::AuthorizeResponse {
    let reply = AuthorizerClient::new(channel.clone())
        .authorize(send(key))
        .await
        .expect("replies")
        .into_inner();
    assert_eq!(reply.reason(), pb::DenyReason::CreditsExhausted);
    reply
}

async fn set_credits(
    channel: &Channel,
    credential: &str,
    id: &str,
    credits: Option<pb::Credits>,
) -> Result<pb::ApiKey, tonic::Status> {
    KeyManagerClient::new(channel.clone())
        .set_key_credits(bearer(
            credential,
            pb::SetKeyCreditsRequest {
                key_id: id.to_owned(),
                credits,
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(channel: &Channel, credential: &str, id: &str) -> pb::ApiKey {
    KeyManagerClient::new(channel.clone())
        .get_key(bearer(
            credential,
            pb::GetKeyRequest {
                key_id: id.to_owned(),
            },
        ))
        .await
        .expect("get")
        .into_inner()
}

async fn credited_key(server: &TestServer, remaining: u64) -> (String, String) {
    server
        .create(pb::CreateKeyRequest {
            name: "metered".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            credits: Some(credits(remaining, None)),
            ..Default::default()
        })
        .await
}

#[tokio::test]
async fn credits_are_spent_exactly_set_anew_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let channel = server.channel().await;
    let (id, key) = credited_key(&server, 30).await;
    assert_eq!(spend(&channel, &key, 40).await, (30, 10));
    assert_eq!(
        refused(&channel, &key).await.retry_after,
        None,
        "no refill coming: no time to retry after"
    );
    let shown = get(&channel, &server.admin, &id).await;
    assert_eq!(shown.credits.expect("credits").remaining, 0);

    // Set anew: the new number, whatever was in hand before.
    set_credits(&channel, &server.admin, &id, Some(credits(5, None)))
        .await
        .expect("set");
    assert_eq!(spend(&channel, &key, 8).await, (5, 3));
    set_credits(&channel, &server.admin, &id, Some(credits(20, None)))
        .await
        .expect("set");
    assert_eq!(spend(&channel, &key, 3).await, (3, 0));

    // A graceful stop gives the unspent lease back to the record.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    assert_eq!(
        get(&channel, &server.admin, &id)
            .await
            .credits
            .expect("credits")
            .remaining,
        17
    );
    assert_eq!(spend(&channel, &key, 20).await, (17, 3));

    // Removed: unlimited again.
    let shown = set_credits(&channel, &server.admin, &id, None)
        .await
        .expect("removed");
    assert!(shown.credits.is_none());
    assert_eq!(spend(&channel, &key, 5).await, (5, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_refill_sets_the_credits_each_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let channel = server.channel().await;
    let (id, key) = server
        .create(pb::CreateKeyRequest {
            name: "refilled".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            credits: Some(credits(2, Some((3, PERIOD)))),
            ..Default::default()
        })
        .await;
    let shown = get(&channel, &server.admin, &id)
        .await
        .credits
        .expect("credits");
    assert!(shown.next_refill_at.is_some());
    assert_eq!(shown.refill.expect("refill").amount, 3);
    assert_eq!(spend(&channel, &key, 3).await, (2, 1));
    let wait = refused(&channel, &key)
        .await
        .retry_after
        .expect("when the refill comes");
    assert!(
        (0..=PERIOD).contains(&wait.seconds) && (wait.seconds > 0 || wait.nanos > 0),
        "{wait:?}"
    );
    // Past the refill the key's own reply names: set to 3 (not 3 + what
    // was left).
    sleep_past_refill(&channel, &server.admin, &id).await;
    assert_eq!(spend(&channel, &key, 5).await, (3, 2));
    // Credits still in this sidecar's lease at a refill are not spent in
    // the new period: a refill sets, whatever a lease held.
    set_credits(
        &channel,
        &server.admin,
        &id,
        Some(credits(50, Some((3, PERIOD)))),
    )
    .await
    .expect("set");
    assert_eq!(spend(&channel, &key, 5).await, (5, 0));
    sleep_past_refill(&channel, &server.admin, &id).await;
    assert_eq!(spend(&channel, &key, 6).await, (3, 3));
    server.stop().await;
}

/// The refill period of [`a_refill_sets_the_credits_each_period`]: long
/// beside the milliseconds each of its steps takes.
const PERIOD: i64 = 5;

/// Sleeps until just past the next refill `id`'s credits show.
async fn sleep_past_refill(channel: &Channel, admin: &str, id: &str) {
    let at = get(channel, admin, id)
        .await
        .credits
        .expect("credits")
        .next_refill_at
        .expect("a refill");
    let at = std::time::UNIX_EPOCH
        + Duration::new(
            u64::try_from(at.seconds).expect("after 1970"),
            u32::try_from(at.nanos).expect("nanos"),
        );
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
}

#[tokio::test]
async fn credits_follow_least_privilege_and_bad_input_names_its_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let (manager_id, manager) = server
        .create(pb::CreateKeyRequest {
            name: "manager".into(),
            scopes: [
                "api_keys.create",
                "api_keys.read",
                "api_keys.update",
                "mail.send",
            ]
            .map(String::from)
            .to_vec(),
            account_id: "acme".into(),
            credits: Some(credits(100, None)),
            ..Default::default()
        })
        .await;
    let mut client = KeyManagerClient::new(channel.clone());
    let child = |credits: Option<pb::Credits>| pb::CreateKeyRequest {
        name: "child".into(),
        scopes: vec!["mail.send".into()],
        credits,
        ..Default::default()
    };
    // More than the creator has, any refill, or none named: refused,
    // naming credits, and nothing taken from the creator.
    for refused in [
        Some(credits(101, None)),
        Some(credits(10, Some((10, 86_400)))),
        None,
    ] {
        let status = client
            .create_key(bearer(&manager, child(refused)))
            .await
            .expect_err("beyond the creator");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("credits"), "{}", status.message());
    }
    let left = |key: pb::ApiKey| key.credits.expect("credits").remaining;
    assert_eq!(left(get(&channel, &server.admin, &manager_id).await), 100);
    // Given: taken from the creator's balance, so children never multiply
    // its credits.
    let given = client
        .create_key(bearer(&manager, child(Some(credits(30, None)))))
        .await
        .expect("created")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(given.credits.expect("given").remaining, 30);
    assert_eq!(left(get(&channel, &server.admin, &manager_id).await), 70);
    // Refused by the rules after the credits were taken (a scope the
    // creator lacks): they go back.
    let status = client
        .create_key(bearer(
            &manager,
            pb::CreateKeyRequest {
                scopes: vec!["alerts.read".into()],
                ..child(Some(credits(30, None)))
            },
        ))
        .await
        .expect_err("a scope the creator lacks");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(left(get(&channel, &server.admin, &manager_id).await), 70);
    // Never credits to a key without any: a copy of its own balance on a
    // key it could then rotate and use.
    let (sibling_id, _) = server.create_key("acme", &["mail.send"]).await;
    let copied = set_credits(&channel, &manager, &sibling_id, Some(credits(10, None))).await;
    assert_status(copied, Code::PermissionDenied, "credits");
    // A key may lower its own credits, never raise them, add a refill or
    // remove them.
    for raised in [credits(500, None), credits(50, Some((10, 86_400)))] {
        let raised = set_credits(&channel, &manager, &manager_id, Some(raised)).await;
        assert_status(raised, Code::PermissionDenied, "credits");
    }
    let lowered = set_credits(&channel, &manager, &manager_id, Some(credits(50, None)))
        .await
        .expect("lowered");
    assert_eq!(lowered.credits.expect("credits").remaining, 50);
    let removed = set_credits(&channel, &manager, &manager_id, None).await;
    assert_status(removed, Code::PermissionDenied, "credits");
    // A key whose credits refill cannot create keys: what it gave them
    // would outlive its refill.
    set_credits(
        &channel,
        &server.admin,
        &manager_id,
        Some(credits(50, Some((50, 86_400)))),
    )
    .await
    .expect("the admin adds a refill");
    let status = client
        .create_key(bearer(&manager, child(Some(credits(5, None)))))
        .await
        .expect_err("a refilling creator");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("refill"), "{}", status.message());

    // Bad input changes nothing and names the field.
    for (bad, field) in [
        (credits(1_000_000_000_001, None), "credits.remaining"),
        (credits(1, Some((0, 60))), "credits.refill.amount"),
        (credits(1, Some((1, 0))), "credits.refill.period"),
    ] {
        let status = set_credits(&channel, &server.admin, &manager_id, Some(bad)).await;
        assert_status(status, Code::InvalidArgument, field);
    }
    let kept = get(&channel, &server.admin, &manager_id)
        .await
        .credits
        .expect("credits");
    assert_eq!(kept.remaining, 50);

    // REST: the same through PUT .../credits, and in the key's reply.
    let http = server.http_addr.expect("REST listener");
    let auth = format!("Bearer {}", server.admin);
    let headers = [("authorization", auth.as_str()), ("on-behalf-of", "acme")];
    let path = format!("/v3/api_keys/{manager_id}/credits");
    let (status, body) = rest_call(
        http,
        "PUT",
        &path,
        &headers,
        r#"{"credits": {"remaining": 7, "refill": {"amount": 9, "period_seconds": 3600}}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credits"]["remaining"], 7);
    assert_eq!(body["credits"]["refill"]["period_seconds"], 3600);
    let (status, body) = rest_call(
        http,
        "PUT",
        &path,
        &headers,
        r#"{"credits": {"remaining": 7, "refill": {"amount": 9, "period_seconds": 0}}}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["field"], "credits.refill.period_seconds");
    let (status, body) = rest_call(http, "PUT", &path, &headers, "{}").await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}

/// A spawned sidecar, killed when dropped (a failed assertion must not
/// leave it running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sidecar killed outright loses at most what its lease held: never a
/// credit granted twice.
#[tokio::test]
async fn a_crash_never_grants_a_credit_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, port) = common::spawn_serve(BIN, dir.path(), &["--data-dir", "data"]);
    let mut child = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let channel = connect(&url).await;
    let admin = common::admin_token(&dir.path().join("data"));
    let created = KeyManagerClient::new(channel.clone())
        .create_key(bearer(
            &admin,
            pb::CreateKeyRequest {
                name: "metered".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                credits: Some(credits(100, None)),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let (id, key) = (created.key.expect("key").key_id, created.secret);
    let (before, _) = spend(&channel, &key, 10).await;
    assert_eq!(before, 10);
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reaped");

    let (child, port) = common::spawn_serve(BIN, dir.path(), &["--data-dir", "data"]);
    let mut child = Killed(child);
    let channel = connect(&format!("http://127.0.0.1:{port}")).await;
    let left = get(&channel, &admin, &id)
        .await
        .credits
        .expect("credits")
        .remaining;
    let (after, _) = spend(&channel, &key, 120).await;
    assert_eq!(after, left, "every credit the record kept is usable");
    assert!(before + after <= 100, "{before} + {after} granted of 100");
    eprintln!(
        "crash: {before} used, {} lost with the lease, {after} used after",
        100 - before - after
    );
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reaped");
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    allowed: AtomicU64,
    exhausted: AtomicU64,
    /// 503s: both reservations a request waited for were spent alongside
    /// while the record still had credits (retry).
    retried: AtomicU64,
    refused_at: std::sync::Mutex<Vec<Instant>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_hammering_one_key_never_spend_one_credit_more() {
    const GRANTED: u64 = 10_000;
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let sidecars: Vec<Sidecar> = (0..3)
        .map(|_| Sidecar::start(BIN, &cluster.endpoints(), &[]))
        .collect();
    let mut channels = Vec::new();
    for sidecar in &sidecars {
        channels.push(connect(&sidecar.url()).await);
    }
    let admin = sidecars[0].admin.clone();
    let created = KeyManagerClient::new(channels[0].clone())
        .create_key(bearer(
            &admin,
            pb::CreateKeyRequest {
                name: "metered".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                credits: Some(credits(GRANTED, None)),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let (id, key) = (created.key.expect("key").key_id, created.secret);
    // Every sidecar holds the key before the hammering starts (these
    // first decisions spend credits too, and are counted).
    let seen = Arc::new(Seen::default());
    seen.allowed.fetch_add(
        common::until_every_sidecar_allows(&channels, &key).await,
        Ordering::Relaxed,
    );

    // 70/20/10 until every credit is spent (a deadline bounds a hang:
    // credits a sidecar holds come back to the others when it goes quiet),
    // then not one more on any sidecar.
    let started = Instant::now();
    let until_at = started + Duration::from_secs(90);
    let last_allow = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut workers = Vec::new();
    for (channel, share) in channels.iter().zip([7, 2, 1]) {
        for _ in 0..share {
            let mut client = AuthorizerClient::new(channel.clone());
            let (key, seen, last_allow) = (key.clone(), Arc::clone(&seen), Arc::clone(&last_allow));
            workers.push(tokio::spawn(async move {
                while seen.allowed.load(Ordering::Relaxed) < GRANTED && Instant::now() < until_at {
                    let reply = client
                        .authorize(send(&key))
                        .await
                        .expect("replies")
                        .into_inner();
                    match (reply.allowed, reply.reason()) {
                        (true, _) => {
                            seen.allowed.fetch_add(1, Ordering::Relaxed);
                            *last_allow.lock().expect("lock") = Instant::now();
                        }
                        (false, pb::DenyReason::CreditsExhausted) => {
                            seen.exhausted.fetch_add(1, Ordering::Relaxed);
                            seen.refused_at.lock().expect("lock").push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        (false, pb::DenyReason::KeyUnverifiable) => {
                            assert_eq!(reply.http_status, 503);
                            seen.retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        (false, reason) => panic!("unexpected {reason:?}: {}", reply.message),
                    }
                }
            }));
        }
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let allowed = seen.allowed.load(Ordering::Relaxed);
    let last = *last_allow.lock().expect("lock");
    let early = seen
        .refused_at
        .lock()
        .expect("lock")
        .iter()
        .filter(|at| **at < last)
        .count();
    eprintln!(
        "3 sidecars: {allowed} allowed of {GRANTED} in {:?}; {early} refused for credits before the last allow (a lease elsewhere still held some); {} told to retry (503)",
        last - started,
        seen.retried.load(Ordering::Relaxed)
    );
    assert_eq!(
        allowed,
        GRANTED,
        "every credit used once and only once ({} refusals on the way)",
        seen.exhausted.load(Ordering::Relaxed)
    );
    for channel in &channels {
        let mut client = AuthorizerClient::new(channel.clone());
        for _ in 0..40 {
            let reply = client
                .authorize(send(&key))
                .await
                .expect("replies")
                .into_inner();
            assert_eq!(
                (reply.allowed, reply.reason()),
                (false, pb::DenyReason::CreditsExhausted),
                "not one credit more than granted"
            );
        }
    }
    let (mut reservations, mut waits) = (0.0, 0.0);
    for (channel, sidecar) in channels.iter().zip(&sidecars) {
        let shown = get(channel, &sidecar.admin, &id).await;
        assert_eq!(shown.credits.expect("credits").remaining, 0);
        let metrics = common::scrape_logged(&sidecar.log_path()).await;
        reservations += metrics
            .lines()
            .find_map(|line| line.strip_prefix("keyward_credit_reservations_total "))
            .and_then(|value| value.parse::<f64>().ok())
            .expect("the reservations counter");
        waits += metrics
            .lines()
            .find_map(|line| line.strip_prefix("keyward_credit_waits_total "))
            .and_then(|value| value.parse::<f64>().ok())
            .expect("the waits counter");
    }
    eprintln!(
        "3 sidecars: {reservations} reservations (store writes) for {GRANTED} credits; {waits} decisions waited for one"
    );
}
