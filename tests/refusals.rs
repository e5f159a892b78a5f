//! Input that must be refused without changing anything: an empty scope
//! list (never Full Access), credentials pasted into the wrong field (never
//! echoed, logged or stored), `on-behalf-of` that must confine the admin,
//! and names that would read differently than they are. Both front doors.

mod common;

use std::net::SocketAddr;

use common::{TestServer, bearer, rest_call};
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use tonic::Code;

async fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    (dir, server)
}

#[tokio::test]
async fn an_empty_scope_list_over_rest_grants_nothing() {
    let (_dir, server) = server().await;
    let rest = server.http_addr.expect("rest");
    let auth = format!("Bearer {}", server.admin);
    let headers = [("authorization", auth.as_str()), ("on-behalf-of", "acme")];
    let (status, json) = rest_call(
        rest,
        "POST",
        "/v3/api_keys",
        &headers,
        r#"{"name":"x","scopes":[]}"#,
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["errors"][0]["field"], "scopes", "{json}");
    assert_eq!(server.count("acme").await, 0);
}

#[tokio::test]
async fn credentials_in_the_wrong_field_are_refused_and_never_echoed() {
    let (_dir, server) = server().await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let mut manager = server.manager().await;
    let create = |name: &str, scopes: Vec<String>, account: &str| pb::CreateKeyRequest {
        name: name.into(),
        scopes,
        account_id: account.into(),
        ..Default::default()
    };
    for request in [
        create("k", vec![secret.clone()], "acme"),
        create("k", vec![server.admin.clone()], "acme"),
        create(&format!("mine: {secret}"), vec!["mail.send".into()], "acme"),
        create("k", vec!["mail.send".into()], &server.admin),
        create("k", vec!["mail.send".into()], &secret[..40]),
    ] {
        let status = manager
            .create_key(bearer(&server.admin, request))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let message = status.message();
        assert!(!message.contains(&secret[3..25]), "echoed: {message}");
        assert!(!message.contains(&server.admin), "echoed: {message}");
    }
    // REST the same.
    let rest = server.http_addr.expect("rest");
    let auth = format!("Bearer {}", server.admin);
    for (account, body) in [
        ("acme", format!(r#"{{"name":"k","scopes":["{secret}"]}}"#)),
        (server.admin.as_str(), r#"{"name":"k"}"#.to_owned()),
    ] {
        let headers = [("authorization", auth.as_str()), ("on-behalf-of", account)];
        let (status, json) = rest_call(rest, "POST", "/v3/api_keys", &headers, &body).await;
        assert_eq!(status, 400, "{json}");
        let text = json.to_string();
        assert!(
            !text.contains(&secret[3..25]) && !text.contains(&server.admin),
            "{text}"
        );
    }
    // Nothing stored (a refusal's audit line carries only its message).
    assert_eq!(server.count("acme").await, 1);
}

#[tokio::test]
async fn on_behalf_of_confines_the_admin_to_the_named_account() {
    let (_dir, server) = server().await;
    let (acme_key, _) = server.create_key("acme", &["mail.send"]).await;
    let rest = server.http_addr.expect("rest");
    let auth = format!("Bearer {}", server.admin);
    let path = format!("/v3/api_keys/{acme_key}");
    let globex = [("authorization", auth.as_str()), ("on-behalf-of", "globex")];
    for (method, body) in [
        ("GET", ""),
        ("PATCH", r#"{"name":"taken"}"#),
        ("PUT", r#"{"name":"taken","scopes":["alerts.read"]}"#),
        ("DELETE", ""),
    ] {
        let (status, json) = rest_call(rest, method, &path, &globex, body).await;
        assert_eq!(status, 404, "{method}: {json}");
    }
    // Twice is an error, not "first wins".
    let twice = [
        ("authorization", auth.as_str()),
        ("on-behalf-of", "acme"),
        ("on-behalf-of", "globex"),
    ];
    let (status, json) = rest_call(rest, "GET", &path, &twice, "").await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["errors"][0]["field"], "on-behalf-of", "{json}");
    // The right account still reaches it, unchanged.
    let acme = [("authorization", auth.as_str()), ("on-behalf-of", "acme")];
    let (status, json) = rest_call(rest, "GET", &path, &acme, "").await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["result"][0]["scopes"][0], "mail.send", "{json}");
}

#[tokio::test]
async fn names_with_bidi_overrides_or_zero_width_characters_are_refused() {
    let (_dir, server) = server().await;
    let mut manager = server.manager().await;
    for name in [
        "evil\u{202E}gpj.exe",
        "zero\u{200B}width",
        "\u{FEFF}bom",
        "iso\u{2066}late",
    ] {
        let status = manager
            .create_key(bearer(
                &server.admin,
                pb::CreateKeyRequest {
                    name: name.into(),
                    scopes: vec!["mail.send".into()],
                    account_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}");
        assert!(status.message().starts_with("name:"), "{status:?}");
    }
    assert_eq!(server.count("acme").await, 0);
}
