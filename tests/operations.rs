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
    assert_eq!(
        metric(&scrape, "keyward_decision_duration_seconds_count"),
        3
    );
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
    };
    let status = server
        .authorizer()
        .await
        .authorize(huge)
        .await
        .expect_err("too large");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
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
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("shutdown finished despite the open stream");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "in-flight work got its drain time"
    );
}

#[tokio::test]
async fn repeated_wrong_secrets_are_throttled_without_touching_the_right_one() {
    use std::time::Instant;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.failed_auth_limit = 3;
    config.failed_auth_delay_ms = 400;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let (_, other) = server.create_key("acme", &["mail.send"]).await;
    let wrong = format!("{}{}", &secret[..26], &other[26..]);
    for _ in 0..3 {
        let started = Instant::now();
        assert!(
            !server
                .authorize(&wrong, "POST", "/v3/mail/send")
                .await
                .allowed
        );
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "under the limit: no delay"
        );
    }
    let started = Instant::now();
    let reply = server.authorize(&wrong, "POST", "/v3/mail/send").await;
    assert_eq!(
        reply.reason,
        pb::DenyReason::UnknownKey as i32,
        "the same answer, later"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "over the limit: delayed"
    );

    // The right secret for the same id is never slowed, even now.
    let started = Instant::now();
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert!(started.elapsed() < Duration::from_millis(300));
    // Management calls with the wrong secret are throttled too.
    let started = Instant::now();
    let refused = server
        .manager()
        .await
        .get_scopes(bearer(&wrong, pb::GetScopesRequest {}))
        .await;
    assert_eq!(refused.expect_err("wrong").code(), Code::Unauthenticated);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Ids of no live key are not tracked (nothing to guess).
    let unknown = format!("SG.AAAAAAAAAAAAAAAAAAAAAA{}", &secret[25..]);
    for _ in 0..5 {
        let started = Instant::now();
        assert!(
            !server
                .authorize(&unknown, "POST", "/v3/mail/send")
                .await
                .allowed
        );
        assert!(started.elapsed() < Duration::from_millis(300));
    }
}
