//! Health (`grpc.health.v1`) and `keyward_serving`: every service
//! SERVING at start, then kept current from the store's health and the
//! replica's sync (see [`follow_store_health`]); shutdown turns it all
//! NOT_SERVING ([`super::shutdown`]).

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;

use crate::envoy::CheckService;
use crate::grpc::authorize::AuthorizeService;
use crate::grpc::manage::ManageService;
use crate::keys::StoreHealth;
use crate::metrics::Metrics;
use crate::pb;

/// Health for every service, SERVING to start with (and so in
/// `keyward_serving`).
pub(super) async fn health_service(
    manage_enabled: bool,
    metrics: &Metrics,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    use envoy_types::ext_authz::v3::pb::AuthorizationServer;
    use pb::v1::authorizer_server::AuthorizerServer;
    use pb::v1::key_manager_server::KeyManagerServer;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<AuthorizerServer<AuthorizeService>>()
        .await;
    reporter
        .set_serving::<AuthorizationServer<CheckService>>()
        .await;
    if manage_enabled {
        reporter
            .set_serving::<KeyManagerServer<ManageService>>()
            .await;
    }
    for service in SERVICES {
        if manage_enabled || service != MANAGE_SERVICE {
            metrics.set_serving(service, true);
        }
    }
    (reporter, health)
}

/// KeyManager's health service name.
pub(super) const MANAGE_SERVICE: &str = "keyward.v1.KeyManager";

/// Every name health answers for (`""`: the server as a whole).
pub(super) const SERVICES: [&str; 4] = [
    "",
    "keyward.v1.Authorizer",
    MANAGE_SERVICE,
    "envoy.service.auth.v3.Authorization",
];

/// Keeps health current: KeyManager NOT_SERVING while the store is
/// failing (and, replicated, while etcd is unreachable: writes would be
/// refused); Authorizer and Check NOT_SERVING only in replicated mode, until
/// the replica's first full read, and once it is staler than
/// `max_staleness` (when set). Runs until the store closes or the server
/// ends (which aborts it, so it cannot undo the shutdown's NOT_SERVING).
pub(super) async fn follow_store_health(
    mut health: tokio::sync::watch::Receiver<StoreHealth>,
    mut replication: Option<tokio::sync::watch::Receiver<crate::keys::Replication>>,
    max_staleness: Duration,
    reporter: tonic_health::server::HealthReporter,
    manage_enabled: bool,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut shown = None;
    loop {
        let store_ok = *health.borrow_and_update() == StoreHealth::Healthy;
        let (writes, decisions) = match &mut replication {
            None => (store_ok, true),
            Some(replication) => {
                let state = *replication.borrow_and_update();
                let age = crate::clock::now_nanos().saturating_sub(state.synced_at);
                let fresh = max_staleness.is_zero()
                    || (state.synced_at != 0
                        && u128::try_from(age).unwrap_or(0) <= max_staleness.as_nanos());
                (store_ok && state.connected, state.ready && fresh)
            }
        };
        if shown != Some((writes, decisions)) {
            if shown.is_some_and(|(_, was)| was != decisions) || !decisions {
                tracing::warn!(
                    serving = decisions,
                    "decisions health changes (replica not yet synced, or staler than --max-staleness)"
                );
            }
            let status = |ok: bool| {
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            if manage_enabled {
                reporter
                    .set_service_status(MANAGE_SERVICE, status(writes))
                    .await;
                metrics.set_serving(MANAGE_SERVICE, writes);
            }
            for service in [
                "keyward.v1.Authorizer",
                "envoy.service.auth.v3.Authorization",
            ] {
                reporter
                    .set_service_status(service, status(decisions))
                    .await;
                metrics.set_serving(service, decisions);
            }
            shown = Some((writes, decisions));
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            () = replica_changed(&mut replication) => {}
            _ = ticks.tick() => {}
        }
    }
}

/// Resolves when the replica's state changes; never without replication.
async fn replica_changed(
    replication: &mut Option<tokio::sync::watch::Receiver<crate::keys::Replication>>,
) {
    if let Some(receiver) = replication
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// Keeps [`crate::usage::HEALTH_SERVICE`] current from the usage store's
/// state (see there; NOT_SERVING too once the plane's task has ended);
/// stopped by shutdown, which reports it NOT_SERVING.
pub(super) async fn follow_usage_store(
    mut up: tokio::sync::watch::Receiver<Option<bool>>,
    reporter: tonic_health::server::HealthReporter,
) {
    loop {
        let status = match *up.borrow_and_update() {
            Some(true) => Some(ServingStatus::Serving),
            Some(false) => Some(ServingStatus::NotServing),
            None => None,
        };
        if let Some(status) = status {
            reporter
                .set_service_status(crate::usage::HEALTH_SERVICE, status)
                .await;
        }
        if up.changed().await.is_err() {
            return;
        }
    }
}
