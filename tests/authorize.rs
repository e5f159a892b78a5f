//! Authorize over a real loopback server: every decision path.

mod common;

use common::{TestServer, assert_status};
use keyward::pb::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn allows_a_key_with_the_route_scope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (key_id, secret) = server.create_key("acme", &["mail.send"]).await;

    let reply = server.authorize(&secret, "POST", "/v3/mail/send").await;
    assert!(reply.allowed, "{reply:?}");
    assert_eq!(reply.reason, pb::DenyReason::Unspecified as i32);
    assert_eq!(reply.http_status, 200);
    assert_eq!(reply.key_id, key_id);
    assert_eq!(reply.account_id, "acme");
    assert_eq!(reply.required_scopes, vec!["mail.send"]);
    assert!(reply.missing_scopes.is_empty());

    // The query string is ignored; a Bearer prefix is accepted.
    let reply = server
        .authorize(
            &format!("Bearer {secret}"),
            "POST",
            "/v3/mail/send?dry_run=1",
        )
        .await;
    assert!(reply.allowed, "{reply:?}");
}

#[tokio::test]
async fn denies_missing_scopes_and_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (key_id, secret) = server
        .create_key("acme", &["suppression.bounces.read"])
        .await;

    let reply = server
        .authorize(&secret, "GET", "/v3/suppression/bounces")
        .await;
    assert!(reply.allowed);
    let reply = server
        .authorize(&secret, "HEAD", "/v3/suppression/bounces")
        .await;
    assert!(reply.allowed, "HEAD is served by GET routes");

    let reply = server
        .authorize(&secret, "DELETE", "/v3/suppression/bounces/a%40b.com")
        .await;
    assert!(!reply.allowed);
    assert_eq!(reply.reason, pb::DenyReason::InsufficientScope as i32);
    assert_eq!(reply.http_status, 403);
    assert_eq!(reply.key_id, key_id);
    assert_eq!(reply.account_id, "acme");
    assert_eq!(reply.required_scopes, vec!["suppression.bounces.delete"]);
    assert_eq!(reply.missing_scopes, vec!["suppression.bounces.delete"]);
    assert!(reply.message.contains("suppression.bounces.delete"));

    let reply = server
        .authorize(&secret, "POST", "/v3/templates/t1/versions/v2/activate")
        .await;
    assert_eq!(
        reply.missing_scopes,
        vec!["templates.versions.activate.create"]
    );
}

#[tokio::test]
async fn any_valid_key_reads_its_scopes_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &["alerts.read"]).await;
    let reply = server.authorize(&secret, "GET", "/v3/scopes").await;
    assert!(reply.allowed);
    assert!(reply.required_scopes.is_empty());
}

#[tokio::test]
async fn billing_keys_reach_billing_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, billing) = server.create_key("acme", &["billing.read"]).await;
    assert!(
        server
            .authorize(&billing, "GET", "/v3/billing")
            .await
            .allowed
    );
    let reply = server.authorize(&billing, "POST", "/v3/mail/send").await;
    assert_eq!(reply.reason, pb::DenyReason::InsufficientScope as i32);

    // A Full Access key holds every scope but billing's.
    let (_, full) = server.create_key("acme", &[]).await;
    assert!(
        server
            .authorize(&full, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let reply = server.authorize(&full, "GET", "/v3/billing").await;
    assert_eq!(reply.missing_scopes, vec!["billing.read"]);
}

#[tokio::test]
async fn bad_keys_are_401() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (key_id, secret) = server.create_key("acme", &["mail.send"]).await;
    let (_, other) = server.create_key("acme", &["mail.send"]).await;
    let wrong_secret = format!("{}{}", &secret[..26], &other[26..]);
    let unknown_id = format!("SG.AAAAAAAAAAAAAAAAAAAAAA{}", &secret[25..]);

    let cases: Vec<(String, pb::DenyReason)> = vec![
        (String::new(), pb::DenyReason::MissingKey),
        ("Bearer ".into(), pb::DenyReason::MissingKey),
        ("SG.short".into(), pb::DenyReason::MalformedKey),
        (secret[..68].to_owned(), pb::DenyReason::MalformedKey),
        (format!("{secret}x"), pb::DenyReason::MalformedKey),
        (
            secret.replacen("SG.", "XX.", 1),
            pb::DenyReason::MalformedKey,
        ),
        (
            format!("{}+{}", &secret[..30], &secret[31..]),
            pb::DenyReason::MalformedKey,
        ),
        ("x".repeat(10_000), pb::DenyReason::MalformedKey),
        (wrong_secret, pb::DenyReason::UnknownKey),
        (unknown_id, pb::DenyReason::UnknownKey),
    ];
    for (key, reason) in cases {
        let reply = server.authorize(&key, "POST", "/v3/mail/send").await;
        assert!(!reply.allowed, "{key:?}");
        assert_eq!(reply.reason, reason as i32, "{key:?}: {reply:?}");
        assert_eq!(reply.http_status, 401, "{key:?}");
        assert!(
            reply.account_id.is_empty(),
            "unverified keys reveal no account"
        );
        assert!(
            reply.required_scopes.is_empty(),
            "unauthenticated callers learn no route"
        );
        assert!(
            !reply.message.contains(&secret[26..]),
            "no secret in messages"
        );
    }
    // The wrong-secret reply names the id the caller sent, never more.
    let reply = server
        .authorize(
            &format!("{}{}", &secret[..26], &other[26..]),
            "POST",
            "/v3/mail/send",
        )
        .await;
    assert_eq!(reply.key_id, key_id);
}

#[tokio::test]
async fn unknown_routes_and_ambiguous_paths_are_403() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, secret) = server.create_key("acme", &[]).await;

    for (method, path) in [
        ("GET", "/v3/nothing/here"),
        ("PUT", "/v3/scopes"),
        ("OPTIONS", "/v3/scopes"),
        ("get", "/v3/scopes"),
        ("POST", "/v3/mail/send/extra"),
    ] {
        let reply = server.authorize(&secret, method, path).await;
        assert_eq!(
            reply.reason,
            pb::DenyReason::UnknownRoute as i32,
            "{method} {path}"
        );
        assert_eq!(reply.http_status, 403);
    }
    for path in [
        "/v3/scopes/../billing",
        "/v3/scopes/%2e%2e/billing",
        "/v3/mail%2Fsend",
        "/v3//mail/send",
        "/v3/mail/send/",
        "/v3/./mail/send",
        "/v3/mail\\send",
        "/v3/alerts/%252e%252e",
        "v3/mail/send",
    ] {
        let reply = server.authorize(&secret, "POST", path).await;
        assert_eq!(reply.reason, pb::DenyReason::AmbiguousPath as i32, "{path}");
        assert_eq!(reply.http_status, 403, "{path}");
    }
}

#[tokio::test]
async fn broken_requests_are_invalid_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut client = server.authorizer().await;
    let request = |method: &str, path: &str| pb::AuthorizeRequest {
        key: String::new(),
        method: method.to_owned(),
        path: path.to_owned(),
        client_ip: String::new(),
    };
    assert_status(
        client.authorize(request("", "/v3/scopes")).await,
        Code::InvalidArgument,
        "method",
    );
    assert_status(
        client.authorize(request("GE T", "/v3/scopes")).await,
        Code::InvalidArgument,
        "method",
    );
    assert_status(
        client.authorize(request("GET", "")).await,
        Code::InvalidArgument,
        "path: required",
    );
    let long = format!("/{}", "a".repeat(9000));
    assert_status(
        client.authorize(request("GET", &long)).await,
        Code::InvalidArgument,
        "path: at most",
    );
}

/// Read is GET, with one deliberate exception the route file documents: the
/// suppression search is a POST that changes nothing, so `.read` suffices.
#[tokio::test]
async fn the_suppression_search_is_a_read_although_it_is_a_post() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, reader) = server.create_key("acme", &["asm.groups.read"]).await;
    let search = "/v3/asm/groups/42/suppressions/search";
    assert!(server.authorize(&reader, "POST", search).await.allowed);
    let add = server
        .authorize(&reader, "POST", "/v3/asm/groups/42/suppressions")
        .await;
    assert!(!add.allowed, "adding suppressions is a write");
    assert_eq!(add.missing_scopes, vec!["asm.groups.update"]);
}

/// The outside review's path confusion: spellings a decoding or
/// case-insensitive upstream reads as another route are denied; legitimate
/// parameter values keep working.
#[tokio::test]
async fn spellings_an_upstream_reads_as_another_route_are_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (_, key) = server.create_key("acme", &["ips.read"]).await;
    for path in [
        "/v3/ips/%70ools",
        "/v3/ips/%70%6F%6F%6C%73",
        "/v3/ips/pools;x=1",
        "/v3/ips/POOLS",
        "/v3/ips/Pools",
        "/v3/ips/AsSiGnEd",
    ] {
        let reply = server.authorize(&key, "GET", path).await;
        assert!(!reply.allowed, "{path}");
        assert_eq!(reply.reason, pb::DenyReason::AmbiguousPath as i32, "{path}");
    }
    for path in [
        "/v3/ips/2001:db8::1",
        "/v3/ips/2001%3Adb8%3A%3A1",
        "/v3/ips/192.0.2.7",
    ] {
        assert!(server.authorize(&key, "GET", path).await.allowed, "{path}");
    }
    let (_, bounces) = server
        .create_key("acme", &["suppression.bounces.read"])
        .await;
    for path in [
        "/v3/suppression/bounces/alice%40example.com",
        "/v3/suppression/bounces/alice@example.com",
    ] {
        assert!(
            server.authorize(&bounces, "GET", path).await.allowed,
            "{path}"
        );
    }
}
