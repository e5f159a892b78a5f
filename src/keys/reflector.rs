//! The reflector: the one consumer of what the replica's watcher delivers
//! ([`super::watcher`]'s [`Event`]s), applying it to the local replica and the index on
//! the key writer's thread (as kube-rs's `reflector` applies a `watcher`'s
//! events to its store). This sidecar's own writes reach the replica
//! through the same [`Reflector::apply`], so a change is applied once
//! whichever way it arrives.
//!
//! - **Idempotent by revision** ([`Revisions`]): a change the sidecar
//!   wrote itself is applied at once (read-your-writes) and skipped when
//!   the watch brings it back; an event at or below what the replica
//!   already holds changes nothing.
//! - **A full read** (at start, after a compaction, after the disk
//!   recovered) is applied page by page, each key switching atomically
//!   while decisions keep reading; its end removes what etcd no longer
//!   holds and makes the replica ready. Keys this sidecar changed after
//!   the read's revision keep their newer state.
//! - Decisions see watched changes even when the local disk fails (etcd
//!   has them; the replica is read again when the disk recovers).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::mirror::Mirror;
use super::shared::Shared;
use super::stage::Write;
use super::watcher::Event;
use crate::clock::now_nanos;
use crate::domain::key::KeyId;
use crate::domain::record::KeyRecord;
use crate::domain::scope_set::ScopeSet;
use crate::store::db::{Put, Store, StoreError};
use crate::store::etcd::{Page, Watched};

/// The local replica's storage, as the reflector writes it: sled in a
/// running sidecar, memory in unit tests.
pub trait Local {
    /// Writes a key's record; whether the replica had it.
    fn put(&self, record: &KeyRecord) -> Result<Put, StoreError>;
    /// Writes records in one batch.
    fn put_all(&self, records: &[&KeyRecord]) -> Result<Vec<Put>, StoreError>;
    /// Removes a key; the record it held, if any.
    fn remove(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key id held.
    fn ids(&self) -> Result<Vec<KeyId>, StoreError>;
    /// Notes that `id` was written here at `revision` (ahead of the watch).
    fn note_revision(&self, id: &KeyId, revision: i64) -> Result<(), StoreError>;
    /// Records that the replica holds everything through `revision`.
    fn set_replica(&self, revision: i64, synced_at: i64) -> Result<(), StoreError>;
    /// Makes everything written durable.
    fn flush(&self) -> Result<(), StoreError>;
}

impl Local for Store {
    fn put(&self, record: &KeyRecord) -> Result<Put, StoreError> {
        Store::put(self, record)
    }
    fn put_all(&self, records: &[&KeyRecord]) -> Result<Vec<Put>, StoreError> {
        Store::put_all(self, records)
    }
    fn remove(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Store::remove(self, id)
    }
    fn ids(&self) -> Result<Vec<KeyId>, StoreError> {
        Store::ids(self).collect()
    }
    fn note_revision(&self, id: &KeyId, revision: i64) -> Result<(), StoreError> {
        Store::note_revision(self, id, revision)
    }
    fn set_replica(&self, revision: i64, synced_at: i64) -> Result<(), StoreError> {
        Store::set_replica(self, revision, synced_at)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Store::flush(self)
    }
}

/// One committed change, as the replica applies it.
#[derive(Debug, Clone, Copy)]
pub enum Applied<'a> {
    /// A key's record (new or changed), with its resolved scopes.
    Put(&'a KeyRecord, ScopeSet),
    /// A removed key.
    Remove(KeyId),
}

impl<'a> Applied<'a> {
    /// What a staged `write` of `record` applies.
    #[must_use]
    pub fn of(record: &'a KeyRecord, write: Write, scopes: ScopeSet) -> Self {
        match write {
            Write::Create | Write::Replace => Self::Put(record, scopes),
            Write::Remove => Self::Remove(record.id),
        }
    }

    /// The key changed.
    #[must_use]
    pub fn id(&self) -> KeyId {
        match self {
            Self::Put(record, _) => record.id,
            Self::Remove(id) => *id,
        }
    }
}

/// A full read of etcd, applied page by page.
#[derive(Debug)]
struct Rebuild {
    /// The revision every page is at.
    revision: i64,
    /// Every key id the pages held so far (16 bytes a key, while the read
    /// lasts): what the last page keeps.
    live: HashSet<KeyId>,
    started: Instant,
}

/// Applies changes to the local replica and the index, each once.
#[derive(Debug)]
pub struct Reflector {
    revisions: Revisions,
    rebuild: Option<Rebuild>,
    mirror: Mirror,
    shared: Arc<Shared>,
}

impl Reflector {
    /// Over `mirror`, with the replica holding `revisions`.
    #[must_use]
    pub fn new(revisions: Revisions, mirror: Mirror, shared: Arc<Shared>) -> Self {
        Self {
            revisions,
            rebuild: None,
            mirror,
            shared,
        }
    }

    /// The index and account counts.
    pub fn mirror(&mut self) -> &mut Mirror {
        &mut self.mirror
    }

    /// What the replica holds, by revision.
    pub fn revisions(&mut self) -> &mut Revisions {
        &mut self.revisions
    }

    /// Applies one committed change to `local` (none: the disk is failing,
    /// or the replica lives in the index only) and queues the index change
    /// it makes (made once its batch stands). `revision`: etcd's, or `None`
    /// for a removal a full read found (no revision of its own). A change
    /// already applied, or older than what the replica holds, changes
    /// nothing.
    pub fn apply(
        &mut self,
        local: Option<&dyn Local>,
        change: Applied<'_>,
        revision: Option<i64>,
    ) -> Result<(), StoreError> {
        if let Some(revision) = revision
            && !self.revisions.admit(change.id(), revision)
        {
            return Ok(());
        }
        match change {
            Applied::Put(record, scopes) => {
                let put = match local {
                    Some(local) => local.put(record)?,
                    None => Put::Unchanged,
                };
                self.mirror.put(record, scopes, put);
            }
            Applied::Remove(id) => {
                let removed = match local {
                    Some(local) => local.remove(&id)?,
                    None => None,
                };
                self.mirror.remove(id, removed.as_ref());
            }
        }
        Ok(())
    }

    /// Applies watched changes in revision order, then records how far the
    /// replica has got. Decisions see them even if `local` fails.
    fn events(
        &mut self,
        local: Option<&dyn Local>,
        changes: &[Watched],
        mut held: impl FnMut(Applied<'_>, i64) -> bool,
    ) -> Result<(), StoreError> {
        let Some(through) = changes.iter().filter_map(Watched::revision).max() else {
            return Ok(());
        };
        // The watch resumed without completing a full read: that read is
        // abandoned (its pages stand, each a key's state at one revision,
        // and the watch brings every later change).
        self.rebuild = None;
        let mut failure = None;
        for change in changes {
            let (applied, revision) = match change {
                Watched::Put { record, revision } => {
                    (Applied::Put(record, self.mirror.scopes(record)), *revision)
                }
                Watched::Deleted { id, revision } => (Applied::Remove(*id), *revision),
                Watched::Progress { .. } | Watched::Compacted { .. } => continue,
            };
            if !held(applied, revision) {
                continue;
            }
            if let Err(error) = self.apply(local, applied, Some(revision)) {
                failure.get_or_insert(error);
            }
        }
        self.revisions.advance(through);
        let flushed = match (failure, local) {
            (Some(error), _) => Err(error),
            (None, Some(local)) => local
                .set_replica(through, now_nanos())
                .and_then(|()| local.flush()),
            (None, None) => Ok(()),
        };
        self.mirror.publish();
        self.shared.replicated(through, false);
        flushed
    }

    /// Applies one event of the watcher, in order; `held` says which
    /// watched changes are for this replica (on demand, only held keys).
    /// `local`: the replica's storage (none: the disk is failing, or the
    /// replica lives in the index only).
    pub fn reflect(
        &mut self,
        local: Option<&dyn Local>,
        event: &Event,
        held: impl FnMut(Applied<'_>, i64) -> bool,
    ) -> Result<(), StoreError> {
        match event {
            Event::Init { revision } => {
                self.init(local, *revision);
                Ok(())
            }
            Event::InitPage(page) => self.init_page(local, page),
            Event::InitDone { revision } => self.init_done(local, *revision),
            Event::Watching { revision } => {
                self.restart(*revision);
                Ok(())
            }
            Event::Changes(changes) => self.events(local, changes, held),
            Event::Current { read_at } => {
                self.shared.confirmed(*read_at);
                Ok(())
            }
            Event::Unconfirmed => {
                self.shared.lost();
                Ok(())
            }
        }
    }

    /// A full read of etcd begins at `revision` (at start, after a
    /// compaction, after the disk recovered), abandoning any in progress
    /// (etcd compacted its revision).
    fn init(&mut self, local: Option<&dyn Local>, revision: i64) {
        // Without a replica to rebuild, recovery reads everything itself;
        // a read older than what the replica already holds (queued behind
        // a re-read on recovery) would roll keys back.
        self.rebuild = (local.is_some() && revision >= self.revisions.floor()).then(|| Rebuild {
            revision,
            live: HashSet::new(),
            started: Instant::now(),
        });
    }

    /// Applies one page of a full read: its keys are written to the
    /// replica and the index as they come, each switching atomically while
    /// decisions keep reading. Keys this sidecar changed after the read's
    /// revision keep their newer state.
    fn init_page(&mut self, local: Option<&dyn Local>, page: &Page) -> Result<(), StoreError> {
        let Some(local) = local else {
            self.rebuild = None;
            return Ok(());
        };
        let Some(mut rebuild) = self.rebuild.take_if(|r| r.revision == page.revision) else {
            return Ok(());
        };
        rebuild
            .live
            .extend(page.records.iter().map(|record| record.id));
        let fresh: Vec<&KeyRecord> = page
            .records
            .iter()
            .filter(|record| !self.revisions.changed_after(&record.id, page.revision))
            .collect();
        let puts = local.put_all(&fresh)?;
        for (record, put) in fresh.into_iter().zip(puts) {
            let scopes = self.mirror.scopes(record);
            self.mirror.put(record, scopes, put);
        }
        self.mirror.publish();
        self.rebuild = Some(rebuild);
        Ok(())
    }

    /// The full read at `revision` is complete.
    fn init_done(&mut self, local: Option<&dyn Local>, revision: i64) -> Result<(), StoreError> {
        let rebuild = self.rebuild.take_if(|r| r.revision == revision);
        match (local, rebuild) {
            (Some(local), Some(rebuild)) => self.finish(local, &rebuild),
            _ => Ok(()),
        }
    }

    /// Completes a full read: removes every key etcd did not hold at its
    /// revision (unless this sidecar wrote it since), then marks the
    /// replica as holding everything through that revision.
    fn finish(&mut self, local: &dyn Local, rebuild: &Rebuild) -> Result<(), StoreError> {
        let newer = self.revisions.reset(rebuild.revision);
        let keep = |id: &KeyId| rebuild.live.contains(id) || newer.contains(id);
        let mut gone = local.ids()?;
        gone.retain(|id| !keep(id));
        for id in &gone {
            self.apply(Some(local), Applied::Remove(*id), None)?;
        }
        local.set_replica(rebuild.revision, now_nanos())?;
        local.flush()?;
        self.mirror.publish();
        // The index holds no key the store lacks; this keeps it so even
        // if the disk failed while changes were applied to the index only.
        self.mirror.retain(keep);
        self.shared.replicated(rebuild.revision, true);
        tracing::info!(
            keys = self.mirror.index().len(),
            revision = rebuild.revision,
            removed = gone.len(),
            elapsed_ms = rebuild.started.elapsed().as_millis(),
            "replica synced with etcd"
        );
        Ok(())
    }

    /// On demand: a watch starts after `revision` with nothing held.
    fn restart(&mut self, revision: i64) {
        self.mirror.retain(|_| false);
        self.revisions.reset(revision);
        self.shared.replicated(revision, true);
    }
}

/// The revisions the replica holds: everything through `floor`, and some
/// keys further ahead (changes this sidecar wrote, not yet back from the
/// watch).
#[derive(Debug, Default)]
pub struct Revisions {
    floor: i64,
    ahead: HashMap<KeyId, i64>,
}

impl Revisions {
    /// What a replica held when it was last closed (or killed).
    #[must_use]
    pub fn restored(floor: i64, ahead: impl IntoIterator<Item = (KeyId, i64)>) -> Self {
        let mut restored = Self {
            floor,
            ahead: ahead.into_iter().collect(),
        };
        restored.advance(floor);
        restored
    }

    /// Whether a change to `id` at `revision` is new to the replica; if so
    /// it is noted as applied.
    pub fn admit(&mut self, id: KeyId, revision: i64) -> bool {
        if revision <= self.floor || self.ahead.get(&id).is_some_and(|r| *r >= revision) {
            return false;
        }
        self.ahead.insert(id, revision);
        true
    }

    /// Every change through `revision` has been applied.
    pub fn advance(&mut self, revision: i64) {
        self.floor = self.floor.max(revision);
        let floor = self.floor;
        self.ahead.retain(|_, r| *r > floor);
    }

    /// Whether this sidecar changed `id` after `revision` (a full read at
    /// `revision` must not overwrite it).
    #[must_use]
    pub fn changed_after(&self, id: &KeyId, revision: i64) -> bool {
        self.ahead.get(id).is_some_and(|r| *r > revision)
    }

    /// A full read as of `revision` replaces the replica; returns the keys
    /// changed here after it, whose newer state stays.
    pub fn reset(&mut self, revision: i64) -> HashSet<KeyId> {
        self.advance(revision);
        self.ahead.keys().copied().collect()
    }

    /// The revision the replica holds everything through.
    #[must_use]
    pub fn floor(&self) -> i64 {
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    #[test]
    fn a_change_is_applied_once_and_never_rolled_back() {
        let mut replica = Revisions::default();
        replica.advance(10);
        assert!(!replica.admit(id(1), 9), "below the floor: already held");
        assert!(!replica.admit(id(1), 10));
        // This sidecar's own write at 20, ahead of the watch...
        assert!(replica.admit(id(1), 20));
        // ...then the watch brings an older change to the same key, and the
        // write itself: neither applies again.
        assert!(!replica.admit(id(1), 17));
        assert!(!replica.admit(id(1), 20));
        // Other keys in between still apply, each once.
        assert!(replica.admit(id(2), 18));
        assert!(!replica.admit(id(2), 18));
        replica.advance(20);
        assert!(
            replica.ahead.is_empty(),
            "nothing ahead of the floor is kept"
        );
        assert!(replica.admit(id(1), 21));
    }

    #[test]
    fn a_full_read_keeps_only_what_this_sidecar_wrote_after_it() {
        let mut replica = Revisions::default();
        assert!(replica.admit(id(1), 5));
        assert!(replica.admit(id(2), 30));
        let newer = replica.reset(25);
        assert_eq!(newer, HashSet::from([id(2)]), "written after the read");
        assert!(!replica.admit(id(1), 25), "the read covers it");
        assert!(!replica.admit(id(2), 28), "older than the local write");
        assert!(replica.admit(id(3), 26));
    }

    #[test]
    fn a_restored_replica_skips_what_it_held_before_the_restart() {
        let mut replica = Revisions::restored(10, [(id(1), 12), (id(2), 9)]);
        assert_eq!(replica.floor, 10);
        assert!(!replica.admit(id(1), 11), "older than the key's own write");
        assert!(!replica.admit(id(1), 12), "the write itself, replayed");
        assert!(replica.admit(id(1), 13));
        assert!(!replica.admit(id(2), 10), "at the floor");
        assert!(replica.admit(id(3), 11));
    }
}

#[cfg(test)]
mod reflecting {
    use super::*;
    use crate::domain::catalog::Catalog;
    use crate::domain::catalog::KeyKind;
    use crate::domain::key::SecretHash;
    use crate::domain::record::Access;
    use crate::keys::change::AccountCounts;
    use crate::keys::memory::Disk;
    use crate::keys::shared::Replication;
    use crate::metrics::Metrics;
    use crate::store::index::Index;

    fn id(n: u8) -> KeyId {
        KeyId::from_bytes([n; 16])
    }

    fn record(n: u8, name: &str) -> KeyRecord {
        KeyRecord {
            id: id(n),
            account: "acme".into(),
            name: name.into(),
            kind: KeyKind::RestrictedAccess,
            scopes: vec!["mail.send".into()],
            created_at: i64::from(n),
            updated_at: 0,
            access: Access::new(SecretHash::from_bytes([n; 32])),
            leak: None,
        }
    }

    fn reflector() -> (Reflector, Arc<Index>, Arc<Shared>) {
        let metrics = Arc::new(Metrics::new());
        let index = Arc::new(Index::default());
        let shared = Shared::new(None, Replication::default(), &metrics);
        let mirror = Mirror::new(
            Arc::clone(&index),
            Arc::new(Catalog::sendgrid()),
            AccountCounts::new(),
            metrics,
        );
        let reflector = Reflector::new(Revisions::default(), mirror, Arc::clone(&shared));
        (reflector, index, shared)
    }

    fn put(n: u8, name: &str, revision: i64) -> Watched {
        Watched::Put {
            record: Box::new(record(n, name)),
            revision,
        }
    }

    fn name(disk: &Disk, n: u8) -> Option<String> {
        disk.state()
            .keys
            .get(&id(n))
            .map(|record| record.name.clone())
    }

    fn page(revision: i64, records: Vec<KeyRecord>, (first, last): (bool, bool)) -> Event {
        Event::InitPage(Page {
            total: records.len() as u64,
            records,
            revision,
            first,
            last,
        })
    }

    /// Reflects `events`, every watched change held here.
    fn reflect(
        reflector: &mut Reflector,
        disk: Option<&Disk>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let local = disk.map(|disk| disk as &dyn Local);
        events
            .iter()
            .try_for_each(|event| reflector.reflect(local, event, |_, _| true))
    }

    fn changes(changes: Vec<Watched>) -> Event {
        Event::Changes(changes)
    }

    #[test]
    fn an_own_write_is_applied_once_and_never_rolled_back_by_the_watch() {
        let (mut reflector, index, shared) = reflector();
        let disk = Disk::default();
        let own = record(1, "own");
        let scopes = reflector.mirror().scopes(&own);
        reflector
            .apply(Some(&disk), Applied::Put(&own, scopes), Some(20))
            .expect("applied");
        assert!(!index.contains(&id(1)), "shown only when its batch stands");
        reflector.mirror().publish();
        assert!(index.contains(&id(1)));
        // The watch brings an older change to the key, then the write
        // itself, and another key's change in between.
        let watched = changes(vec![
            put(1, "older", 17),
            put(2, "other", 18),
            put(1, "own", 20),
        ]);
        reflect(&mut reflector, Some(&disk), &[watched]).expect("applied");
        assert_eq!(name(&disk, 1).as_deref(), Some("own"));
        assert_eq!(name(&disk, 2).as_deref(), Some("other"));
        assert_eq!(disk.state().revision, 20, "the replica holds through 20");
        assert_eq!(shared.replication().borrow().revision, 20);
        // Replayed history changes nothing; a newer change applies.
        let replayed = changes(vec![put(2, "replayed", 18)]);
        let removed = changes(vec![Watched::Deleted {
            id: id(1),
            revision: 21,
        }]);
        reflect(&mut reflector, Some(&disk), &[replayed, removed]).expect("applied");
        assert_eq!(name(&disk, 2).as_deref(), Some("other"));
        assert!(!index.contains(&id(1)));
        assert_eq!(name(&disk, 1), None);
    }

    #[test]
    fn a_full_read_removes_what_etcd_no_longer_holds_and_keeps_newer_own_writes() {
        let (mut reflector, index, shared) = reflector();
        let disk = Disk::default();
        let before = changes(vec![put(1, "a", 1), put(2, "gone", 2)]);
        reflect(&mut reflector, Some(&disk), &[before]).expect("applied");
        // This sidecar writes key 3 at 12, after the read's revision.
        let own = record(3, "own");
        let scopes = reflector.mirror().scopes(&own);
        reflector
            .apply(Some(&disk), Applied::Put(&own, scopes), Some(12))
            .expect("applied");
        reflector.mirror().publish();
        let first = page(10, vec![record(1, "a, read")], (true, false));
        reflect(
            &mut reflector,
            Some(&disk),
            &[Event::Init { revision: 10 }, first],
        )
        .expect("applied");
        assert!(!shared.replication().borrow().ready, "not ready mid-read");
        let last = page(10, vec![record(3, "older than own")], (false, true));
        reflect(
            &mut reflector,
            Some(&disk),
            &[last, Event::InitDone { revision: 10 }],
        )
        .expect("applied");
        assert_eq!(name(&disk, 1).as_deref(), Some("a, read"));
        assert_eq!(name(&disk, 2), None, "etcd no longer holds it");
        assert!(!index.contains(&id(2)));
        assert_eq!(name(&disk, 3).as_deref(), Some("own"), "newer, kept");
        assert!(index.contains(&id(3)));
        let state = *shared.replication().borrow();
        assert!(state.ready && state.revision == 10);
        // A read older than what the replica holds is never applied.
        let newer = changes(vec![put(4, "new", 30)]);
        let behind = [
            Event::Init { revision: 25 },
            page(25, vec![], (true, true)),
            Event::InitDone { revision: 25 },
        ];
        reflect(&mut reflector, Some(&disk), &[newer]).expect("applied");
        reflect(&mut reflector, Some(&disk), &behind).expect("ignored");
        assert_eq!(name(&disk, 4).as_deref(), Some("new"), "not rolled back");
    }

    #[test]
    fn watched_changes_reach_decisions_while_the_disk_fails() {
        let (mut reflector, index, shared) = reflector();
        let disk = Disk::default();
        disk.state().fail = true;
        let failed = reflect(
            &mut reflector,
            Some(&disk),
            &[changes(vec![put(1, "a", 5)])],
        );
        assert!(failed.is_err(), "the failure is reported");
        // The writer lets go of the disk; what the watch brings next
        // reaches decisions anyway (etcd has it).
        reflect(&mut reflector, None, &[changes(vec![put(1, "a", 6)])]).expect("applied");
        assert!(index.contains(&id(1)));
        assert_eq!(shared.replication().borrow().revision, 6);
        // On demand: an event for a key this replica does not hold is
        // passed over.
        let watched = changes(vec![put(2, "b", 6), put(3, "c", 7)]);
        reflector
            .reflect(None, &watched, |applied, _| applied.id() != id(2))
            .expect("applied");
        assert!(!index.contains(&id(2)));
        assert!(index.contains(&id(3)));
    }

    #[test]
    fn an_on_demand_restart_drops_every_held_key() {
        let (mut reflector, index, shared) = reflector();
        reflect(&mut reflector, None, &[changes(vec![put(1, "a", 5)])]).expect("applied");
        assert!(index.contains(&id(1)));
        reflect(&mut reflector, None, &[Event::Watching { revision: 9 }]).expect("applied");
        assert_eq!(index.len(), 0);
        let state = *shared.replication().borrow();
        assert!(state.ready && state.revision == 9);
        // What the old watch still had in flight is history now.
        reflect(&mut reflector, None, &[changes(vec![put(1, "a", 8)])]).expect("applied");
        assert_eq!(index.len(), 0);
    }
}
