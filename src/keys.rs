//! The write path and key management: rules, then a durable store write,
//! then the index update. Every acknowledged change is on disk and visible
//! to the very next decision.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;

use crate::domain::catalog::{Catalog, KeyKind};
use crate::domain::key::{self, KeyId, SecretHash};
use crate::domain::rules;
use crate::domain::scope_set::ScopeSet;
use crate::metrics::Metrics;
use crate::store::db::{Cursor, RawRecord, Store, StoreError};
use crate::store::index::{Entry, Index};
use crate::store::record::KeyRecord;

/// Who is calling a management operation.
#[derive(Debug, Clone)]
pub enum Principal {
    /// The operator's admin token: every scope, any account.
    Admin,
    /// An API key, acting inside its own account with its own scopes.
    Key {
        /// The calling key.
        id: KeyId,
        /// Its account.
        account: Arc<str>,
        /// Its scopes.
        scopes: ScopeSet,
    },
}

impl Principal {
    /// A label for audit logs: `admin` or the key id.
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Self::Admin => "admin".to_owned(),
            Self::Key { id, .. } => id.to_string(),
        }
    }
}

/// Why a management operation failed. Mapped to gRPC codes in one place
/// (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A request field is invalid; nothing changed.
    #[error("{field}: {problem}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The caller may not do this; nothing changed.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such key visible to the caller.
    #[error("key {0} not found")]
    NotFound(String),
    /// The account is full; nothing changed.
    #[error("account {account:?} already has {limit} keys, the maximum")]
    LimitReached {
        /// The account.
        account: String,
        /// The configured limit.
        limit: usize,
    },
    /// Storage failed; the change may not have happened (it was not acknowledged).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The system RNG failed.
    #[error("random number generator failed")]
    Rng,
}

/// Key management: the rules, the durable store and the live index, kept in
/// step. Writes are serialised; reads of the index never wait on them.
#[derive(Debug)]
pub struct Keys {
    store: Store,
    index: Arc<Index>,
    catalog: Arc<Catalog>,
    max_per_account: usize,
    metrics: Arc<Metrics>,
    /// Serialises writes: the per-account count check and the write it
    /// guards happen as one step. Holds interned account ids and key counts.
    accounts: Mutex<AccountCounts>,
}

/// The management operation being attempted, for its scope requirement.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    /// CreateKey.
    Create,
    /// GetKey, ListKeys.
    Read,
    /// UpdateKey, RenameKey.
    Update,
    /// DeleteKey.
    Delete,
}

impl Operation {
    fn scope(self) -> &'static str {
        match self {
            Self::Create => "api_keys.create",
            Self::Read => "api_keys.read",
            Self::Update => "api_keys.update",
            Self::Delete => "api_keys.delete",
        }
    }
}

impl Keys {
    /// Loads every stored key into a fresh index. Stored scope names the
    /// catalog no longer defines grant nothing (and are logged), but stay in
    /// the record, so restoring the catalog restores them.
    pub fn open(
        store: Store,
        catalog: Arc<Catalog>,
        max_per_account: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Arc<Index>), StoreError> {
        let index = Index::default();
        // Read, decode and index in parallel: at a million keys, start-up
        // time is the time to walk the store.
        let parts = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let loaded: Vec<Result<AccountCounts, StoreError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..parts)
                .map(|part| {
                    let (store, catalog, index) = (&store, &catalog, &index);
                    scope.spawn(move || load_part(store.partition(part, parts), catalog, index))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        // The first part's Arc for an account is kept, so later keys of the
        // account share it.
        let mut accounts = AccountCounts::new();
        for part in loaded {
            for (account, count) in part? {
                *accounts.entry(account).or_default() += count;
            }
        }
        let index = Arc::new(index);
        metrics.set_keys(index.len());
        let keys = Self {
            store,
            index: Arc::clone(&index),
            catalog,
            max_per_account,
            metrics,
            accounts: Mutex::new(accounts),
        };
        Ok((keys, index))
    }

    /// The catalog in force.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Checks that `principal` may perform `operation`: the admin may do
    /// anything; a key needs the matching `api_keys.*` scope. Operations
    /// addressed by key id need only this, since the record's account then
    /// decides visibility.
    pub fn permit(&self, principal: &Principal, operation: Operation) -> Result<(), KeyError> {
        let Principal::Key { scopes, .. } = principal else {
            return Ok(());
        };
        let needed = self.catalog.lookup(operation.scope());
        if needed.is_some_and(|id| scopes.contains(id)) {
            Ok(())
        } else {
            Err(KeyError::PermissionDenied(format!(
                "this API key lacks the scope {}",
                operation.scope()
            )))
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
                    return Err(KeyError::PermissionDenied(
                        "account_id: an API key acts only in its own account".into(),
                    ));
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
    ) -> Result<(KeyRecord, String), KeyError> {
        self.check_grant(principal, &grant)?;
        let mut accounts = self.accounts.lock().await;
        let count = accounts.get(&account).copied().unwrap_or_default();
        if count >= self.max_per_account {
            return Err(KeyError::LimitReached {
                account: account.to_string(),
                limit: self.max_per_account,
            });
        }
        let new_key = key::generate().map_err(|_| KeyError::Rng)?;
        let now = now_nanos();
        let record = KeyRecord {
            key_id: new_key.id.as_bytes().to_vec(),
            secret_sha256: new_key.hash.as_bytes().to_vec(),
            account_id: account.to_string(),
            name,
            kind: kind_number(self.catalog.kind_of(&grant)),
            scopes: self.catalog.names(&grant),
            created_at_unix_nanos: now,
            updated_at_unix_nanos: now,
        };
        self.timed("create", self.store.create(&record)).await?;
        let account = intern(&accounts, &account);
        *accounts.entry(Arc::clone(&account)).or_default() += 1;
        self.index.insert(
            new_key.id,
            Entry {
                hash: new_key.hash,
                scopes: grant,
                account,
            },
        );
        self.metrics.set_keys(self.index.len());
        Ok((record, new_key.text))
    }

    /// Reads a key visible to `principal`.
    pub fn get(&self, principal: &Principal, id: &KeyId) -> Result<KeyRecord, KeyError> {
        self.visible(principal, id)
    }

    /// Lists `account`'s keys in creation order.
    pub fn list(
        &self,
        account: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, Option<Cursor>), KeyError> {
        Ok(self.store.page(account, after, limit)?)
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
        if let Some(grant) = &grant {
            self.check_grant(principal, grant)?;
        }
        let accounts = self.accounts.lock().await;
        let before = self.visible(principal, id)?;
        let mut record = before.clone();
        record.name = name;
        if let Some(grant) = &grant {
            record.scopes = self.catalog.names(grant);
            record.kind = kind_number(self.catalog.kind_of(grant));
        }
        record.updated_at_unix_nanos = now_nanos().max(record.updated_at_unix_nanos);
        self.timed("update", self.store.replace(&record)).await?;
        if let Some(grant) = grant {
            let account = intern(&accounts, &record.account_id);
            self.index.insert(
                *id,
                Entry {
                    hash: record_hash(&record),
                    scopes: grant,
                    account,
                },
            );
        }
        Ok((before, record))
    }

    /// Revokes a key: removed from disk, then from the index.
    pub async fn delete(&self, principal: &Principal, id: &KeyId) -> Result<KeyRecord, KeyError> {
        let mut accounts = self.accounts.lock().await;
        let record = self.visible(principal, id)?;
        self.timed("delete", self.store.remove(&record)).await?;
        self.index.remove(id);
        self.metrics.set_keys(self.index.len());
        if let Some(count) = accounts.get_mut(record.account_id.as_str()) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                accounts.remove(record.account_id.as_str());
            }
        }
        Ok(record)
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

    /// Flushes the store (at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// Runs one durable write, recording its latency and outcome.
    async fn timed(
        &self,
        operation: &'static str,
        write: impl std::future::Future<Output = Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let result = write.await;
        self.metrics
            .store_write(operation, started.elapsed(), result.is_ok());
        result
    }

    fn check_grant(&self, principal: &Principal, grant: &ScopeSet) -> Result<(), KeyError> {
        match rules::escalation(&self.held_scopes(principal), grant) {
            None => Ok(()),
            Some(missing) => Err(KeyError::PermissionDenied(format!(
                "cannot grant scopes the caller does not hold: {}",
                summarize(&self.catalog.names(&missing))
            ))),
        }
    }

    /// A key the principal may see: any for the admin, same-account for a
    /// key. Other accounts' keys are reported as not found, not forbidden,
    /// so a key cannot probe for ids elsewhere.
    fn visible(&self, principal: &Principal, id: &KeyId) -> Result<KeyRecord, KeyError> {
        let not_found = || KeyError::NotFound(id.to_string());
        let record = self.store.get(id)?.ok_or_else(not_found)?;
        match principal {
            Principal::Key { account, .. } if record.account_id != **account => Err(not_found()),
            _ => Ok(record),
        }
    }
}

/// Loads part of the stored records into the index; returns key counts per
/// account. Each part interns its own account ids.
fn load_part(
    part: impl Iterator<Item = Result<RawRecord, StoreError>>,
    catalog: &Catalog,
    index: &Index,
) -> Result<AccountCounts, StoreError> {
    let mut accounts = AccountCounts::new();
    for raw in part {
        let view = raw?.index_view()?;
        let (scopes, unknown) = catalog.resolve_stored(&view.scopes);
        let id = KeyId::from_bytes(view.key_id.as_slice().try_into().unwrap_or_default());
        if !unknown.is_empty() {
            tracing::warn!(key_id = %id, ?unknown, "stored scopes not in the catalog grant nothing");
        }
        let account = intern(&accounts, &view.account_id);
        *accounts.entry(Arc::clone(&account)).or_default() += 1;
        index.insert(
            id,
            Entry {
                hash: SecretHash::from_bytes(
                    view.secret_sha256.as_slice().try_into().unwrap_or([0; 32]),
                ),
                scopes,
                account,
            },
        );
    }
    Ok(accounts)
}

/// Account ids: 1 to 64 of `A-Z a-z 0-9 . _ - @`.
pub fn validate_account(account: &str) -> Result<(), KeyError> {
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

/// At most ten names, then a count: errors stay readable.
fn summarize(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(text, " and {} more", names.len() - SHOWN);
    }
    text
}

/// Live keys per account, keyed by the one shared copy of each account id.
type AccountCounts = HashMap<Arc<str>, usize>;

/// The shared copy of `account`'s id, or a new one for a new account.
fn intern(accounts: &AccountCounts, account: &str) -> Arc<str> {
    accounts
        .get_key_value(account)
        .map_or_else(|| Arc::from(account), |(a, _)| Arc::clone(a))
}

fn record_hash(record: &KeyRecord) -> SecretHash {
    SecretHash::from_bytes(
        record
            .secret_sha256
            .as_slice()
            .try_into()
            .unwrap_or([0; 32]),
    )
}

/// The `keyward.v1.KeyKind` number of a kind (also stored in records).
#[must_use]
pub fn kind_number(kind: KeyKind) -> i32 {
    match kind {
        KeyKind::FullAccess => 1,
        KeyKind::RestrictedAccess => 2,
        KeyKind::Billing => 3,
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
