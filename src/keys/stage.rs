//! The management rules at the commit point, over any backend.
//!
//! A change reads the truth through a [`View`] (the sled store in
//! standalone mode, etcd in replicated mode), checks the rules against what
//! it read, and yields the one [`Write`] it makes. The backend then commits
//! that write atomically *with* what was read: sled because one writer
//! thread runs reads and writes serially, etcd because the transaction
//! compares every key the change read with the revision it read it at.
//! Either way a key revoked or narrowed a moment ago on any sidecar cannot
//! act on what it held before, and the per-account limit holds.

use std::fmt::Write as _;
use std::sync::Arc;

use super::change::{Change, Committed, CreditMovement, Expiry, LeakAction, Operation, Rotation};
use super::change::{KeyError, Lifecycle, Principal, StateChange};
use crate::clock::now_nanos;
use crate::domain::catalog::Catalog;
use crate::domain::key::{KeyId, NewKey, SecretHash};
use crate::domain::record::{Access, KeyRecord, Leak, PreviousSecret};
use crate::domain::rules::{self, Limit};
use crate::domain::scope_set::ScopeSet;

/// What a change reads from the truth, as of the backend's atomic step.
pub trait View {
    /// A key's record, if it exists.
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError>;
    /// How many keys `account` holds.
    fn count(&mut self, account: &str) -> Result<usize, KeyError>;
}

/// The one write a change makes; the record is [`Committed::after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// A new key.
    Create,
    /// A changed key (same id, account and creation time).
    Replace,
    /// A removed key.
    Remove,
}

/// A change that passed the rules: what to write, what to answer, and the
/// scopes of the written record (already resolved).
#[derive(Debug)]
pub struct Staged {
    /// The answer once the write commits.
    pub committed: Committed,
    /// What to write.
    pub write: Write,
    /// The written record's scopes (empty for a removal).
    pub scopes: ScopeSet,
    /// Must not run twice: after a commit whose outcome is unknown (etcd's
    /// reply lost, the record since changed by someone else) it fails
    /// rather than run its rules again. A credit move: run again, a
    /// give-back would return its credits twice.
    pub once: bool,
}

/// The rules, with the settings they depend on.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The catalog in force.
    pub catalog: &'a Catalog,
    /// Most keys per account.
    pub max_per_account: usize,
}

impl Rules<'_> {
    /// Checks `change` by `actor` against `view` and stages it.
    pub fn stage(
        &self,
        view: &mut dyn View,
        actor: &Principal,
        change: Change,
    ) -> Result<Staged, KeyError> {
        let (held, caller) = self.held_now(view, actor)?;
        if let Principal::Key { .. } = actor {
            require(self.catalog, &held, change.operation())?;
        }
        let caller = caller.as_ref().map(|record| &record.access);
        match change {
            Change::Create {
                account,
                name,
                grant,
                key,
                lifecycle,
            } => {
                let lifecycle = inherit(lifecycle, caller)?;
                self.create(view, &held, &account, (name, grant, key), lifecycle)
            }
            Change::Update { id, name, grant } => {
                let before = self.target(view, actor, &held, &id)?;
                self.update(&held, before, name, grant)
            }
            Change::SetState { id, state } => {
                let before = self.target(view, actor, &held, &id)?;
                self.set_state(before, state, caller)
            }
            Change::Delete { id } => {
                let record = self.target(view, actor, &held, &id)?;
                Ok(Staged {
                    committed: Committed {
                        before: Some(record.clone()),
                        after: record,
                        secret: None,
                    },
                    write: Write::Remove,
                    scopes: ScopeSet::default(),
                    once: false,
                })
            }
            Change::Rotate { id, rotation } => {
                let before = self.target(view, actor, &held, &id)?;
                if let Some(caller) = caller
                    && let Some(limit) = before
                        .access
                        .limits
                        .at(now_nanos())
                        .loosens(&caller.limits.at(now_nanos()), &Limit::ALL)
                {
                    // Its new secret would let the caller escape its own limits.
                    return Err(KeyError::PermissionDenied(format!(
                        "cannot rotate a key less restricted than the calling key: {}",
                        rules::loosening_refused(limit, "the calling key")
                    )));
                }
                Ok(self.rotate(before, rotation))
            }
            Change::Credits { id, movement } => {
                let before = view
                    .get(&id)?
                    .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
                let scopes = self.catalog.resolve_stored(&before.scopes).0;
                move_credits(before, scopes, movement)
            }
            Change::Leaked {
                id,
                found,
                leak,
                action,
            } => {
                let before = view
                    .get(&id)?
                    .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
                self.leaked(before, found, leak, action)
            }
        }
    }

    /// Acts on a secret found in public, if it is `before`'s current
    /// secret or its previous one in an open overlap (both compared in
    /// constant time); otherwise the found token is not this key (a
    /// matching id with another secret proves nothing) and nothing
    /// changes. The current secret: `action` (disable, revoke, or only
    /// mark). The previous one: its overlap ends at once (unless only
    /// reporting); the current secret was not found, so the key stays.
    /// A key reported again keeps the mark of its first report.
    fn leaked(
        &self,
        before: KeyRecord,
        found: SecretHash,
        mut leak: Leak,
        action: LeakAction,
    ) -> Result<Staged, KeyError> {
        let now = now_nanos();
        let access = &before.access;
        let current = access.secret.matches(&found);
        let previous = access
            .previous
            .is_some_and(|previous| previous.valid_until > now && previous.hash.matches(&found));
        if !current && !previous {
            return Err(KeyError::NotFound(before.id.to_string()));
        }
        leak.previous_secret = !current;
        let mut record = before.clone();
        record.leak = Some(match before.leak.clone() {
            Some(first) if first.previous_secret == leak.previous_secret => first,
            _ => leak,
        });
        let access = &mut record.access;
        match action {
            LeakAction::Report => {}
            _ if !current => access.previous = None,
            LeakAction::Disable => {
                access.disabled = true;
                // Only the admin enables it again, whatever the key holds.
                access.disabled_by_admin = true;
            }
            LeakAction::Revoke => {
                return Ok(Staged {
                    committed: Committed {
                        before: Some(before),
                        after: record,
                        secret: None,
                    },
                    write: Write::Remove,
                    scopes: ScopeSet::default(),
                    once: false,
                });
            }
        }
        let scopes = self.catalog.resolve_stored(&record.scopes).0;
        Ok(replaced(before, record, scopes, None))
    }

    fn create(
        &self,
        view: &mut dyn View,
        held: &ScopeSet,
        account: &Arc<str>,
        (name, grant, key): (String, ScopeSet, NewKey),
        lifecycle: Lifecycle,
    ) -> Result<Staged, KeyError> {
        self.no_escalation(held, &grant)?;
        if view.count(account)? >= self.max_per_account {
            return Err(KeyError::LimitReached {
                account: account.to_string(),
                limit: self.max_per_account,
            });
        }
        let now = now_nanos();
        let record = KeyRecord {
            id: key.id,
            account: account.to_string(),
            name,
            kind: self.catalog.kind_of(&grant),
            scopes: self.catalog.names(&grant),
            created_at: now,
            updated_at: now,
            access: Access {
                limits: lifecycle.limits,
                ..Access::new(key.hash)
            },
            leak: None,
        };
        Ok(Staged {
            committed: Committed {
                before: None,
                after: record,
                secret: Some(key.text),
            },
            write: Write::Create,
            scopes: grant,
            once: false,
        })
    }

    fn update(
        &self,
        held: &ScopeSet,
        before: KeyRecord,
        name: String,
        grant: Option<ScopeSet>,
    ) -> Result<Staged, KeyError> {
        let mut record = before.clone();
        record.name = name;
        let scopes = match grant {
            Some(grant) => {
                self.no_escalation(held, &grant)?;
                record.scopes = self.catalog.names(&grant);
                record.kind = self.catalog.kind_of(&grant);
                grant
            }
            None => self.catalog.resolve_stored(&record.scopes).0,
        };
        Ok(replaced(before, record, scopes, None))
    }

    /// Applies lifecycle settings. A key (`caller`) may only tighten: each
    /// limit it sets must be at least as strict as the target's and its
    /// own, and a key the admin disabled stays disabled until the admin
    /// enables it.
    fn set_state(
        &self,
        before: KeyRecord,
        state: StateChange,
        caller: Option<&Access>,
    ) -> Result<Staged, KeyError> {
        let mut record = before.clone();
        let access = &mut record.access;
        if let Some(disabled) = state.disabled {
            if let Some(leak) = &before.leak
                && caller.is_some()
                && !disabled
                && access.disabled
            {
                return Err(KeyError::PermissionDenied(format!(
                    "this key was disabled because its secret was found in public{}; only the admin can enable it (rotate it first: the found secret keeps working otherwise)",
                    if leak.url.is_empty() {
                        String::new()
                    } else {
                        format!(" at {}", leak.url)
                    }
                )));
            }
            if caller.is_some() && !disabled && access.disabled_by_admin {
                return Err(KeyError::PermissionDenied(
                    "the admin disabled this key; only the admin can enable it".into(),
                ));
            }
            access.disabled_by_admin = disabled && (caller.is_none() || access.disabled_by_admin);
            access.disabled = disabled;
        }
        match state.expires_at {
            Some(Expiry::Never) => access.limits.expires_at = None,
            Some(Expiry::At(nanos)) => access.limits.expires_at = Some(nanos),
            None => {}
        }
        let set = [
            state.expires_at.is_some(),
            state.allowed_cidrs.is_some(),
            state.rate_limit.is_some(),
            state.credits.is_some(),
        ];
        if let Some(allowed_cidrs) = state.allowed_cidrs {
            access.limits.allowed_cidrs = allowed_cidrs;
        }
        if let Some(limit) = state.rate_limit {
            access.limits.rate_limit = limit;
        }
        if let (Some(caller), Some(Some(_)), None) =
            (caller, &state.credits, &access.limits.credits)
            && caller.limits.credits.is_some()
        {
            // Tighter than none, but it would copy the caller's own
            // balance to a key it may then rotate and use.
            return Err(KeyError::Beyond {
                field: "credits",
                problem: "credits: a key with credits may lower the credits a key has, never give credits to a key without any (only the admin can)".into(),
            });
        }
        if let Some(credits) = state.credits {
            access.limits.credits = credits;
        }
        if let Some(caller) = caller {
            let changed: Vec<Limit> = Limit::ALL
                .into_iter()
                .zip(set)
                .filter_map(|(limit, set)| set.then_some(limit))
                .collect();
            let now = now_nanos();
            let after = record.access.limits.at(now);
            for (bound, than) in [
                (before.access.limits.at(now), "it was"),
                (caller.limits.at(now), "the calling key"),
            ] {
                if let Some(limit) = after.loosens(&bound, &changed) {
                    return Err(KeyError::Beyond {
                        field: limit.field(),
                        problem: rules::loosening_refused(limit, than),
                    });
                }
            }
        }
        let scopes = self.catalog.resolve_stored(&record.scopes).0;
        Ok(replaced(before, record, scopes, None))
    }

    /// Issues the new secret. A key whose current secret was found in
    /// public gets no overlap (the found secret stops at once, whatever
    /// the caller asked), and loses its leak mark: the mark is about a
    /// secret that no longer works. A key disabled for the leak stays
    /// disabled: enabling it is the admin's act.
    fn rotate(&self, before: KeyRecord, rotation: Rotation) -> Staged {
        let mut record = before.clone();
        let leaked_current = record.leak.take().is_some_and(|leak| !leak.previous_secret);
        let access = &mut record.access;
        // The current secret becomes the previous one (ending any earlier
        // overlap), unless the overlap is zero.
        access.previous = (rotation.overlap_nanos > 0 && !leaked_current).then(|| PreviousSecret {
            hash: access.secret,
            valid_until: now_nanos().saturating_add(rotation.overlap_nanos),
        });
        access.secret = rotation.key.hash;
        let scopes = self.catalog.resolve_stored(&record.scopes).0;
        replaced(before, record, scopes, Some(rotation.key.text))
    }

    /// The scopes `actor` holds *now*, and a key's own record, read in the
    /// same atomic step as the write: a key revoked, disabled, expired or
    /// narrowed since it was authenticated acts with what it has left.
    fn held_now(
        &self,
        view: &mut dyn View,
        actor: &Principal,
    ) -> Result<(ScopeSet, Option<KeyRecord>), KeyError> {
        let refused = |why: &str| {
            Err(KeyError::PermissionDenied(format!(
                "the calling API key {why}"
            )))
        };
        match actor {
            Principal::Admin => Ok((self.catalog.all(), None)),
            Principal::Key { id, .. } => match view.get(id)? {
                None => refused("has been revoked"),
                Some(record) if record.access.disabled => refused("is disabled"),
                Some(record) if record.access.expired_at(now_nanos()) => refused("has expired"),
                Some(record) => Ok((self.catalog.resolve_stored(&record.scopes).0, Some(record))),
            },
        }
    }

    /// The key a change is addressed to: visible to the actor (other
    /// accounts' keys are "not found", so a key cannot probe for ids), and
    /// holding no scope the actor lacks (a key may not rename, narrow,
    /// convert or revoke a more privileged sibling).
    fn target(
        &self,
        view: &mut dyn View,
        actor: &Principal,
        held: &ScopeSet,
        id: &KeyId,
    ) -> Result<KeyRecord, KeyError> {
        let not_found = || KeyError::NotFound(id.to_string());
        let record = view.get(id)?.ok_or_else(not_found)?;
        if let Principal::Key { account, .. } = actor {
            if record.account != **account {
                return Err(not_found());
            }
            let (target, _) = self.catalog.resolve_stored(&record.scopes);
            if let Some(missing) = rules::escalation(held, &target) {
                return Err(KeyError::PermissionDenied(format!(
                    "cannot change a key holding scopes the caller lacks: {}",
                    summarize(&self.catalog.names(&missing))
                )));
            }
        }
        Ok(record)
    }

    fn no_escalation(&self, held: &ScopeSet, grant: &ScopeSet) -> Result<(), KeyError> {
        match rules::escalation(held, grant) {
            None => Ok(()),
            Some(missing) => Err(KeyError::Beyond {
                field: "scopes",
                problem: format!(
                    "cannot grant scopes the caller does not hold: {}",
                    summarize(&self.catalog.names(&missing))
                ),
            }),
        }
    }
}

/// A new key's limits under a creating key: whatever it leaves unset is the
/// caller's (its expiry as the upper bound, its allowlist and rate limit as
/// the least strict allowed), and whatever it sets may be no looser.
fn inherit(mut lifecycle: Lifecycle, caller: Option<&Access>) -> Result<Lifecycle, KeyError> {
    let Some(caller) = caller else {
        return Ok(lifecycle);
    };
    lifecycle.limits.expires_at = lifecycle.limits.expires_at.or(caller.limits.expires_at);
    if lifecycle.limits.allowed_cidrs.is_empty() {
        lifecycle
            .limits
            .allowed_cidrs
            .clone_from(&caller.limits.allowed_cidrs);
    }
    lifecycle.limits.rate_limit = lifecycle.limits.rate_limit.or(caller.limits.rate_limit);
    // A key with credits gives the keys it creates credits out of its own
    // balance (the management service took them from it before this
    // change: `Withdraw`), never a copy: a copy would let it multiply its
    // credits through children. Nor a refill, which would mint credits
    // every period beyond its own.
    let checked: &[Limit] = if let Some(own) = caller.limits.credits {
        if own.refill.is_some() {
            return Err(KeyError::Beyond {
                field: "credits",
                problem: "credits: a key whose credits refill cannot create keys: what it gave them would outlive its refill (only the admin can)".into(),
            });
        }
        match &lifecycle.limits.credits {
            None => {
                return Err(KeyError::Beyond {
                    field: "credits",
                    problem: "credits: a key with credits gives each key it creates credits taken from its own balance; set credits.remaining".into(),
                });
            }
            Some(credits) if credits.refill.is_some() => {
                return Err(KeyError::Beyond {
                    field: "credits",
                    problem: "credits.refill: a key with credits may give the keys it creates credits from its balance, never a refill".into(),
                });
            }
            Some(_) if !lifecycle.credits_taken => {
                // The caller had no credits when the request began, and has
                // some now: nothing was taken from it.
                return Err(KeyError::Beyond {
                    field: "credits",
                    problem: "credits: the calling key's credits changed while the key was being created; try again".into(),
                });
            }
            Some(_) => &[Limit::Expiry, Limit::Allowlist, Limit::RateLimit],
        }
    } else {
        &Limit::ALL
    };
    match lifecycle
        .limits
        .loosens(&caller.limits.at(now_nanos()), checked)
    {
        None => Ok(lifecycle),
        Some(limit) => Err(KeyError::Beyond {
            field: limit.field(),
            problem: rules::loosening_refused(limit, "the calling key"),
        }),
    }
}

/// `record` in place of `before`, with `secret` when the change issued one.
fn replaced(
    before: KeyRecord,
    mut record: KeyRecord,
    scopes: ScopeSet,
    secret: Option<String>,
) -> Staged {
    record.updated_at = now_nanos().max(record.updated_at);
    Staged {
        committed: Committed {
            before: Some(before),
            after: record,
            secret,
        },
        write: Write::Replace,
        scopes,
        once: false,
    }
}

/// Moves credits between `before`'s record and a lease. The record's
/// update time stays: nobody changed the key's settings.
fn move_credits(
    before: KeyRecord,
    scopes: ScopeSet,
    movement: CreditMovement,
) -> Result<Staged, KeyError> {
    let now = now_nanos();
    let mut record = before.clone();
    let credits = record
        .access
        .limits
        .credits
        .as_mut()
        .ok_or(KeyError::NoCreditsLeft)?;
    match movement {
        CreditMovement::Reserve { want } => {
            let was = credits.due(now);
            if credits.reserve(want, now) == 0 && *credits == was {
                return Err(KeyError::NoCreditsLeft);
            }
        }
        CreditMovement::Withdraw { amount } => {
            if !credits.withdraw(amount, now) {
                return Err(KeyError::Beyond {
                    field: "credits",
                    problem: format!(
                        "credits.remaining: the calling key has {} credits it can give, fewer than {amount}",
                        credits.due(now).remaining
                    ),
                });
            }
        }
        CreditMovement::GiveBack { amount, period } => credits.give_back(amount, period, now),
    }
    // Unique bytes for this write: an etcd commit whose reply was lost is
    // then recognised as this one, never as another sidecar's move that
    // left the same balance.
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|_| KeyError::Rng)?;
    credits.last_move = u64::from_le_bytes(id);
    Ok(Staged {
        committed: Committed {
            before: Some(before),
            after: record,
            secret: None,
        },
        write: Write::Replace,
        scopes,
        once: true,
    })
}

/// A key needs the `api_keys.*` scopes of the operation.
pub fn require(catalog: &Catalog, held: &ScopeSet, operation: Operation) -> Result<(), KeyError> {
    match operation
        .scopes()
        .iter()
        .find(|scope| !catalog.lookup(scope).is_some_and(|id| held.contains(id)))
    {
        None => Ok(()),
        Some(scope) => Err(KeyError::PermissionDenied(format!(
            "this API key lacks the scope {scope}"
        ))),
    }
}

/// At most ten names, then a count: errors stay readable.
pub(crate) fn summarize(names: &[String]) -> String {
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
