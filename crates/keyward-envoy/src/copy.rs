//! The module's copy of the sidecar's key set, which Envoy's workers decide
//! from: read with one atomic load (no lock, no wait), replaced whole when
//! the feed is read again, changed key by key in between.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;

use arc_swap::ArcSwapOption;
use keyward_core::clock;
use keyward_core::decide::{AuthFailure, Decider, validate};
use keyward_core::domain::catalog::Catalog;
use keyward_core::domain::decision::DenyReason;
use keyward_core::domain::key::KeyId;
use keyward_core::domain::lease::Roster;
use keyward_core::reply::{self, Reply};

use crate::settings::Settings;

/// Uses waiting to be reported to the sidecar; more are dropped (counted):
/// `last_used_at` is kept to the minute, so a key loses at most a report.
pub const USES_BUFFER: usize = 65_536;

/// A synced copy: the tables it was made against and the live keys.
pub struct Copy {
    /// Decides from this copy's index and routes.
    pub decider: Decider,
    /// Names scopes in replies.
    pub catalog: Arc<Catalog>,
}

/// What the sync thread and the workers share.
pub struct Shared {
    /// The copy decisions read (`None` until the first sync).
    pub copy: ArcSwapOption<Copy>,
    /// When the sidecar was last heard from (Unix nanos; 0: never).
    pub heard: AtomicI64,
    /// Whether a feed stream is open and synced.
    pub live: AtomicBool,
    /// Uses to report.
    pub uses: SyncSender<(KeyId, i64)>,
    /// Uses dropped because the buffer was full.
    pub uses_dropped: AtomicU64,
    /// Decisions per key and minute, reported to the sidecar for the
    /// key's usage (verified keys only: a flood of made-up ids adds none).
    pub counts: keyward_core::counts::Counts,
    /// Rate limits are global: decisions spend leases the sidecar trades
    /// with its usage store ([`crate::trade`]).
    pub global: Arc<AtomicBool>,
    /// Where decisions enlist keys whose leases to trade.
    pub roster: Roster,
    /// Requests paused until their key's credit lease is topped up
    /// ([`crate::credits`]).
    pub waiters: SyncSender<crate::credits::Waiter>,
    /// Keys the sidecar had no credits to lend for, until when (Unix
    /// nanos): their requests are refused as exhausted meanwhile.
    pub dry: dashmap::DashMap<KeyId, i64>,
    /// Settings from Envoy's config.
    pub settings: Settings,
    /// Set when Envoy destroys the filter config: the sync thread ends.
    pub stop: AtomicBool,
}

/// What the filter does with a request.
pub enum Verdict {
    /// Pass it on, with these request headers set (client copies
    /// overwritten), `authorization` removed, and these response headers.
    Allow {
        /// Identity headers for the upstream.
        request: [(&'static str, String); 2],
        /// Rate-limit headers for the client.
        response: Vec<(&'static str, String)>,
    },
    /// Answer it here.
    Deny(Reply),
    /// The key's credit lease is empty: pause the request until a loan
    /// comes back, then decide it again.
    Await(KeyId),
}

impl Shared {
    /// The index decisions read now (`None` before the first sync).
    #[must_use]
    pub fn live_index(&self) -> Option<Arc<keyward_core::index::Index>> {
        self.copy
            .load()
            .as_ref()
            .map(|copy| Arc::clone(copy.decider.index()))
    }

    /// Decides a request as the sidecar would (the same core code): from
    /// its method, path (query included), `authorization` value and
    /// downstream address. A key whose credit lease is empty makes it
    /// wait for a loan when `may_wait` (else, unless the sidecar had none
    /// to lend, it is refused as unverifiable: 503, retry).
    pub fn verdict(
        &self,
        method: &str,
        path: &str,
        authorization: &str,
        client: Option<IpAddr>,
        may_wait: bool,
    ) -> Verdict {
        let copy = self.copy.load();
        let Some(copy) = copy.as_ref() else {
            return Verdict::Deny(reply::unavailable(
                "keyward has not synced this proxy's copy of the keys yet; retry later",
                "not_synced",
            ));
        };
        if let Some(limit) = self.settings.max_staleness() {
            let silent = clock::recent_now_nanos() - self.heard.load(Ordering::Relaxed);
            if silent > i64::try_from(limit.as_nanos()).unwrap_or(i64::MAX) {
                return Verdict::Deny(reply::unavailable(
                    "this proxy's copy of the keys is too old to decide from; retry later",
                    "stale_copy",
                ));
            }
        }
        let (method, path) = match validate(method, path) {
            Ok(valid) => valid,
            Err(invalid) => return Verdict::Deny(reply::invalid(&invalid.to_string())),
        };
        let (mut decision, new_minute) =
            copy.decider
                .decide_noting_use(authorization, client, method, path);
        if let (Some(DenyReason::CreditsExhausted), Some(id)) = (decision.deny, decision.key_id)
            && self
                .dry
                .get(&id)
                .is_none_or(|until| *until <= clock::recent_now_nanos())
        {
            if may_wait {
                return Verdict::Await(id);
            }
            decision = AuthFailure::new(DenyReason::KeyUnverifiable, Some(id)).decision();
        }
        self.counts
            .record(&decision, clock::recent_now_nanos() / 1_000_000_000);
        if !decision.allowed() {
            return Verdict::Deny(reply::denied(&decision, &copy.catalog));
        }
        if let (true, Some(id)) = (new_minute, decision.key_id) {
            // Never blocks: a full buffer drops the report.
            if self.uses.try_send((id, clock::recent_now_nanos())).is_err() {
                self.uses_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Verdict::Allow {
            request: reply::identity_headers(&decision),
            response: reply::rate_limit_headers(&decision),
        }
    }
}
