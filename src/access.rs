//! Who is calling key management, through gRPC (KeyManager) or REST:
//! `Authorization: Bearer <admin token | API key>`, checked the same way for
//! both front doors.

use std::sync::Arc;

use crate::authorizer::{Authorizer, bearer_credential};
use crate::domain::decision::DenyReason;
use crate::domain::key::SecretHash;
use crate::guessing::{Failure, FailureGuard};
use crate::keys::Principal;

/// Why a management caller was not authenticated. The message never
/// echoes the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub &'static str);

/// Authenticates management callers.
#[derive(Debug, Clone)]
pub struct Authenticator {
    authorizer: Authorizer,
    admin: SecretHash,
    guard: Arc<FailureGuard>,
}

impl Authenticator {
    /// Checks credentials against the live keys and the hash of the
    /// operator's admin token; failures feed guessing detection.
    #[must_use]
    pub fn new(authorizer: Authorizer, admin: SecretHash, guard: Arc<FailureGuard>) -> Self {
        Self {
            authorizer,
            admin,
            guard,
        }
    }

    /// Whether a free-text value is, or holds as a word, the admin token
    /// (whatever its shape: an operator may bring their own). Credentials
    /// keyward generates are refused by shape already
    /// ([`crate::domain::key::looks_like_secret`]).
    #[must_use]
    pub fn holds_admin_token(&self, value: &str) -> bool {
        let is_admin =
            |text: &str| !text.is_empty() && SecretHash::of(text.as_bytes()).matches(&self.admin);
        is_admin(value) || value.split_whitespace().any(is_admin)
    }

    /// The caller behind an `Authorization` header value (`None`: absent;
    /// `Err` inside: not ASCII), calling from `client`: a key's allowlist
    /// binds its management calls as it binds its decisions.
    pub async fn principal(
        &self,
        header: Option<Result<&str, ()>>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Principal, Unauthenticated> {
        let header = header
            .ok_or(Unauthenticated("missing bearer credential"))?
            .map_err(|()| Unauthenticated("credential is not ASCII"))?;
        let credential = bearer_credential(header);
        if credential.is_empty() {
            return Err(Unauthenticated("missing bearer credential"));
        }
        // Both sides hashed to 32 bytes, so the comparison is constant-time
        // whatever the credential's length.
        if SecretHash::of(credential.as_bytes()).matches(&self.admin) {
            return Ok(Principal::Admin);
        }
        match self
            .authorizer
            .authenticate_fetching(credential, client)
            .await
        {
            Ok(verified) => Ok(Principal::Key {
                id: verified.id,
                account: verified.account,
                scopes: verified.scopes,
            }),
            Err(failure) if failure.reason == DenyReason::IpNotAllowed => Err(Unauthenticated(
                "this API key may not be used from this address (its allowlist)",
            )),
            Err(failure) if failure.reason == DenyReason::KeyUnverifiable => Err(Unauthenticated(
                "this API key cannot be verified right now; retry later",
            )),
            Err(failure) if failure.superseded => Err(Unauthenticated(
                "this secret was replaced by a rotation: until the overlap ends it still \
                 authorizes requests, but it cannot manage keys; use the new secret",
            )),
            Err(failure) => {
                match (failure.key_id, failure.reason) {
                    // Live id or not, counted alike (see `crate::guessing`).
                    (Some(id), DenyReason::UnknownKey) => self.guard.record(Failure::Unverified {
                        id,
                        live: failure.wrong_secret,
                    }),
                    // Not an API key at all: an admin token attempt.
                    (_, DenyReason::MalformedKey) => self.guard.record(Failure::AdminToken),
                    _ => {}
                }
                Err(Unauthenticated("invalid, expired or revoked credential"))
            }
        }
    }
}

/// The peer's address, as the listener recorded it (plain or TLS).
pub fn peer(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip())
}
