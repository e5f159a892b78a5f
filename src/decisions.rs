//! The front door both decision services share (keyward's `Authorize` and
//! Envoy's `Check`): one decision path, its metrics and guessing detection,
//! so the two cannot drift apart.

use std::sync::Arc;
use std::time::Instant;

use crate::authorizer::Authorizer;
use crate::domain::catalog::Catalog;
use crate::domain::decision::{Decision, DenyReason};
use crate::domain::route::Method;
use crate::guessing::{Failure, FailureGuard};

use crate::metrics::{Metrics, Source};

/// One decision in this many, per thread, is timed for
/// `keyward_decision_duration_seconds`.
const DURATION_SAMPLE_EVERY: u32 = 64;

/// Whether to time this decision: a per-thread countdown, so sampling
/// touches no shared state.
fn sample_this_decision() -> bool {
    thread_local! {
        static COUNTDOWN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    COUNTDOWN.with(|countdown| {
        let left = countdown.get();
        countdown.set(if left == 0 {
            DURATION_SAMPLE_EVERY - 1
        } else {
            left - 1
        });
        left == 0
    })
}

pub use keyward_core::decide::{InvalidRequest, MAX_PATH_BYTES};

/// Decides and records, on behalf of one front door.
#[derive(Debug, Clone)]
pub struct FrontDoor {
    authorizer: Authorizer,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    guard: Arc<FailureGuard>,
    source: Source,
    usage: Option<Arc<crate::usage::UsagePlane>>,
}

impl FrontDoor {
    /// A front door labelled `source` in the decision metrics.
    #[must_use]
    pub fn new(
        authorizer: Authorizer,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        guard: Arc<FailureGuard>,
        source: Source,
    ) -> Self {
        Self {
            authorizer,
            catalog,
            metrics,
            guard,
            source,
            usage: None,
        }
    }

    /// The same, each decision also counted in the usage plane.
    #[must_use]
    pub fn with_usage(mut self, usage: Option<Arc<crate::usage::UsagePlane>>) -> Self {
        self.usage = usage;
        self
    }

    /// Checks what both front doors take from a request (see
    /// [`keyward_core::decide::validate`]).
    pub fn validate<'a>(
        method: &str,
        path: &'a str,
    ) -> Result<(Option<Method>, &'a str), InvalidRequest> {
        keyward_core::decide::validate(method, path)
    }

    /// Decides one request and records it (a key id whose secret did not
    /// verify also feeds guessing detection, whether or not the id is live;
    /// the reply is never delayed). On
    /// an on-demand replica, a key it does not hold is fetched first.
    pub async fn decide(
        &self,
        credential: &str,
        client: Option<std::net::IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let decision = if sample_this_decision() {
            let started = Instant::now();
            let decision = self
                .authorizer
                .decide_fetching(credential, client, method, path)
                .await;
            self.metrics.decision_duration(started.elapsed());
            decision
        } else {
            self.authorizer
                .decide_fetching(credential, client, method, path)
                .await
        };
        self.metrics.decision(self.source, &decision);
        if let Some(usage) = &self.usage {
            usage.record(&decision);
        }
        // Every well-formed key that did not verify counts, live id or not:
        // counting only live ids would make the guard's metric an oracle.
        if let (Some(DenyReason::UnknownKey), Some(id)) = (decision.deny, decision.key_id) {
            self.guard.record(Failure::Unverified {
                id,
                live: decision.wrong_secret,
            });
        }
        decision
    }

    /// The catalog, to name scopes in replies.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}
