//! The web console: SendGrid's API Keys page (sign in, list, create, edit,
//! delete, and keyward's lifecycle actions), served at `/` on the REST
//! listener. Plain HTML, CSS and JavaScript embedded in the binary: no
//! build step, no framework, no request to any other origin. It calls
//! only the public REST API ([`crate::rest`]), so every rule, the audit
//! log and the error rates are those of any client. The security headers
//! (CSP without inline script or style, no-store, nosniff, no referrer,
//! no framing) are set on every response of the listener by
//! [`crate::rest::router`].

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
const ICON: &str = include_str!("favicon.svg");

/// The console's files, each with its type.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { ([(CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }),
        )
        .route(
            "/console/app.js",
            get(|| async { ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }),
        )
        .route(
            "/console/app.css",
            get(|| async { ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route(
            "/console/favicon.svg",
            get(|| async { ([(CONTENT_TYPE, "image/svg+xml")], ICON) }),
        )
}
