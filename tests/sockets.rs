//! Every listener keyward serves sets TCP_NODELAY and keepalive on the
//! connections it accepts (Nagle's algorithm cost one gRPC channel ~4/5 of
//! its throughput), checked on sockets accepted by the real `Listeners`.

use std::net::SocketAddr;

use keyward::config::ServeConfig;
use keyward::server::Listeners;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;

async fn assert_accepts_with_nodelay(name: &str, listener: &mut TcpIncoming) {
    let addr = listener.local_addr().expect("addr");
    let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let accepted = listener
        .next()
        .await
        .expect("a connection")
        .expect("accepted");
    assert_eq!(accepted.peer_addr().ok(), client.local_addr().ok());
    assert!(
        accepted.nodelay().expect("TCP_NODELAY readable"),
        "{name}: accepted socket lacks TCP_NODELAY"
    );
    assert!(
        socket2::SockRef::from(&accepted)
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
    let mut listeners = Listeners::bind(&config).await.expect("bind");
    assert_accepts_with_nodelay("gRPC", &mut listeners.grpc).await;
    assert_accepts_with_nodelay("KeyManager", listeners.manage.as_mut().expect("manage")).await;
    assert_accepts_with_nodelay("metrics", listeners.metrics.as_mut().expect("metrics")).await;
}
