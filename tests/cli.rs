//! The real `keyward` binary: `serve` with defaults, and `keyward keys …`.
#![allow(
    clippy::too_many_lines,
    reason = "one end-to-end story reads best in one test"
)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

struct Serve {
    child: Child,
    port: u16,
}

impl Serve {
    fn start(cwd: &Path) -> Self {
        let (child, port) = common::spawn_serve(BIN, cwd, &[]);
        Self { child, port }
    }

    fn keys(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("keys")
            .args(["--server", &format!("http://127.0.0.1:{}", self.port)])
            .args(args)
            .current_dir(cwd)
            .env_remove("KEYWARD_TOKEN")
            .env_remove("KEYWARD_DATA_DIR")
            .output()
            .expect("keyward keys runs")
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        self.child.wait().expect("wait")
    }
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or_else(|| panic!("no {name} in {text}"), str::trim)
}

#[test]
fn serve_with_defaults_and_manage_keys_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    let server = Serve::start(cwd);
    let token_path = cwd.join("keyward-data/admin.token");
    assert!(
        token_path.exists(),
        "serve created its data dir and admin token"
    );
    let admin = std::fs::read_to_string(&token_path)
        .expect("token")
        .trim()
        .to_owned();

    let created = ok(&server.keys(
        cwd,
        &[
            "create",
            "--name",
            "ci",
            "--scope",
            "mail.send",
            "--scope",
            "api_keys.read",
            "--account",
            "acme",
        ],
    ));
    let key_id = field(&created, "key_id:").to_owned();
    let secret = field(&created, "secret:").to_owned();
    assert_eq!(secret.len(), 69);
    assert!(created.contains("restricted_access"));

    let listed = ok(&server.keys(cwd, &["list", "--account", "acme"]));
    assert!(
        listed.contains(&key_id) && listed.contains("ci"),
        "{listed}"
    );
    assert!(
        !listed.contains(&secret[26..]),
        "the secret is shown once only"
    );

    let renamed = ok(&server.keys(cwd, &["rename", &key_id, "--name", "ci-2"]));
    assert_eq!(field(&renamed, "name:"), "ci-2");
    let updated = ok(&server.keys(
        cwd,
        &[
            "update",
            &key_id,
            "--name",
            "ci-3",
            "--access",
            "alerts=read",
            "--access",
            "api_keys=read",
        ],
    ));
    assert_eq!(field(&updated, "scopes:"), "alerts.read api_keys.read");

    // Acting as the key itself.
    let own = ok(&server.keys(cwd, &["--token", &secret, "scopes"]));
    assert_eq!(
        own.split_whitespace().collect::<Vec<_>>(),
        vec!["alerts.read", "api_keys.read"]
    );
    let refused = server.keys(
        cwd,
        &[
            "--token",
            &secret,
            "create",
            "--name",
            "x",
            "--scope",
            "alerts.read",
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("api_keys.create"));

    let got = ok(&server.keys(cwd, &["get", &key_id]));
    assert_eq!(field(&got, "name:"), "ci-3");
    assert!(ok(&server.keys(cwd, &["catalog"])).contains("[billing] Billing"));
    ok(&server.keys(cwd, &["delete", &key_id]));
    let gone = server.keys(cwd, &["get", &key_id]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));

    assert!(server.terminate().success(), "SIGTERM stops cleanly");
    let log = std::fs::read_to_string(cwd.join("serve.log")).expect("log");
    assert!(
        log.contains("admin.token"),
        "the log says where the token is"
    );
    assert!(!log.contains(&admin), "the admin token is never logged");
    assert!(!log.contains(&secret[26..]), "secrets are never logged");
    assert!(log.contains("keyward::audit"), "changes are audited");
}

/// `keys create --expires-in`, `keys disable|enable`, `keys rotate --overlap`,
/// `keys expire --in|--never` and the lifecycle fields in `get` and `list`.
#[test]
fn lifecycle_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Serve::start(dir.path());
    let created = ok(&serve.keys(
        dir.path(),
        &[
            "create",
            "--name",
            "temp",
            "--scope",
            "mail.send",
            "--account",
            "acme",
            "--expires-in",
            "30d",
        ],
    ));
    let id = field(&created, "key_id:").to_owned();
    assert!(
        field(&created, "expires_at:").starts_with("20"),
        "{created}"
    );
    assert_eq!(field(&created, "enabled:"), "true");

    let disabled = ok(&serve.keys(dir.path(), &["disable", &id]));
    assert_eq!(field(&disabled, "enabled:"), "false");
    let listed = ok(&serve.keys(dir.path(), &["list", "--account", "acme"]));
    assert!(listed.contains("disabled"), "{listed}");
    let enabled = ok(&serve.keys(dir.path(), &["enable", &id]));
    assert_eq!(field(&enabled, "enabled:"), "true");

    let rotated = ok(&serve.keys(dir.path(), &["rotate", &id, "--overlap", "1h"]));
    assert_eq!(field(&rotated, "key_id:"), id, "the same key");
    assert!(
        field(&rotated, "secret:").starts_with(&format!("SG.{id}.")),
        "{rotated}"
    );
    assert!(rotated.contains("previous secret valid until"), "{rotated}");

    let allowed = ok(&serve.keys(
        dir.path(),
        &["allow", &id, "--cidr", "10.0.0.0/8", "--cidr", "192.0.2.7"],
    ));
    assert_eq!(field(&allowed, "allowed_from:"), "10.0.0.0/8 192.0.2.7/32");
    let refused = serve.keys(dir.path(), &["allow", &id, "--cidr", "10.0.0.1/8"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("host bits"));
    let any = ok(&serve.keys(dir.path(), &["allow", &id, "--any"]));
    assert_eq!(field(&any, "allowed_from:"), "any address");

    let never = ok(&serve.keys(dir.path(), &["expire", &id, "--never"]));
    assert_eq!(field(&never, "expires_at:"), "never");
    let soon = ok(&serve.keys(dir.path(), &["expire", &id, "--in", "2h"]));
    assert!(field(&soon, "expires_at:").starts_with("20"), "{soon}");
    // Bad input is refused with the field named.
    let refused = serve.keys(dir.path(), &["expire", &id, "--in", "soon"]);
    assert!(!refused.status.success());
    let refused = serve.keys(dir.path(), &["expire", &id]);
    assert!(!refused.status.success(), "--in or --never is required");

    assert!(serve.terminate().success());
}

/// `keys create --rate --burst`, `keys limit`, `keys list --unused-for`, and
/// the rate-limit and last-use fields in `get` and `list`.
#[test]
fn rate_limits_and_last_use_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Serve::start(dir.path());
    let created = ok(&serve.keys(
        dir.path(),
        &[
            "create",
            "--name",
            "plain",
            "--scope",
            "mail.send",
            "--account",
            "acme",
        ],
    ));
    let id = field(&created, "key_id:").to_owned();
    assert_eq!(field(&created, "rate_limit:"), "none");
    assert_eq!(field(&created, "last_used:"), "never");
    let limited = ok(&serve.keys(
        dir.path(),
        &["limit", &id, "--rate", "100/s", "--burst", "20"],
    ));
    assert_eq!(
        field(&limited, "rate_limit:"),
        "100/1s per sidecar, burst 20"
    );
    let hourly = ok(&serve.keys(dir.path(), &["limit", &id, "--rate", "5000/h"]));
    assert_eq!(
        field(&hourly, "rate_limit:"),
        "5000/1h per sidecar, burst 5000"
    );
    let refused = serve.keys(dir.path(), &["limit", &id, "--rate", "0/s"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("rate_limit.requests"),
        "{refused:?}"
    );
    let refused = serve.keys(dir.path(), &["limit", &id, "--rate", "fast"]);
    assert!(!refused.status.success());
    let none = ok(&serve.keys(dir.path(), &["limit", &id, "--none"]));
    assert_eq!(field(&none, "rate_limit:"), "none");
    assert_eq!(field(&none, "credits:"), "unlimited");
    let metered = ok(&serve.keys(
        dir.path(),
        &[
            "credits",
            &id,
            "--remaining",
            "10000",
            "--refill",
            "10000/1d",
        ],
    ));
    let credits = field(&metered, "credits:");
    assert!(
        credits.starts_with("10000 remaining, set to 10000 every 1day (next "),
        "{credits}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&serve.keys(
        dir.path(),
        &["credits", &id, "--remaining", "7", "-o", "json"],
    )))
    .expect("json");
    assert_eq!(json["credits"]["remaining"], 7, "{json}");
    assert!(json["credits"]["refill"].is_null(), "{json}");
    let refused = serve.keys(
        dir.path(),
        &["credits", &id, "--remaining", "1", "--refill", "0/1d"],
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("credits.refill.amount"),
        "{refused:?}"
    );
    let unlimited = ok(&serve.keys(dir.path(), &["credits", &id, "--none"]));
    assert_eq!(field(&unlimited, "credits:"), "unlimited");
    let limited = ok(&serve.keys(
        dir.path(),
        &[
            "create",
            "--name",
            "metered",
            "--scope",
            "mail.send",
            "--account",
            "acme",
            "--rate",
            "10/m",
        ],
    ));
    assert_eq!(
        field(&limited, "rate_limit:"),
        "10/1m per sidecar, burst 10"
    );
    let listed = ok(&serve.keys(dir.path(), &["list", "--account", "acme"]));
    assert!(listed.contains("never used"), "{listed}");
    let stale = ok(&serve.keys(
        dir.path(),
        &["list", "--account", "acme", "--unused-for", "90d"],
    ));
    assert!(stale.is_empty(), "every key was created just now: {stale}");
    let all = ok(&serve.keys(
        dir.path(),
        &["list", "--account", "acme", "--unused-for", "0s"],
    ));
    assert_eq!(all.lines().count(), 2, "{all}");
    assert!(serve.terminate().success());
}

/// `keyward serve 2>file` (a file, a pipe, `kubectl logs`) gets plain text:
/// no ANSI escape byte in the human log format.
#[tokio::test]
async fn the_human_log_has_no_escape_codes_off_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serve.log");
    let port = common::free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-grace-ms",
            "0",
        ])
        .current_dir(dir.path())
        .env_remove("KEYWARD_DATA_DIR")
        .env_remove("KEYWARD_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve starts");
    common::await_ready(&format!("http://127.0.0.1:{port}")).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = std::fs::read(&log).expect("log");
    assert!(
        String::from_utf8_lossy(&text).contains("serving gRPC"),
        "the human format was written"
    );
    assert!(!text.contains(&0x1b), "escape codes in a file log");
}

#[test]
fn shell_completions_and_a_man_page_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("runs");
        let script = ok(&output);
        for word in ["serve", "keys", "migrate", "data-dir"] {
            assert!(script.contains(word), "{shell}: {word}");
        }
    }
    let output = Command::new(BIN).arg("man").output().expect("runs");
    let page = ok(&output);
    assert!(
        page.starts_with(".ie") || page.contains(".TH keyward"),
        "{page}"
    );
    assert!(page.contains("serve"), "{page}");
}

/// Each error class is one line on stderr with its own exit code, never a
/// backtrace or tonic's debug form, also with `RUST_BACKTRACE=1` set.
#[test]
fn errors_are_one_line_with_an_exit_code_per_class() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Serve::start(dir.path());
    let run = |server: &str, args: &[&str]| {
        Command::new(BIN)
            .arg("keys")
            .args(["--server", server])
            .args(args)
            .current_dir(dir.path())
            .env_remove("KEYWARD_TOKEN")
            .env_remove("KEYWARD_DATA_DIR")
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("keyward keys runs")
    };
    let here = format!("http://127.0.0.1:{}", serve.port);
    let gone = format!("http://127.0.0.1:{}", common::free_port());
    for (server, args, code, needle) in [
        (
            here.as_str(),
            &[
                "create",
                "--name",
                "x",
                "--scope",
                "mail.sned",
                "--account",
                "a",
            ][..],
            3,
            "did you mean \"mail.send\"",
        ),
        (here.as_str(), &["get", "AAAA"][..], 3, "key_id"),
        (
            here.as_str(),
            &["get", "AAAAAAAAAAAAAAAAAAAAAA"][..],
            4,
            "not found",
        ),
        (
            gone.as_str(),
            &["list", "--account", "a"][..],
            5,
            "is `keyward serve` running",
        ),
    ] {
        let output = run(server, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("backtrace") && !stderr.contains("code: '"),
            "{stderr}"
        );
    }
    serve.terminate();
    // `serve` refusing its settings says so in one line too.
    std::fs::write(dir.path().join("weak.token"), "short").expect("token");
    let refused = Command::new(BIN)
        .args([
            "serve",
            "--admin-token-file",
            "weak.token",
            "--data-dir",
            "other",
        ])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("admin token"),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

/// `-o json`: one JSON document on stdout, the secret of `create` in it,
/// so `jq -r .secret` works; `list` and `get` carry the documented fields.
#[test]
fn json_output_for_scripts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = Serve::start(dir.path());
    let json = |args: &[&str]| -> serde_json::Value {
        let output = serve.keys(dir.path(), &[&["-o", "json"], args].concat());
        serde_json::from_str(&ok(&output)).expect("stdout is one JSON document")
    };
    let created = json(&[
        "create",
        "--name",
        "ci",
        "--scope",
        "mail.send",
        "--account",
        "acme",
    ]);
    let secret = created["secret"].as_str().expect("secret");
    assert!(secret.starts_with("SG.") && secret.len() == 69, "{created}");
    let id = created["key"]["key_id"]
        .as_str()
        .expect("key_id")
        .to_owned();
    let listed = json(&["list", "--account", "acme"]);
    assert_eq!(listed["keys"][0]["key_id"], id.as_str(), "{listed}");
    let key = json(&["get", &id]);
    for field in [
        "name",
        "kind",
        "account_id",
        "scopes",
        "enabled",
        "expires_at",
        "rate_limit",
    ] {
        assert!(key.get(field).is_some(), "{field}: {key}");
    }
    assert_eq!(key["scopes"][0], "mail.send");
    assert_eq!(json(&["delete", &id])["revoked"], id.as_str());
    serve.terminate();
}

#[test]
fn a_key_id_that_starts_with_a_hyphen_is_an_id_not_a_flag() {
    // Key ids are base64url: one in 64 starts with "-" (CI found one).
    let dir = tempfile::tempdir().expect("tempdir");
    for command in ["get", "disable", "enable", "delete"] {
        let output = Command::new(BIN)
            .args(["keys", "--server", "http://127.0.0.1:9", "--token", "x"])
            .args([command, "-sAAAAAAAAAAAAAAAAAAAAA"])
            .current_dir(dir.path())
            .output()
            .expect("keyward keys runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("unexpected argument"),
            "{command}: {stderr}"
        );
        assert_eq!(
            output.status.code(),
            Some(5),
            "{command}: unreachable, {stderr}"
        );
    }
}

/// The fields of one human-format line after `target: `, read as a log
/// parser would: `name=value`, a value either bare (to the next space) or
/// quoted with backslash escapes.
fn human_fields(line: &str, target: &str) -> Vec<(String, String)> {
    let rest = line
        .split_once(&format!("{target}: "))
        .map_or("", |(_, rest)| rest);
    let mut fields = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            return fields;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(chars.by_ref().take_while(|c| *c != ' '));
        }
        fields.push((name, value));
    }
}

/// A key name crafted to forge audit fields and a line in the default
/// (human) log format is written quoted and escaped: the log holds exactly
/// one audit line for the create, with the name as one field, no forged
/// `operation=delete` field, and no raw line or paragraph separator.
#[tokio::test]
async fn a_key_name_cannot_forge_audit_fields_or_lines_in_the_human_log() {
    use keyward::pb::v1 as pb;

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serve.log");
    let data = dir.path().join("data");
    let port = common::free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-grace-ms",
            "0",
        ])
        .args(["--log-format", "human", "--data-dir"])
        .arg(&data)
        .current_dir(dir.path())
        .env_remove("KEYWARD_DATA_DIR")
        .env_remove("KEYWARD_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve starts");
    let url = format!("http://127.0.0.1:{port}");
    common::await_ready(&url).await;
    let forged = "x\" operation=delete actor=admin result=ok\u{2028} INFO keyward::audit: forged\u{2029}y=z\\";
    let admin = common::admin_token(&data);
    let created =
        keyward::pb::v1::key_manager_client::KeyManagerClient::new(common::connect(&url).await)
            .create_key(common::bearer(
                &admin,
                pb::CreateKeyRequest {
                    name: forged.into(),
                    scopes: vec!["mail.send".into()],
                    account_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("the name is accepted")
            .into_inner();
    let id = created.key.expect("key").key_id;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    let text = std::fs::read_to_string(&log).expect("log");
    for separator in ['\u{2028}', '\u{2029}', '\u{85}'] {
        assert!(!text.contains(separator), "a raw {separator:?} in:\n{text}");
    }
    let audit: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("keyward::audit"))
        .collect();
    assert_eq!(audit.len(), 1, "one audit line, no forged one:\n{text}");
    assert!(
        !text
            .lines()
            .any(|line| line.contains("forged") && line != audit[0]),
        "the name spilled onto another line:\n{text}"
    );
    let fields = human_fields(audit[0], "keyward::audit");
    let values = |name: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    };
    assert_eq!(values("operation"), ["create"], "{}", audit[0]);
    assert_eq!(values("actor"), ["admin"], "{}", audit[0]);
    assert_eq!(values("result"), ["ok"], "{}", audit[0]);
    assert_eq!(values("key_id"), [id.as_str()], "{}", audit[0]);
    assert!(values("y").is_empty(), "{}", audit[0]);
    // The name is one field, its hazards escaped as \u{…}.
    assert_eq!(
        values("name"),
        [forged
            .replace('\u{2028}', "u{2028}")
            .replace('\u{2029}', "u{2029}")
            .as_str()],
        "{}",
        audit[0]
    );
}

/// `keyward keys usage`: a standalone sidecar's own counts, as totals and
/// a bar per minute for people, every bucket for scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_usage_shows_a_keys_requests_as_totals_and_bars() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    let server = Serve::start(cwd);
    let created = ok(&server.keys(
        cwd,
        &[
            "create",
            "--name",
            "used",
            "--scope",
            "mail.send",
            "--account",
            "acme",
        ],
    ));
    let (key_id, secret) = (field(&created, "key_id:"), field(&created, "secret:"));
    let mut authorizer = keyward::pb::v1::authorizer_client::AuthorizerClient::new(
        common::connect(&format!("http://127.0.0.1:{}", server.port)).await,
    );
    for (path, method, times) in [("/v3/mail/send", "POST", 4), ("/v3/alerts", "GET", 3)] {
        for _ in 0..times {
            authorizer
                .authorize(keyward::pb::v1::AuthorizeRequest {
                    key: secret.to_owned(),
                    method: method.into(),
                    path: path.into(),
                    client_ip: String::new(),
                })
                .await
                .expect("answered");
        }
    }
    // The counts reach the sidecar's own database within a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let json: serde_json::Value = loop {
        let json: serde_json::Value =
            serde_json::from_str(&ok(&server.keys(cwd, &["usage", key_id, "-o", "json"])))
                .expect("JSON");
        let counted = json["totals"]["allowed"] == 4 && json["totals"]["denied"] == 3;
        if counted || std::time::Instant::now() > deadline {
            break json;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(json["totals"]["allowed"], 4, "{json}");
    assert_eq!(json["totals"]["denied_by_reason"]["insufficient_scope"], 3);
    assert_eq!(json["series"].as_array().expect("series").len(), 60);
    let text = ok(&server.keys(cwd, &["usage", key_id, "--range", "24h"]));
    assert!(
        text.starts_with("last 24h by hour: 4 allowed, 3 denied"),
        "{text}"
    );
    assert!(text.contains("denied insufficient_scope: 3"), "{text}");
    assert!(text.contains("####"), "a bar: {text}");
    let refused = server.keys(cwd, &["usage", key_id, "--range", "2h"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("range"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(server.terminate().success());
}
