//! The on-demand cache's side on the key writer's thread: keys fetched at
//! their first sight ([`super::demand`] reads them from etcd) are put into
//! the index here, in order with the watch, and what the eviction policy
//! dropped leaves the index here. Fetches and evictions are not watch
//! events: the reflector ([`super::reflector`]) applies those, asking
//! [`Cache::watched`] which are for a held key.
//!
//! Ordering: a fetch read one key at etcd revision H. It is put into the
//! index only if no watched change to that key after H has been passed
//! over (the last [`RECENT_EVENTS`] ids the watch delivered are kept), and
//! this sidecar wrote nothing to it since; otherwise it is read again. The
//! fetched version is noted by its revision, so the watch's older events
//! for the key are skipped: a fetch never resurrects a revoked key or
//! rolls one back.

use std::collections::VecDeque;
use std::sync::Arc;

use super::demand::OnDemand;
use super::reflector::{Applied, Reflector};
use super::shared::{Fetch, Fetched};
use crate::domain::key::KeyId;
use crate::store::index::Index;

/// Watched key ids remembered, to order fetches against.
pub const RECENT_EVENTS: usize = 4096;

/// The writer's half of the on-demand cache.
#[derive(Debug)]
pub struct Cache {
    demand: Arc<OnDemand>,
    recent: Recent,
    index: Arc<Index>,
}

impl Cache {
    /// Applies `demand`'s fetches and evictions to `index`.
    #[must_use]
    pub fn new(demand: Arc<OnDemand>, index: Arc<Index>) -> Self {
        Self {
            demand,
            recent: Recent::default(),
            index,
        }
    }

    /// Whether a watched change is for this replica: only for held keys (a
    /// put of another key ends what was remembered of its absence). Noted
    /// for ordering fetches either way.
    pub fn watched(&mut self, change: Applied<'_>, revision: i64) -> bool {
        let id = change.id();
        self.recent.note(id, revision);
        if matches!(change, Applied::Put(..)) {
            self.demand.watched_put(&id);
        }
        self.index.contains(&id)
    }

    /// A watch starts after `revision` with nothing held (at start, or
    /// after etcd compacted the history a watch needed: what was held may
    /// have missed changes, so it is fetched again as presented).
    pub fn restart(&mut self, revision: i64) {
        self.demand.clear();
        self.recent.reset(revision);
        tracing::info!(
            revision,
            "on-demand replica following etcd: keys are fetched as they are presented"
        );
    }

    /// Puts a key fetched at its first sight into the index, unless it
    /// changed after the fetch's revision (then it is read again).
    pub fn fetched(&mut self, fetch: &Fetch, reflector: &mut Reflector) -> Fetched {
        if reflector.mirror().index().contains(&fetch.id) {
            // The watch keeps a held key current.
            return Fetched::Held;
        }
        let revisions = reflector.revisions();
        let written_here = revisions.changed_after(&fetch.id, fetch.revision);
        // Changed after the fetch's revision, by the watch (passed over
        // while the key was not held) or by this sidecar itself (say a
        // revocation whose event has not come back yet): read it again.
        if written_here
            || (fetch.revision < revisions.floor()
                && !self.recent.unchanged_since(&fetch.id, fetch.revision))
        {
            return Fetched::Stale;
        }
        let Some((record, written_at)) = &fetch.found else {
            self.demand.remember_absent(fetch.id);
            return Fetched::Absent;
        };
        // Noted by revision: the watch's older events for the key (still
        // on their way) are skipped, never applied over it.
        revisions.admit(fetch.id, *written_at);
        // The index only: the fetch's caller tells the eviction policy
        // (moka's maintenance then runs on its task, not on this thread).
        reflector.mirror().show(record);
        Fetched::Held
    }

    /// Drops from the index what the eviction policy evicted.
    pub fn evicted(&self, reflector: &mut Reflector) {
        reflector.mirror().drop_evicted();
    }
}

/// The last [`RECENT_EVENTS`] key ids the watch delivered, with their
/// revisions: whether a fetch at some revision may have missed a change.
#[derive(Debug, Default)]
pub struct Recent {
    events: VecDeque<(i64, KeyId)>,
    /// Every watched change after this revision is in `events`.
    since: i64,
}

impl Recent {
    /// Nothing known before `revision` (a new watch from it).
    pub fn reset(&mut self, revision: i64) {
        self.events.clear();
        self.since = revision;
    }

    /// The watch delivered a change to `id` at `revision`.
    pub fn note(&mut self, id: KeyId, revision: i64) {
        if self.events.len() == RECENT_EVENTS
            && let Some((dropped, _)) = self.events.pop_front()
        {
            self.since = self.since.max(dropped);
        }
        self.events.push_back((revision, id));
    }

    /// Whether a fetch of `id` at `revision` is still the key's state: no
    /// change to it after `revision` was delivered (`false` also when that
    /// is no longer known).
    #[must_use]
    pub fn unchanged_since(&self, id: &KeyId, revision: i64) -> bool {
        revision >= self.since
            && !self
                .events
                .iter()
                .any(|(at, changed)| *at > revision && changed == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    #[test]
    fn a_fetch_is_stale_once_the_key_changed_after_it() {
        let mut recent = Recent::default();
        recent.reset(10);
        recent.note(id(1), 12);
        recent.note(id(2), 13);
        assert!(recent.unchanged_since(&id(1), 12), "the change it read");
        assert!(
            !recent.unchanged_since(&id(1), 11),
            "read before the change"
        );
        assert!(recent.unchanged_since(&id(3), 11), "another key changed");
        assert!(!recent.unchanged_since(&id(3), 9), "before what is known");
    }

    #[test]
    fn forgotten_history_makes_every_older_fetch_stale() {
        let mut recent = Recent::default();
        recent.reset(0);
        for n in 0..RECENT_EVENTS + 10 {
            recent.note(id(1), i64::try_from(n).expect("small") + 1);
        }
        assert!(!recent.unchanged_since(&id(2), 5), "no longer known");
        let newest = i64::try_from(RECENT_EVENTS + 10).expect("small");
        assert!(recent.unchanged_since(&id(2), newest));
        assert!(recent.events.len() <= RECENT_EVENTS);
    }
}
