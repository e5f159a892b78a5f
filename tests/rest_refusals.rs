//! The REST API's refusals, as a stranger probes them: no credential is
//! ever echoed (the audit log records the same refusal text), permission is checked before
//! a body is read, a lifecycle PUT without its field changes nothing, a bad
//! path id is SendGrid's JSON error, and every refusal names the field the
//! console shows it beside.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::net::SocketAddr;

use common::{TestServer, rest_call};
use keyward::config::ServeConfig;

async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    (TestServer::start_with(config).await, dir)
}

struct Caller<'a> {
    addr: SocketAddr,
    auth: String,
    account: Option<&'a str>,
}

impl Caller<'_> {
    /// The admin, acting for `acme`.
    fn admin(server: &TestServer) -> Self {
        Self {
            addr: server.http_addr.expect("REST"),
            auth: format!("Bearer {}", server.admin),
            account: Some("acme"),
        }
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let mut headers = vec![("authorization", self.auth.as_str())];
        if let Some(account) = self.account {
            headers.push(("on-behalf-of", account));
        }
        rest_call(self.addr, method, path, &headers, body).await
    }
}

fn field(reply: &serde_json::Value) -> &serde_json::Value {
    &reply["errors"][0]["field"]
}

#[tokio::test]
async fn no_credential_is_echoed_in_a_refusal() {
    let (server, _dir) = server().await;
    let admin = Caller::admin(&server);
    let (key_id, key) = server.create_key("acme", &["alerts.read"]).await;
    let token = server.admin.clone();
    let probes = [
        // The admin token as a name (a custom token would not be refused by
        // its shape), as an allowlist entry, and inside a JSON type error.
        (
            "PATCH",
            format!("/v3/api_keys/{key_id}"),
            serde_json::json!({ "name": token }).to_string(),
            "name",
        ),
        (
            "PATCH",
            format!("/v3/api_keys/{key_id}"),
            serde_json::json!({ "name": format!("prod {token}") }).to_string(),
            "name",
        ),
        (
            "PUT",
            format!("/v3/api_keys/{key_id}/allowlist"),
            serde_json::json!({ "allowed_cidrs": [token] }).to_string(),
            "allowed_cidrs",
        ),
        (
            "PUT",
            format!("/v3/api_keys/{key_id}/allowlist"),
            serde_json::json!({ "allowed_cidrs": ["10.0.0.0/8", key] }).to_string(),
            "allowed_cidrs",
        ),
        (
            "POST",
            "/v3/api_keys".to_owned(),
            serde_json::json!({ "name": "x", "scopes": ["alerts.read"], "expires_at": key })
                .to_string(),
            "body",
        ),
        (
            "POST",
            format!("/v3/api_keys/{key_id}/rotate"),
            serde_json::json!({ "overlap_seconds": token }).to_string(),
            "body",
        ),
    ];
    for (method, path, body, named) in probes {
        let (status, reply) = admin.call(method, &path, &body).await;
        assert_eq!(status, 400, "{method} {path}: {reply}");
        assert_eq!(field(&reply), named, "{method} {path}: {reply}");
        let text = reply.to_string();
        assert!(
            !text.contains(&token) && !text.contains(&key),
            "echoed: {text}"
        );
    }
    let (_, read) = admin
        .call("GET", &format!("/v3/api_keys/{key_id}"), "")
        .await;
    assert_eq!(read["result"][0]["allowed_cidrs"], serde_json::json!([]));
}

#[tokio::test]
async fn lifecycle_puts_need_their_field_and_permission_comes_before_the_body() {
    let (server, _dir) = server().await;
    let addr = server.http_addr.expect("REST");
    let admin = Caller::admin(&server);
    let (status, created) = admin
        .call(
            "POST",
            "/v3/api_keys",
            r#"{"name": "limited", "scopes": ["alerts.read"], "expires_at": 4102444800, "rate_limit": {"requests": 5, "period_ms": 1000}}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["api_key_id"].as_str().expect("id").to_owned();

    // An empty body or `{}` does not clear the expiry or the rate limit.
    for body in ["", "{}"] {
        for (path, named) in [("expiry", "expires_at"), ("rate_limit", "rate_limit")] {
            let (status, reply) = admin
                .call("PUT", &format!("/v3/api_keys/{id}/{path}"), body)
                .await;
            assert_eq!(status, 400, "{path} {body:?}: {reply}");
            let expected = if body.is_empty() { "body" } else { named };
            assert_eq!(field(&reply), expected, "{path} {body:?}: {reply}");
        }
    }
    let (_, read) = admin.call("GET", &format!("/v3/api_keys/{id}"), "").await;
    assert_eq!(read["result"][0]["expires_at"], 4_102_444_800_i64);
    assert_eq!(read["result"][0]["rate_limit"]["requests"], 5);
    // An explicit null clears them.
    let (status, _) = admin
        .call(
            "PUT",
            &format!("/v3/api_keys/{id}/expiry"),
            r#"{"expires_at": null}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (_, read) = admin.call("GET", &format!("/v3/api_keys/{id}"), "").await;
    assert_eq!(read["result"][0]["expires_at"], serde_json::Value::Null);

    // A key without api_keys.update learns it lacks the scope, not what is
    // wrong with its body.
    let (_, reader) = server
        .create_key("acme", &["api_keys.read", "alerts.read"])
        .await;
    let reader = Caller {
        addr,
        auth: format!("Bearer {reader}"),
        account: None,
    };
    for (method, path) in [
        ("PUT", format!("/v3/api_keys/{id}")),
        ("PATCH", format!("/v3/api_keys/{id}")),
        ("PUT", format!("/v3/api_keys/{id}/expiry")),
        ("PUT", format!("/v3/api_keys/{id}/allowlist")),
        ("PUT", format!("/v3/api_keys/{id}/rate_limit")),
        ("POST", format!("/v3/api_keys/{id}/rotate")),
        ("POST", "/v3/api_keys".to_owned()),
    ] {
        let (status, reply) = reader.call(method, &path, "not json").await;
        assert_eq!(status, 403, "{method} {path}: {reply}");
    }
    // Naming another account is refused by the field that names it.
    let other = Caller {
        addr,
        auth: reader.auth.clone(),
        account: Some("globex"),
    };
    let (status, reply) = other.call("GET", "/v3/api_keys", "").await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(field(&reply), "on-behalf-of", "{reply}");
    let (status, reply) = other.call("GET", &format!("/v3/api_keys/{id}"), "").await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(field(&reply), "on-behalf-of", "{reply}");
}

#[tokio::test]
async fn odd_paths_and_limits_get_sendgrids_errors() {
    let (server, _dir) = server().await;
    let admin = Caller::admin(&server);
    let (status, reply) = admin.call("GET", "/v3/api_keys/%FF", "").await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(field(&reply), "api_key_id");
    let (status, reply) = admin
        .call("GET", "/v3/api_keys?limit=99999999999", "")
        .await;
    assert_eq!(status, 200, "a large page is capped: {reply}");
    let (status, reply) = admin.call("GET", "/v3/api_keys?limit=0", "").await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(field(&reply), "limit");
    // A rotation without a body rotates with no overlap.
    let (id, _) = server.create_key("acme", &["alerts.read"]).await;
    let (status, reply) = admin
        .call("POST", &format!("/v3/api_keys/{id}/rotate"), "")
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["previous_secret_valid_until"],
        serde_json::Value::Null
    );
}

/// Issue 29 (3): during a rotation overlap the previous secret still
/// authorizes requests, but it can manage nothing: not rotate its own key
/// again (a takeover: the owner's new secret would stop working), not
/// touch another key, not create one. The new secret manages as before.
#[tokio::test]
async fn a_previous_secret_cannot_take_over_a_rotated_key() {
    let (server, _dir) = server().await;
    let admin = Caller::admin(&server);
    let (id, old) = server
        .create_key(
            "acme",
            &[
                "api_keys.create",
                "api_keys.update",
                "api_keys.read",
                "mail.send",
            ],
        )
        .await;
    let (peer, _) = server.create_key("acme", &["mail.send"]).await;
    let (status, rotated) = admin
        .call(
            "POST",
            &format!("/v3/api_keys/{id}/rotate"),
            r#"{"overlap_seconds": 3600}"#,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["api_key"]
        .as_str()
        .expect("the new secret")
        .to_owned();

    let thief = Caller {
        addr: admin.addr,
        auth: format!("Bearer {old}"),
        account: None,
    };
    for (method, path, body) in [
        (
            "POST",
            format!("/v3/api_keys/{id}/rotate"),
            r#"{"overlap_seconds": 0}"#,
        ),
        (
            "POST",
            format!("/v3/api_keys/{peer}/rotate"),
            r#"{"overlap_seconds": 0}"#,
        ),
        ("PATCH", format!("/v3/api_keys/{id}"), r#"{"name": "mine"}"#),
        (
            "POST",
            "/v3/api_keys".to_owned(),
            r#"{"name": "spare", "scopes": ["mail.send"]}"#,
        ),
        ("GET", format!("/v3/api_keys/{id}"), ""),
    ] {
        let (status, reply) = thief.call(method, &path, body).await;
        assert_eq!(
            status, 401,
            "{method} {path} with the previous secret: {reply}"
        );
        assert!(
            reply.to_string().contains("replaced by a rotation"),
            "says why: {reply}"
        );
    }
    // Over gRPC too.
    let refused = server
        .manager()
        .await
        .rotate_key(common::bearer(
            &old,
            keyward::pb::v1::RotateKeyRequest {
                key_id: id.clone(),
                overlap: None,
            },
        ))
        .await;
    common::assert_status(
        refused,
        tonic::Code::Unauthenticated,
        "replaced by a rotation",
    );

    // The previous secret still decides until the overlap ends, and the
    // owner's new secret still works for both.
    assert!(
        server
            .authorize(&old, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    assert!(
        server
            .authorize(&new, "POST", "/v3/mail/send")
            .await
            .allowed
    );
    let owner = Caller {
        addr: admin.addr,
        auth: format!("Bearer {new}"),
        account: None,
    };
    let (status, reply) = owner.call("GET", &format!("/v3/api_keys/{id}"), "").await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply.to_string().contains(&id),
        "the owner still holds it: {reply}"
    );
}

/// A key without a route's `api_keys.*` scope is refused from the request's
/// head: the 403 arrives while the declared body is still unsent, on every
/// route that can carry a body. (The body deadline is set far beyond the
/// exchange's hang guard, so a server that waited for the body would fail
/// this test by not answering, not by answering late.)
#[tokio::test]
async fn permission_is_refused_before_a_byte_of_the_body_arrives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.request_timeout_ms = 600_000;
    let server = TestServer::start_with(config).await;
    let addr = server.http_addr.expect("REST");
    let (id, _) = server.create_key("acme", &["alerts.read"]).await;
    let (_, sender) = server.create_key("acme", &["mail.send"]).await;
    let key = format!("/v3/api_keys/{id}");
    let routes = [
        ("POST", "/v3/api_keys".to_owned()),
        ("GET", "/v3/api_keys".to_owned()),
        ("GET", key.clone()),
        ("PUT", key.clone()),
        ("PATCH", key.clone()),
        ("DELETE", key.clone()),
        ("POST", format!("{key}/disable")),
        ("POST", format!("{key}/enable")),
        ("POST", format!("{key}/rotate")),
        ("PUT", format!("{key}/expiry")),
        ("PUT", format!("{key}/allowlist")),
        ("PUT", format!("{key}/rate_limit")),
    ];
    for (method, path) in routes {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {sender}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
        );
        // The head only: the 100 bytes it announces are never sent.
        let response = common::http_exchange(addr, &head, b"").await;
        assert!(
            response.starts_with("HTTP/1.1 403"),
            "{method} {path}: {response}"
        );
        assert!(
            response.contains("lacks the scope api_keys."),
            "{method} {path}: {response}"
        );
    }
    // Nothing was changed on the way.
    let admin = Caller::admin(&server);
    let (status, read) = admin.call("GET", &key, "").await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["result"][0]["enabled"], true, "{read}");
}

/// A page token is accepted only as this server issued it: one forged the
/// way an unkeyed check could be forged (SHA-256 over account and
/// position), one of the right length with a made-up tag, an issued one
/// edited, and an issued one presented for another account are each
/// refused naming `page_token`, through REST (400) and gRPC
/// (INVALID_ARGUMENT); the issued one pages on.
#[tokio::test]
async fn made_up_or_edited_page_tokens_are_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use sha2::Digest;

    let (server, _dir) = server().await;
    let admin = Caller::admin(&server);
    for _ in 0..3 {
        server.create_key("acme", &["alerts.read"]).await;
    }
    let (status, first) = admin.call("GET", "/v3/api_keys?limit=1", "").await;
    assert_eq!(status, 200, "{first}");
    let issued = first["next_page_token"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (status, second) = admin
        .call(
            "GET",
            &format!("/v3/api_keys?limit=1&page_token={issued}"),
            "",
        )
        .await;
    assert_eq!(status, 200, "the issued token pages on: {second}");
    assert_ne!(second["result"][0], first["result"][0]);

    // The position "from the start" (created at 0, id all zeros).
    let position = [0u8; 24];
    let unkeyed = {
        let digest = sha2::Sha256::new()
            .chain_update(b"keyward page token\0acme\0")
            .chain_update(position)
            .finalize();
        let mut raw = position.to_vec();
        raw.extend_from_slice(&digest[..8]);
        URL_SAFE_NO_PAD.encode(raw)
    };
    let made_up_tag = {
        let mut raw = position.to_vec();
        raw.extend_from_slice(&[0x5a; 16]);
        URL_SAFE_NO_PAD.encode(raw)
    };
    let edited = {
        let mut raw = URL_SAFE_NO_PAD.decode(&issued).expect("base64");
        raw[7] ^= 1;
        URL_SAFE_NO_PAD.encode(raw)
    };
    let mut manager = server.manager().await;
    for (account, token) in [
        ("acme", unkeyed.as_str()),
        ("acme", made_up_tag.as_str()),
        ("acme", edited.as_str()),
        ("globex", issued.as_str()),
    ] {
        let caller = Caller {
            addr: admin.addr,
            auth: admin.auth.clone(),
            account: Some(account),
        };
        let (status, reply) = caller
            .call(
                "GET",
                &format!("/v3/api_keys?limit=1&page_token={token}"),
                "",
            )
            .await;
        assert_eq!(status, 400, "{account} {token}: {reply}");
        assert_eq!(field(&reply), "page_token", "{reply}");
        common::assert_status(
            manager
                .list_keys(common::bearer(
                    &server.admin,
                    keyward::pb::v1::ListKeysRequest {
                        account_id: account.into(),
                        page_size: 1,
                        page_token: token.into(),
                        unused_for: None,
                    },
                ))
                .await,
            tonic::Code::InvalidArgument,
            "page_token",
        );
    }
}
