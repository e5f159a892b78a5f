//! Key management, one service for both front doors (gRPC `KeyManager` and
//! SendGrid's REST API): each operation's flow — permit, field checks
//! ([`fields`]), the change through [`Keys`], the audit line — written
//! once. A front door authenticates the caller (as a layer), reads its
//! request into plain values and shapes the reply; nothing else.
//!
//! Values a front door could not read arrive as [`Given`] errors and are
//! refused at the point of the flow where the value is needed, so both
//! doors refuse a request for the same first reason, and every refused
//! change is audited under its [`Action`].

pub mod fields;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::access::Authenticator;
use crate::audit;
use crate::domain::catalog::Catalog;
use crate::domain::key::{CREDENTIAL_REFUSED, KeyId};
use crate::domain::record::KeyRecord;
use crate::domain::rules::Limits;
use crate::domain::scope_set::ScopeSet;
use crate::keys::snapshot::{Chunks, Origin, SnapshotError};
use crate::keys::{Expiry, KeyError, Keys, Lifecycle, Operation, Principal, StateChange};
use fields::{CreditsInput, GivenDuration, GrantInput, RateLimitInput, UnixTime};

/// A value a front door read from its request, or why it could not.
pub type Given<T> = Result<T, KeyError>;

/// A change a caller may attempt, by its name in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A new key.
    Create,
    /// A key's name and scopes replaced.
    Update,
    /// A key's name replaced.
    Rename,
    /// A key revoked.
    Delete,
    /// A key disabled.
    Disable,
    /// A key enabled.
    Enable,
    /// A key's secret replaced.
    Rotate,
    /// A key's expiry set or cleared.
    SetExpiry,
    /// A key's address allowlist replaced.
    SetAllowlist,
    /// A key's rate limit set or removed.
    SetRateLimit,
    /// A key's usage credits set or removed.
    SetCredits,
    /// Every key read out to a backup.
    Backup,
}

impl Action {
    /// Its name in the audit log.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Rename => "rename",
            Self::Delete => "delete",
            Self::Disable => "disable",
            Self::Enable => "enable",
            Self::Rotate => "rotate",
            Self::SetExpiry => "set_expiry",
            Self::SetAllowlist => "set_allowlist",
            Self::SetRateLimit => "set_rate_limit",
            Self::SetCredits => "set_credits",
            Self::Backup => "backup",
        }
    }

    /// The operation whose scopes it needs (a backup is the admin's only,
    /// checked apart).
    #[must_use]
    pub fn operation(self) -> Operation {
        match self {
            Self::Create => Operation::Create,
            Self::Delete => Operation::Delete,
            Self::Rotate => Operation::Rotate,
            Self::Update
            | Self::Rename
            | Self::Disable
            | Self::Enable
            | Self::SetExpiry
            | Self::SetAllowlist
            | Self::SetRateLimit
            | Self::SetCredits
            | Self::Backup => Operation::Update,
        }
    }
}

/// A new key, as a request gave it.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Its name.
    pub name: String,
    /// Its scopes; none given: Full Access.
    pub grant: GrantInput,
    /// When it expires, if ever.
    pub expires_at: Option<UnixTime>,
    /// The addresses it works from (empty: any).
    pub allowed_cidrs: Vec<String>,
    /// Its rate limit, if any.
    pub rate_limit: Option<RateLimitInput>,
    /// Its usage credits, if any.
    pub credits: Option<CreditsInput>,
}

/// A key's name and scopes, replaced, as a request gave them.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The new name.
    pub name: String,
    /// The new scopes (required).
    pub grant: GrantInput,
    /// Why no scopes is refused, in the front door's own words (each
    /// names its own way to change only the name).
    pub grant_required: &'static str,
}

/// One page of a listing, as a request asked for it.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// The previous page's token ("" from the start).
    pub token: String,
    /// Keys per page (0: the default).
    pub size: i64,
    /// Only keys unused this long.
    pub unused_for: Option<GivenDuration>,
}

/// Why a backup was not started.
#[derive(Debug)]
pub enum BackupError {
    /// The caller may not take one (audited).
    Refused(KeyError),
    /// The store could not start one.
    Failed(SnapshotError),
}

/// The management service.
#[derive(Debug, Clone)]
pub struct Manager {
    keys: Arc<Keys>,
    access: Authenticator,
    usage: Option<Arc<crate::usage::UsagePlane>>,
}

impl Manager {
    /// The service over the shared key store; `access` recognizes the
    /// admin token pasted into a field.
    #[must_use]
    pub fn new(keys: Arc<Keys>, access: Authenticator) -> Self {
        Self {
            keys,
            access,
            usage: None,
        }
    }

    /// The same, reading key usage from `usage`.
    #[must_use]
    pub fn with_usage(mut self, usage: Option<Arc<crate::usage::UsagePlane>>) -> Self {
        self.usage = usage;
        self
    }

    /// The catalog in force.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        self.keys.catalog()
    }

    /// The scopes `principal` holds.
    #[must_use]
    pub fn held_scopes(&self, principal: &Principal) -> ScopeSet {
        self.keys.held_scopes(principal)
    }

    /// When `record`'s key was last allowed on this sidecar (Unix nanos;
    /// 0: never).
    #[must_use]
    pub fn last_used(&self, record: &KeyRecord) -> i64 {
        self.keys.last_used(record)
    }

    /// Whether `principal` may read keys: a changed key is shown in full
    /// only to such a caller.
    #[must_use]
    pub fn may_read(&self, principal: &Principal) -> bool {
        self.keys.permit(principal, Operation::Read).is_ok()
    }

    /// Whether `principal` may read keys, refused otherwise (reads are not
    /// audited).
    pub fn permit_read(&self, principal: &Principal) -> Given<()> {
        self.keys.permit(principal, Operation::Read)
    }

    /// Whether `principal` may attempt `action` at all; a refusal is
    /// audited. (Each flow checks again; REST asks first, before it reads
    /// a body.)
    pub fn permit(&self, principal: &Principal, action: Action) -> Given<()> {
        let permitted = match action {
            Action::Backup => admin_only(principal),
            _ => self.keys.permit(principal, action.operation()),
        };
        permitted.inspect_err(|error| audit::refused(principal, action.label(), error))
    }

    // --- reads ---------------------------------------------------------------

    /// One key, in the account `account` names (if it names one).
    pub async fn get(
        &self,
        principal: &Principal,
        id: &str,
        account: Given<&str>,
    ) -> Given<KeyRecord> {
        let id = self.on_key(principal, Operation::Read, id, account).await?;
        self.keys.get(principal, &id).await
    }

    /// A key's usage over `range` (see [`crate::usage::Range`]), summed
    /// over every sidecar: whoever may read the key may read its usage.
    pub async fn usage(
        &self,
        principal: &Principal,
        id: &str,
        account: Given<&str>,
        range: Given<&str>,
    ) -> Given<crate::usage::KeyUsage> {
        let record = self.get(principal, id, account).await?;
        let range = fields::usage_range(range?)?;
        let usage = self.usage.as_ref().ok_or(KeyError::NoUsageStore)?;
        usage.usage(&record.id, range).await.map_err(|error| {
            tracing::warn!(%error, "usage store read failed");
            KeyError::UsageStoreAway
        })
    }

    /// One page of an account's keys, and the next page's token ("" on the
    /// last).
    pub async fn list(
        &self,
        principal: &Principal,
        account: Given<&str>,
        page: Given<PageRequest>,
    ) -> Given<(Vec<KeyRecord>, String)> {
        let account = self.account(principal, Operation::Read, account)?;
        let page = page?;
        let limit = fields::page_size(page.size)?;
        let unused_for = fields::unused_for(page.unused_for)?;
        self.keys
            .list(account, &page.token, limit, unused_for)
            .await
    }

    // --- changes -------------------------------------------------------------

    /// Creates a key in the account `account` names (a key's own); the
    /// record and its secret, shown this once.
    pub async fn create(
        &self,
        principal: &Principal,
        account: Given<&str>,
        key: Given<NewKey>,
    ) -> Given<(KeyRecord, String)> {
        let steps = async {
            let account = self.account(principal, Operation::Create, account)?;
            let key = key?;
            let name = self.name(&key.name)?;
            let grant = fields::grant(self.catalog(), &key.grant)?
                .unwrap_or_else(|| self.catalog().full_access());
            let lifecycle = Lifecycle {
                limits: Limits {
                    expires_at: fields::expires_at(key.expires_at)?,
                    allowed_cidrs: self.allowed_cidrs(&key.allowed_cidrs)?,
                    rate_limit: fields::rate_limit(key.rate_limit)?,
                    credits: fields::credits(key.credits, crate::clock::now_nanos())?,
                },
                credits_taken: false,
            };
            // In a task of its own: credits taken from the caller reach the
            // new key or go back even if the request is cancelled meanwhile.
            let (keys, caller) = (Arc::clone(&self.keys), principal.clone());
            let (record, secret) = tokio::spawn(async move {
                create_giving(&keys, &caller, (account, name, grant), lifecycle).await
            })
            .await
            .map_err(|_| KeyError::Unavailable)??;
            audit::changed(principal, Action::Create.label(), None, &record);
            Ok((record, secret))
        };
        self.audited(principal, Action::Create, steps).await
    }

    /// Replaces a key's name and scopes; the key as changed.
    pub async fn update(
        &self,
        principal: &Principal,
        (id, account): (&str, Given<&str>),
        replacement: Given<Replacement>,
    ) -> Given<KeyRecord> {
        let steps = async {
            let id = self
                .on_key(principal, Operation::Update, id, account)
                .await?;
            let replacement = replacement?;
            let name = self.name(&replacement.name)?;
            let grant = fields::grant(self.catalog(), &replacement.grant)?.ok_or_else(|| {
                KeyError::Invalid {
                    field: "scopes",
                    problem: replacement.grant_required.into(),
                }
            })?;
            let (before, record) = self.keys.update(principal, &id, name, Some(grant)).await?;
            audit::changed(principal, Action::Update.label(), Some(&before), &record);
            Ok(record)
        };
        self.audited(principal, Action::Update, steps).await
    }

    /// Renames a key; the key as changed.
    pub async fn rename(
        &self,
        principal: &Principal,
        (id, account): (&str, Given<&str>),
        name: Given<String>,
    ) -> Given<KeyRecord> {
        let steps = async {
            let id = self
                .on_key(principal, Operation::Update, id, account)
                .await?;
            let name = self.name(&name?)?;
            let (before, record) = self.keys.update(principal, &id, name, None).await?;
            audit::changed(principal, Action::Rename.label(), Some(&before), &record);
            Ok(record)
        };
        self.audited(principal, Action::Rename, steps).await
    }

    /// Revokes a key: the very next decision refuses it.
    pub async fn delete(
        &self,
        principal: &Principal,
        (id, account): (&str, Given<&str>),
    ) -> Given<()> {
        let steps = async {
            let id = self
                .on_key(principal, Operation::Delete, id, account)
                .await?;
            let record = self.keys.delete(principal, &id).await?;
            audit::changed(principal, Action::Delete.label(), Some(&record), &record);
            Ok(())
        };
        self.audited(principal, Action::Delete, steps).await
    }

    /// Replaces a key's secret; the key as changed and its new secret,
    /// shown this once. The previous secret works for `overlap`.
    pub async fn rotate(
        &self,
        principal: &Principal,
        (id, account): (&str, Given<&str>),
        overlap: Given<Option<GivenDuration>>,
    ) -> Given<(KeyRecord, String)> {
        let steps = async {
            let id = self
                .on_key(principal, Operation::Rotate, id, account)
                .await?;
            let overlap = fields::overlap(overlap?)?;
            let (before, record, secret) = self.keys.rotate(principal, &id, overlap).await?;
            audit::changed(principal, Action::Rotate.label(), Some(&before), &record);
            Ok((record, secret))
        };
        self.audited(principal, Action::Rotate, steps).await
    }

    /// Disables (`true`) or enables a key.
    pub async fn set_disabled(
        &self,
        principal: &Principal,
        key: (&str, Given<&str>),
        disabled: bool,
    ) -> Given<KeyRecord> {
        let action = if disabled {
            Action::Disable
        } else {
            Action::Enable
        };
        self.change_state(principal, action, key, || {
            Ok(StateChange {
                disabled: Some(disabled),
                ..StateChange::default()
            })
        })
        .await
    }

    /// Sets (or with `None` clears) when a key stops working.
    pub async fn set_expiry(
        &self,
        principal: &Principal,
        key: (&str, Given<&str>),
        expires_at: Given<Option<UnixTime>>,
    ) -> Given<KeyRecord> {
        self.change_state(principal, Action::SetExpiry, key, || {
            let at = fields::expires_at(expires_at?)?;
            Ok(StateChange {
                expires_at: Some(at.map_or(Expiry::Never, Expiry::At)),
                ..StateChange::default()
            })
        })
        .await
    }

    /// Replaces the addresses a key works from (empty: any).
    pub async fn set_allowlist(
        &self,
        principal: &Principal,
        key: (&str, Given<&str>),
        cidrs: Given<Vec<String>>,
    ) -> Given<KeyRecord> {
        self.change_state(principal, Action::SetAllowlist, key, || {
            Ok(StateChange {
                allowed_cidrs: Some(self.allowed_cidrs(&cidrs?)?),
                ..StateChange::default()
            })
        })
        .await
    }

    /// Sets (or with `None` removes) a key's rate limit.
    pub async fn set_rate_limit(
        &self,
        principal: &Principal,
        key: (&str, Given<&str>),
        limit: Given<Option<RateLimitInput>>,
    ) -> Given<KeyRecord> {
        self.change_state(principal, Action::SetRateLimit, key, || {
            Ok(StateChange {
                rate_limit: Some(fields::rate_limit(limit?)?),
                ..StateChange::default()
            })
        })
        .await
    }

    /// Sets (or with `None` removes) a key's usage credits.
    pub async fn set_credits(
        &self,
        principal: &Principal,
        key: (&str, Given<&str>),
        credits: Given<Option<CreditsInput>>,
    ) -> Given<KeyRecord> {
        self.change_state(principal, Action::SetCredits, key, || {
            Ok(StateChange {
                credits: Some(fields::credits(credits?, crate::clock::now_nanos())?),
                ..StateChange::default()
            })
        })
        .await
    }

    /// Starts a backup of every key (the admin's only); its chunks.
    pub async fn backup(
        &self,
        principal: &Principal,
        origin: Origin,
    ) -> Result<Chunks, BackupError> {
        self.permit(principal, Action::Backup)
            .inspect_err(|error| audit::refused(principal, Action::Backup.label(), error))
            .map_err(BackupError::Refused)?;
        let chunks = self
            .keys
            .backup(origin)
            .await
            .map_err(BackupError::Failed)?;
        audit::backup(principal);
        Ok(chunks)
    }

    // --- steps ---------------------------------------------------------------

    /// The lifecycle changes: UpdateKey's rules, then one state change
    /// (`state` reads and checks the request's values).
    async fn change_state(
        &self,
        principal: &Principal,
        action: Action,
        (id, account): (&str, Given<&str>),
        state: impl FnOnce() -> Given<StateChange>,
    ) -> Given<KeyRecord> {
        let steps = async {
            let id = self
                .on_key(principal, Operation::Update, id, account)
                .await?;
            let (before, record) = self.keys.set_state(principal, &id, state()?).await?;
            audit::changed(principal, action.label(), Some(&before), &record);
            Ok(record)
        };
        self.audited(principal, action, steps).await
    }

    /// Runs a change's steps; a refusal is audited under `action`.
    async fn audited<T>(
        &self,
        principal: &Principal,
        action: Action,
        steps: impl Future<Output = Given<T>>,
    ) -> Given<T> {
        steps
            .await
            .inspect_err(|error| audit::refused(principal, action.label(), error))
    }

    /// What every operation on one key does first: the caller may do
    /// `operation`, the id parses, and the key is in the account `account`
    /// names (see [`Self::confine`]).
    async fn on_key(
        &self,
        principal: &Principal,
        operation: Operation,
        id: &str,
        account: Given<&str>,
    ) -> Given<KeyId> {
        self.keys.permit(principal, operation)?;
        let id = fields::key_id(id)?;
        self.confine(principal, account?, &id).await?;
        Ok(id)
    }

    /// Confines an operation on one key to the account `named` (none:
    /// ""): the admin acting for `globex` finds no key of `acme` (not
    /// found), and a key cannot name another account. A key's account
    /// never changes, so checking before the change is as good as during
    /// it.
    async fn confine(&self, principal: &Principal, named: &str, id: &KeyId) -> Given<()> {
        let named = self.screened("account_id", named)?;
        if named.is_empty() {
            return Ok(());
        }
        match principal {
            Principal::Admin => {
                let record = self.keys.get(principal, id).await?;
                if record.account != named {
                    return Err(KeyError::NotFound(id.to_string()));
                }
                Ok(())
            }
            Principal::Key { account, .. } if &**account != named => Err(KeyError::Beyond {
                field: "account_id",
                problem: "account_id: an API key acts only in its own account".into(),
            }),
            Principal::Key { .. } => Ok(()),
        }
    }

    /// The account to act in: the one the admin names, or the key's own
    /// (a key naming another is refused), once the caller may do
    /// `operation`.
    fn account(
        &self,
        principal: &Principal,
        operation: Operation,
        named: Given<&str>,
    ) -> Given<Arc<str>> {
        let named = self.screened("account_id", named?)?;
        self.keys.authorize(principal, operation, named)
    }

    /// A key name, checked and screened for the admin token.
    fn name(&self, name: &str) -> Given<String> {
        let name = fields::name(name)?;
        self.screened("name", &name)?;
        Ok(name)
    }

    /// Address ranges, none of them the admin token, canonical.
    fn allowed_cidrs(&self, cidrs: &[String]) -> Given<Vec<String>> {
        for cidr in cidrs {
            self.screened("allowed_cidrs", cidr)?;
        }
        fields::allowed_cidrs(cidrs)
    }

    /// Refuses a free-text value that is, or holds as a word, the admin
    /// token (pasted into the wrong field it would be stored and logged),
    /// without echoing it.
    fn screened<'a>(&self, field: &'static str, value: &'a str) -> Given<&'a str> {
        if self.access.holds_admin_token(value) {
            return Err(KeyError::Invalid {
                field,
                problem: CREDENTIAL_REFUSED.into(),
            });
        }
        Ok(value)
    }
}

/// Backups are the admin's only.
fn admin_only(principal: &Principal) -> Given<()> {
    match principal {
        Principal::Admin => Ok(()),
        Principal::Key { .. } => Err(KeyError::PermissionDenied(
            "backups are for the admin token only".into(),
        )),
    }
}

/// Creates a key, giving it credits out of the calling key's own balance
/// when the caller is a key with credits (see `keys::stage::inherit`):
/// taken first; given back if the key is surely not created.
async fn create_giving(
    keys: &Keys,
    principal: &Principal,
    (account, name, grant): (Arc<str>, String, ScopeSet),
    lifecycle: Lifecycle,
) -> Result<(KeyRecord, String), KeyError> {
    let transfer = take_credits(keys, principal, lifecycle.limits.credits).await?;
    let lifecycle = Lifecycle {
        credits_taken: transfer.is_some(),
        ..lifecycle
    };
    let created = keys
        .create(principal, account, name, grant, lifecycle)
        .await;
    match (created, transfer) {
        (Ok(created), _) => Ok(created),
        (
            Err(
                error @ (KeyError::Invalid { .. }
                | KeyError::PermissionDenied(_)
                | KeyError::Beyond { .. }
                | KeyError::LimitReached { .. }
                | KeyError::NotFound(_)
                | KeyError::Busy),
            ),
            Some((id, account, amount, period)),
        ) => {
            // Refused by the rules, or never reached the writer, so surely
            // not created: the credits go back to their giver, retried
            // while the writer is too busy to take them (which proves they
            // are not back yet). After a timeout or a storage failure the
            // key may have been created: they are lost then, never granted
            // twice.
            let back = crate::keys::change::CreditMovement::GiveBack { amount, period };
            for attempt in 1..=GIVE_BACK_ATTEMPTS {
                match keys.move_credits(id, Some(&account), back).await {
                    Err(KeyError::Busy) if attempt < GIVE_BACK_ATTEMPTS => {}
                    Ok(_) => break,
                    Err(lost) => {
                        tracing::warn!(key_id = %id, error = %lost, "credits taken for a key that was not created could not be given back");
                        break;
                    }
                }
            }
            Err(error)
        }
        (Err(error), _) => Err(error),
    }
}

/// Tries at giving back credits taken for a key that was not created.
const GIVE_BACK_ATTEMPTS: usize = 3;

/// Takes the credits a calling key gives a key it creates out of its own
/// balance: `(giver, account, amount, period)`, or `None` when the caller
/// is the admin, gives no credits, or has none of its own.
async fn take_credits(
    keys: &Keys,
    principal: &Principal,
    credits: Option<crate::domain::credits::Credits>,
) -> Result<Option<(KeyId, Arc<str>, u64, i64)>, KeyError> {
    let (Principal::Key { id, account, .. }, Some(credits)) = (principal, credits) else {
        return Ok(None);
    };
    let amount = credits.remaining;
    let withdraw = crate::keys::change::CreditMovement::Withdraw { amount };
    match keys.move_credits(*id, Some(account), withdraw).await {
        Ok((_, period)) => Ok(Some((*id, Arc::clone(account), amount, period))),
        Err(KeyError::NoCreditsLeft) => Ok(None),
        Err(error) => Err(error),
    }
}
