//! Hostile input on every RPC: each gets its documented status, nothing in
//! the store changes, and the server keeps serving.
#![allow(clippy::too_many_lines, reason = "one table of cases per test")]

mod common;

use std::collections::HashMap;

use common::{TestServer, bearer};
use keyward::pb::v1 as pb;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// Same tags as AuthorizeRequest / CreateKeyRequest, but raw bytes, so a
/// client can send strings that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawStrings {
    #[prost(bytes = "vec", tag = "1")]
    one: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    two: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    three: Vec<u8>,
}

async fn raw_call(
    server: &TestServer,
    path: &'static str,
    message: RawStrings,
    token: &str,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RawStrings, RawStrings>::default();
    grpc.unary(
        bearer(token, message),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .expect_err("refused")
}

/// Every string a key field might hold that is not a live key.
fn bad_keys(valid: &str) -> Vec<String> {
    let mut keys: Vec<String> = (0..=80)
        .filter(|n| *n != 69)
        .map(|n| "A".repeat(n))
        .collect();
    for (i, c) in valid.char_indices() {
        for replacement in ['+', '/', '=', ' ', '\u{0}', 'é'] {
            if c != replacement {
                let mut key = valid.to_owned();
                key.replace_range(i..=i, &replacement.to_string());
                keys.push(key);
            }
        }
    }
    keys.push(format!("{}{}", &valid[..26], "A".repeat(43))); // valid id, wrong secret
    keys
}

#[tokio::test]
async fn hostile_input_changes_nothing_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let (key_id, secret) = server.create_key("acme", &["mail.send"]).await;
    let mut manager = server.manager().await;
    let before = manager
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: key_id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();

    // Keys of every wrong length and alphabet: a deny, never an error.
    for key in bad_keys(&secret) {
        let reply = server.authorize(&key, "POST", "/v3/mail/send").await;
        assert!(!reply.allowed, "{key:?}");
        assert_eq!(reply.http_status, 401, "{key:?}");
        let unknown = key == format!("{}{}", &secret[..26], "A".repeat(43));
        let expected = if key.is_empty() {
            pb::DenyReason::MissingKey
        } else if unknown {
            pb::DenyReason::UnknownKey
        } else {
            pb::DenyReason::MalformedKey
        };
        assert_eq!(reply.reason, expected as i32, "{key:?}");
    }
    // Paths with tricks or junk: a deny, never an error.
    for path in [
        "/v3/%2e%2e/mail/send",
        "/v3//mail/send",
        "/v3/mail%2Fsend",
        "/v3/mail/send\u{1}",
        &format!("/{}", "a/".repeat(4000)),
    ] {
        let reply = server.authorize(&secret, "POST", path).await;
        assert_eq!(reply.http_status, 403, "{path:?}");
    }

    // Strings that are not UTF-8: INVALID_ARGUMENT, named as a malformed message.
    let junk = vec![0xff, 0xfe, b'S', b'G'];
    for (path, message) in [
        (
            "/keyward.v1.Authorizer/Authorize",
            RawStrings {
                one: junk.clone(),
                two: b"GET".to_vec(),
                three: b"/v3/scopes".to_vec(),
            },
        ),
        (
            "/keyward.v1.Authorizer/Authorize",
            RawStrings {
                one: secret.clone().into_bytes(),
                two: junk.clone(),
                three: b"/".to_vec(),
            },
        ),
        (
            "/keyward.v1.KeyManager/CreateKey",
            RawStrings {
                one: junk.clone(),
                two: b"mail.send".to_vec(),
                three: Vec::new(),
            },
        ),
        (
            "/keyward.v1.KeyManager/GetKey",
            RawStrings {
                one: junk.clone(),
                two: Vec::new(),
                three: Vec::new(),
            },
        ),
    ] {
        let status = raw_call(&server, path, message, &server.admin).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains("malformed request message"),
            "{status:?}"
        );
    }

    // Every management RPC with bad key ids.
    let mut bad_ids: Vec<String> = (0..30)
        .filter(|n| *n != 22)
        .map(|n| "A".repeat(n))
        .collect();
    bad_ids.extend([
        "AAAAAAAAAAAAAAAAAAAAA+".into(),
        "AAAAAAAAAAAAAAAAAAAAAB".into(),
        "AAAAAAAAAAAAAAAAAAAA\u{0}A".into(),
    ]);
    for id in &bad_ids {
        let admin = &server.admin;
        let results = [
            manager
                .get_key(bearer(admin, pb::GetKeyRequest { key_id: id.clone() }))
                .await
                .map(drop),
            manager
                .delete_key(bearer(admin, pb::DeleteKeyRequest { key_id: id.clone() }))
                .await
                .map(drop),
            manager
                .rename_key(bearer(
                    admin,
                    pb::RenameKeyRequest {
                        key_id: id.clone(),
                        name: "x".into(),
                    },
                ))
                .await
                .map(drop),
            manager
                .update_key(bearer(
                    admin,
                    pb::UpdateKeyRequest {
                        key_id: id.clone(),
                        name: "x".into(),
                        scopes: vec!["mail.send".into()],
                        access: HashMap::new(),
                    },
                ))
                .await
                .map(drop),
        ];
        for result in results {
            let status = result.expect_err("bad id");
            assert_eq!(status.code(), Code::InvalidArgument, "{id:?}: {status:?}");
            assert!(status.message().starts_with("key_id:"), "{status:?}");
        }
    }

    // Names, scope lists and kinds.
    let create = |name: &str, scopes: Vec<String>| pb::CreateKeyRequest {
        name: name.into(),
        scopes,
        account_id: "acme".into(),
        access: HashMap::new(),
        expires_at: None,
        allowed_cidrs: Vec::new(),
        rate_limit: None,
        credits: None,
    };
    let cases = vec![
        (create("", vec!["mail.send".into()]), "name:"),
        (
            create(&"x".repeat(10_000), vec!["mail.send".into()]),
            "name:",
        ),
        (create("line\nbreak", vec!["mail.send".into()]), "name:"),
        (create("tab\tname", vec!["mail.send".into()]), "name:"),
        (
            create("k", (0..10_000).map(|i| format!("mail.s{i}")).collect()),
            "scopes:",
        ),
        (
            create("k", vec!["mail.send".into(); 3]),
            "scopes: duplicate",
        ),
        (create("k", vec![String::new()]), "scopes: unknown"),
        (create("k", vec!["MAIL.SEND".into()]), "scopes: unknown"),
        (
            create("k", vec!["mail.send\u{0}".into()]),
            "scopes: unknown",
        ),
        (
            create("k", vec!["billing.read".into(), "alerts.read".into()]),
            "never be combined",
        ),
    ];
    for (request, needle) in cases {
        let status = manager
            .create_key(bearer(&server.admin, request))
            .await
            .expect_err(needle);
        assert_eq!(status.code(), Code::InvalidArgument, "{needle}: {status:?}");
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }

    // Page tokens.
    for token in [
        "x",
        "AAAA",
        &"A".repeat(32),
        &"A".repeat(43),
        &"A".repeat(33),
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "\u{0}",
    ] {
        let status = manager
            .list_keys(bearer(
                &server.admin,
                pb::ListKeysRequest {
                    account_id: "acme".into(),
                    page_size: 10,
                    page_token: token.into(),
                    unused_for: None,
                },
            ))
            .await;
        // Even a well-formed position is refused unless a listing of this
        // account issued it.
        assert_eq!(
            status.expect_err(token).code(),
            Code::InvalidArgument,
            "{token:?}"
        );
    }

    // Nothing changed; the server still serves.
    assert_eq!(server.count("acme").await, 1);
    let after = manager
        .get_key(bearer(&server.admin, pb::GetKeyRequest { key_id }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after, before);
    assert!(
        server
            .authorize(&secret, "POST", "/v3/mail/send")
            .await
            .allowed
    );
}

#[tokio::test]
async fn check_survives_huge_paths_and_many_headers() {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    // Far past Envoy's own header limits: an operator who raises them
    // raises --max-message-bytes too.
    let mut config = keyward::config::ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_message_bytes = 1024 * 1024;
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let mut headers: HashMap<String, String> = (0..2000)
        .map(|i| (format!("x-h{i}"), "v".repeat(100)))
        .collect();
    headers.insert("authorization".into(), format!("Bearer {secret}"));
    for path in [
        format!("/{}", "a".repeat(500_000)),
        "/v3/mail/send".to_owned(),
    ] {
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: path.clone(),
                        headers: headers.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let reply = client
            .check(request)
            .await
            .expect("a reply, not an error")
            .into_inner();
        let allowed = reply.status.as_ref().is_some_and(|s| s.code == 0);
        assert_eq!(allowed, path == "/v3/mail/send", "{}", path.len());
    }
}

/// Requests that never reach a handler are counted all the same.
#[tokio::test]
async fn requests_refused_before_any_handler_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let not_utf8 = RawStrings {
        one: vec![0xff, 0xfe],
        two: b"GET".to_vec(),
        three: b"/v3/scopes".to_vec(),
    };
    let status = raw_call(
        &server,
        "/keyward.v1.Authorizer/Authorize",
        not_utf8.clone(),
        "",
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw_call(&server, "/keyward.v1.Nothing/Here", not_utf8, "").await;
    assert_eq!(status.code(), Code::Unimplemented);
    let scrape = server.scrape().await;
    for line in [
        r#"keyward_rpcs_total{method="Authorize",code="INVALID_ARGUMENT"} 1"#,
        r#"keyward_rpcs_total{method="unknown",code="UNIMPLEMENTED"} 1"#,
    ] {
        assert!(scrape.contains(line), "{line} in:\n{scrape}");
    }
}
