//! What is served on each listener: the gRPC routers (decisions, health,
//! reflection, key management, the decision feed) behind their tower
//! layers, SendGrid's REST API, and metrics; their TLS settings; and the
//! future that runs them all until the stop signal.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::listeners::{GrpcListener, Listeners, local_addr};
use super::shutdown::Stop;
use super::{App, Limits, ServerError, io_error};
use crate::config::ServeConfig;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use pb::v1::authorizer_server::AuthorizerServer;
use pb::v1::key_manager_server::KeyManagerServer;

use crate::decisions::FrontDoor;
use crate::envoy::CheckService;
use crate::grpc::authorize::AuthorizeService;
use crate::grpc::caller::Authenticated;
use crate::grpc::feed::FeedService;
use crate::grpc::manage::ManageService;
use crate::listen::Incoming;
use crate::metrics::Source;
use crate::pb;

/// Every server the listeners ask for, as one future that ends when they
/// all have (after the stop signal, or when one fails).
pub(super) fn serve(
    app: &App,
    listeners: Listeners,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: &Stop,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>, ServerError> {
    let Listeners {
        grpc,
        manage,
        metrics,
        http,
        manage_enabled,
        echo_enabled,
    } = listeners;
    let manage = manage.map(|listener| app.bounded(listener, "manage"));
    let metrics = metrics.map(|listener| app.bounded(listener, "metrics"));
    let http = http.map(|listener| app.bounded(listener, "rest"));
    let (grpc, manage) = grpc_servers(
        app,
        grpc,
        manage,
        manage_enabled,
        echo_enabled,
        health,
        stop,
    )?;
    let metrics = metrics.map(|listener| {
        if let Ok(local) = listener.get_ref().local_addr() {
            tracing::info!(%local, "serving metrics at /metrics");
        }
        crate::metrics::serve(listener, Arc::clone(&app.metrics), stop.stopped())
    });
    let rest = http.map(|listener| rest_server(app, listener, stop));
    Ok(async {
        let (grpc, manage, rest, ()) =
            tokio::join!(grpc, optional(manage), optional(rest), async {
                if let Some(metrics) = metrics {
                    metrics.await;
                }
            });
        grpc.and(manage).and(rest)
    })
}

async fn optional(server: Option<Serving>) -> Result<(), tonic::transport::Error> {
    match server {
        Some(server) => server.await,
        None => Ok(()),
    }
}

/// The gRPC servers: decisions, health, reflection (and KeyManager, unless
/// it has its own listener or is disabled), and KeyManager's own server.
/// Each request has a deadline, and a global in-flight limit sheds excess
/// load with RESOURCE_EXHAUSTED at once rather than queueing it.
fn grpc_servers(
    app: &App,
    grpc: GrpcListener,
    manage_listener: Option<Incoming<TcpListener>>,
    manage_enabled: bool,
    echo_enabled: bool,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: &Stop,
) -> Result<(Serving, Option<Serving>), ServerError> {
    let limits = app.limits;
    let concurrency =
        tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_concurrent_requests);
    // Outermost, so shed requests are counted as sent.
    let count_rpcs = crate::grpc::rpc_counts::CountRpcsLayer::new(&app.metrics);
    let base_server = || -> Result<_, ServerError> {
        let mut builder = bounded_server(limits);
        if let Some(tls) = &app.tls {
            builder = builder.tls_config(tls.clone())?;
        }
        Ok(builder.timeout(limits.request_timeout).layer(
            tower::ServiceBuilder::new()
                .layer(count_rpcs.clone())
                .layer(crate::trace::TraceLayer)
                .load_shed()
                .layer(concurrency.clone())
                .into_inner(),
        ))
    };
    let (authorize, check) = decision_services(app);
    let manage = manage_enabled.then(|| manage_service(app));
    let mut router = base_server()?
        .add_service(health.clone())
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(authorize)
        .add_service(check);
    // The decision feed carries every key's decision fields: it is served
    // with key management (on `--manage-listen`, loopback in the shipped
    // manifests) when that has its own listener, never beside decisions on
    // a port the pod network reaches.
    let feed = feed_service(app, stop);
    if echo_enabled {
        router = router.add_service(pb::v1::diagnostics_server::DiagnosticsServer::new(
            crate::grpc::echo::EchoService,
        ));
    }
    if manage.is_none() {
        tracing::info!("KeyManager disabled");
    }
    let mut separate_manage: Option<Serving> = None;
    match (manage, manage_listener) {
        (manage, None) => {
            router = router.add_service(feed).add_optional_service(manage);
        }
        (manage, Some(listener)) => {
            tracing::info!(local = %local_addr(&listener)?, manage = manage.is_some(), "serving key management and the decision feed on their own listener");
            let manage_router = base_server()?
                .add_service(health)
                .add_service(feed)
                .add_optional_service(manage);
            separate_manage = Some(Box::pin(
                manage_router.serve_with_incoming_shutdown(listener, stop.stopped()),
            ));
        }
    }
    tracing::info!(local = %grpc.describe(), "serving gRPC");
    let grpc: Serving = match grpc {
        GrpcListener::Tcp(listener) => Box::pin(
            router.serve_with_incoming_shutdown(app.bounded(listener, "grpc"), stop.stopped()),
        ),
        GrpcListener::Unix(listener, _) => Box::pin(
            router.serve_with_incoming_shutdown(app.bounded(listener, "grpc"), stop.stopped()),
        ),
    };
    Ok((grpc, separate_manage))
}

/// The decision services, `Authorize` and Envoy's `Check`, each through
/// its own front door (counted under its own source).
fn decision_services(
    app: &App,
) -> (
    AuthorizerServer<AuthorizeService>,
    AuthorizationServer<CheckService>,
) {
    let front = |source| {
        FrontDoor::new(
            app.authorizer.clone(),
            Arc::clone(&app.catalog),
            Arc::clone(&app.metrics),
            Arc::clone(&app.guard),
            source,
        )
        .with_usage(app.usage.clone())
    };
    let max = app.limits.max_message_bytes;
    let authorize = AuthorizerServer::new(AuthorizeService::new(front(Source::Authorize)))
        .max_decoding_message_size(max);
    let check = AuthorizationServer::new(CheckService::new(
        front(Source::Check),
        app.xff_trusted_hops,
    ))
    .max_decoding_message_size(max);
    (authorize, check)
}

/// KeyManager, behind the layer that authenticates its callers.
fn manage_service(app: &App) -> Authenticated<KeyManagerServer<ManageService>> {
    let server = KeyManagerServer::new(ManageService::new(
        crate::manage::Manager::new(Arc::clone(&app.keys), app.access())
            .with_usage(app.usage.clone()),
        crate::keys::snapshot::Origin::new(&app.tables.catalog_source, &app.tables.catalog),
    ))
    .max_decoding_message_size(app.limits.max_message_bytes);
    tower::Layer::layer(
        &crate::grpc::caller::AuthenticateLayer::new(app.access()),
        server,
    )
}

/// Reflection over keyward's services and health.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The decision feed's service.
fn feed_service(
    app: &App,
    stop: &Stop,
) -> pb::v1::decision_feed_server::DecisionFeedServer<FeedService> {
    pb::v1::decision_feed_server::DecisionFeedServer::new(
        FeedService::new(
            Arc::clone(&app.index),
            app.feed.clone(),
            Arc::clone(&app.tables),
            app.access(),
            app.feed_reader,
            app.keys.replication(),
            stop.subscribe(),
            app.metrics.feed(),
        )
        .with_usage(app.usage.clone())
        .with_credits(Arc::clone(&app.credits)),
    )
    .max_decoding_message_size(app.limits.max_message_bytes)
}

/// SendGrid's REST API, on tonic's server too (HTTP/1.1 accepted). Not
/// behind the gRPC deadline and load shedding: they answer in gRPC's form,
/// which a REST client cannot read; its calls are bounded by
/// `--store-timeout-ms`. TLS is terminated by [`crate::tls`] (see there why).
fn rest_server(app: &App, listener: Incoming<TcpListener>, stop: &Stop) -> Serving {
    if let Ok(local) = listener.get_ref().local_addr() {
        tracing::info!(%local, tls = app.rest_tls.is_some(), console = app.console, "serving SendGrid's REST key API");
        if app.rest_tls.is_none() && !local.ip().is_loopback() {
            // Credentials (the admin token, API keys) cross this listener.
            tracing::warn!(%local, "the REST listener and console are plain HTTP on a non-loopback address: serve them with --tls-cert and --tls-key, or on loopback");
        }
    }
    let router = crate::rest::router(
        Arc::clone(&app.keys),
        app.access(),
        crate::rest::BodyLimits {
            max_bytes: app.limits.max_message_bytes,
            read_timeout: app.limits.request_timeout,
        },
        crate::rest::Surface {
            console: app.console,
            tls: app.rest_tls.is_some(),
            usage: app.usage.clone(),
            scanning: app.scanning.as_ref().map(|(file, action)| {
                tokio::spawn(Arc::clone(file).follow(crate::scanning::RELOAD_EVERY));
                tracing::info!(
                    path = crate::rest::scanning::PATH,
                    action = action.label(),
                    "serving GitHub's secret scanning reports"
                );
                Arc::new(crate::rest::scanning::Scanning {
                    file: Arc::clone(file),
                    action: *action,
                    metrics: Arc::clone(&app.metrics),
                })
            }),
        },
    );
    let server = bounded_server(app.limits)
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(router));
    match &app.rest_tls {
        Some(tls) => Box::pin(server.serve_with_incoming_shutdown(
            crate::tls::incoming(listener, Arc::clone(tls)),
            stop.stopped(),
        )),
        None => Box::pin(server.serve_with_incoming_shutdown(listener, stop.stopped())),
    }
}

/// A server with the HTTP/2 bounds every listener shares: a small stream
/// limit advertised to the peer (a client with a zero flow-control window
/// can leave at most this many replies unsent per connection), and as the
/// per-connection in-flight limit.
fn bounded_server(limits: Limits) -> Server {
    Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .concurrency_limit_per_connection(limits.max_streams_per_connection as usize)
}

/// A server running until its shutdown signal.
type Serving = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// TLS for the gRPC listeners (see [`load_tls`]) and, when the REST
/// listener is configured too, for it ([`crate::tls`]).
pub(super) type Tls = (Option<ServerTlsConfig>, Option<Arc<rustls::ServerConfig>>);

/// The TLS settings of both kinds of listener, if TLS is configured.
pub(super) fn load(config: &ServeConfig) -> Result<Tls, ServerError> {
    let tls = load_tls(config)?;
    let rest_tls = match (&config.tls_cert, &config.tls_key, config.http_listen) {
        (Some(cert), Some(key), Some(_)) => Some(crate::tls::server_config(
            cert,
            key,
            config.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    Ok((tls, rest_tls))
}

/// The TLS settings, if TLS is configured: server identity, and for mutual
/// TLS the CA that client certificates must chain to.
fn load_tls(config: &ServeConfig) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read_bytes = |path: &Path| std::fs::read(path).map_err(io_error(path));
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read_bytes(cert)?, read_bytes(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_bytes(ca)?));
    }
    tracing::info!(mutual = config.tls_client_ca.is_some(), "TLS enabled");
    Ok(Some(tls))
}
