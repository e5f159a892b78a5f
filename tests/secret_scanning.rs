//! GitHub's secret scanning partner protocol against a real server on
//! loopback (and the real binary): reports signed with a P-256 key pair
//! made here, in GitHub's request shape (headers, body) and feedback shape.
//! Forged, unsigned, tampered and unknown-key reports change nothing; a
//! genuine one acts on exactly the live key it names.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::github::{GITHUB_URL, PATH, Signer256, post, post_signed, report, write_document};
use common::{TestServer, bearer, rest_call};
use keyward::config::ServeConfig;
use keyward::keys::LeakAction;
use keyward::pb::v1 as pb;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256_hex(text: &str) -> String {
    use std::fmt::Write as _;
    Sha256::digest(text.as_bytes())
        .iter()
        .fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

async fn start(dir: &tempfile::TempDir, keys: &Path, action: LeakAction) -> TestServer {
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.secret_scanning_keys = Some(keys.to_owned());
    config.leaked_key_action = action;
    TestServer::start_with(config).await
}

fn keys_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("github-keys.json")
}

/// The decision for `secret` on mail send: (allowed, deny reason).
async fn mail_send(server: &TestServer, secret: &str) -> (bool, i32) {
    let reply = server.authorize(secret, "POST", "/v3/mail/send").await;
    (reply.allowed, reply.reason)
}

/// The key as the admin reads it over REST.
async fn rest_key(server: &TestServer, id: &str) -> (u16, Value) {
    let admin = format!("Bearer {}", server.admin);
    let (status, body) = rest_call(
        server.http_addr.expect("http"),
        "GET",
        &format!("/v3/api_keys/{id}"),
        &[("authorization", &admin)],
        "",
    )
    .await;
    (status, body["result"][0].clone())
}

fn labels(feedback: &Value) -> Vec<&str> {
    feedback
        .as_array()
        .expect("feedback is an array")
        .iter()
        .map(|entry| entry["label"].as_str().expect("label"))
        .collect()
}

#[tokio::test]
async fn a_genuine_report_disables_only_the_live_key_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    write_document(&keys_file(&dir), &[&github]);
    let server = start(&dir, &keys_file(&dir), LeakAction::Disable).await;
    let addr = server.http_addr.expect("http");
    let (leaked_id, leaked) = server.create_key("acme", &["mail.send"]).await;
    let (_, bystander) = server.create_key("acme", &["mail.send"]).await;
    let (_, other_account) = server.create_key("globex", &["mail.send"]).await;
    // The leaked key's id with another key's secret: not that key.
    let wrong_secret = format!("{}{}", &leaked[..26], &bystander[26..]);
    let unknown = format!("SG.{}.{}", "A".repeat(22), &leaked[26..]);
    let tokens = [
        leaked.as_str(),
        wrong_secret.as_str(),
        unknown.as_str(),
        "SG.not-a-key",
        leaked.as_str(),
    ];
    let body = report(&tokens);
    let (status, feedback) = post_signed(addr, &github, &body).await;
    assert_eq!(status, 200, "{feedback}");
    // GitHub's feedback: one entry per match, named by hash, never a token.
    assert_eq!(
        labels(&feedback),
        [
            "true_positive",
            "false_positive",
            "false_positive",
            "false_positive",
            "true_positive"
        ]
    );
    for (entry, token) in feedback.as_array().expect("array").iter().zip(tokens) {
        assert_eq!(entry["token_hash"], sha256_hex(token));
        assert_eq!(entry["token_type"], "keyward_api_key");
        assert_eq!(entry.as_object().expect("object").len(), 3, "{entry}");
    }
    assert!(!feedback.to_string().contains(&leaked[26..]));

    assert_eq!(
        mail_send(&server, &leaked).await,
        (false, pb::DenyReason::KeyDisabled as i32)
    );
    assert_eq!(mail_send(&server, &bystander).await, (true, 0));
    assert_eq!(mail_send(&server, &other_account).await, (true, 0));

    // Where it leaked: REST, gRPC.
    let (status, key) = rest_key(&server, &leaked_id).await;
    assert_eq!(status, 200);
    assert_eq!(key["enabled"], false);
    assert_eq!(key["leak"]["url"], GITHUB_URL);
    assert_eq!(key["leak"]["source"], "content");
    assert_eq!(key["leak"]["type"], "keyward_api_key");
    assert_eq!(key["leak"]["previous_secret"], false);
    let first_reported = key["leak"]["reported_at"].clone();
    let grpc = server
        .manager()
        .await
        .get_key(bearer(
            &server.admin,
            pb::GetKeyRequest {
                key_id: leaked_id.clone(),
            },
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(grpc.leak.expect("leak").url, GITHUB_URL);

    // The same report again: the same answer, the first report's mark.
    let (status, again) = post_signed(addr, &github, &body).await;
    assert_eq!((status, &again), (200, &feedback));
    let (_, key) = rest_key(&server, &leaked_id).await;
    assert_eq!(key["leak"]["reported_at"], first_reported);

    remedy(&server, &leaked_id, &leaked).await;

    let metrics = server.scrape().await;
    assert!(
        metrics.contains("keyward_leaked_keys_total{action=\"disabled\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyward_secret_scanning_reports_total{result=\"accepted\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains(&leaked[26..]));
}

/// Every refusal was counted by why, and no key was acted on.
async fn assert_refusals_counted(server: &TestServer) {
    let metrics = server.scrape().await;
    assert!(!metrics.contains("keyward_leaked_keys_total{"), "{metrics}");
    for result in [
        "missing_identifier",
        "missing_signature",
        "unknown_identifier",
        "wrong_signature",
        "malformed_signature",
        "too_large",
    ] {
        assert!(
            metrics.contains(&format!(
                "keyward_secret_scanning_reports_total{{result=\"{result}\"}}"
            )),
            "{result}: {metrics}"
        );
    }
}

/// A refused report: (case, identifier, signature, body, status, what the
/// message names).
type Case<'a> = (
    &'a str,
    Option<&'a str>,
    Option<String>,
    &'a str,
    u16,
    &'a str,
);

/// A key disabled for a leak: no key can enable it, even one holding
/// api_keys.update; rotating it (the found secret stops at once, whatever
/// the overlap asked, and the mark goes) and the admin enabling it can.
async fn remedy(server: &TestServer, leaked_id: &str, leaked: &str) {
    let addr = server.http_addr.expect("http");
    // A key cannot enable it again, even one holding api_keys.update.
    let (_, manager_key) = server
        .create_key("acme", &["mail.send", "api_keys.read", "api_keys.update"])
        .await;
    let (status, refusal) = rest_call(
        addr,
        "POST",
        &format!("/v3/api_keys/{leaked_id}/enable"),
        &[("authorization", &format!("Bearer {manager_key}"))],
        "",
    )
    .await;
    assert_eq!(status, 403, "{refusal}");
    let message = refusal["errors"][0]["message"].as_str().expect("message");
    assert!(message.contains("found in public"), "{message}");
    assert!(!mail_send(server, leaked).await.0);

    // The remedy: rotate (the found secret stops, with no overlap, and
    // the mark goes), then the admin enables it.
    let admin = format!("Bearer {}", server.admin);
    let (status, rotated) = rest_call(
        addr,
        "POST",
        &format!("/v3/api_keys/{leaked_id}/rotate"),
        &[("authorization", &admin)],
        r#"{"overlap_seconds": 3600}"#,
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["previous_secret_valid_until"], Value::Null);
    let (status, _) = rest_call(
        addr,
        "POST",
        &format!("/v3/api_keys/{leaked_id}/enable"),
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let fresh = rotated["api_key"].as_str().expect("new secret");
    assert_eq!(mail_send(server, fresh).await, (true, 0));
    assert!(!mail_send(server, leaked).await.0);
    let (_, key) = rest_key(server, leaked_id).await;
    assert_eq!(key["leak"], Value::Null);
}

#[tokio::test]
async fn forged_unsigned_tampered_and_oversized_reports_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    let forger = Signer256::new("github-key-1");
    write_document(&keys_file(&dir), &[&github]);
    let server = start(&dir, &keys_file(&dir), LeakAction::Revoke).await;
    let addr = server.http_addr.expect("http");
    let (id, secret) = server.create_key("acme", &["mail.send"]).await;
    let body = report(&[&secret]);
    let genuine = github.sign(body.as_bytes());
    let tampered = body.replace("content", "commit");
    let too_many = report(&vec![secret.as_str(); 1001]);
    let cases: Vec<Case> = vec![
        ("unsigned", None, None, &body, 401, "Identifier"),
        (
            "no signature",
            Some("github-key-1"),
            None,
            &body,
            401,
            "Signature",
        ),
        (
            "unknown identifier",
            Some("github-key-2"),
            Some(genuine.clone()),
            &body,
            401,
            "Identifier",
        ),
        (
            "signed by another key",
            Some("github-key-1"),
            Some(forger.sign(body.as_bytes())),
            &body,
            401,
            "Signature",
        ),
        (
            "tampered after signing",
            Some("github-key-1"),
            Some(genuine.clone()),
            &tampered,
            401,
            "Signature",
        ),
        (
            "malformed signature",
            Some("github-key-1"),
            Some("bm90IGEgc2lnbmF0dXJl".into()),
            &body,
            401,
            "Signature",
        ),
        (
            "over 1,000 matches",
            Some("github-key-1"),
            Some(github.sign(too_many.as_bytes())),
            &too_many,
            413,
            "1000",
        ),
    ];
    for (case, identifier, signature, sent, status, names) in cases {
        let (got, reply) = post(addr, identifier, signature.as_deref(), sent).await;
        assert_eq!(got, status, "{case}: {reply}");
        let message = reply["errors"][0]["message"]
            .as_str()
            .expect("SendGrid's error shape");
        assert!(message.contains(names), "{case}: {message}");
        assert!(!reply.to_string().contains(&secret[26..]), "{case}");
    }
    // A body declared over the limit is refused before it is read.
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nGithub-Public-Key-Identifier: github-key-1\r\nGithub-Public-Key-Signature: {genuine}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        3 * 1024 * 1024
    );
    let response = common::http_exchange(addr, &head, b"[").await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // Nothing changed: the key is live, unmarked, and decides as before.
    assert_eq!(mail_send(&server, &secret).await, (true, 0));
    let (status, key) = rest_key(&server, &id).await;
    assert_eq!(status, 200);
    assert_eq!(key["leak"], Value::Null);
    assert_refusals_counted(&server).await;

    // The genuine report revokes it (--leaked-key-action revoke).
    let (status, feedback) = post(addr, Some("github-key-1"), Some(&genuine), &body).await;
    assert_eq!(status, 200, "{feedback}");
    assert_eq!(labels(&feedback), ["true_positive"]);
    assert_eq!(
        mail_send(&server, &secret).await,
        (false, pb::DenyReason::UnknownKey as i32)
    );
    assert_eq!(rest_key(&server, &id).await.0, 404);
}

#[tokio::test]
async fn only_the_report_route_is_outside_bearer_authentication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    write_document(&keys_file(&dir), &[&github]);
    let server = start(&dir, &keys_file(&dir), LeakAction::Disable).await;
    let addr = server.http_addr.expect("http");
    for (method, path) in [
        ("GET", "/v3/api_keys"),
        ("POST", "/v3/api_keys"),
        ("GET", "/v3/scopes"),
        ("POST", "/v3/api_keys/AAAAAAAAAAAAAAAAAAAAAA/enable"),
    ] {
        let (status, reply) = rest_call(addr, method, path, &[], "{}").await;
        assert_eq!(status, 401, "{method} {path}: {reply}");
    }
    // The report route answers for its signature, not for a bearer token.
    let (status, reply) = rest_call(addr, "POST", PATH, &[], "[]").await;
    assert_eq!(status, 401);
    assert!(
        reply["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Github-Public-Key-Identifier")),
        "{reply}"
    );
    // An empty report, signed: nothing to act on.
    let (status, reply) = post_signed(addr, &github, "[]").await;
    assert_eq!((status, reply), (200, json!([])));

    // Without --secret-scanning-keys there is no such route.
    let plain_dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(plain_dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let plain = TestServer::start_with(config).await;
    let (status, _) = post_signed(plain.http_addr.expect("http"), &github, "[]").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_found_previous_secret_ends_the_overlap_and_the_key_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    write_document(&keys_file(&dir), &[&github]);
    let server = start(&dir, &keys_file(&dir), LeakAction::Disable).await;
    let addr = server.http_addr.expect("http");
    let (id, old) = server.create_key("acme", &["mail.send"]).await;
    let admin = format!("Bearer {}", server.admin);
    let (status, rotated) = rest_call(
        addr,
        "POST",
        &format!("/v3/api_keys/{id}/rotate"),
        &[("authorization", &admin)],
        r#"{"overlap_seconds": 3600}"#,
    )
    .await;
    assert_eq!(status, 200);
    let new = rotated["api_key"].as_str().expect("secret").to_owned();
    assert_eq!(mail_send(&server, &old).await, (true, 0), "in its overlap");

    let (status, feedback) = post_signed(addr, &github, &report(&[&old])).await;
    assert_eq!(status, 200);
    assert_eq!(labels(&feedback), ["true_positive"]);
    assert!(!mail_send(&server, &old).await.0, "the overlap ended");
    assert_eq!(mail_send(&server, &new).await, (true, 0));
    let (_, key) = rest_key(&server, &id).await;
    assert_eq!(key["enabled"], true);
    assert_eq!(key["previous_secret_valid_until"], Value::Null);
    assert_eq!(key["leak"]["previous_secret"], true);
    // Once the overlap is over the old secret is no key at all.
    let (_, feedback) = post_signed(addr, &github, &report(&[&old])).await;
    assert_eq!(labels(&feedback), ["false_positive"]);
}

#[tokio::test]
async fn a_refreshed_key_file_is_picked_up_and_a_bad_one_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Signer256::new("github-key-1");
    let second = Signer256::new("github-key-2");
    write_document(&keys_file(&dir), &[&first]);
    let server = start(&dir, &keys_file(&dir), LeakAction::Report).await;
    let addr = server.http_addr.expect("http");
    assert_eq!(post_signed(addr, &second, "[]").await.0, 401);

    // GitHub rotates its key: the operator's refresh lists both.
    write_document(&keys_file(&dir), &[&first, &second]);
    let mut accepted = false;
    for _ in 0..300 {
        if post_signed(addr, &second, "[]").await.0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(accepted, "the refreshed file was picked up");

    // A broken refresh keeps the keys in force.
    std::fs::write(keys_file(&dir), b"<html>rate limited</html>").expect("written");
    keyward::scanning::KeyFile::load(&keys_file(&dir)).expect_err("the file is unusable");
    assert_eq!(post_signed(addr, &first, "[]").await.0, 200);
    assert_eq!(post_signed(addr, &second, "[]").await.0, 200);

    // --leaked-key-action report: marked, still working.
    let (id, secret) = server.create_key("acme", &["mail.send"]).await;
    let (status, feedback) = post_signed(addr, &first, &report(&[&secret])).await;
    assert_eq!(status, 200);
    assert_eq!(labels(&feedback), ["true_positive"]);
    assert_eq!(mail_send(&server, &secret).await, (true, 0));
    let (_, key) = rest_key(&server, &id).await;
    assert_eq!(key["enabled"], true);
    assert_eq!(key["leak"]["url"], GITHUB_URL);
}

/// Through the real binary: the flags, GitHub's request, the key denied,
/// `keyward keys get` showing where it leaked, and no secret in the log.
#[tokio::test]
async fn the_binary_acts_on_a_report_and_logs_no_secret() {
    const BIN: &str = env!("CARGO_BIN_EXE_keyward");
    let dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    write_document(&keys_file(&dir), &[&github]);
    let keys = keys_file(&dir).display().to_string();
    let (mut child, port) = common::spawn_serve(
        BIN,
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--http-listen",
            "127.0.0.1:0",
            "--secret-scanning-keys",
            &keys,
            "--shutdown-grace-ms",
            "0",
        ],
    );
    let url = format!("http://127.0.0.1:{port}");
    let admin = common::admin_token(&dir.path().join("data"));
    let log_path = dir.path().join("serve.log");
    let rest: SocketAddr =
        common::await_logged_address(&log_path, "serving SendGrid's REST key API")
            .parse()
            .expect("address");
    let mut manager =
        keyward::pb::v1::key_manager_client::KeyManagerClient::new(common::connect(&url).await);
    let created = manager
        .create_key(bearer(
            &admin,
            pb::CreateKeyRequest {
                name: "ci".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create")
        .into_inner();
    let (id, secret) = (created.key.expect("key").key_id, created.secret);
    let body = report(&[&secret]);
    let (status, feedback) = post_signed(rest, &github, &body).await;
    assert_eq!(status, 200, "{feedback}");
    assert_eq!(labels(&feedback), ["true_positive"]);
    let mut authorizer =
        keyward::pb::v1::authorizer_client::AuthorizerClient::new(common::connect(&url).await);
    let reply = authorizer
        .authorize(pb::AuthorizeRequest {
            key: secret.clone(),
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: String::new(),
        })
        .await
        .expect("authorize")
        .into_inner();
    assert_eq!(reply.reason, pb::DenyReason::KeyDisabled as i32);

    let cli = |args: &[&str]| {
        let output = std::process::Command::new(BIN)
            .args(["keys", "--server", &url])
            .args(args)
            .env("KEYWARD_TOKEN", &admin)
            .output()
            .expect("keyward keys runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let text = cli(&["get", &id]);
    assert!(
        text.contains("leaked:") && text.contains(GITHUB_URL),
        "{text}"
    );
    let json: Value = serde_json::from_str(&cli(&["-o", "json", "get", &id])).expect("json");
    assert_eq!(json["leak"]["url"], GITHUB_URL);
    assert_eq!(json["enabled"], false);

    // Waited for before the SIGKILL, which drops what the log's thread has
    // not written yet.
    let log = common::await_log(
        || std::fs::read_to_string(&log_path).unwrap_or_default(),
        &["\"operation\":\"leaked\""],
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(!log.contains(&secret[26..]), "no secret in the log");
    assert!(!log.contains(&admin), "no admin token in the log");
}
