//! The write path: rules, then a durable write, then the index update;
//! every acknowledged change is durable and visible to the next decision.
//!
//! Layers, each importing only those below it:
//! - [`Keys`] (this module): the async face; opens the backend the
//!   settings pick and starts the writer thread and the replica's tasks.
//! - [`writer`]: queue, batching, group commit, replies, recovery, over a
//!   [`backend::Backend`]; it names no storage.
//! - [`standalone`] (sled), [`replicated`] (etcd and a local replica): the
//!   backends; [`remote`] is etcd's transactions, [`reflector`] applies
//!   what the replica's [`watcher`] delivers (driven by [`follow`]), and
//!   [`cache`] the on-demand cache's fetches and evictions ([`demand`]).
//! - [`shared`] (what crosses threads, the watcher's events and the
//!   [`snapshot`] tracker among them); below it [`mirror`] (the index and
//!   account counts), [`stage`] (the rules), [`change`] (the vocabulary).

pub mod backend;
pub mod cache;
pub mod change;
pub mod demand;
pub mod follow;
mod gates;
pub mod members;
#[cfg(test)]
mod memory;
pub mod mirror;
pub mod reflector;
pub mod remote;
pub mod replicated;
pub mod shared;
pub mod snapshot;
pub mod stage;
pub mod standalone;
pub mod watcher;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::clock::now_nanos;
use crate::domain::catalog::Catalog;
use crate::domain::key::{self, KeyId};
use crate::domain::record::KeyRecord;
use crate::domain::scope_set::ScopeSet;
use crate::metrics::Metrics;
use crate::store::db::{Cursor, PageKey, Store, StoreError};
use crate::store::index::Index;
use backend::Backend;
use change::{Change, Committed};
pub use change::{
    Expiry, KeyError, LeakAction, Lifecycle, Operation, Principal, Rotation, StateChange,
};
use demand::{Demand, OnDemand};
use follow::EtcdRuntime;
use gates::Gates;
use replicated::Replicated;
use shared::{Command, FailureKind, Job, Shared};
pub use shared::{Replication, StoreHealth};
use standalone::Standalone;
use writer::Writer;

/// Changes that may wait for the writer at once; past that, writes are
/// refused at once instead of queueing behind a stuck disk.
const QUEUE_CAPACITY: usize = 1024;

/// How the key writer runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most keys per account.
    pub max_per_account: usize,
    /// Longest a caller waits for a change (or a read).
    pub write_timeout: Duration,
    /// How often last-used times are written to the store.
    pub last_used_every: Duration,
    /// Replicated mode: how to reach etcd (`None`: standalone).
    pub replication: Option<crate::store::etcd::Connection>,
    /// Replicated mode: hold only the keys presented (`None`: every key).
    pub on_demand: Option<Demand>,
}

/// Key management: the async face of the key writer. Changes go to the
/// writer thread ([`writer`]) and are awaited for at most the write timeout;
/// reads run on the blocking pool. No storage call ever runs on an async
/// worker, so a failing disk costs writes, never decisions.
#[derive(Debug)]
pub struct Keys {
    commands: SyncSender<Command>,
    gates: Gates,
    shared: Arc<Shared>,
    index: Arc<Index>,
    catalog: Arc<Catalog>,
    write_timeout: Duration,
    /// On-demand replica: fetches keys at their first sight.
    demand: Option<Arc<OnDemand>>,
    /// Keys ListKeys' page tokens (per process: see [`PageKey`]).
    page_key: PageKey,
    /// One backup at a time.
    backups: Arc<tokio::sync::Semaphore>,
    /// Replicated mode: the etcd connection (dropped last).
    etcd: Option<EtcdRuntime>,
}

impl Keys {
    /// Opens the store in `dir`, loads every key into a fresh index and
    /// starts the writer thread. A change waits at most
    /// `settings.write_timeout`. With `settings.replication`, etcd is the
    /// truth and the store its replica, kept current by a watch.
    pub fn open(
        dir: PathBuf,
        catalog: Arc<Catalog>,
        settings: &Settings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Arc<Index>), StoreError> {
        let page_key = PageKey::random()?;
        let etcd = settings
            .replication
            .as_ref()
            .map(EtcdRuntime::start)
            .transpose()?;
        let (backend, shared, index, demand) =
            open_backend(dir, &catalog, settings, &metrics, etcd.as_ref())?;
        let writer = Writer::new(
            backend,
            Arc::clone(&shared),
            Arc::clone(&catalog),
            Arc::clone(&metrics),
            (settings.max_per_account, settings.last_used_every),
        );
        let (commands, queue) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("keyward-writer".into())
            .spawn(move || writer.run(&queue))
            .map_err(|source| StoreError::Thread {
                what: "the key writer thread",
                source,
            })?;
        if let Some(etcd) = &etcd {
            etcd.follow(
                commands.clone(),
                Arc::clone(&shared),
                metrics,
                demand.is_some(),
            );
        }
        if let (Some(etcd), Some(demand)) = (&etcd, &demand) {
            demand.connect(commands.clone());
            etcd.handle().spawn(Arc::clone(demand).sweep());
            etcd.handle().spawn(Arc::clone(demand).maintain_members());
        }
        let keys = Self {
            demand,
            page_key,
            etcd,
            commands,
            gates: Gates::default(),
            shared,
            index: Arc::clone(&index),
            catalog,
            write_timeout: settings.write_timeout,
            backups: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        Ok((keys, index))
    }

    /// On-demand replica: what fetches keys the index does not hold.
    #[must_use]
    pub fn on_demand(&self) -> Option<Arc<OnDemand>> {
        self.demand.clone()
    }

    /// The catalog in force.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Follows whether the store takes writes (for health and readiness).
    #[must_use]
    pub fn health(&self) -> watch::Receiver<StoreHealth> {
        self.shared.subscribe()
    }

    /// Replicated mode: follows how current the local replica is.
    #[must_use]
    pub fn replication(&self) -> Option<watch::Receiver<Replication>> {
        self.etcd.as_ref().map(|_| self.shared.replication())
    }

    /// Checks that `principal` may perform `operation`: the admin may do
    /// anything; a key needs the matching `api_keys.*` scope. Checked again
    /// against the caller's current scopes when a change commits.
    pub fn permit(&self, principal: &Principal, operation: Operation) -> Result<(), KeyError> {
        match principal {
            Principal::Admin => Ok(()),
            Principal::Key { scopes, .. } => stage::require(&self.catalog, scopes, operation),
        }
    }

    /// [`Self::permit`], then the account to act in: the one the admin
    /// names, or the key's own (a key naming another is refused).
    pub fn authorize(
        &self,
        principal: &Principal,
        operation: Operation,
        requested_account: &str,
    ) -> Result<Arc<str>, KeyError> {
        self.permit(principal, operation)?;
        match principal {
            Principal::Admin => {
                validate_account(requested_account)?;
                Ok(Arc::from(requested_account))
            }
            Principal::Key { account, .. } => {
                if !requested_account.is_empty() && requested_account != &**account {
                    return Err(KeyError::Beyond {
                        field: "account_id",
                        problem: "account_id: an API key acts only in its own account".into(),
                    });
                }
                Ok(Arc::clone(account))
            }
        }
    }

    /// The scopes `principal` holds.
    #[must_use]
    pub fn held_scopes(&self, principal: &Principal) -> ScopeSet {
        match principal {
            Principal::Admin => self.catalog.all(),
            Principal::Key { scopes, .. } => *scopes,
        }
    }

    /// Creates a key in `account` with `grant`; returns the record and the
    /// full key text, which is never available again.
    pub async fn create(
        &self,
        principal: &Principal,
        account: Arc<str>,
        name: String,
        grant: ScopeSet,
        lifecycle: Lifecycle,
    ) -> Result<(KeyRecord, String), KeyError> {
        let key = key::generate().map_err(|_| KeyError::Rng)?;
        let committed = self
            .submit(
                principal,
                Change::Create {
                    account,
                    name,
                    grant,
                    key,
                    lifecycle,
                },
            )
            .await?;
        let secret = committed.secret.expect("a create issues a secret");
        Ok((committed.after, secret))
    }

    /// Reads a key visible to `principal`.
    pub async fn get(&self, principal: &Principal, id: &KeyId) -> Result<KeyRecord, KeyError> {
        if let Some(demand) = &self.demand {
            let record = demand.record(*id).await?;
            return visible(record, principal, id);
        }
        let (principal, id) = (principal.clone(), *id);
        self.read(move |store| visible(store.get(&id)?, &principal, &id))
            .await
    }

    /// Lists `account`'s keys in creation order: up to `limit` after
    /// `page_token` (empty: from the start), with the token for the next
    /// page (empty on the last). Tokens are opaque to callers and keyed to
    /// this process; a token it did not issue (made up, edited, another
    /// account's, or from before a restart) is `Invalid` on `page_token`.
    /// With `unused_for`,
    /// only keys unused that long (never used: counted from creation);
    /// such a page may hold fewer keys.
    pub async fn list(
        &self,
        account: Arc<str>,
        page_token: &str,
        limit: usize,
        unused_for: Option<Duration>,
    ) -> Result<(Vec<KeyRecord>, String), KeyError> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(
                Cursor::parse(page_token, &account, &self.page_key).ok_or_else(|| {
                    KeyError::Invalid {
                        field: "page_token",
                        problem: "not a token this server issued for this account's listing (tokens do not survive a restart: list again from the start)".into(),
                    }
                })?,
            )
        };
        if self.demand.is_some() && unused_for.is_some() {
            // Last use is known here only for the keys held now: a key busy
            // elsewhere would be listed as unused.
            return Err(KeyError::Invalid {
                field: "unused_for",
                problem: "an on-demand replica knows the last use only of the keys it holds; ask a full replica".into(),
            });
        }
        let listed = Arc::clone(&account);
        let (mut records, next) = match &self.demand {
            Some(demand) => demand.account_page(listed, after, limit).await?,
            None => {
                self.read(move |store| Ok(store.page(&listed, after, limit)?))
                    .await?
            }
        };
        if let Some(unused_for) = unused_for {
            let cutoff = now_nanos()
                .saturating_sub(i64::try_from(unused_for.as_nanos()).unwrap_or(i64::MAX));
            records.retain(|record| self.last_used(record).max(record.created_at) <= cutoff);
        }
        Ok((
            records,
            next.map(|cursor| cursor.token(&account, &self.page_key))
                .unwrap_or_default(),
        ))
    }

    /// Replaces a key's name, and its scopes when `grant` is given; returns
    /// the record before and after.
    pub async fn update(
        &self,
        principal: &Principal,
        id: &KeyId,
        name: String,
        grant: Option<ScopeSet>,
    ) -> Result<(KeyRecord, KeyRecord), KeyError> {
        let committed = self
            .submit(
                principal,
                Change::Update {
                    id: *id,
                    name,
                    grant,
                },
            )
            .await?;
        Ok(committed.changed())
    }

    /// Disables or enables a key, sets its expiry, replaces its address
    /// allowlist (canonical ranges) and/or its rate limit; `None` keeps each
    /// as it is.
    /// Returns the record before and after.
    pub async fn set_state(
        &self,
        principal: &Principal,
        id: &KeyId,
        state: StateChange,
    ) -> Result<(KeyRecord, KeyRecord), KeyError> {
        let committed = self
            .submit(principal, Change::SetState { id: *id, state })
            .await?;
        Ok(committed.changed())
    }

    /// Issues a new secret for the same key; the previous one keeps working
    /// for `overlap`. Returns the record before and after, and the new key
    /// text, shown once.
    pub async fn rotate(
        &self,
        principal: &Principal,
        id: &KeyId,
        overlap: Duration,
    ) -> Result<(KeyRecord, KeyRecord, String), KeyError> {
        let key = key::generate_secret(*id).map_err(|_| KeyError::Rng)?;
        let overlap_nanos = i64::try_from(overlap.as_nanos()).unwrap_or(i64::MAX);
        let mut committed = self
            .submit(
                principal,
                Change::Rotate {
                    id: *id,
                    rotation: Rotation { key, overlap_nanos },
                },
            )
            .await?;
        let secret = committed.secret.take().expect("a rotation issues a secret");
        let (before, after) = committed.changed();
        Ok((before, after, secret))
    }

    /// Acts on a key's secret found in public (a verified secret scanning
    /// report; see [`change::Change::Leaked`]): the record before and
    /// after (after: the removed record, marked, when revoked), or `None`
    /// when `found` is no live key's secret. A full index holds every live
    /// key, so a token it does not verify (both secrets compared in
    /// constant time) costs no write; an on-demand replica asks the writer,
    /// which reads etcd. The writer checks again at the commit point.
    pub async fn leaked(
        &self,
        found: &key::PresentedKey<'_>,
        leak: crate::domain::record::Leak,
        action: LeakAction,
    ) -> Result<Option<(KeyRecord, KeyRecord)>, KeyError> {
        if self.demand.is_none()
            && self
                .index
                .pin()
                .verify(found, now_nanos(), crate::store::index::SecretUse::Decision)
                .is_err()
        {
            return Ok(None);
        }
        let change = Change::Leaked {
            id: found.id,
            found: found.secret_hash(),
            leak,
            action,
        };
        match self.submit(&Principal::Admin, change).await {
            Ok(committed) => Ok(Some(committed.changed())),
            Err(KeyError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Moves credits between a key's record in `account` (when known) and
    /// this sidecar's lease on them (see `usage::credits`), in the
    /// account's turn at the writer (one tenant's credit traffic queues behind its
    /// own changes, not the admin's or another tenant's): how many a
    /// reservation moved into the lease, as the commit point counted them
    /// (0 for another movement), and the period of the key's credits after
    /// it.
    pub async fn move_credits(
        &self,
        id: KeyId,
        account: Option<&Arc<str>>,
        movement: change::CreditMovement,
    ) -> Result<(u64, i64), KeyError> {
        let committed = self
            .submit_in(account, &Principal::Admin, Change::Credits { id, movement })
            .await?;
        let moved = match (movement, &committed.before) {
            (change::CreditMovement::Reserve { .. }, Some(before)) => committed
                .after
                .access
                .limits
                .credits
                .zip(before.access.limits.credits)
                .map_or(0, |(after, before)| after.reserved_from(&before)),
            _ => 0,
        };
        let period = committed
            .after
            .access
            .limits
            .credits
            .map_or(0, |credits| credits.refilled_at);
        Ok((moved, period))
    }

    /// Revokes a key: removed from disk, then from the index.
    pub async fn delete(&self, principal: &Principal, id: &KeyId) -> Result<KeyRecord, KeyError> {
        Ok(self
            .submit(principal, Change::Delete { id: *id })
            .await?
            .after)
    }

    /// Starts an online backup of every key at one point in time
    /// ([`snapshot`]): the backup file's chunks, in order. Standalone, the
    /// writer fixes the point between two batches (waiting at most the
    /// write timeout for it); replicated, etcd's current revision is the
    /// point. Writes go on meanwhile. The caller checks that the admin asks.
    pub async fn backup(
        &self,
        origin: snapshot::Origin,
    ) -> Result<snapshot::Chunks, snapshot::SnapshotError> {
        use snapshot::SnapshotError;
        let turn = Arc::clone(&self.backups)
            .try_acquire_owned()
            .map_err(|_| SnapshotError::Busy)?;
        let source = if let Some(etcd) = &self.etcd {
            snapshot::Source::Etcd(Box::new(etcd.remote()))
        } else {
            let (reply, begun) = oneshot::channel();
            self.commands
                .try_send(Command::Snapshot(reply))
                .map_err(|_| SnapshotError::Unavailable)?;
            match tokio::time::timeout(self.write_timeout, begun).await {
                Ok(Ok(begun)) => snapshot::Source::Store(begun?),
                Ok(Err(_)) | Err(_) => return Err(SnapshotError::Unavailable),
            }
        };
        let (chunks, receiver) = tokio::sync::mpsc::channel(snapshot::CHUNKS_IN_FLIGHT);
        let sink = snapshot::Sink {
            chunks,
            runtime: tokio::runtime::Handle::current(),
        };
        let index = Arc::clone(&self.index);
        tokio::task::spawn_blocking(move || {
            snapshot::take(source, &index, &origin, &sink);
            drop(turn);
        });
        Ok(receiver)
    }

    /// When a stored key last authorized a request, to the minute (Unix
    /// nanos; 0: never). From memory: the newest this sidecar knows.
    #[must_use]
    pub fn last_used(&self, record: &KeyRecord) -> i64 {
        self.index.last_used(&record.id)
    }

    /// How many live keys there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// At shutdown: commits what is queued, flushes, and releases the
    /// store, waiting at most the write timeout. Every acknowledged change
    /// is already durable; an error here only reports the disk's state.
    /// Later changes are refused with [`KeyError::Unavailable`].
    pub async fn close(&self) -> Result<(), KeyError> {
        let (reply, closed) = oneshot::channel();
        self.commands
            .try_send(Command::Close(reply))
            .map_err(|_| KeyError::Unavailable)?;
        match tokio::time::timeout(self.write_timeout, closed).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(KeyError::Store(error)),
            Ok(Err(_)) | Err(_) => Err(KeyError::Unavailable),
        }
    }

    /// Hands a change to the writer and waits for its outcome, at most the
    /// write timeout. A caller that gives up is told nothing was
    /// acknowledged; the writer then drops the change if it has not started.
    async fn submit(&self, actor: &Principal, change: Change) -> Result<Committed, KeyError> {
        let domain = match actor {
            Principal::Admin => None,
            Principal::Key { account, .. } => Some(account),
        };
        self.submit_in(domain, actor, change).await
    }

    /// [`Self::submit`], waiting its turn among `domain`'s changes (an
    /// account; `None`: the admin's).
    async fn submit_in(
        &self,
        domain: Option<&Arc<str>>,
        actor: &Principal,
        change: Change,
    ) -> Result<Committed, KeyError> {
        let deadline = Instant::now() + self.write_timeout;
        let _turn = tokio::time::timeout_at(deadline.into(), self.gates.enter(domain))
            .await
            .map_err(|_| KeyError::Busy)?;
        let (reply, outcome) = oneshot::channel();
        let job = Job {
            actor: actor.clone(),
            change,
            deadline,
            reply,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.commands.try_send(Command::Commit(Box::new(job)))
        {
            return Err(KeyError::Busy);
        }
        match tokio::time::timeout_at(deadline.into(), outcome).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(KeyError::Unavailable),
            Err(_) => {
                self.stalled();
                Err(KeyError::Unavailable)
            }
        }
    }

    /// Runs a store read on the blocking pool, bounded by the write timeout.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, KeyError> + Send + 'static,
    ) -> Result<T, KeyError> {
        let store = self.shared.store().ok_or(KeyError::Unavailable)?;
        let task = tokio::task::spawn_blocking(move || read(&store));
        match tokio::time::timeout(self.write_timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(KeyError::Unavailable),
            Err(_) => {
                self.stalled();
                Err(KeyError::Unavailable)
            }
        }
    }

    /// The store did not answer in time: report it until it does again.
    fn stalled(&self) {
        self.shared
            .publish(StoreHealth::Failing(FailureKind::NotResponding));
    }
}

/// What a backend opens to: itself, what it shares with the async side,
/// the live index, and the on-demand policy if any.
type Opened = (
    Box<dyn Backend>,
    Arc<Shared>,
    Arc<Index>,
    Option<Arc<OnDemand>>,
);

/// Opens the backend `settings` pick: sled as the truth standalone, etcd
/// through `etcd` replicated (holding every key, or those presented).
fn open_backend(
    dir: PathBuf,
    catalog: &Arc<Catalog>,
    settings: &Settings,
    metrics: &Arc<Metrics>,
    etcd: Option<&EtcdRuntime>,
) -> Result<Opened, StoreError> {
    let Some(etcd) = etcd else {
        let (backend, shared, index) =
            Standalone::open(dir, Arc::clone(catalog), Arc::clone(metrics))?;
        return Ok((Box::new(backend), shared, index, None));
    };
    let (mut backend, shared, index) = Replicated::open(
        dir,
        Arc::clone(catalog),
        Arc::clone(metrics),
        etcd.remote(),
        settings.on_demand.is_some(),
    )?;
    let demand = settings.on_demand.map(|demand| {
        let demand = OnDemand::new(
            demand,
            etcd.etcd().clone(),
            etcd.handle(),
            Arc::clone(&index),
            Arc::clone(metrics),
        );
        backend.hold_on_demand(Arc::clone(&demand));
        demand
    });
    Ok((Box::new(backend), shared, index, demand))
}

/// A key the principal may see: any for the admin, same-account for a
/// key. Other accounts' keys are reported as not found, not forbidden, so a
/// key cannot probe for ids elsewhere.
fn visible(
    record: Option<KeyRecord>,
    principal: &Principal,
    id: &KeyId,
) -> Result<KeyRecord, KeyError> {
    let not_found = || KeyError::NotFound(id.to_string());
    let record = record.ok_or_else(not_found)?;
    match principal {
        Principal::Key { account, .. } if record.account != **account => Err(not_found()),
        _ => Ok(record),
    }
}

/// Account ids: 1 to 64 of `A-Z a-z 0-9 . _ - @`.
pub fn validate_account(account: &str) -> Result<(), KeyError> {
    if crate::domain::key::looks_like_secret(account) {
        return Err(KeyError::Invalid {
            field: "account_id",
            problem: crate::domain::key::CREDENTIAL_REFUSED.into(),
        });
    }
    let ok = !account.is_empty()
        && account.len() <= 64
        && account
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else if account.is_empty() {
        Err(KeyError::Invalid {
            field: "account_id",
            problem: "required with the admin token".into(),
        })
    } else {
        Err(KeyError::Invalid {
            field: "account_id",
            problem: "must be 1 to 64 characters of A-Z a-z 0-9 . _ - @".into(),
        })
    }
}
