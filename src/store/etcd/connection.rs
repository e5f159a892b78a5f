//! Reaching etcd: the endpoints, TLS, and the token etcd issues for the
//! configured user, sent with every call by an interceptor.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Etcd, EtcdError, REPLY_LIMIT_BYTES};
use crate::pb::etcd::AuthenticateRequest;
use crate::pb::etcd::auth_client::AuthClient;
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::etcd::watch_client::WatchClient;

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections: a member that vanished (killed, or
/// cut off) is noticed in seconds, and the watch moves to another.
const KEEPALIVE: Duration = Duration::from_secs(2);

/// How to reach etcd: endpoints, and optionally TLS and a user.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Client URLs (`http://…` or `https://…`).
    pub endpoints: Vec<String>,
    /// The key prefix keyward's data lives under.
    pub prefix: String,
    /// PEM CA bundle that signs etcd's server certificates (required for
    /// `https://` endpoints).
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key, for etcd's client-certificate auth.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user and password, for etcd's own authentication.
    pub credentials: Option<(String, String)>,
    /// Keys per page of a full read (0:
    /// [`DEFAULT_PAGE_KEYS`](super::DEFAULT_PAGE_KEYS)).
    pub page_keys: u32,
}

/// The token etcd issued for the configured user, sent with every call.
#[derive(Debug, Clone, Default)]
pub struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the token.
pub(super) type Authed = InterceptedService<Channel, Token>;

impl Etcd {
    /// Connects lazily to plain-text `endpoints` (requests are spread over
    /// them, and move on from one that fails).
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self, EtcdError> {
        Self::open(&Connection {
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_owned(),
            ..Connection::default()
        })
    }

    /// Connects lazily as `connection` says. Must run inside a tokio
    /// runtime (the connection's balancer is a task on it).
    pub fn open(connection: &Connection) -> Result<Self, EtcdError> {
        let tls = match (&connection.ca, &connection.identity) {
            (None, None) => None,
            (ca, identity) => {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = ca {
                    tls = tls.ca_certificate(Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some(tls)
            }
        };
        let endpoints = connection
            .endpoints
            .iter()
            .map(|url| {
                let https = url.starts_with("https://");
                if https != tls.is_some() {
                    return Err(EtcdError::Endpoint(format!(
                        "{url}: https:// endpoints need --etcd-ca-file, and the TLS flags need https:// endpoints"
                    )));
                }
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|_| EtcdError::Endpoint(url.clone()))?
                    .connect_timeout(CALL_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE)
                    .keep_alive_timeout(KEEPALIVE)
                    .keep_alive_while_idle(true);
                match &tls {
                    Some(tls) => endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| EtcdError::Endpoint(format!("{url}: {e}"))),
                    None => Ok(endpoint),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoint("no endpoints given".into()));
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let token = Token::default();
        Ok(Self {
            kv: KvClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(REPLY_LIMIT_BYTES),
            watch: WatchClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(REPLY_LIMIT_BYTES),
            auth: AuthClient::new(channel),
            token,
            credentials: connection.credentials.clone(),
            prefix: connection.prefix.clone(),
        })
    }

    /// With a user configured: asks etcd for a fresh token (at start, and
    /// again whenever etcd says the token is no longer valid).
    pub async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = &self.credentials else {
            return Ok(());
        };
        let reply = self
            .auth
            .clone()
            .authenticate(AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            })
            .await?
            .into_inner();
        let token = MetadataValue::try_from(reply.token)
            .map_err(|_| EtcdError::Unexpected("etcd issued a token that is not a header value"))?;
        *self.token.0.write().unwrap_or_else(PoisonError::into_inner) = Some(token);
        Ok(())
    }

    /// Whether `error` means the etcd token must be renewed (then renews
    /// it, so the caller's retry can succeed).
    pub async fn renew_if_expired(&self, error: &EtcdError) -> bool {
        let EtcdError::Rpc(status) = error else {
            return false;
        };
        let expired = self.credentials.is_some()
            && (status.code() == tonic::Code::Unauthenticated
                || status.message().contains("invalid auth token"));
        expired && self.authenticate().await.is_ok()
    }
}
