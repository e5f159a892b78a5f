//! Decisions per key and minute, counted where they are made (a sidecar,
//! an Envoy module) until the next flush sums them into the usage store
//! (a module's, through its sidecar).
//!
//! Only a verified key is counted (a decision that found the key's account):
//! a flood of made-up ids creates nothing here or in Redis. Held at most
//! for [`KEPT_MINUTES`] while the store is away, so what this holds is
//! bounded by live keys used × minutes kept.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::domain::decision::{Decision, DenyReason};
use crate::domain::key::KeyId;

/// Outcomes counted: allowed, then each deny reason at its index.
pub const OUTCOMES: usize = 1 + DenyReason::COUNT;

/// Minutes of counts held while the store is away; older ones are dropped
/// (and counted as dropped).
pub const KEPT_MINUTES: i64 = 60;

/// One key's counts in one minute, by outcome.
pub type Tally = [u64; OUTCOMES];

/// One key's counts in one minute (Unix seconds at its start).
pub type KeyMinute = ((KeyId, i64), Tally);

/// A [`Tally`] decisions add to under a shared lock.
type Counting = [AtomicU64; OUTCOMES];

/// The label an outcome is stored under.
#[must_use]
pub fn label(outcome: usize) -> &'static str {
    match outcome.checked_sub(1) {
        None => "allowed",
        Some(reason) => DenyReason::ALL[reason].label(),
    }
}

/// The outcome a label names (what [`label`] gives), if any.
#[must_use]
pub fn outcome(label: &str) -> Option<usize> {
    if label == "allowed" {
        return Some(0);
    }
    DenyReason::ALL
        .iter()
        .position(|reason| reason.label() == label)
        .map(|reason| reason + 1)
}

/// Counts not yet in the usage store.
#[derive(Debug, Default)]
pub struct Counts {
    pending: DashMap<(KeyId, i64), Counting, rustc_hash::FxBuildHasher>,
}

impl Counts {
    /// Counts one decision at `now_secs`, if its key verified (allowed,
    /// denied after its secret matched, or disabled or expired). A key's
    /// decisions in a minute share a read lock and add atomically: only a
    /// key's first decision of a minute takes the write lock.
    pub fn record(&self, decision: &Decision, now_secs: i64) {
        let Some(id) = decision.key_id else {
            return;
        };
        let verified = decision.account.is_some()
            || matches!(
                decision.deny,
                Some(DenyReason::KeyDisabled | DenyReason::KeyExpired)
            );
        if !verified {
            return;
        }
        let outcome = decision.deny.map_or(0, |reason| 1 + reason.index());
        let at = (id, now_secs - now_secs.rem_euclid(60));
        if let Some(counting) = self.pending.get(&at) {
            counting[outcome].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pending.entry(at).or_default()[outcome].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes every count held, to flush.
    #[must_use]
    pub fn take(&self) -> Vec<((KeyId, i64), Tally)> {
        let held: Vec<(KeyId, i64)> = self.pending.iter().map(|entry| *entry.key()).collect();
        held.into_iter()
            .filter_map(|at| self.pending.remove(&at))
            .map(|(at, counting)| (at, counting.map(AtomicU64::into_inner)))
            .collect()
    }

    /// Puts back counts a flush could not write, unless older than
    /// [`KEPT_MINUTES`] at `now_secs`. Returns how many decisions were
    /// dropped as too old.
    #[must_use]
    pub fn put_back(&self, unwritten: Vec<((KeyId, i64), Tally)>, now_secs: i64) -> u64 {
        let mut dropped = 0;
        for (at, tally) in unwritten {
            if at.1 < now_secs - KEPT_MINUTES * 60 {
                dropped += tally.iter().sum::<u64>();
                continue;
            }
            let held = self.pending.entry(at).or_default();
            for (held, more) in held.iter().zip(tally) {
                held.fetch_add(more, Ordering::Relaxed);
            }
        }
        dropped
    }

    /// (key, minute) pairs held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::domain::scope_set::ScopeSet;

    use super::*;

    fn decided(id: u8, deny: Option<DenyReason>, verified: bool) -> Decision {
        Decision {
            deny,
            key_id: Some(KeyId::from_bytes([id; 16])),
            account: verified.then(|| Arc::from("acct")),
            required: ScopeSet::EMPTY,
            missing: ScopeSet::EMPTY,
            wrong_secret: false,
            quota: None,
            credits_reservable: false,
            refill_in_ms: 0,
        }
    }

    #[test]
    fn only_verified_keys_are_counted_by_minute_and_outcome() {
        let counts = Counts::default();
        counts.record(&decided(1, None, true), 120);
        counts.record(&decided(1, None, true), 179);
        counts.record(&decided(1, Some(DenyReason::RateLimited), true), 150);
        counts.record(&decided(1, None, true), 180);
        counts.record(&decided(2, Some(DenyReason::UnknownKey), false), 150);
        counts.record(&decided(3, Some(DenyReason::KeyDisabled), false), 150);
        counts.record(&decided(3, Some(DenyReason::KeyDisabled), false), 150);
        let mut taken = counts.take();
        taken.sort_by_key(|(at, _)| (at.1, *at.0.as_bytes()));
        assert_eq!(
            taken.len(),
            3,
            "two minutes of one key, a disabled key's refusal; the unverified id left nothing"
        );
        assert_eq!(taken[0].0.1, 120);
        assert_eq!(taken[0].1[0], 2);
        assert_eq!(taken[0].1[1 + DenyReason::RateLimited.index()], 1);
        assert_eq!(label(1 + DenyReason::RateLimited.index()), "rate_limited");
        assert!(counts.is_empty());
    }

    #[test]
    fn unwritten_counts_come_back_until_they_are_an_hour_old() {
        let counts = Counts::default();
        counts.record(&decided(1, None, true), 7200);
        counts.record(&decided(1, None, true), 3600);
        let taken = counts.take();
        counts.record(&decided(1, None, true), 7200);
        let dropped = counts.put_back(taken, 7200 + 1);
        assert_eq!(dropped, 1, "the minute an hour and a second old");
        let taken = counts.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1[0], 2, "merged with what came after");
    }
}
