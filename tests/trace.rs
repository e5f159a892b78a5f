//! W3C trace context: a `traceparent` on a gRPC call, inside an ext_authz
//! Check (as Envoy forwards it) or on a REST request reaches that
//! request's log lines and its audit line as `trace_id`; an invalid one is
//! ignored and never written. The real binary, JSON logs, loopback only.

mod common;

use std::collections::HashMap;

use common::{bearer, connect, rest_call, spawn_serve};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::pb::v1 as pb;
use keyward::pb::v1::key_manager_client::KeyManagerClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Three traces, one per front door, and one invalid header (upper-case
/// hex) that must leave no trace in the log.
const GRPC: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const REST: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CHECK: &str = "00-a3ce929d0e0e47364bf92f3577b34da6-53995c3f42cd8ad8-00";
const INVALID: &str = "00-5D0E3A2C9B7F41E8A6C4D2B0F1E3A5C7-B7AD6B7169203331-01";

fn trace_id(traceparent: &str) -> &str {
    &traceparent[3..35]
}

/// The trace ids an event names: its own `trace_id` field and its spans'.
fn traces_of(event: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = event["fields"]["trace_id"]
        .as_str()
        .map(str::to_owned)
        .into_iter()
        .collect();
    if let Some(spans) = event["spans"].as_array() {
        ids.extend(
            spans
                .iter()
                .filter_map(|span| span["trace_id"].as_str().map(str::to_owned)),
        );
    }
    ids
}

/// `key` with one character of its secret changed: its id, a wrong secret.
fn wrong_secret(key: &str) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    let at = chars.len() - 10;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

fn check_request(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: path.into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<HashMap<_, _>>(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test]
#[allow(
    clippy::too_many_lines,
    reason = "one request followed through three front doors"
)]
async fn a_traceparent_reaches_the_requests_log_and_audit_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, port) = spawn_serve(
        BIN,
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--http-listen",
            "127.0.0.1:0",
            "--failed-auth-limit",
            "2",
            "--shutdown-grace-ms",
            "0",
        ],
    );
    let admin = common::admin_token(&dir.path().join("data"));
    let url = format!("http://127.0.0.1:{port}");
    let mut manager = KeyManagerClient::new(connect(&url).await);
    let create = |name: &str, traceparent: &str| {
        let mut request = bearer(
            &admin,
            pb::CreateKeyRequest {
                name: name.to_owned(),
                scopes: vec!["mail.send".to_owned()],
                account_id: "acme".to_owned(),
                ..Default::default()
            },
        );
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().expect("ascii"));
        request
    };
    // gRPC: a traced create, and one whose traceparent is invalid.
    let traced = manager
        .create_key(create("traced", GRPC))
        .await
        .expect("created")
        .into_inner();
    manager
        .create_key(create("untraced", INVALID))
        .await
        .expect("created");

    // REST: a traced create.
    let rest: std::net::SocketAddr = common::await_logged_address(
        &dir.path().join("serve.log"),
        "serving SendGrid's REST key API",
    )
    .parse()
    .expect("REST address");
    let authorization = format!("Bearer {admin}");
    let (status, reply) = rest_call(
        rest,
        "POST",
        "/v3/api_keys",
        &[
            ("authorization", &authorization),
            ("on-behalf-of", "acme"),
            ("traceparent", REST),
        ],
        r#"{"name": "rest", "scopes": ["mail.send"]}"#,
    )
    .await;
    assert_eq!(status, 201, "{reply}");

    // ext_authz: the client request's traceparent, inside the Check. Three
    // wrong secrets for one id cross --failed-auth-limit 2: the guessing
    // warning is a log line of the third request.
    let mut check = AuthorizationClient::new(connect(&url).await);
    let wrong = format!("Bearer {}", wrong_secret(&traced.secret));
    for _ in 0..3 {
        check
            .check(check_request(
                "/v3/mail/send",
                &[("authorization", &wrong), ("traceparent", CHECK)],
            ))
            .await
            .expect("a deny is an OK reply");
    }

    drop((manager, check));
    // SIGTERM flushes the log.
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(child.wait().expect("exit").success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).expect("log");
    assert_traced(&log);
}

/// The audit lines of traced requests carry their trace (as a field and
/// in their span), the untraced one none; the guessing warning of the
/// Check carries the client request's trace; the invalid header is
/// nowhere.
fn assert_traced(log: &str) {
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let audit_of = |name: &str| {
        events
            .iter()
            .find(|e| e["target"] == "keyward::audit" && e["fields"]["name"] == name)
            .unwrap_or_else(|| panic!("no audit line for {name}:\n{log}"))
    };
    // The audit line carries trace_id as a field of its own (kept under
    // RUST_LOG=keyward::audit=info) and within its request's span.
    for (name, traceparent) in [("traced", GRPC), ("rest", REST)] {
        let audit = audit_of(name);
        assert_eq!(
            audit["fields"]["trace_id"],
            trace_id(traceparent),
            "{audit}"
        );
        assert!(
            traces_of(audit)
                .iter()
                .all(|id| id == trace_id(traceparent)),
            "{audit}"
        );
    }
    let untraced = audit_of("untraced");
    assert!(traces_of(untraced).is_empty(), "{untraced}");
    let guessing = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("repeated wrong secrets"))
        })
        .unwrap_or_else(|| panic!("no guessing warning:\n{log}"));
    assert_eq!(traces_of(guessing), [trace_id(CHECK)], "{guessing}");
    // An invalid traceparent is never echoed, in any case.
    assert!(
        !log.to_ascii_lowercase()
            .contains(&trace_id(INVALID).to_ascii_lowercase()),
        "the invalid traceparent was logged:\n{log}"
    );
}
