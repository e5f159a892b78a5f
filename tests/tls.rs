//! TLS and mutual TLS on the gRPC listener, with certificates made here.

mod common;

use common::TestServer;
use common::pki::pki;
use keyward::config::ServeConfig;
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn tls_channel(
    server: &TestServer,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await
}

async fn authorize(channel: Channel) -> Result<pb::AuthorizeResponse, tonic::Status> {
    AuthorizerClient::new(channel)
        .authorize(pb::AuthorizeRequest {
            key: String::new(),
            method: "GET".into(),
            path: "/v3/scopes".into(),
            client_ip: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.tls_cert = Some(write("server.pem", &pki.server.0));
    config.tls_key = Some(write("server.key", &pki.server.1));
    config.tls_client_ca = Some(write("ca.pem", &pki.ca));
    let server = TestServer::start_with(config).await;

    let trusted = tls_channel(&server, &pki.ca, Some(&pki.client))
        .await
        .expect("handshake");
    let reply = authorize(trusted).await.expect("served over mTLS");
    assert_eq!(reply.http_status, 401, "a real decision came back");
    // The served certificate's notAfter is exported, for expiry alerts.
    let metrics = server.scrape().await;
    let expiry: i64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("keyward_tls_certificate_expiry_timestamp_seconds{file=\"")
                .filter(|rest| rest.contains("server.pem\"}"))
                .and_then(|rest| rest.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no certificate expiry in\n{metrics}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(u64::try_from(expiry).expect("positive") > now, "{expiry}");

    for identity in [None, Some(&pki.stranger)] {
        let refused = match tls_channel(&server, &pki.ca, identity).await {
            Err(_) => true,
            Ok(channel) => authorize(channel).await.is_err(),
        };
        assert!(refused, "a client without a trusted certificate is refused");
    }
    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => authorize(channel).await.is_err(),
    };
    assert!(refused, "plaintext is refused on a TLS listener");
}

#[tokio::test]
async fn server_only_tls_serves_any_client_that_trusts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, &pki.server.0).expect("write");
    std::fs::write(&key, &pki.server.1).expect("write");
    let mut config = ServeConfig::with_data_dir(dir.path().join("data"));
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    let server = TestServer::start_with(config).await;
    let channel = tls_channel(&server, &pki.ca, None)
        .await
        .expect("handshake");
    assert_eq!(authorize(channel).await.expect("served").http_status, 401);
}
