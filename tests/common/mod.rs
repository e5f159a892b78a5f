//! A real keyward on a loopback port over a temporary sled directory.
#![allow(dead_code, clippy::missing_panics_doc)]

pub mod etcd;
pub mod github;
pub mod pki;
pub mod proxy;
pub mod redis;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use keyward::pb::v1::key_manager_client::KeyManagerClient;
use keyward::server::{self, App, Listeners};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A running server. Dropping the data dir guard deletes the directory.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub manage_addr: Option<std::net::SocketAddr>,
    /// SendGrid's REST key API, when `http_listen` is set.
    pub http_addr: Option<std::net::SocketAddr>,
    pub metrics: Arc<keyward::metrics::Metrics>,
    pub config: ServeConfig,
    pub admin: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServerError>>>,
}

impl TestServer {
    /// Starts on a fresh temporary directory.
    pub async fn start(dir: &tempfile::TempDir) -> Self {
        Self::start_with(ServeConfig::with_data_dir(dir.path().join("data"))).await
    }

    /// Starts with explicit settings (the `listen` address is ignored).
    pub async fn start_with(config: ServeConfig) -> Self {
        let app = App::open(&config).expect("keyward opens");
        let metrics = Arc::clone(&app.metrics);
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr = listeners.grpc.local_addr().expect("addr");
        let metrics_addr = listeners.metrics.as_ref().and_then(|l| l.local_addr().ok());
        let manage_addr = listeners.manage.as_ref().and_then(|l| l.local_addr().ok());
        let http_addr = listeners.http.as_ref().and_then(|l| l.local_addr().ok());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listeners, app, async {
            let _ = stopped.await;
        }));
        let admin = std::fs::read_to_string(config.data.admin_token_path())
            .expect("admin token written")
            .trim()
            .to_owned();
        Self {
            addr,
            metrics_addr,
            manage_addr,
            http_addr,
            metrics,
            config,
            admin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops gracefully and waits for the store flush.
    pub async fn stop(mut self) -> ServeConfig {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
        self.config.clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.url()).await
    }

    /// GET /metrics, as Prometheus scrapes it.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.expect("metrics enabled");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    }

    pub async fn authorizer(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.channel().await)
    }

    /// KeyManager: on its own listener when configured so.
    pub async fn manager(&self) -> KeyManagerClient<Channel> {
        match self.manage_addr {
            Some(addr) => KeyManagerClient::new(connect(&format!("http://{addr}")).await),
            None => KeyManagerClient::new(self.channel().await),
        }
    }

    /// Creates a key as admin in `account`; returns (key_id, secret).
    pub async fn create_key(&self, account: &str, scopes: &[&str]) -> (String, String) {
        self.create(pb::CreateKeyRequest {
            name: format!("test key in {account}"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            account_id: account.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Creates a key as admin; returns (key_id, secret).
    pub async fn create(&self, request: pb::CreateKeyRequest) -> (String, String) {
        let response = self
            .manager()
            .await
            .create_key(bearer(&self.admin, request))
            .await
            .expect("admin creates a key")
            .into_inner();
        (response.key.expect("key").key_id, response.secret)
    }

    /// Authorizes one request.
    pub async fn authorize(&self, key: &str, method: &str, path: &str) -> pb::AuthorizeResponse {
        self.authorizer()
            .await
            .authorize(pb::AuthorizeRequest {
                key: key.to_owned(),
                method: method.to_owned(),
                path: path.to_owned(),
                client_ip: String::new(),
            })
            .await
            .expect("authorize replies")
            .into_inner()
    }

    /// `account`'s keys (first 1000), as ListKeys reports them to the admin.
    pub async fn list(&self, account: &str) -> Vec<pb::ApiKey> {
        list_keys(&mut self.manager().await, &self.admin, account).await
    }

    /// How many keys `account` has, as ListKeys reports.
    pub async fn count(&self, account: &str) -> usize {
        self.list(account).await.len()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `account`'s keys (first 1000), as ListKeys reports them to `admin`.
pub async fn list_keys(
    manager: &mut KeyManagerClient<Channel>,
    admin: &str,
    account: &str,
) -> Vec<pb::ApiKey> {
    manager
        .list_keys(bearer(
            admin,
            pb::ListKeysRequest {
                account_id: account.to_owned(),
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner()
        .keys
}

pub async fn connect(url: &str) -> Channel {
    for _ in 0..50 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server did not accept connections");
}

/// Waits until the server at `url` is ready for traffic, as Kubernetes'
/// readiness probe sees it (`keyward.v1.Authorizer` SERVING): a replicated
/// sidecar only once its replica caught up with etcd.
pub async fn await_ready(url: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(connect(url).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "keyward.v1.Authorizer".into(),
            })
            .await
            .map(|reply| reply.into_inner().status);
        if status
            .as_ref()
            .is_ok_and(|s| *s == ServingStatus::Serving as i32)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin token `keyward serve` wrote into `data_dir` on first start.
pub fn admin_token(data_dir: &std::path::Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .expect("admin token written")
        .trim()
        .to_owned()
}

/// A request carrying `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// Asserts a gRPC error's code and that its message mentions `needle`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let status = result.expect_err("expected an error status");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The real `keyward serve` binary on ephemeral loopback ports, logging JSON
/// to `<cwd>/serve.log`; returns the child and its gRPC port (read from the
/// log, so no port is ever guessed).
#[allow(
    clippy::zombie_processes,
    reason = "the caller owns and reaps the child"
)]
pub fn spawn_serve(bin: &str, cwd: &std::path::Path, extra: &[&str]) -> (std::process::Child, u16) {
    spawn_serve_env(bin, cwd, extra, &[])
}

/// [`spawn_serve`] with environment variables set for the child.
#[allow(
    clippy::zombie_processes,
    reason = "the child is returned to the caller, who waits for it"
)]
pub fn spawn_serve_env(
    bin: &str,
    cwd: &std::path::Path,
    extra: &[&str],
    env: &[(String, String)],
) -> (std::process::Child, u16) {
    spawn_serve_via(std::process::Command::new(bin), cwd, extra, env)
}

/// [`spawn_serve_env`] through `command`: the keyward binary itself, or a
/// wrapper (e.g. `prlimit … keyward`) that runs it with the arguments
/// added here.
#[allow(
    clippy::zombie_processes,
    reason = "the child is returned to the caller, who waits on it; a failed start is killed and waited here"
)]
pub fn spawn_serve_via(
    mut command: std::process::Command,
    cwd: &std::path::Path,
    extra: &[&str],
    env: &[(String, String)],
) -> (std::process::Child, u16) {
    use std::process::Stdio;
    let log_path = cwd.join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json"])
        .args(extra)
        .current_dir(cwd)
        .env_remove("KEYWARD_DATA_DIR")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("keyward serve starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let port = log.lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["fields"]["message"] == "serving gRPC")
                .then(|| {
                    event["fields"]["local"]
                        .as_str()?
                        .rsplit(':')
                        .next()?
                        .parse()
                        .ok()
                })
                .flatten()
        });
        if let Some(port) = port {
            return (child, port);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyward serve did not start:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback port (for child processes that need one named up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// An external tool's binary: `$env_var`, else `name` when it runs from
/// PATH. Without it a test skips locally, and fails under CI, where
/// `.ci/run` installs it (`install` says how).
pub fn tool(env_var: &str, name: &str, install: &str) -> Option<String> {
    if let Ok(path) = std::env::var(env_var) {
        return Some(path);
    }
    let found = std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(name.to_owned());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have {name} ({install})"
    );
    eprintln!("skipped: no {name} binary ({install})");
    None
}

/// The address a spawned server logged with `message` (JSON logs).
pub fn logged_address(log: &str, message: &str) -> String {
    log.lines()
        .find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["fields"]["message"] == message)
                .then(|| event["fields"]["local"].as_str().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("no {message:?} in the log"))
}

/// The address a spawned server logs with `message` in its JSON log file
/// `path`, waiting for it: each listener logs as it starts serving, not
/// necessarily before the port a spawn waited for.
pub fn await_logged_address(path: &std::path::Path, message: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(path).expect("log");
        let found = log.lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["fields"]["message"] == message)
                .then(|| event["fields"]["local"].as_str().map(str::to_owned))?
        });
        if let Some(address) = found {
            return address;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no {message:?} in the log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `log_of()` (a spawned server's log) holds every one of
/// `texts`, and returns it: the log is written by the server's own thread,
/// a little after the event. A liveness bound of 30 s; nothing is timed.
pub async fn await_log(log_of: impl Fn() -> String, texts: &[&str]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = log_of();
        if texts.iter().all(|text| log.contains(text)) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never logged {texts:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Prometheus metrics of a spawned server whose JSON log file is
/// `log_path` (waiting for its metrics listener's line: the log is written
/// by its own thread, a little after the event).
pub async fn scrape_logged(log_path: &std::path::Path) -> String {
    scrape(&await_logged_address(
        log_path,
        "serving metrics at /metrics",
    ))
    .await
}

/// GET /metrics from `addr`, as Prometheus scrapes it.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut metrics = String::new();
    stream.read_to_string(&mut metrics).await.expect("read");
    metrics
}

/// One raw HTTP/1.1 exchange (the body may be cut short, as an attacker
/// sends it): writes `head` (and `body`), then reads the
/// response until the server ends it.
pub async fn http_exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(body).await.expect("body");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    response.extend(&buf[..n]);
                    // One response is all these requests get.
                    let text = String::from_utf8_lossy(&response);
                    if let Some((head, body)) = text.split_once("\r\n\r\n")
                        && head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .is_some_and(|n| body.len() >= n)
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server answers without waiting for the body");
    String::from_utf8_lossy(&response).into_owned()
}

/// A REST call with a JSON body: (status, JSON reply or `null`).
pub async fn rest_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    use std::fmt::Write as _;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = write!(
        head,
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let response = http_exchange(addr, &head, body.as_bytes()).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {response}"));
    let json = response
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Waits until `id`'s usage over the last hour, read through `manager` as
/// `credential`, satisfies `done`; the totals then.
pub async fn await_usage(
    mut manager: KeyManagerClient<Channel>,
    credential: &str,
    id: &str,
    done: impl Fn(&pb::UsageCounts) -> bool,
) -> pb::UsageCounts {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let totals = manager
            .get_key_usage(bearer(
                credential,
                pb::GetKeyUsageRequest {
                    key_id: id.to_owned(),
                    range: String::new(),
                },
            ))
            .await
            .expect("usage")
            .into_inner()
            .totals
            .expect("totals");
        if done(&totals) {
            return totals;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage never reached what was expected: {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the sidecar on each of `channels` to authorize `POST /v3/mail/send`
/// with `key` until it allows (the key has reached it: until then it is
/// unknown there); how many were allowed (one a sidecar).
pub async fn until_every_sidecar_allows(channels: &[Channel], key: &str) -> u64 {
    let request = pb::AuthorizeRequest {
        key: key.to_owned(),
        method: "POST".into(),
        path: "/v3/mail/send".into(),
        client_ip: String::new(),
    };
    for channel in channels {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
        loop {
            let reply = client
                .authorize(request.clone())
                .await
                .expect("replies")
                .into_inner();
            if reply.allowed {
                break;
            }
            assert_eq!(
                reply.reason(),
                pb::DenyReason::UnknownKey,
                "not yet replicated"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the key never reached a sidecar"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    channels.len() as u64
}
