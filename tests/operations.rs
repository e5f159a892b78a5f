//! Operations: metrics, graceful shutdown, listener layout and limits.

mod common;

use std::time::Duration;

use common::{TestServer, bearer};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn metric(scrape: &str, name_and_labels: &str) -> u64 {
    scrape
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name_and_labels} not in:\n{scrape}"))
}

#[tokio::test]
async fn metrics_count_decisions_rpcs_keys_and_store_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    server.create_key("acme", &["alerts.read"]).await;
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert!(!server.authorize(&secret, "GET", "/v3/alerts").await.allowed);
    assert!(!server.authorize("nope", "GET", "/v3/alerts").await.allowed);
    let _ = server
        .manager()
        .await
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: "bad".into(),
            },
        ))
        .await;

    let scrape = server.scrape().await;
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_decisions_total{source="authorize",result="allow",reason="none"}"#
        ),
        1
    );
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_decisions_total{source="authorize",result="deny",reason="insufficient_scope"}"#
        ),
        1
    );
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_decisions_total{source="authorize",result="deny",reason="malformed_key"}"#
        ),
        1
    );
    // Durations are sampled (each thread times its first decision, then
    // one in 64), so some but at most all of the three are timed.
    let timed = metric(&scrape, "keyward_decision_duration_seconds_count");
    assert!((1..=3).contains(&timed), "{timed} decisions timed");
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_rpcs_total{method="Authorize",code="OK"}"#
        ),
        3
    );
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_rpcs_total{method="CreateKey",code="OK"}"#
        ),
        2
    );
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_rpcs_total{method="GetKey",code="INVALID_ARGUMENT"}"#
        ),
        1
    );
    assert_eq!(metric(&scrape, "keyward_keys "), 2);
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_store_write_duration_seconds_count{operation="create"}"#
        ),
        2
    );
    assert!(!scrape.contains(&secret[26..]), "no secret in metrics");
    assert!(!scrape.contains(&server.admin), "no admin token in metrics");
}

#[tokio::test]
async fn shutdown_reports_not_serving_then_drains_and_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.shutdown_grace_ms = 600;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut authorizer = keyward::pb::v1::authorizer_client::AuthorizerClient::new(channel);
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());

    // During the grace period health says NOT_SERVING, yet requests are served.
    let mut saw_not_serving = false;
    for _ in 0..40 {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("still answering")
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_not_serving);
    let reply = authorizer
        .authorize(pb::AuthorizeRequest {
            key: secret.clone(),
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: String::new(),
        })
        .await
        .expect("served while draining")
        .into_inner();
    assert!(reply.allowed);

    let config = stopping.await.expect("stopped cleanly");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
    let server = TestServer::start_with(config).await;
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

#[tokio::test]
async fn key_manager_can_move_to_its_own_listener_or_be_disabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("a"));
    config.manage_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await; // via the manage port
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let on_public =
        keyward::pb::v1::key_manager_client::KeyManagerClient::new(server.channel().await)
            .get_scopes(bearer(&server.admin, pb::GetScopesRequest {}))
            .await
            .expect_err("not on the public port");
    assert_eq!(on_public.code(), Code::Unimplemented);

    let mut config = ServeConfig::with_data_dir(dir.path().join("b"));
    config.disable_manage = true;
    let server = TestServer::start_with(config).await;
    let disabled = server
        .manager()
        .await
        .get_scopes(bearer(&server.admin, pb::GetScopesRequest {}))
        .await
        .expect_err("disabled");
    assert_eq!(disabled.code(), Code::Unimplemented);
    let status = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: "keyward.v1.Authorizer".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_message_bytes = 4096;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let huge = pb::AuthorizeRequest {
        key: secret.clone(),
        method: "POST".into(),
        path: format!("/{}", "a".repeat(8000)),
        client_ip: String::new(),
    };
    let status = server
        .authorizer()
        .await
        .authorize(huge)
        .await
        .expect_err("too large");
    // gRPC's guide: a message over the limit is RESOURCE_EXHAUSTED (tonic
    // says OUT_OF_RANGE; keyward corrects it at the edge).
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        server
            .scrape()
            .await
            .contains(r#"keyward_rpcs_total{method="Authorize",code="RESOURCE_EXHAUSTED"} 1"#),
        "counted as sent"
    );
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

#[tokio::test]
async fn overload_is_shed_quickly_not_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_concurrent_requests = 1;
    config.max_streams_per_connection = 1;
    config.max_keys_per_account = 1000;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    // Creates hold their slot through a disk flush, so concurrent ones overlap.
    let mut tasks = Vec::new();
    for task in 0..8 {
        let client = server.manager().await;
        let admin = server.admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut codes = Vec::new();
            for i in 0..10 {
                let result = client
                    .create_key(bearer(
                        &admin,
                        pb::CreateKeyRequest {
                            name: format!("k{task}-{i}"),
                            scopes: vec!["mail.send".into()],
                            account_id: "acme".into(),
                            ..Default::default()
                        },
                    ))
                    .await;
                codes.push(result.map_or_else(|s| s.code(), |_| Code::Ok));
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(task.await.expect("task"));
    }
    let shed = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    let ok = codes.iter().filter(|c| **c == Code::Ok).count();
    assert_eq!(shed + ok, codes.len(), "only OK or shed: {codes:?}");
    assert!(
        shed > 0,
        "80 concurrent creates against a limit of 1 shed some"
    );
    assert!(ok > 0);
    assert_eq!(
        server.count("acme").await,
        ok + 1,
        "shed requests changed nothing"
    );
    // Shed requests never reach a handler; the edge counts them as sent.
    let scrape = server.scrape().await;
    assert_eq!(
        metric(
            &scrape,
            r#"keyward_rpcs_total{method="CreateKey",code="RESOURCE_EXHAUSTED"}"#
        ),
        shed as u64,
        "{scrape}"
    );
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed,
        "still serving"
    );
}

#[tokio::test]
async fn a_stuck_stream_cannot_hold_shutdown_hostage() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.drain_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    // A bidirectional stream whose client side never ends.
    let (_keep_open, requests) = tokio::sync::mpsc::channel(1);
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let _stream = reflection
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .expect("stream open");
    let started = std::time::Instant::now();
    // A liveness bound only (held hostage, shutdown would never end).
    tokio::time::timeout(Duration::from_secs(60), server.stop())
        .await
        .expect("shutdown finished despite the open stream");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "in-flight work got its drain time"
    );
}

/// The guard must not be an oracle: wrong secrets for a live key id and for
/// an id that does not exist get the same reply, however many there are
/// (the guard never delays or blocks a reply: it only counts); the guessing
/// is reported in metrics instead.
#[tokio::test]
async fn guessing_is_detected_but_live_and_unknown_ids_are_indistinguishable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.failed_auth_limit = 3;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let (_, other) = server.create_key("acme", &["mail.send"]).await;
    let live_id_wrong_secret = format!("{}{}", &secret[..26], &other[26..]);
    let unknown_id = format!("SG.AAAAAAAAAAAAAAAAAAAAAA{}", &secret[25..]);
    for _ in 0..20 {
        let mut replies = Vec::new();
        for key in [&live_id_wrong_secret, &unknown_id] {
            let mut reply = server.authorize(key, "POST", "/v3/mail/send").await;
            reply.key_id.clear();
            replies.push(reply);
        }
        assert_eq!(
            replies[0], replies[1],
            "the same reply for live and unknown ids"
        );
        assert_eq!(replies[0].reason, pb::DenyReason::UnknownKey as i32);
    }
    // The right secret still works.
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    // KeyManager: wrong secrets and non-keys are answered at once too.
    let mut manager = server.manager().await;
    for credential in [live_id_wrong_secret.as_str(), "kwadmin_not-the-token"] {
        for _ in 0..4 {
            let refused = manager
                .get_scopes(bearer(credential, pb::GetScopesRequest {}))
                .await;
            assert_eq!(refused.expect_err("wrong").code(), Code::Unauthenticated);
        }
    }
    // One detection for the live id, one for the unknown id (counted alike:
    // see below), one for the admin-token attempts.
    let metrics = server.scrape().await;
    assert!(
        metrics.contains("keyward_guessing_detected_total 3"),
        "{metrics}"
    );
}

/// The counters a guessing run can move: detections and decisions.
fn guessing_counters(scrape: &str) -> Vec<(String, u64)> {
    scrape
        .lines()
        .filter(|line| {
            line.starts_with("keyward_guessing_detected_total")
                || line.starts_with("keyward_decisions_total")
        })
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// How each counter moved from `before` to `after`.
fn movement(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    assert_eq!(before.len(), after.len(), "the same counters");
    before
        .iter()
        .zip(after)
        .map(|((name, was), (same, now))| {
            assert_eq!(name, same);
            (name.clone(), now - was)
        })
        .collect()
}

/// The metrics are no liveness oracle either: 25 wrong secrets for a live
/// key id and 25 for a random well-formed id (past the default limit of
/// 20) move every guessing and decision counter identically, through the
/// decision service and through key management alike.
#[tokio::test]
async fn metrics_move_alike_for_live_and_random_key_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut live = Vec::new();
    for _ in 0..2 {
        let (_, secret) = server.create_key("acme", &["mail.send"]).await;
        // The id of a live key with a secret that is not its own.
        live.push(format!("{}{}", &secret[..26], "A".repeat(43)));
    }
    let random = |first: char| format!("SG.{first}{}.{}", "Q".repeat(21), "A".repeat(43));
    let mut manager = server.manager().await;
    // Each pair through one front door: (live id, random id).
    let mut moved = Vec::new();
    for (door, pair) in [(0, [&live[0], &random('Q')]), (1, [&live[1], &random('g')])] {
        for key in pair {
            let before = guessing_counters(&server.scrape().await);
            for _ in 0..25 {
                if door == 0 {
                    let reply = server.authorize(key, "POST", "/v3/mail/send").await;
                    assert_eq!(reply.reason, pb::DenyReason::UnknownKey as i32);
                } else {
                    let refused = manager
                        .get_scopes(bearer(key, pb::GetScopesRequest {}))
                        .await;
                    assert_eq!(refused.expect_err("refused").code(), Code::Unauthenticated);
                }
            }
            let after = guessing_counters(&server.scrape().await);
            moved.push(movement(&before, &after));
        }
    }
    for (door, pair) in moved.chunks(2).enumerate() {
        assert_eq!(pair[0], pair[1], "front door {door}: live vs random id");
        let detected = pair[0]
            .iter()
            .find(|(name, _)| name == "keyward_guessing_detected_total")
            .map(|(_, moved)| *moved);
        assert_eq!(detected, Some(1), "front door {door}: {:?}", pair[0]);
    }
}

/// Every RPC the services define is counted under its own name, derived
/// from their descriptors: the lifecycle RPCs were once all "unknown".
#[tokio::test]
async fn every_rpc_is_counted_under_its_own_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, _) = server.create_key("acme", &["mail.send"]).await;
    let mut manager = server.manager().await;
    manager
        .disable_key(bearer(
            &server.admin,
            pb::DisableKeyRequest { key_id: id.clone() },
        ))
        .await
        .expect("disabled");
    manager
        .enable_key(bearer(&server.admin, pb::EnableKeyRequest { key_id: id }))
        .await
        .expect("enabled");
    let metrics = server.scrape().await;
    for counted in [
        r#"keyward_rpcs_total{method="DisableKey",code="OK"} 1"#,
        r#"keyward_rpcs_total{method="EnableKey",code="OK"} 1"#,
        r#"keyward_rpcs_total{method="unknown",code="OK"} 0"#,
    ] {
        assert!(metrics.contains(counted), "{counted}\n{metrics}");
    }
    for method in [
        "SetKeyExpiry",
        "RotateKey",
        "SetKeyAllowlist",
        "SetKeyRateLimit",
        "Backup",
        "Check",
        "HealthCheck",
        "ServerReflectionInfo",
    ] {
        assert!(
            metrics.contains(&format!(r#"method="{method}""#)),
            "{method}\n{metrics}"
        );
    }
}
