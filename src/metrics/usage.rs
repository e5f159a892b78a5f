//! The usage plane's metrics (`keyward_usage_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::registered;

/// What an operator watches of the usage store.
#[derive(Debug, Clone, Default)]
pub struct UsageMetrics {
    /// 1 while the store answers (rate limits global), 0 while it is away.
    pub up: Gauge,
    /// Failed rounds with the store.
    pub errors: Counter,
    /// Leases traded.
    pub trades: Counter,
    /// Decisions whose counts were dropped (held an hour unwritten).
    pub dropped: Counter,
    /// Keys whose leases are traded.
    pub leased_keys: Gauge,
    /// Credit reservations this sidecar made (one store write each).
    pub credit_reservations: Counter,
    /// Decisions that waited for a credit reservation.
    pub credit_waits: Counter,
    /// Keys this sidecar holds a credit lease on.
    pub credit_keys: Gauge,
}

impl UsageMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            up: registered(
                registry,
                "usage_store_up",
                "1 while the usage store (--usage-store) answers: rate limits hold across every sidecar; 0 while it is away: each sidecar enforces rate limits on its own, decisions go on; -1 without a usage store",
                Gauge::default(),
            ),
            errors: registered(
                registry,
                "usage_store_errors",
                "Rounds with the usage store that failed (a lease trade or a count flush refused, failed or not answered in time)",
                Counter::default(),
            ),
            trades: registered(
                registry,
                "usage_lease_trades",
                "Leases on keys' global rate limits traded with the usage store",
                Counter::default(),
            ),
            dropped: registered(
                registry,
                "usage_counts_dropped",
                "Decisions whose per-key counts were dropped: held an hour while the usage store (or a standalone's own database) was away, or in a write that failed and may or may not have been applied (never sent twice)",
                Counter::default(),
            ),
            leased_keys: registered(
                registry,
                "usage_leased_keys",
                "Keys whose global rate limit this sidecar holds a lease on",
                Gauge::default(),
            ),
            credit_reservations: registered(
                registry,
                "credit_reservations",
                "Usage credits reserved from keys' records into this sidecar's leases (one store write each)",
                Counter::default(),
            ),
            credit_waits: registered(
                registry,
                "credit_waits",
                "Decisions that found a key's credit lease empty while its record still had credits, and waited for a reservation",
                Counter::default(),
            ),
            credit_keys: registered(
                registry,
                "credit_keys",
                "Keys with usage credits this sidecar holds a lease on",
                Gauge::default(),
            ),
        };
        metrics.up.set(-1);
        metrics
    }
}
