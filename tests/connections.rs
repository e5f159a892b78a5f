//! What one unauthenticated peer can make keyward hold, bounded and tested
//! with the attack itself: HTTP/2 streams per connection (a client with a
//! zero flow-control window that ignores the advertised limit), connections
//! per listener, idle connections and partial request heads, and accepts at
//! the descriptor limit.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestServer;
use keyward::config::ServeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Liveness only: how long a test waits for something that must happen.
const EVENTUALLY: Duration = Duration::from_secs(30);

// --- a raw HTTP/2 client that breaks the rules ----------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// HPACK literal fields without indexing (no Huffman): every length < 127.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for text in [name, value] {
            out.push(u8::try_from(text.len()).expect("short"));
            out.extend(text.as_bytes());
        }
    }
    out
}

/// One unauthenticated Authorize call (key `"x"`) on `stream`.
fn authorize_call(stream: u32) -> Vec<u8> {
    let headers = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/keyward.v1.Authorizer/Authorize"),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    // gRPC framing (uncompressed, 3 bytes) around AuthorizeRequest{key: "x"}.
    let message = [0u8, 0, 0, 0, 3, 0x0a, 0x01, b'x'];
    let mut out = frame(HEADERS, END_HEADERS, stream, &headers);
    out.extend(frame(DATA, END_STREAM, stream, &message));
    out
}

async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], id, payload))
}

fn setting(payload: &[u8], id: u16) -> Option<u32> {
    payload.chunks_exact(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == id)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    })
}

/// What the server did with a flood of streams.
#[derive(Debug, Default)]
struct Outcome {
    advertised_streams: Option<u32>,
    answered: std::collections::BTreeSet<u32>,
    /// Streams answered and not yet ended (by END_STREAM or RST_STREAM).
    open: std::collections::BTreeSet<u32>,
    /// The most streams open at once.
    most_open: usize,
    refused: usize,
    goaway: bool,
    closed: bool,
}

/// Opens `streams` Authorize calls on one connection that advertises a
/// zero stream window (no reply body can ever be sent) and never waits
/// for the server's stream limit; then reads until the server closes it.
async fn zero_window_flood(addr: SocketAddr, streams: u32) -> Outcome {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let mut hello = PREFACE.to_vec();
    let mut zero_window = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    zero_window.extend(0u32.to_be_bytes());
    hello.extend(frame(SETTINGS, 0, 0, &zero_window));
    conn.write_all(&hello).await.expect("preface");
    let mut outcome = Outcome::default();
    let (kind, _, _, payload) = read_frame(&mut conn).await.expect("server SETTINGS");
    assert_eq!(kind, SETTINGS);
    outcome.advertised_streams = setting(&payload, SETTINGS_MAX_CONCURRENT_STREAMS);
    conn.write_all(&frame(SETTINGS, ACK, 0, &[]))
        .await
        .expect("ack");
    let (mut reader, mut writer) = conn.into_split();
    let flood = tokio::spawn(async move {
        for batch in (0..streams).collect::<Vec<_>>().chunks(100) {
            let bytes: Vec<u8> = batch
                .iter()
                .flat_map(|n| authorize_call(2 * n + 1))
                .collect();
            if writer.write_all(&bytes).await.is_err() {
                return; // the server closed the connection
            }
        }
        // Keep the write side open, as the attacker does; the server's
        // idle timeout ends it.
        std::future::pending::<()>().await;
    });
    let read = async {
        while let Some((kind, flags, id, payload)) = read_frame(&mut reader).await {
            match kind {
                HEADERS if flags & END_STREAM != 0 => {
                    outcome.open.remove(&id);
                }
                HEADERS => {
                    outcome.answered.insert(id);
                    outcome.open.insert(id);
                    outcome.most_open = outcome.most_open.max(outcome.open.len());
                }
                // A stream the server ends (e.g. at the request deadline,
                // on a loaded machine) frees its place for another.
                RST_STREAM if outcome.open.remove(&id) => {}
                RST_STREAM => outcome.refused += 1,
                GOAWAY => outcome.goaway = true,
                _ => {}
            }
            let _ = payload;
        }
        outcome.closed = true;
    };
    tokio::time::timeout(EVENTUALLY, read)
        .await
        .expect("the server closes a connection that stays silent");
    flood.abort();
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_the_stream_limit_and_others_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_streams_per_connection = 16;
    config.idle_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(config).await;
    let (_, secret) = server.create_key("acme", &["mail.send"]).await;

    let attack = tokio::spawn(zero_window_flood(server.addr, 2_000));
    // A well-behaved client on its own connection meanwhile: every call
    // answered, and right.
    let mut client = server.authorizer().await;
    for _ in 0..200 {
        let reply = client
            .authorize(keyward::pb::v1::AuthorizeRequest {
                key: secret.clone(),
                method: "POST".into(),
                path: "/v3/mail/send".into(),
                client_ip: String::new(),
            })
            .await
            .expect("answered during the flood")
            .into_inner();
        assert!(reply.allowed, "{reply:?}");
    }
    let outcome = attack.await.expect("flood");
    assert_eq!(outcome.advertised_streams, Some(16), "{outcome:?}");
    assert!(
        outcome.most_open <= 16,
        "more streams than the limit were open at once: {outcome:?}"
    );
    assert!(
        outcome.refused > 0 || outcome.goaway,
        "streams past the limit are refused: {outcome:?}"
    );
    assert!(outcome.closed);
    // The slot is given back just after the socket closes.
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        let metrics = server.scrape().await;
        if metrics.contains("keyward_connections_open{listener=\"grpc\"} 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only the well-behaved client's connection is left:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_rest_listener_advertises_the_same_stream_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_streams_per_connection = 8;
    config.idle_timeout = Duration::from_millis(500);
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    let outcome = zero_window_flood(server.http_addr.expect("rest"), 200).await;
    assert_eq!(outcome.advertised_streams, Some(8), "{outcome:?}");
    assert!(outcome.most_open <= 8, "{outcome:?}");
}

#[test]
fn a_stream_limit_above_half_the_in_flight_budget_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_concurrent_requests = 100;
    config.max_streams_per_connection = 51;
    let error = keyward::server::App::open(&config).expect_err("refused");
    assert!(
        error.to_string().contains("--max-streams-per-connection"),
        "{error}"
    );
}

// --- connections per listener, idle connections ----------------------------------

/// Whether the server closes `conn` (EOF or reset) before `EVENTUALLY`.
async fn closed_by_server(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, read)
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn each_listener_caps_its_connections_and_frees_a_slot_when_one_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.max_connections = 4;
    let server = TestServer::start_with(config).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = TcpStream::connect(server.addr).await.expect("connect");
        conn.write_all(PREFACE).await.expect("preface");
        held.push(conn);
    }
    // The fifth is accepted and closed at once.
    let mut fifth = TcpStream::connect(server.addr).await.expect("connect");
    assert!(closed_by_server(&mut fifth).await, "over the cap");
    let metrics = server.scrape().await;
    assert!(
        metrics.contains("keyward_connections_refused_total{listener=\"grpc\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyward_connections_open{listener=\"grpc\"} 4"),
        "{metrics}"
    );
    // One ends: a real client gets its slot.
    held.pop();
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let channel = tonic::transport::Endpoint::from_shared(server.url())
            .expect("url")
            .connect()
            .await;
        if let Ok(channel) = channel {
            let health = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await;
            if health.is_ok() {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn silent_connections_and_partial_request_heads_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.idle_timeout = Duration::from_millis(300);
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = TestServer::start_with(config).await;
    let metrics_addr = server.metrics_addr.expect("metrics");
    let rest_addr = server.http_addr.expect("rest");
    for (listener, addr, opening) in [
        ("grpc", server.addr, &b""[..]),
        ("grpc", server.addr, PREFACE),
        (
            "rest",
            rest_addr,
            &b"POST /v3/api_keys HTTP/1.1\r\nhost: x\r\n"[..],
        ),
        ("metrics", metrics_addr, &b"GET /metr"[..]),
    ] {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(opening).await.expect("write");
        assert!(
            closed_by_server(&mut conn).await,
            "{listener}: a silent connection after {:?} is closed",
            String::from_utf8_lossy(opening)
        );
    }
}

// --- the descriptor limit --------------------------------------------------------

/// At the descriptor limit, accepting fails until a descriptor frees: the
/// listeners pause (counted) and log it once per interval instead of
/// spinning and flooding the log, and serve again once descriptors free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_accepts_pause_and_the_log_stays_quiet() {
    use std::process::Command;
    let Some(prlimit) = common::tool("KEYWARD_PRLIMIT", "prlimit", "apt-get install util-linux")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("serve.log");
    let mut under_limit = Command::new(prlimit);
    under_limit
        .arg("--nofile=128:128")
        .arg(env!("CARGO_BIN_EXE_keyward"));
    let (mut child, _) = common::spawn_serve_via(under_limit, dir.path(), &[], &[]);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + EVENTUALLY;
    while !log().contains("serving metrics") {
        assert!(std::time::Instant::now() < deadline, "no start:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grpc: SocketAddr = common::logged_address(&log(), "serving gRPC")
        .parse()
        .expect("addr");
    // Hold connections until the server runs out of descriptors, then keep
    // knocking for a while.
    // (Past the limit, connections wait in the kernel's backlog; once that
    // is full a connect is never answered, so each attempt is bounded.)
    let mut held = Vec::new();
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(grpc)).await {
            Ok(Ok(conn)) => held.push(conn),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warnings = log()
        .lines()
        .filter(|line| line.contains("accepting a connection failed"))
        .count();
    drop(held);
    let scraped = common::scrape_logged(&log_path).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        (1..=2).contains(&warnings),
        "one throttled warning, not a flood: {warnings}"
    );
    let errors: f64 = scraped
        .lines()
        .find(|l| l.starts_with("keyward_accept_errors_total{listener=\"grpc\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("accept errors counted:\n{scraped}"));
    // Pausing up to a second between attempts: a handful in two seconds
    // (a spinning loop counted hundreds of thousands).
    assert!((1.0..100.0).contains(&errors), "accept errors: {errors}");
}

// --- REST: authenticate before the body, bound it in size and time ---------------

fn sendgrid_error(response: &str, status: &str) -> serde_json::Value {
    assert!(
        response.starts_with(&format!("HTTP/1.1 {status}")),
        "{response}"
    );
    let body = response.split_once("\r\n\r\n").expect("a body").1;
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert!(json["errors"][0]["message"].is_string(), "{json}");
    json
}

#[tokio::test]
async fn rest_authenticates_before_reading_a_body_and_bounds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.request_timeout_ms = 500;
    config.store_timeout_ms = 400;
    let server = TestServer::start_with(config).await;
    let rest = server.http_addr.expect("rest");
    let post = |token: &str, length: u64| {
        format!(
            "POST /v3/api_keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\non-behalf-of: acme\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        )
    };
    // A bogus token with a body still to come: refused from the headers.
    let response = common::http_exchange(rest, &post("not-a-token", 60_000), b"{").await;
    sendgrid_error(&response, "401");
    // A declared length over the limit: refused before any of it is sent.
    let admin = server.admin.clone();
    let response = common::http_exchange(rest, &post(&admin, 1 << 30), b"").await;
    let json = sendgrid_error(&response, "413");
    assert_eq!(json["errors"][0]["field"], "body", "{json}");
    // An authenticated body that stalls: refused at the deadline.
    let response = common::http_exchange(rest, &post(&admin, 100), b"{\"name\":").await;
    sendgrid_error(&response, "408");
    // A method the route does not take: SendGrid's shape too.
    let response = common::http_exchange(
        rest,
        &format!("PATCH /v3/api_keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-length: 0\r\n\r\n"),
        b"",
    )
    .await;
    sendgrid_error(&response, "405");
    // Nothing was created by any of it.
    assert_eq!(server.count("acme").await, 0);
}
