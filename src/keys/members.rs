//! On demand: which key ids etcd holds, so that first sights of ids that
//! exist never compete with ids a flood makes up.
//!
//! A Bloom filter of every live id: filled from a keys-only listing of
//! etcd (ids only, no record is sent) and kept current by the watch, which
//! inserts every id it sees put, as does this sidecar's own writes. Revoked
//! ids stay in it until the next build (harmless: they are fetched and
//! found absent, at the members' budget). Built again after a watch gap
//! (a compaction: puts may have been missed) and when more ids were added
//! than it was sized for.
//!
//! The guarantee, with the filter's false-positive rate `p` ([`FALSE_POS`],
//! 0.1 %): a made-up id spends the members' first-sight budget only with
//! probability `p` (the filter's hash keys are random per process, so an
//! attacker cannot search for false positives offline), so a flood delays
//! a real key's first sight only above `--replica-fetch-rate / p` made-up
//! ids a second (a million a second at the default rate). Memory: about 14
//! bits per id, sized for twice the ids listed (3.6 MB at a million keys).
//! Until the first listing completes, every id counts as a member (today's
//! single budget).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use fastbloom::AtomicBloomFilter;

use crate::domain::key::KeyId;
use crate::metrics::Metrics;
use crate::store::etcd::Etcd;

/// The filter's false-positive rate.
pub const FALSE_POS: f64 = 0.001;
/// Fewest ids a filter is sized for.
const MIN_CAPACITY: u64 = 65_536;
/// Ids read per page of the listing (about 60 bytes each on the wire).
const PAGE_IDS: u32 = 10_000;
/// Wait after a failed build before the next.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the filter says of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Listed, or possibly (a false positive).
    Member,
    /// Not in etcd as of the listing and the watch since (or created too
    /// recently for the watch to have told).
    Stranger,
}

/// One filter and what it was sized for.
struct Filter {
    bloom: AtomicBloomFilter,
    capacity: u64,
    inserted: AtomicU64,
    complete: AtomicBool,
}

impl Filter {
    fn sized_for(ids: u64) -> Self {
        let capacity = ids.saturating_mul(2).max(MIN_CAPACITY);
        Self {
            bloom: AtomicBloomFilter::with_false_pos(FALSE_POS)
                .expected_items(usize::try_from(capacity).unwrap_or(usize::MAX)),
            capacity,
            inserted: AtomicU64::new(0),
            complete: AtomicBool::new(false),
        }
    }
}

/// The filter answering, and the one being built (filled by the watch
/// too, so nothing put meanwhile is missing when it takes over).
type Filters = (Arc<Filter>, Option<Arc<Filter>>);

/// The live ids' filter, and the task that builds it.
pub struct Members {
    filters: RwLock<Filters>,
    /// Bumped when the filter must be built again.
    generation: AtomicU64,
    rebuild: tokio::sync::Notify,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let filter = self.filter();
        f.debug_struct("Members")
            .field("capacity", &filter.capacity)
            .field("complete", &filter.complete.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Members {
    fn default() -> Self {
        Self {
            filters: RwLock::new((Arc::new(Filter::sized_for(0)), None)),
            generation: AtomicU64::new(0),
            rebuild: tokio::sync::Notify::new(),
        }
    }
}

impl Members {
    fn filter(&self) -> Arc<Filter> {
        Arc::clone(
            &self
                .filters
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .0,
        )
    }

    /// etcd holds `id` (the watch saw it put, a fetch found it, or this
    /// sidecar wrote it).
    pub fn insert(&self, id: &KeyId) {
        let over = {
            let filters = self.filters.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(building) = &filters.1 {
                building.bloom.insert(id);
            }
            let filter = &filters.0;
            // Only a new id counts toward the size: an update of a listed
            // key (rotate, disable) must not make the filter look full.
            let known = filter.bloom.insert(id);
            !known
                && filter.inserted.fetch_add(1, Ordering::Relaxed) + 1 > filter.capacity
                && filters.1.is_none()
        };
        if over {
            self.invalidate();
        }
    }

    /// What the filter says of `id`: a member until a listing completed.
    #[must_use]
    pub fn of(&self, id: &KeyId) -> Membership {
        let filter = self.filter();
        if !filter.complete.load(Ordering::Acquire) || filter.bloom.contains(id) {
            Membership::Member
        } else {
            Membership::Stranger
        }
    }

    /// The watch may have missed puts (a new watch after a compaction), or
    /// the filter is over its size: build it again. The current filter
    /// keeps answering meanwhile.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.rebuild.notify_one();
    }

    /// Builds the filter, and again whenever [`Self::invalidate`] asks.
    pub async fn maintain(self: Arc<Self>, etcd: Etcd, metrics: Arc<Metrics>) {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            match self.build(&etcd).await {
                Ok(listed) => {
                    metrics.set_member_ids(listed);
                    tracing::debug!(listed, "on-demand membership filter built");
                    if self.generation.load(Ordering::Acquire) == generation {
                        self.rebuild.notified().await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "listing key ids for the on-demand membership filter failed; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// A new filter, filled by the watch from now on, then with every id
    /// etcd holds as of a revision read after that; it answers once
    /// complete (the previous one answers until then).
    async fn build(&self, etcd: &Etcd) -> Result<u64, crate::store::etcd::EtcdError> {
        let filter = Arc::new(Filter::sized_for(etcd.count_keys().await?));
        self.filters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .1 = Some(Arc::clone(&filter));
        let (mut after, mut revision, mut listed) = (None, 0, 0_u64);
        loop {
            let (ids, at, more) = etcd
                .key_ids_page(after.as_ref(), PAGE_IDS, revision)
                .await?;
            revision = at;
            for id in &ids {
                filter.bloom.insert(id);
            }
            listed += ids.len() as u64;
            filter
                .inserted
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            match ids.last() {
                Some(last) if more => after = Some(*last),
                _ => break,
            }
        }
        filter.complete.store(true, Ordering::Release);
        *self.filters.write().unwrap_or_else(PoisonError::into_inner) = (filter, None);
        Ok(listed)
    }
}
