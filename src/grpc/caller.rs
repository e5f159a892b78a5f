//! Who is calling KeyManager, authenticated once for every RPC as a tower
//! layer (as REST does it as middleware): `authorization: Bearer <admin
//! token | API key>` and the peer's address (a key's allowlist binds its
//! management calls). A caller without a valid credential is refused
//! UNAUTHENTICATED before its request is decoded; a handler finds the
//! caller among the request's extensions ([`caller`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Request, Status};

use crate::access::Authenticator;
use crate::keys::Principal;

/// Authenticates every request before the service sees it.
#[derive(Debug, Clone)]
pub struct AuthenticateLayer {
    access: Authenticator,
}

impl AuthenticateLayer {
    /// Authenticates with `access`.
    #[must_use]
    pub fn new(access: Authenticator) -> Self {
        Self { access }
    }
}

impl<S> tower::Layer<S> for AuthenticateLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The service [`AuthenticateLayer`] makes.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    access: Authenticator,
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone was not polled ready; the one that was serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = self.access.clone();
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.to_str().map_err(|_| ()));
            let client = crate::access::peer(request.extensions());
            match access.principal(header, client).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(refused) => Ok(Status::from(refused).into_http()),
            }
        })
    }
}

/// The caller [`Authenticated`] found. Without the layer, nobody: refused.
pub fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("authorization: missing bearer credential"))
}

/// Authenticates one request's caller (for a service that admits other
/// credentials first, as the decision feed does).
pub async fn authenticate<T>(
    access: &Authenticator,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|value| value.to_str().map_err(|_| ()));
    let client = request.remote_addr().map(|peer| peer.ip());
    Ok(access.principal(header, client).await?)
}
