//! TLS for the REST listener. tonic's own TLS offers only `h2` by ALPN, and
//! HTTP/1.1 clients (SendGrid's, curl's) that offer `http/1.1` are refused at
//! the handshake; so the REST listener terminates TLS here, from the same
//! `--tls-cert`, `--tls-key` and `--tls-client-ca` as the gRPC listeners.
//! Handshakes run concurrently, each bounded in time, so a client that
//! stalls its handshake holds up no one else.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const READY_BACKLOG: usize = 64;

/// Why the REST listener's TLS settings are unusable.
#[derive(Debug, thiserror::Error)]
#[error("TLS for --http-listen: {0}")]
pub struct TlsError(String);

/// The server settings: identity from PEM files, client certificates
/// required when `client_ca` is given, ALPN `h2` and `http/1.1`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.display().to_string();
        move |e: rustls::pki_types::pem::Error| TlsError(format!("{path}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(pem_error(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(pem_error(ca))? {
                roots
                    .add(cert.map_err(pem_error(ca))?)
                    .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections from `listener`, each after a completed handshake. Failed or
/// stalled handshakes are dropped (and logged at debug level).
pub fn incoming(
    mut listener: crate::listen::Incoming<tokio::net::TcpListener>,
    config: Arc<rustls::ServerConfig>,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<crate::listen::Conn<TcpStream>>>> {
    let acceptor = TlsAcceptor::from(config);
    let (ready, handshaken) = tokio::sync::mpsc::channel(READY_BACKLOG);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = ready.closed() => return,
                accepted = listener.next() => match accepted {
                    Some(Ok(stream)) => stream,
                    // The listener pauses and logs failed accepts itself.
                    Some(Err(_)) => continue,
                    None => return,
                },
            };
            let (acceptor, ready) = (acceptor.clone(), ready.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(tls).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "REST TLS handshake failed"),
                    Err(_) => tracing::debug!("REST TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(handshaken).map(Ok)
}

/// When the (first) certificate in the PEM file `cert` stops being valid,
/// as Unix seconds; `None` if the file holds no certificate x509-parser
/// can read (rustls, which loaded it, is the judge of whether it serves).
#[must_use]
pub fn not_after(cert: &Path) -> Option<i64> {
    let first = CertificateDer::pem_file_iter(cert).ok()?.next()?.ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}
