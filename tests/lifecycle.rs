//! Key lifecycle: disable/enable and expiry, through Authorize and Check,
//! under the same least-privilege rules as every change, across a restart.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use common::{TestServer, assert_status, bearer};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::pb::v1 as pb;
use tonic::Code;

/// A `mail.send` key named `name` in `acme`, to build on.
fn mailer(name: &str) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        name: name.into(),
        scopes: vec!["mail.send".into()],
        account_id: "acme".into(),
        ..Default::default()
    }
}

fn at(after: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now() + after)
}

async fn get(server: &TestServer, key_id: &str) -> pb::ApiKey {
    server
        .manager()
        .await
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: key_id.into(),
            },
        ))
        .await
        .expect("get")
        .into_inner()
}

async fn deny_reason(server: &TestServer, secret: &str) -> (i32, u32, String) {
    let reply = server.authorize(secret, "POST", "/v3/mail/send").await;
    (reply.reason, reply.http_status, reply.message)
}

/// The reason header Envoy's deny carries for `secret`.
async fn check_reason(server: &TestServer, secret: &str) -> (u32, String) {
    check_from(server, secret, None).await.expect_err("a deny")
}

/// Check as Envoy sends it from downstream address `source`: `Ok(())` for
/// an allow, else the deny's HTTP status and reason header.
async fn check_from(
    server: &TestServer,
    secret: &str,
    source: Option<&str>,
) -> Result<(), (u32, String)> {
    let (status, headers) = check_headers(server, secret, source).await;
    match status {
        None => Ok(()),
        Some(status) => Err((
            status,
            headers
                .get("x-keyward-deny-reason")
                .cloned()
                .unwrap_or_default(),
        )),
    }
}

/// Check as Envoy sends it: the deny's HTTP status (`None`: allowed) and
/// the headers Envoy would add to the client's response.
async fn check_headers(
    server: &TestServer,
    secret: &str,
    source: Option<&str>,
) -> (Option<u32>, HashMap<String, String>) {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
    let source = source.map(|ip| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    let response = AuthorizationClient::new(server.channel().await)
        .check(CheckRequest {
            attributes: Some(AttributeContext {
                source,
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: "/v3/mail/send".into(),
                        headers: [("authorization".to_owned(), format!("Bearer {secret}"))]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("check")
        .into_inner();
    let collect = |headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    };
    match response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => (
            Some(
                denied
                    .status
                    .map_or(0, |s| u32::try_from(s.code).unwrap_or(0)),
            ),
            collect(&denied.headers),
        ),
        Some(HttpResponse::OkResponse(ok)) => (None, collect(&ok.response_headers_to_add)),
        other => panic!("keyward answers every check with a response: {other:?}"),
    }
}

#[tokio::test]
async fn a_disabled_key_is_denied_until_enabled_and_cannot_manage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, secret) = server
        .create_key("acme", &["mail.send", "api_keys.read"])
        .await;
    let mut manager = server.manager().await;
    let disabled = manager
        .disable_key(bearer(
            &server.admin,
            pb::DisableKeyRequest { key_id: id.clone() },
        ))
        .await
        .expect("disable")
        .into_inner();
    assert!(!disabled.enabled);
    let (reason, status, message) = deny_reason(&server, &secret).await;
    assert_eq!(reason, pb::DenyReason::KeyDisabled as i32);
    assert_eq!(status, 401);
    assert!(message.contains("disabled"), "{message}");
    assert_eq!(
        check_reason(&server, &secret).await,
        (401, "key_disabled".into())
    );
    // A disabled key cannot act at KeyManager either.
    assert_status(
        manager
            .get_key(bearer(&secret, pb::GetKeyRequest { key_id: id.clone() }))
            .await,
        Code::Unauthenticated,
        "invalid",
    );
    assert!(!get(&server, &id).await.enabled);

    let enabled = manager
        .enable_key(bearer(
            &server.admin,
            pb::EnableKeyRequest { key_id: id.clone() },
        ))
        .await
        .expect("enable")
        .into_inner();
    assert!(enabled.enabled);
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

#[tokio::test]
async fn keys_expire_and_expiry_can_be_changed_or_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut manager = server.manager().await;
    // An expiry in the past is refused and creates nothing.
    assert_status(
        manager
            .create_key(bearer(
                &server.admin,
                pb::CreateKeyRequest {
                    expires_at: Some(prost_types::Timestamp::from(
                        SystemTime::now() - Duration::from_secs(1),
                    )),
                    ..mailer("late")
                },
            ))
            .await,
        Code::InvalidArgument,
        "expires_at: must be in the future",
    );
    assert_eq!(server.count("acme").await, 0);

    let (id, secret) = server
        .create(pb::CreateKeyRequest {
            expires_at: Some(at(Duration::from_millis(800))),
            ..mailer("short-lived")
        })
        .await;
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let key = get(&server, &id).await;
    assert!(key.expires_at.is_some() && !key.expired);

    tokio::time::sleep(Duration::from_millis(900)).await;
    let (reason, status, message) = deny_reason(&server, &secret).await;
    assert_eq!(reason, pb::DenyReason::KeyExpired as i32);
    assert_eq!(status, 401);
    assert!(message.contains("expired"), "{message}");
    assert_eq!(
        check_reason(&server, &secret).await,
        (401, "key_expired".into())
    );
    assert!(get(&server, &id).await.expired, "GetKey shows it expired");

    // Cleared: the key works again and never expires.
    let cleared = manager
        .set_key_expiry(bearer(
            &server.admin,
            pb::SetKeyExpiryRequest {
                key_id: id.clone(),
                expires_at: None,
            },
        ))
        .await
        .expect("clear")
        .into_inner();
    assert!(cleared.expires_at.is_none() && !cleared.expired);
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert_status(
        manager
            .set_key_expiry(bearer(
                &server.admin,
                pb::SetKeyExpiryRequest {
                    key_id: id,
                    expires_at: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: 0,
                    }),
                },
            ))
            .await,
        Code::InvalidArgument,
        "expires_at",
    );
}

#[tokio::test]
async fn lifecycle_changes_follow_least_privilege_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, manager_key) = server
        .create_key("acme", &["api_keys.update", "alerts.read"])
        .await;
    let (mailer_id, mailer) = server.create_key("acme", &["mail.send"]).await;
    let (peer_id, peer) = server.create_key("acme", &["alerts.read"]).await;
    let mut manager = server.manager().await;
    // A key may not disable a key holding scopes it lacks...
    assert_status(
        manager
            .disable_key(bearer(
                &manager_key,
                pb::DisableKeyRequest {
                    key_id: mailer_id.clone(),
                },
            ))
            .await,
        Code::PermissionDenied,
        "mail.send",
    );
    assert!(
        server
            .authorize(&mailer, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    // ...but may disable and expire one within its scopes.
    manager
        .disable_key(bearer(
            &manager_key,
            pb::DisableKeyRequest {
                key_id: peer_id.clone(),
            },
        ))
        .await
        .expect("disable a peer");
    manager
        .set_key_expiry(bearer(
            &server.admin,
            pb::SetKeyExpiryRequest {
                key_id: mailer_id.clone(),
                expires_at: Some(at(Duration::from_secs(3600))),
            },
        ))
        .await
        .expect("expire later");

    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    let (reason, _, _) = deny_reason(&server, &peer).await;
    assert_eq!(
        reason,
        pb::DenyReason::KeyDisabled as i32,
        "disabled after a restart"
    );
    let mailer_key = get(&server, &mailer_id).await;
    assert!(mailer_key.expires_at.is_some() && mailer_key.enabled);
    assert!(
        server
            .authorize(&mailer, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

async fn rotate(
    server: &TestServer,
    token: &str,
    key_id: &str,
    overlap: Duration,
) -> Result<pb::RotateKeyResponse, tonic::Status> {
    server
        .manager()
        .await
        .rotate_key(bearer(
            token,
            pb::RotateKeyRequest {
                key_id: key_id.into(),
                overlap: Some(prost_types::Duration::try_from(overlap).expect("duration")),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn rotation_keeps_the_id_and_the_previous_secret_works_only_for_the_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (id, first) = server.create_key("acme", &["mail.send"]).await;
    let allowed = |secret: String| {
        let server = &server;
        async move {
            server
                .authorize(&secret, "POST", "/v3/mail/send")
                .await
                .allowed
        }
    };

    let rotated = rotate(&server, &server.admin, &id, Duration::from_millis(700))
        .await
        .expect("rotate");
    let second = rotated.secret;
    let key = rotated.key.expect("key");
    assert_eq!(key.key_id, id, "the same key id");
    assert!(second.starts_with(&format!("SG.{id}.")) && second != first);
    assert_eq!(key.scopes, vec!["mail.send"], "same scopes");
    assert!(key.previous_secret_valid_until.is_some());
    assert!(allowed(second.clone()).await, "the new secret works");
    assert!(
        allowed(first.clone()).await,
        "the previous one, during the overlap"
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    let reply = server.authorize(&first, "POST", "/v3/mail/send").await;
    assert_eq!(
        reply.reason,
        pb::DenyReason::UnknownKey as i32,
        "refused like any wrong secret"
    );
    assert!(allowed(second.clone()).await);
    assert!(
        get(&server, &id)
            .await
            .previous_secret_valid_until
            .is_none()
    );

    // Rotating again ends the previous overlap: with overlap 0, at once.
    let third = rotate(&server, &server.admin, &id, Duration::from_secs(3600))
        .await
        .expect("rotate")
        .secret;
    assert!(allowed(second.clone()).await && allowed(third.clone()).await);
    let fourth = rotate(&server, &server.admin, &id, Duration::ZERO)
        .await
        .expect("rotate")
        .secret;
    assert!(
        !allowed(second).await,
        "the overlap of an earlier rotation ended"
    );
    assert!(
        !allowed(third.clone()).await,
        "overlap 0: the previous secret stops at once"
    );
    assert!(allowed(fourth.clone()).await);

    // An absurd overlap is refused and changes nothing.
    assert_status(
        rotate(
            &server,
            &server.admin,
            &id,
            Duration::from_secs(31 * 24 * 3600),
        )
        .await,
        Code::InvalidArgument,
        "overlap",
    );
    assert!(allowed(fourth.clone()).await);
    // Across a restart.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    assert!(
        server
            .authorize(&fourth, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert!(
        !server
            .authorize(&third, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

#[tokio::test]
async fn only_a_caller_holding_the_keys_scopes_may_rotate_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (mailer_id, mailer) = server.create_key("acme", &["mail.send"]).await;
    let (peer_id, _) = server.create_key("acme", &["alerts.read"]).await;
    // Rotation mints a working secret: `api_keys.update` alone is not enough.
    let (_, updater) = server
        .create_key("acme", &["api_keys.update", "alerts.read"])
        .await;
    assert_status(
        rotate(&server, &updater, &peer_id, Duration::ZERO).await,
        Code::PermissionDenied,
        "api_keys.create",
    );
    let (_, manager) = server
        .create_key(
            "acme",
            &["api_keys.create", "api_keys.update", "alerts.read"],
        )
        .await;
    assert_status(
        rotate(&server, &manager, &mailer_id, Duration::ZERO).await,
        Code::PermissionDenied,
        "mail.send",
    );
    assert!(
        server
            .authorize(&mailer, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let rotated = rotate(&server, &manager, &peer_id, Duration::ZERO)
        .await
        .expect("a peer within its scopes");
    assert!(
        server
            .authorize(&rotated.secret, "GET", "/v3/alerts")
            .await
            .allowed
    );
}

async fn authorize_from(
    server: &TestServer,
    secret: &str,
    client_ip: &str,
) -> Result<pb::AuthorizeResponse, tonic::Status> {
    server
        .authorizer()
        .await
        .authorize(pb::AuthorizeRequest {
            key: secret.into(),
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: client_ip.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn an_allowlist_limits_where_a_key_works_and_fails_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut manager = server.manager().await;
    // Host bits set: refused, nothing created.
    assert_status(
        manager
            .create_key(bearer(
                &server.admin,
                pb::CreateKeyRequest {
                    allowed_cidrs: vec!["10.0.0.1/8".into()],
                    ..mailer("x")
                },
            ))
            .await,
        Code::InvalidArgument,
        "allowed_cidrs",
    );
    assert_eq!(server.count("acme").await, 0);
    let (_, secret) = server
        .create(pb::CreateKeyRequest {
            allowed_cidrs: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            ..mailer("office")
        })
        .await;
    for inside in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::7"] {
        assert!(
            authorize_from(&server, &secret, inside)
                .await
                .expect("ok")
                .allowed,
            "{inside}"
        );
    }
    for outside in ["11.0.0.1", "2001:db9::1", ""] {
        let reply = authorize_from(&server, &secret, outside)
            .await
            .expect("a deny");
        assert_eq!(
            reply.reason,
            pb::DenyReason::IpNotAllowed as i32,
            "{outside:?}"
        );
        assert_eq!(reply.http_status, 403);
    }
    assert_status(
        authorize_from(&server, &secret, "not-an-ip").await,
        Code::InvalidArgument,
        "client_ip",
    );
    // Check uses the downstream address Envoy reports.
    assert_eq!(check_from(&server, &secret, Some("10.9.9.9")).await, Ok(()));
    assert_eq!(
        check_from(&server, &secret, Some("192.0.2.1")).await,
        Err((403, "ip_not_allowed".into()))
    );
    assert_eq!(
        check_from(&server, &secret, None).await,
        Err((403, "ip_not_allowed".into()))
    );
}

#[tokio::test]
async fn allowlists_follow_least_privilege_survive_a_restart_and_can_be_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut manager = server.manager().await;
    let (id, secret) = server
        .create(pb::CreateKeyRequest {
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..mailer("office")
        })
        .await;
    // A key may not change the allowlist of a key holding scopes it lacks.
    let (_, manager_key) = server
        .create_key("acme", &["api_keys.update", "alerts.read"])
        .await;
    assert_status(
        manager
            .set_key_allowlist(bearer(
                &manager_key,
                pb::SetKeyAllowlistRequest {
                    key_id: id.clone(),
                    allowed_cidrs: vec![],
                },
            ))
            .await,
        Code::PermissionDenied,
        "mail.send",
    );
    // Survives a restart; then cleared: any address again.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    assert!(
        !authorize_from(&server, &secret, "11.0.0.1")
            .await
            .expect("ok")
            .allowed
    );
    let cleared = server
        .manager()
        .await
        .set_key_allowlist(bearer(
            &server.admin,
            pb::SetKeyAllowlistRequest {
                key_id: id,
                allowed_cidrs: vec![],
            },
        ))
        .await
        .expect("clear")
        .into_inner();
    assert!(cleared.allowed_cidrs.is_empty());
    assert!(
        authorize_from(&server, &secret, "")
            .await
            .expect("ok")
            .allowed
    );
}

fn rate(requests: u32, period: Duration, burst: u32) -> pb::RateLimit {
    pb::RateLimit {
        requests,
        period: Some(period.try_into().expect("a period")),
        burst,
    }
}

async fn set_rate_limit(
    server: &TestServer,
    caller: &str,
    key_id: &str,
    rate_limit: Option<pb::RateLimit>,
) -> Result<pb::ApiKey, tonic::Status> {
    server
        .manager()
        .await
        .set_key_rate_limit(bearer(
            caller,
            pb::SetKeyRateLimitRequest {
                key_id: key_id.into(),
                rate_limit,
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_rate_limit_admits_its_burst_then_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    // 3 a minute, all at once: then one every 20 s.
    let (id, secret) = server
        .create(pb::CreateKeyRequest {
            rate_limit: Some(rate(3, Duration::from_secs(60), 0)),
            ..mailer("limited")
        })
        .await;
    let shown = get(&server, &id).await.rate_limit.expect("shown");
    assert_eq!((shown.requests, shown.burst), (3, 3), "burst 0 = requests");

    for remaining in [2, 1, 0] {
        let reply = server.authorize(&secret, "POST", "/v3/mail/send").await;
        assert!(reply.allowed, "{reply:?}");
        let status = reply.rate_limit.expect("budget reported");
        assert_eq!((status.limit, status.remaining), (3, remaining));
        assert!(reply.retry_after.is_none());
    }
    let refused = server.authorize(&secret, "POST", "/v3/mail/send").await;
    assert!(!refused.allowed);
    assert_eq!(refused.reason, pb::DenyReason::RateLimited as i32);
    assert_eq!(refused.http_status, 429);
    assert!(
        refused.message.contains("rate limit"),
        "{}",
        refused.message
    );
    let retry = Duration::try_from(refused.retry_after.expect("retry_after")).expect("positive");
    assert!(
        retry > Duration::from_secs(19) && retry <= Duration::from_secs(20),
        "one interval: {retry:?}"
    );

    // Envoy's deny: 429 with the headers a client can act on.
    let (status, headers) = check_headers(&server, &secret, None).await;
    assert_eq!(status, Some(429));
    assert_eq!(headers["x-keyward-deny-reason"], "rate_limited");
    assert_eq!(headers["retry-after"], "20");
    assert_eq!(headers["x-ratelimit-limit"], "3");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert_eq!(headers["x-ratelimit-reset"], "60");
    assert!(headers["content-type"].starts_with("application/json"));
    assert!(
        server
            .scrape()
            .await
            .lines()
            .any(|l| l.contains("reason=\"rate_limited\"") && !l.ends_with(" 0")),
        "denies counted by reason"
    );

    // Removed: every request passes again, with no budget reported; set
    // again on the existing key, it applies at once.
    let cleared = set_rate_limit(&server, &server.admin, &id, None)
        .await
        .expect("clear");
    assert!(cleared.rate_limit.is_none());
    let reply = server.authorize(&secret, "POST", "/v3/mail/send").await;
    assert!(reply.allowed && reply.rate_limit.is_none());
    set_rate_limit(
        &server,
        &server.admin,
        &id,
        Some(rate(1, Duration::from_secs(3600), 1)),
    )
    .await
    .expect("set");
    let (_, allowed_headers) = check_headers(&server, &secret, None).await;
    assert_eq!(
        allowed_headers["x-ratelimit-remaining"], "0",
        "an allow reports its budget"
    );
    assert_eq!(deny_reason(&server, &secret).await.1, 429);

    // Across a restart the limit is kept.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    let kept = get(&server, &id).await.rate_limit.expect("kept");
    assert_eq!((kept.requests, kept.burst), (1, 1));
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert_eq!(deny_reason(&server, &secret).await.1, 429);
}

#[tokio::test]
async fn only_requests_that_would_pass_spend_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server
        .create(pb::CreateKeyRequest {
            rate_limit: Some(rate(1, Duration::from_secs(3600), 1)),
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..mailer("one an hour")
        })
        .await;
    for _ in 0..5 {
        // Wrong address, wrong route, wrong scope: refused for that reason,
        // never for the rate, and the budget stays whole.
        assert_eq!(
            authorize_from(&server, &secret, "192.0.2.1")
                .await
                .expect("reply")
                .reason,
            pb::DenyReason::IpNotAllowed as i32
        );
        let mut authorizer = server.authorizer().await;
        for (method, path, reason) in [
            ("GET", "/v3/alerts", pb::DenyReason::InsufficientScope),
            ("GET", "/v3/no/such/route", pb::DenyReason::UnknownRoute),
        ] {
            let reply = authorizer
                .authorize(pb::AuthorizeRequest {
                    key: secret.clone(),
                    method: method.into(),
                    path: path.into(),
                    client_ip: "10.1.1.1".into(),
                })
                .await
                .expect("reply")
                .into_inner();
            assert_eq!(reply.reason, reason as i32);
            assert!(reply.rate_limit.is_none(), "never reached the limiter");
        }
    }
    assert!(
        authorize_from(&server, &secret, "10.1.1.1")
            .await
            .expect("reply")
            .allowed
    );
    assert_eq!(
        authorize_from(&server, &secret, "10.1.1.1")
            .await
            .expect("reply")
            .reason,
        pb::DenyReason::RateLimited as i32
    );
}

#[tokio::test]
async fn bad_rate_limits_are_refused_by_field_and_follow_least_privilege() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut manager = server.manager().await;
    for (limit, field) in [
        (rate(0, Duration::from_secs(1), 0), "rate_limit.requests"),
        (rate(10, Duration::ZERO, 0), "rate_limit.period"),
        (
            rate(10, Duration::from_secs(2 * 86_400), 0),
            "rate_limit.period",
        ),
        (
            rate(2_000_000, Duration::from_secs(1), 0),
            "rate_limit.requests",
        ),
        (
            rate(10, Duration::from_secs(1), 2_000_000),
            "rate_limit.burst",
        ),
        (
            pb::RateLimit {
                requests: 10,
                period: None,
                burst: 0,
            },
            "rate_limit.period",
        ),
    ] {
        assert_status(
            manager
                .create_key(bearer(
                    &server.admin,
                    pb::CreateKeyRequest {
                        rate_limit: Some(limit),
                        ..mailer("bad")
                    },
                ))
                .await,
            Code::InvalidArgument,
            field,
        );
        let (id, secret) = server.create_key("acme", &["mail.send"]).await;
        assert_status(
            set_rate_limit(&server, &server.admin, &id, Some(limit)).await,
            Code::InvalidArgument,
            field,
        );
        assert!(
            get(&server, &id).await.rate_limit.is_none(),
            "nothing changed"
        );
        assert!(
            server
                .authorize(&secret, "POST", "/v3/mail/send")
                .await
                .allowed
        );
    }
    assert_eq!(server.count("acme").await, 6, "no bad create went through");

    // A key may limit only keys within its own scopes.
    let (_, limiter) = server
        .create_key("acme", &["api_keys.update", "alerts.read"])
        .await;
    let (mailer_id, _) = server.create_key("acme", &["mail.send"]).await;
    let (peer_id, _) = server.create_key("acme", &["alerts.read"]).await;
    let one = Some(rate(1, Duration::from_secs(1), 0));
    assert_status(
        set_rate_limit(&server, &limiter, &mailer_id, one).await,
        Code::PermissionDenied,
        "mail.send",
    );
    set_rate_limit(&server, &limiter, &peer_id, one)
        .await
        .expect("a peer within its scopes");
}

#[tokio::test]
async fn last_used_is_kept_to_the_minute_and_finds_unused_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (used_id, used) = server.create_key("acme", &["mail.send"]).await;
    let (denied_id, denied) = server.create_key("acme", &["alerts.read"]).await;
    assert!(get(&server, &used_id).await.last_used_at.is_none());

    let before = SystemTime::now();
    for _ in 0..100 {
        assert!(
            server
                .authorize(&used, "POST", "/v3/mail/send")
                .await
                .allowed
        );
        // A denied decision is not a use.
        assert!(
            !server
                .authorize(&denied, "POST", "/v3/mail/send")
                .await
                .allowed
        );
    }
    let last_used = get(&server, &used_id).await.last_used_at.expect("recorded");
    assert_eq!(
        (last_used.seconds % 60, last_used.nanos),
        (0, 0),
        "to the minute"
    );
    let last_used = SystemTime::try_from(last_used).expect("a time");
    let after = SystemTime::now();
    let minute_before = before
        - Duration::from_secs(
            before
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
                % 60,
        )
        - Duration::from_nanos(u64::from(
            before
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .subsec_nanos(),
        ));
    assert!(
        minute_before <= last_used && last_used <= after,
        "{last_used:?} in [{minute_before:?}, {after:?}]"
    );
    assert!(
        last_used <= before
            && before.duration_since(last_used).expect("earlier") < Duration::from_secs(60)
    );
    assert!(get(&server, &denied_id).await.last_used_at.is_none());

    // ListKeys shows it too, and filters by it: every key here was used
    // or created just now.
    let listed = server.list("acme").await;
    assert!(
        listed
            .iter()
            .any(|k| k.key_id == used_id && k.last_used_at.is_some())
    );
    let unused = |unused_for: Duration| {
        let server = &server;
        async move {
            server
                .manager()
                .await
                .list_keys(bearer(
                    &server.admin,
                    pb::ListKeysRequest {
                        account_id: "acme".into(),
                        unused_for: Some(unused_for.try_into().expect("duration")),
                        ..Default::default()
                    },
                ))
                .await
                .expect("list")
                .into_inner()
                .keys
                .len()
        }
    };
    assert_eq!(unused(Duration::ZERO).await, 2);
    assert_eq!(unused(Duration::from_secs(3600)).await, 0);

    // A graceful restart keeps it.
    let config = server.stop().await;
    let server = TestServer::start_with(config).await;
    let kept = get(&server, &used_id).await.last_used_at.expect("kept");
    assert_eq!(SystemTime::try_from(kept).expect("a time"), last_used);
    assert!(get(&server, &denied_id).await.last_used_at.is_none());
}
