//! Every listener keyward serves sets TCP_NODELAY and keepalive on the
//! connections it accepts (Nagle's algorithm cost one gRPC channel ~4/5 of
//! its throughput), checked on sockets accepted by the real `Listeners`;
//! and the Unix domain socket listener.

mod common;

use std::net::SocketAddr;

use keyward::config::ServeConfig;
use keyward::listen::{Bounds, Counters, Incoming};
use keyward::server::Listeners;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

/// Accepts one connection as the server does (through [`Incoming`]).
async fn assert_accepts_with_nodelay(name: &'static str, listener: TcpListener) {
    let addr = listener.local_addr().expect("addr");
    let bounds = Bounds {
        max_connections: 1,
        idle_timeout: std::time::Duration::from_secs(60),
    };
    let mut listener = Incoming::new(listener, name, bounds, Counters::default());
    let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let conn = listener
        .next()
        .await
        .expect("a connection")
        .expect("accepted");
    let accepted = conn.get_ref();
    assert_eq!(accepted.peer_addr().ok(), client.local_addr().ok());
    assert!(
        accepted.nodelay().expect("TCP_NODELAY readable"),
        "{name}: accepted socket lacks TCP_NODELAY"
    );
    assert!(
        socket2::SockRef::from(accepted)
            .keepalive()
            .expect("SO_KEEPALIVE readable"),
        "{name}: accepted socket lacks keepalive"
    );
}

#[tokio::test]
async fn every_listener_accepts_with_nodelay_and_keepalive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.manage_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let listeners = Listeners::bind(&config).await.expect("bind");
    let keyward::server::GrpcListener::Tcp(grpc) = listeners.grpc else {
        panic!("TCP by default");
    };
    assert_accepts_with_nodelay("gRPC", grpc).await;
    assert_accepts_with_nodelay("KeyManager", listeners.manage.expect("manage")).await;
    assert_accepts_with_nodelay("metrics", listeners.metrics.expect("metrics")).await;
    assert_accepts_with_nodelay("REST", listeners.http.expect("REST")).await;
}

/// `--listen unix:///path`: the real server on a Unix domain socket (as
/// Envoy reaches it through a volume shared in the pod); a stale socket
/// file from an earlier run is replaced, and the socket is removed at exit.
#[cfg(unix)]
#[tokio::test]
async fn serves_on_a_unix_domain_socket() {
    use keyward::config::ListenAddr;
    use keyward::pb::v1 as pb;
    use keyward::server::{self, App};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("keyward.sock");
    // A stale socket left by a killed process.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.listen = format!("unix://{}", socket.display())
        .parse()
        .expect("a unix listen address");
    assert_eq!(config.listen, ListenAddr::Unix(socket.clone()));
    config.manage_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let app = App::open(&config).expect("opens");
    let listeners = Listeners::bind(&config)
        .await
        .expect("binds over the stale socket");
    let manage = listeners
        .manage
        .as_ref()
        .expect("manage")
        .local_addr()
        .expect("addr");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listeners, app, async {
        let _ = stopped.await;
    }));

    let admin = std::fs::read_to_string(config.data.admin_token_path()).expect("token");
    let manage = common::connect(&format!("http://{manage}")).await;
    let secret = keyward::pb::v1::key_manager_client::KeyManagerClient::new(manage)
        .create_key(common::bearer(
            admin.trim(),
            pb::CreateKeyRequest {
                name: "uds".into(),
                scopes: vec!["mail.send".into()],
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create")
        .into_inner()
        .secret;
    let channel = common::connect(&format!("unix://{}", socket.display())).await;
    let reply = keyward::pb::v1::authorizer_client::AuthorizerClient::new(channel)
        .authorize(pb::AuthorizeRequest {
            key: secret,
            method: "POST".into(),
            path: "/v3/mail/send".into(),
            client_ip: String::new(),
        })
        .await
        .expect("authorize over the Unix socket")
        .into_inner();
    assert!(reply.allowed);

    let _ = stop.send(());
    task.await.expect("task").expect("clean stop");
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn listen_addresses_parse_or_say_what_is_wrong() {
    use keyward::config::ListenAddr;
    assert!(matches!("127.0.0.1:50051".parse(), Ok(ListenAddr::Tcp(_))));
    assert!(matches!("[::1]:50051".parse(), Ok(ListenAddr::Tcp(_))));
    assert!(matches!(
        "unix:///run/k.sock".parse(),
        Ok(ListenAddr::Unix(_))
    ));
    assert!(matches!(
        "unix:/run/k.sock".parse(),
        Ok(ListenAddr::Unix(_))
    ));
    for bad in ["unix://relative.sock", "localhost", "50051", ""] {
        let error = bad.parse::<ListenAddr>().expect_err(bad);
        assert!(error.contains(bad), "{error}");
    }
}
