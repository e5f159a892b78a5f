//! A real Envoy from a shipped config (ports rewritten), an upstream that
//! records what reaches it, and a raw HTTP/1.1 client.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::free_port;

pub type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// An HTTP/1.1 upstream that records each request's headers and answers 200.
pub async fn upstream() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut headers = Vec::new();
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let trimmed = line.trim_end();
                        if trimmed.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = trimmed.split_once(':') {
                            let name = name.trim().to_ascii_lowercase();
                            if name == "content-length" {
                                length = value.trim().parse().unwrap_or(0);
                            }
                            headers.push((name, value.trim().to_owned()));
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    record.lock().expect("lock").push(headers);
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"upstream\":1}\n";
                    if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

pub struct Envoy {
    child: Child,
    /// The listener.
    pub port: u16,
    /// The admin interface.
    pub admin: u16,
    _config: tempfile::NamedTempFile,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped ext_authz config (k8s/base/envoy.yaml), ports rewritten.
pub async fn start_envoy(binary: &str, keyward_port: u16, upstream_port: u16) -> Envoy {
    start_shipped(
        binary,
        include_str!("../../k8s/base/envoy.yaml"),
        "k8s/base/envoy.yaml",
        &[(
            "port_value: 50051".into(),
            format!("port_value: {keyward_port}"),
        )],
        upstream_port,
        &[],
    )
    .await
}

/// A shipped Envoy config (`name`, for messages) with its listener, app
/// and admin ports rewritten to free loopback ones, plus `rewrites` (each
/// must appear exactly once), started with `env`.
pub async fn start_shipped(
    binary: &str,
    shipped: &str,
    name: &str,
    rewrites: &[(String, String)],
    upstream_port: u16,
    env: &[(&str, String)],
) -> Envoy {
    let port = free_port();
    let admin = free_port();
    let mut config = shipped.to_owned();
    let ports = [
        (
            "address: 0.0.0.0, port_value: 10000".to_owned(),
            format!("address: 127.0.0.1, port_value: {port}"),
        ),
        (
            "port_value: 8080".into(),
            format!("port_value: {upstream_port}"),
        ),
        ("port_value: 9901".into(), format!("port_value: {admin}")),
    ];
    for (from, to) in ports.iter().chain(rewrites) {
        assert_eq!(
            config.matches(from.as_str()).count(),
            1,
            "{from} appears once in {name}"
        );
        config = config.replace(from.as_str(), to);
    }
    let file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("config file");
    std::fs::write(file.path(), config).expect("write config");
    let child = Command::new(binary)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["-c", &file.path().display().to_string()])
        .args([
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--concurrency",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("envoy starts");
    let envoy = Envoy {
        child,
        port,
        admin,
        _config: file,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = http(admin, "GET", "/ready", &[]).await.unwrap_or_default();
        if status == 200 && body.contains("LIVE") {
            break;
        }
        assert!(Instant::now() < deadline, "envoy did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    envoy
}

/// One raw HTTP/1.1 request (paths are sent byte for byte, unnormalised).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, Vec<(String, String)>, String)> {
    http_from(None, port, method, path, headers).await
}

/// [`http`] from the loopback address `from` (e.g. 127.0.0.2, a load
/// balancer's address in front of Envoy), when given.
pub async fn http_from(
    from: Option<std::net::IpAddr>,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, Vec<(String, String)>, String)> {
    let mut stream = match from {
        None => TcpStream::connect(("127.0.0.1", port)).await.ok()?,
        Some(from) => {
            let socket = tokio::net::TcpSocket::new_v4().ok()?;
            socket.bind(std::net::SocketAddr::new(from, 0)).ok()?;
            socket
                .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .ok()?
        }
    };
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: app.local\r\nconnection: close\r\n");
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    if method == "POST" || method == "PUT" {
        request.push_str("content-length: 2\r\n\r\n{}");
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.ok()?;
    // Read the head, then exactly content-length bytes: a reply sent
    // before Envoy read the request body comes with a delayed close, and
    // waiting for the close would time that, not the reply.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        raw.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let head = head.as_str();
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, body))
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}
