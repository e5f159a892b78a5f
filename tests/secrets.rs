//! Secrets never leak: after a full session with JSON logs at debug level, no
//! key secret and no admin token appears in the logs, the metrics, any error
//! message, or anywhere in the sled directory.
#![allow(clippy::too_many_lines, reason = "one session end to end")]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{bearer, connect, spawn_serve};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_secret_or_admin_token_escapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, port) = spawn_serve(
        BIN,
        dir.path(),
        &["--data-dir", "data", "--shutdown-grace-ms", "0"],
    );
    let url = format!("http://127.0.0.1:{port}");
    let admin = common::admin_token(&dir.path().join("data"));
    let mut manager = KeyManagerClient::new(connect(&url).await);
    let mut authorizer = AuthorizerClient::new(connect(&url).await);
    let mut errors = Vec::new();
    let mut secrets = Vec::new();

    for scopes in [vec!["mail.send"], vec!["billing.read"], vec![]] {
        let reply = manager
            .create_key(bearer(
                &admin,
                pb::CreateKeyRequest {
                    name: "session".into(),
                    scopes: scopes.into_iter().map(String::from).collect(),
                    account_id: "acme".into(),
                    access: HashMap::new(),
                    expires_at: None,
                    allowed_cidrs: Vec::new(),
                    rate_limit: None,
                    credits: None,
                },
            ))
            .await
            .expect("create")
            .into_inner();
        secrets.push((reply.key.expect("key").key_id, reply.secret));
    }
    let (first_id, first) = secrets[0].clone();
    let wrong = format!("{}{}", &first[..26], &secrets[1].1[26..]);
    for (key, path) in [
        (first.clone(), "/v3/mail/send"),
        (first.clone(), "/v3/alerts"),
        (wrong.clone(), "/v3/mail/send"),
        (format!("Bearer {first}"), "/v3/scopes/../billing"),
        (first[..60].to_owned(), "/v3/mail/send"),
    ] {
        let reply = authorizer
            .authorize(pb::AuthorizeRequest {
                key,
                method: "POST".into(),
                path: path.into(),
                client_ip: String::new(),
            })
            .await
            .expect("authorize")
            .into_inner();
        errors.push(reply.message);
    }
    // Management errors, some with secrets in the wrong places.
    for result in [
        manager
            .get_scopes(bearer(&wrong, pb::GetScopesRequest {}))
            .await
            .map(drop),
        manager
            .get_scopes(bearer(&format!("{admin}x"), pb::GetScopesRequest {}))
            .await
            .map(drop),
        manager
            .get_key(bearer(
                &admin,
                pb::GetKeyRequest {
                    key_id: first.clone(),
                },
            ))
            .await
            .map(drop),
        manager
            .create_key(bearer(
                &first,
                pb::CreateKeyRequest {
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
    ] {
        errors.push(result.expect_err("refused").message().to_owned());
    }
    manager
        .update_key(bearer(
            &admin,
            pb::UpdateKeyRequest {
                key_id: first_id.clone(),
                name: "renamed".into(),
                scopes: vec!["mail.send".into(), "alerts.read".into()],
                access: HashMap::new(),
            },
        ))
        .await
        .expect("update");
    // Lifecycle changes: a rotation issues a secret that must not leak
    // either; a rate limit is audited with its value.
    let rotated = manager
        .rotate_key(bearer(
            &admin,
            pb::RotateKeyRequest {
                key_id: secrets[1].0.clone(),
                overlap: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            },
        ))
        .await
        .expect("rotate")
        .into_inner();
    secrets.push((secrets[1].0.clone(), rotated.secret));
    manager
        .set_key_rate_limit(bearer(
            &admin,
            pb::SetKeyRateLimitRequest {
                key_id: secrets[2].0.clone(),
                rate_limit: Some(pb::RateLimit {
                    requests: 5,
                    period: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    burst: 0,
                }),
            },
        ))
        .await
        .expect("limit");
    manager
        .delete_key(bearer(
            &admin,
            pb::DeleteKeyRequest {
                key_id: first_id.clone(),
            },
        ))
        .await
        .expect("revoke");
    let reply = authorizer
        .authorize(pb::AuthorizeRequest {
            key: first.clone(),
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: String::new(),
        })
        .await
        .expect("authorize")
        .into_inner();
    assert!(!reply.allowed);
    errors.push(reply.message);

    let metrics = common::scrape_logged(&dir.path().join("serve.log")).await;
    assert!(metrics.contains("keyward_decisions_total"));

    drop((manager, authorizer));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "SIGTERM exits cleanly");
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "keyward::audit")
        .collect();
    let event = |operation: &str, result: &str| {
        audit
            .iter()
            .find(|e| e["fields"]["operation"] == operation && e["fields"]["result"] == result)
            .unwrap_or_else(|| panic!("no {operation}/{result} audit event in {audit:?}"))
            .clone()
    };
    let created = event("create", "ok");
    assert_eq!(created["fields"]["actor"], "admin");
    assert_eq!(created["fields"]["account"], "acme");
    assert!(created["timestamp"].is_string(), "when");
    let updated = audit
        .iter()
        .find(|e| {
            e["fields"]["operation"] == "update" && e["fields"]["key_id"] == first_id.as_str()
        })
        .expect("update audited");
    assert_eq!(updated["fields"]["scopes_added"], "[\"alerts.read\"]");
    assert_eq!(updated["fields"]["scopes_removed"], "[]");
    assert_eq!(updated["fields"]["name_before"], "session");
    assert_eq!(event("rotate", "ok")["fields"]["rotated"], true);
    assert_eq!(
        event("set_rate_limit", "ok")["fields"]["rate_limit"],
        "5/1000ms burst 5"
    );
    let deleted = event("delete", "ok");
    assert_eq!(deleted["fields"]["key_id"], first_id.as_str());
    assert_eq!(
        deleted["fields"]["scopes_removed"],
        "[\"alerts.read\", \"mail.send\"]"
    );
    let refused = event("create", "refused");
    assert_eq!(
        refused["fields"]["actor"],
        secrets[0].0.as_str(),
        "a key is named by its id"
    );
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "debug logging was on"
    );

    let mut needles: Vec<String> = vec![admin.clone(), admin["kwadmin_".len()..].to_owned()];
    for (_, secret) in &secrets {
        needles.push(secret.clone());
        needles.push(secret[26..].to_owned()); // the secret part alone
    }
    let sled_files = files_under(&dir.path().join("data/db"));
    assert!(!sled_files.is_empty());
    for needle in &needles {
        assert!(!log.contains(needle.as_str()), "a secret is in the log");
        assert!(
            !metrics.contains(needle.as_str()),
            "a secret is in the metrics"
        );
        for error in &errors {
            assert!(
                !error.contains(needle.as_str()),
                "a secret is in an error: {error}"
            );
        }
        for file in &sled_files {
            let bytes = std::fs::read(file).expect("read sled file");
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "a secret is in {}",
                file.display()
            );
        }
    }
}
