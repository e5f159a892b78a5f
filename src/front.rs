//! The front door both decision services share (keyward's `Authorize` and
//! Envoy's `Check`): one decision path, its metrics and the brute-force
//! guard, so the two cannot drift apart.

use std::sync::Arc;
use std::time::Instant;

use crate::authorizer::Authorizer;
use crate::domain::catalog::Catalog;
use crate::domain::decision::Decision;
use crate::domain::route::Method;
use crate::guard::FailureGuard;
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Metrics, Source};

/// Decides, counts and throttles, on behalf of one front door.
#[derive(Debug, Clone)]
pub struct FrontDoor {
    authorizer: Authorizer,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    guard: Arc<FailureGuard>,
    source: Source,
    method: &'static str,
    /// Resolved once: almost every reply is OK (a deny is a normal reply).
    ok_rpcs: Counter,
}

impl FrontDoor {
    /// A front door labelled `source` in the decision metrics and
    /// `method` in the RPC metrics.
    #[must_use]
    pub fn new(
        authorizer: Authorizer,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        guard: Arc<FailureGuard>,
        source: Source,
        method: &'static str,
    ) -> Self {
        let ok_rpcs = metrics.rpc_counter(method, tonic::Code::Ok);
        Self {
            authorizer,
            catalog,
            metrics,
            guard,
            source,
            method,
            ok_rpcs,
        }
    }

    /// Decides one request, records it, and serves the brute-force penalty
    /// (a wrong secret for an over-limit key id) before returning.
    pub async fn decide(&self, credential: &str, method: Option<Method>, path: &str) -> Decision {
        let started = Instant::now();
        let decision = self.authorizer.decide(credential, method, path);
        self.metrics
            .decision(self.source, &decision, started.elapsed());
        self.guard
            .throttle(decision.wrong_secret, decision.key_id)
            .await;
        decision
    }

    /// The catalog, to name scopes in replies.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Counts one RPC by its final code.
    pub fn count_rpc(&self, code: tonic::Code) {
        if code == tonic::Code::Ok {
            self.ok_rpcs.inc();
        } else {
            self.metrics.rpc(self.method, code);
        }
    }
}
