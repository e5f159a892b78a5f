//! Shutdown: on the signal, every service NOT_SERVING for the grace
//! period, then one stop signal to every listener, then a bounded drain of
//! in-flight requests.

use std::future::Future;
use std::time::Duration;

use tonic_health::ServingStatus;

use super::health::SERVICES;
use crate::metrics::Metrics;

/// One stop signal that fans out to every listener.
pub(super) struct Stop {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Stop {
    pub(super) fn new() -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Resolves once the listeners are to close.
    pub(super) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// The signal itself, for a service that must see it (the decision
    /// feed's streams end on it).
    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// On `shutdown`: every service NOT_SERVING at once (and the store-health
/// and usage-store followers stopped, so they cannot undo that), requests still served for
/// `grace` (Kubernetes and Envoy stop sending), then the stop signal.
/// Returns early if the servers end on their own.
pub(super) async fn coordinate(
    shutdown: impl Future<Output = ()> + Send,
    mut ended: tokio::sync::watch::Receiver<bool>,
    (reporter, store_health, usage_health): (
        tonic_health::server::HealthReporter,
        tokio::task::AbortHandle,
        Option<tokio::task::AbortHandle>,
    ),
    metrics: &Metrics,
    grace: Duration,
    stop: &Stop,
) {
    tokio::select! {
        () = shutdown => {},
        _ = ended.wait_for(|ended| *ended) => return,
    }
    store_health.abort();
    if let Some(usage_health) = usage_health {
        usage_health.abort();
        reporter
            .set_service_status(crate::usage::HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
    }
    tracing::info!(
        grace_ms = grace.as_millis(),
        "shutdown: reporting NOT_SERVING, then draining"
    );
    for service in SERVICES {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
        metrics.set_serving(service, false);
    }
    tokio::time::sleep(grace).await;
    let _ = stop.tx.send(true);
}

/// In-flight requests get `timeout` after the listeners close; a client
/// that never lets its connection go must not hold shutdown hostage (every
/// acknowledged write is already on disk).
pub(super) async fn drain(
    servers: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop: &Stop,
    timeout: Duration,
) -> Result<(), tonic::transport::Error> {
    let deadline = async {
        stop.stopped().await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        served = servers => served,
        () = deadline => {
            tracing::warn!(timeout_ms = timeout.as_millis(), "drain timed out; closing remaining connections");
            Ok(())
        }
    }
}
