//! SendGrid's key-management REST API, driven by SendGrid's own client
//! libraries (Python `sendgrid`, Node `@sendgrid/client`) against a real
//! `--http-listen` server; the keys they create must then decide through
//! `Authorize` exactly as they were left. Both clients must be installed in
//! CI (`.ci/run` installs them); elsewhere a missing client skips with a
//! message.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::TestServer;
use keyward::config::ServeConfig;

const LIMIT: u32 = 12;

fn missing(tool: &str, install: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} is required in CI ({install})"
    );
    eprintln!("SKIPPED: {tool} is not installed ({install})");
}

/// Runs one client's flow against `url` (off the runtime, which may be
/// serving it meanwhile); returns its report, or `None` if the client is not
/// installed here.
async fn run_flow_at(
    admin: &str,
    url: &str,
    env: &[(&str, &Path)],
    program: &str,
    args: &[&str],
    cwd: &Path,
) -> Option<serde_json::Value> {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .env("KEYWARD_URL", url)
        .env("KEYWARD_ADMIN", admin)
        .env("KEYWARD_LIMIT", LIMIT.to_string());
    let Ok(output) = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the client ran")
    else {
        missing(program, "see README");
        return None;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    Some(serde_json::from_slice(&output.stdout).expect("the flow prints its report"))
}

/// Every key a flow left alive may send mail; every key it revoked may not,
/// asked through `Authorize` on `channel`.
async fn assert_decisions(channel: tonic::transport::Channel, report: &serde_json::Value) {
    use keyward::pb::v1 as pb;
    let mut authorizer = pb::authorizer_client::AuthorizerClient::new(channel);
    for (list, allowed) in [("allowed_mail_send", true), ("revoked", false)] {
        for key in report[list].as_array().expect(list) {
            let reply = authorizer
                .authorize(pb::AuthorizeRequest {
                    key: key.as_str().expect("key").to_owned(),
                    method: "POST".into(),
                    path: "/v3/mail/send".into(),
                    client_ip: String::new(),
                })
                .await
                .expect("authorize")
                .into_inner();
            assert_eq!(reply.allowed, allowed, "{list}");
            if !allowed {
                assert_eq!(reply.http_status, 401);
            }
        }
    }
}

fn has_python_client() -> bool {
    Command::new("python3")
        .args(["-c", "import sendgrid"])
        .status()
        .is_ok_and(|s| s.success())
}

fn node_project() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node")
}

fn python_flow() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/sendgrid_flow.py")
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

/// Both official clients against a fresh `keyward serve --http-listen`,
/// the real binary; then their keys through `Authorize`.
#[tokio::test]
async fn sendgrids_clients_manage_keys_on_a_real_keyward_serve() {
    if !has_python_client()
        || !node_project()
            .join("node_modules/@sendgrid/client")
            .exists()
    {
        return missing(
            "SendGrid's clients",
            "pip install sendgrid; npm ci --prefix tests/clients/node",
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = LIMIT.to_string();
    let (mut child, port) = common::spawn_serve(
        env!("CARGO_BIN_EXE_keyward"),
        dir.path(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--max-keys-per-account",
            &limit,
        ],
    );
    let rest = common::await_logged_address(
        &dir.path().join("serve.log"),
        "serving SendGrid's REST key API",
    );
    let url = format!("http://{rest}");
    let admin = common::admin_token(&dir.path().join("keyward-data"));
    let grpc = common::connect(&format!("http://127.0.0.1:{port}")).await;
    let python = run_flow_at(&admin, &url, &[], "python3", &[&python_flow()], dir.path())
        .await
        .expect("python ran");
    assert_decisions(grpc.clone(), &python).await;
    let node = run_flow_at(&admin, &url, &[], "node", &["flow.js"], &node_project())
        .await
        .expect("node ran");
    assert_decisions(grpc, &node).await;
    let _ = child.kill();
    let _ = child.wait();
}

/// The REST API serves TLS like the gRPC listeners (same `--tls-cert` and
/// `--tls-key`); SendGrid's clients verify it against a CA the way their
/// users configure one (`SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS`).
#[tokio::test]
async fn sendgrids_clients_work_over_tls() {
    let node = node_project();
    if !has_python_client() || !node.join("node_modules/@sendgrid/client").exists() {
        return missing(
            "SendGrid's clients",
            "pip install sendgrid; npm ci --prefix tests/clients/node",
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::pki();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    let ca = write("ca.pem", &pki.ca);
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.max_keys_per_account = LIMIT;
    config.tls_cert = Some(write("server.pem", &pki.server.0));
    config.tls_key = Some(write("server.key", &pki.server.1));
    let server = TestServer::start_with(config).await;
    let https = format!(
        "https://localhost:{}",
        server.http_addr.expect("REST").port()
    );
    let report = run_flow_at(
        &server.admin,
        &https,
        &[("SSL_CERT_FILE", &ca)],
        "python3",
        &[&python_flow()],
        dir.path(),
    )
    .await
    .expect("python ran");
    assert_decisions_over_tls(&server, &report, &pki.ca).await;
    let report = run_flow_at(
        &server.admin,
        &https,
        &[("NODE_EXTRA_CA_CERTS", &ca)],
        "node",
        &["flow.js"],
        &node,
    )
    .await
    .expect("node ran");
    assert_decisions_over_tls(&server, &report, &pki.ca).await;
    // Plain HTTP is refused on a TLS listener.
    let plain = format!("http://{}", server.http_addr.expect("REST"));
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/v3/scopes', timeout=5)"])
            .arg(plain)
            .output()
    })
    .await
    .expect("ran")
    .expect("python");
    assert!(!output.status.success(), "plaintext must not be served");
}

/// [`assert_decisions`] through a TLS channel to Authorize.
async fn assert_decisions_over_tls(server: &TestServer, report: &serde_json::Value, ca: &str) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    assert_decisions(channel, report).await;
}
