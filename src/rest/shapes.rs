//! The JSON bodies of the REST API, requests and replies, with their
//! OpenAPI schemas. SendGrid's fields keep SendGrid's names and shapes;
//! keyward's additions are extra fields SendGrid's clients ignore.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::catalog::{Catalog, KeyKind};
use crate::domain::record::KeyRecord;

/// Unix seconds of Unix nanos.
fn seconds(nanos: i64) -> i64 {
    nanos.div_euclid(1_000_000_000)
}

// --- requests ---------------------------------------------------------------

/// A field that must be given but may be `null` (`null` clears it): an
/// absent one is refused, so an empty body never clears a limit.
#[derive(Debug, Default)]
pub enum Nullable<T> {
    /// Not in the body.
    #[default]
    Missing,
    /// Given: a value, or `null`.
    Given(Option<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Nullable<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Option::<T>::deserialize(deserializer).map(Self::Given)
    }
}

impl<T> Nullable<T> {
    /// The value given (`None`: `null`), or the refusal naming `field`.
    pub fn required(
        self,
        field: &'static str,
        what: &str,
    ) -> Result<Option<T>, crate::keys::KeyError> {
        match self {
            Self::Given(value) => Ok(value),
            Self::Missing => Err(crate::keys::KeyError::Invalid {
                field,
                problem: format!("required: {what}"),
            }),
        }
    }
}

/// `POST /v3/api_keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// 1 to 100 characters.
    #[serde(default)]
    pub name: String,
    /// Scope names; omitted is Full Access. Billing scopes combine with no
    /// other scope.
    pub scopes: Option<Vec<String>>,
    /// keyward: when the key stops working, in Unix seconds (future).
    pub expires_at: Option<i64>,
    /// keyward: the addresses the key works from (CIDR ranges; a bare
    /// address is one host). Omitted or empty: any.
    pub allowed_cidrs: Option<Vec<String>>,
    /// keyward: requests per period the key may make.
    pub rate_limit: Option<RateLimitBody>,
    /// keyward: how many requests the key may make in all (optionally
    /// refilled). Omitted: what the creating key has left of its own, if
    /// it has credits; otherwise none.
    pub credits: Option<CreditsBody>,
}

/// `PUT /v3/api_keys/{api_key_id}`: replaces the name and every scope.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceBody {
    /// 1 to 100 characters.
    #[serde(default)]
    pub name: String,
    /// Every scope the key will hold (required).
    pub scopes: Option<Vec<String>>,
}

/// `PATCH /v3/api_keys/{api_key_id}`: the name only.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    /// 1 to 100 characters.
    #[serde(default)]
    pub name: String,
}

/// `POST /v3/api_keys/{api_key_id}/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the previous secret keeps working, 0 to 2,592,000 (30
    /// days); omitted is 0 (it stops at once).
    #[serde(default)]
    pub overlap_seconds: u64,
}

/// `PUT /v3/api_keys/{api_key_id}/expiry`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpiryBody {
    /// Unix seconds in the future; `null` never expires. Required: an
    /// empty body does not clear an expiry by accident.
    #[serde(default)]
    #[schema(value_type = Option<i64>, required = true)]
    pub expires_at: Nullable<i64>,
}

/// `PUT /v3/api_keys/{api_key_id}/allowlist`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowlistBody {
    /// CIDR ranges (a bare address is one host); empty: any address.
    pub allowed_cidrs: Vec<String>,
}

/// `PUT /v3/api_keys/{api_key_id}/rate_limit`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitChange {
    /// The new limit; `null` removes it. Required, like `expires_at`.
    #[serde(default)]
    #[schema(value_type = Option<RateLimitBody>, required = true)]
    pub rate_limit: Nullable<RateLimitBody>,
}

/// `PUT /v3/api_keys/{api_key_id}/credits`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsChange {
    /// The new credits; `null` removes them (unlimited use). Required, like
    /// `expires_at`.
    #[serde(default)]
    #[schema(value_type = Option<CreditsBody>, required = true)]
    pub credits: Nullable<CreditsBody>,
}

/// A key's usage credits: each allowed request spends one.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsBody {
    /// Credits to start with, 0 to 1,000,000,000,000.
    pub remaining: u64,
    /// Omitted or `null`: never refilled.
    pub refill: Option<RefillBody>,
}

/// Every `period_seconds`, the remaining credits are set to `amount`
/// (unused credits do not carry over).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefillBody {
    /// 1 to 1,000,000,000,000.
    pub amount: u64,
    /// 1 to 31,622,400 (366 days).
    pub period_seconds: u64,
}

/// A key's usage credits as a reply shows them.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct CreditsShape {
    /// Credits no sidecar has reserved yet (each reserves about a second
    /// of its demand ahead).
    pub remaining: u64,
    /// The refill, if any.
    pub refill: Option<RefillBody>,
    /// Unix seconds of the next refill; `null` without one.
    pub next_refill_at: Option<i64>,
}

impl CreditsShape {
    fn of(credits: &crate::domain::credits::Credits, now: i64) -> Self {
        let credits = credits.due(now);
        Self {
            remaining: credits.remaining,
            refill: credits.refill.map(|refill| RefillBody {
                amount: refill.amount(),
                period_seconds: refill.period().as_secs(),
            }),
            next_refill_at: credits.refill.map(|_| seconds(credits.next_refill())),
        }
    }
}

/// A key's rate limit: `requests` per `period_ms`, at most `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    /// Requests per period, 1 to 1,000,000.
    pub requests: u32,
    /// The period in milliseconds, 1 to 86,400,000 (24 h).
    pub period_ms: u64,
    /// Most requests at once; 0 (or omitted) is `requests`.
    #[serde(default)]
    pub burst: u32,
}

// --- replies ----------------------------------------------------------------

/// SendGrid's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorReply {
    /// One entry per problem.
    pub errors: Vec<ErrorEntry>,
}

/// One problem: the field it concerns (if any) and what is wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEntry {
    /// The request field, header or parameter, e.g. `name`, `scopes`,
    /// `on-behalf-of`; `null` when the problem is not one field's.
    pub field: Option<&'static str>,
    /// What is wrong, for people.
    pub message: String,
}

/// `PATCH`'s reply, as SendGrid's.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeySummary {
    /// The key's name.
    pub name: String,
    /// The key's id (the part of the secret before the second dot).
    pub api_key_id: String,
}

impl KeySummary {
    pub(super) fn of(record: &KeyRecord) -> Self {
        Self {
            name: record.name.clone(),
            api_key_id: record.id.to_string(),
        }
    }
}

/// A key's kind, as SendGrid's page names it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Every general scope.
    FullAccess,
    /// Some general scopes.
    RestrictedAccess,
    /// Billing scopes only.
    BillingAccess,
}

impl From<KeyKind> for Kind {
    fn from(kind: KeyKind) -> Self {
        match kind {
            KeyKind::FullAccess => Self::FullAccess,
            KeyKind::RestrictedAccess => Self::RestrictedAccess,
            KeyKind::Billing => Self::BillingAccess,
        }
    }
}

/// A key in a list: SendGrid's name and id, plus keyward's kind and
/// lifecycle state (never its scopes: read the key for those).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyListed {
    /// The key's name.
    pub name: String,
    /// The key's id.
    pub api_key_id: String,
    /// keyward: its kind.
    pub kind: Kind,
    /// keyward: false once disabled.
    pub enabled: bool,
    /// keyward: true once past `expires_at`.
    pub expired: bool,
    /// keyward: Unix seconds; `null` never.
    pub expires_at: Option<i64>,
    /// keyward: Unix seconds of its last allowed decision on this
    /// sidecar (minute resolution); `null` never.
    pub last_used_at: Option<i64>,
    /// keyward: where its secret was found in public; `null` never.
    pub leak: Option<LeakShape>,
}

/// Where a key's secret was found in public, as a verified secret scanning
/// report (GitHub's) said. Cleared by a rotation; kept by enabling.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeakShape {
    /// Unix seconds when keyward received the report.
    pub reported_at: i64,
    /// The public URL where it was found (may be empty).
    pub url: String,
    /// Where the scanner found it (GitHub's `source`: `content`, `commit`,
    /// `npm`, …; may be empty).
    pub source: String,
    /// The token type the scanner matched.
    #[serde(rename = "type")]
    pub kind: String,
    /// The key's previous secret (in a rotation overlap, which the report
    /// ended) was found, not its current one.
    pub previous_secret: bool,
}

impl LeakShape {
    fn of(record: &KeyRecord) -> Option<Self> {
        record.leak.as_ref().map(|leak| Self {
            reported_at: seconds(leak.reported_at),
            url: leak.url.clone(),
            source: leak.source.clone(),
            kind: leak.kind.clone(),
            previous_secret: leak.previous_secret,
        })
    }
}

impl KeyListed {
    pub(super) fn of(record: &KeyRecord, last_used: i64, now: i64) -> Self {
        Self {
            name: record.name.clone(),
            api_key_id: record.id.to_string(),
            kind: record.kind.into(),
            enabled: !record.access.disabled,
            expired: record.access.expired_at(now),
            expires_at: record.access.limits.expires_at.map(seconds),
            last_used_at: (last_used != 0).then(|| seconds(last_used)),
            leak: LeakShape::of(record),
        }
    }
}

/// `GET /v3/api_keys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListReply {
    /// One page of the account's keys, by id.
    pub result: Vec<KeyListed>,
    /// keyward: pass as `page_token` for the next page; `null` on the last.
    pub next_page_token: Option<String>,
}

/// A key as SendGrid shows it, plus keyward's lifecycle fields.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyDetail {
    /// The key's name.
    pub name: String,
    /// The key's id.
    pub api_key_id: String,
    /// Every scope the key holds.
    pub scopes: Vec<String>,
    /// keyward: the account the key acts in.
    pub account: String,
    /// keyward: its kind.
    pub kind: Kind,
    /// keyward: false once disabled.
    pub enabled: bool,
    /// keyward: true once past `expires_at`.
    pub expired: bool,
    /// keyward: Unix seconds; `null` never.
    pub expires_at: Option<i64>,
    /// keyward: after a rotation with an overlap, until when (Unix seconds)
    /// the previous secret still works; `null` when it does not.
    pub previous_secret_valid_until: Option<i64>,
    /// keyward: the addresses it works from; empty: any.
    pub allowed_cidrs: Vec<String>,
    /// keyward: its rate limit, if any.
    pub rate_limit: Option<RateLimitBody>,
    /// keyward: its usage credits, if any.
    pub credits: Option<CreditsShape>,
    /// keyward: Unix seconds.
    pub created_at: i64,
    /// keyward: Unix seconds.
    pub updated_at: i64,
    /// keyward: Unix seconds of its last allowed decision on this sidecar;
    /// `null` never.
    pub last_used_at: Option<i64>,
    /// keyward: where its secret was found in public; `null` never.
    pub leak: Option<LeakShape>,
}

impl KeyDetail {
    pub(super) fn of(record: &KeyRecord, last_used: i64, now: i64) -> Self {
        let access = &record.access;
        Self {
            name: record.name.clone(),
            api_key_id: record.id.to_string(),
            scopes: record.scopes.clone(),
            account: record.account.clone(),
            kind: record.kind.into(),
            enabled: !access.disabled,
            expired: access.expired_at(now),
            expires_at: access.limits.expires_at.map(seconds),
            previous_secret_valid_until: access.previous_open_at(now).map(seconds),
            allowed_cidrs: access.limits.allowed_cidrs.clone(),
            rate_limit: access.limits.rate_limit.map(|limit| RateLimitBody {
                requests: limit.requests(),
                period_ms: u64::try_from(limit.period().as_millis()).unwrap_or(u64::MAX),
                burst: limit.burst(),
            }),
            credits: access
                .limits
                .credits
                .map(|credits| CreditsShape::of(&credits, now)),
            created_at: seconds(record.created_at),
            updated_at: seconds(record.updated_at),
            last_used_at: (last_used != 0).then(|| seconds(last_used)),
            leak: LeakShape::of(record),
        }
    }
}

/// `GET /v3/api_keys/{api_key_id}`, as SendGrid's: a one-element list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadReply {
    /// The key.
    pub result: Vec<KeyDetail>,
}

/// `POST /v3/api_keys`: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The secret (69 characters). Shown once: keyward keeps only its hash.
    pub api_key: String,
    /// The key's id.
    pub api_key_id: String,
    /// The key's name.
    pub name: String,
    /// Every scope the key holds.
    pub scopes: Vec<String>,
}

/// `POST /v3/api_keys/{api_key_id}/rotate`: the new secret, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedKey {
    /// The new secret (69 characters). Shown once.
    pub api_key: String,
    /// The key's id (unchanged).
    pub api_key_id: String,
    /// The key's name.
    pub name: String,
    /// Until when (Unix seconds) the previous secret still works; `null`
    /// when it stopped at once.
    pub previous_secret_valid_until: Option<i64>,
}

/// `GET /v3/scopes`, as SendGrid's, plus who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScopesReply {
    /// Every scope the calling credential holds.
    pub scopes: Vec<String>,
    /// keyward: `admin` (the operator's token) or `api_key`.
    pub credential: &'static str,
    /// keyward: the calling key's account; `null` for the admin.
    pub account: Option<String>,
    /// keyward: the calling key's id; `null` for the admin.
    pub api_key_id: Option<String>,
}

/// `GET /v3/scopes/catalog`: what a key can be granted, as SendGrid's page
/// offers it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogReply {
    /// The categories, in the catalog's order.
    pub categories: Vec<CategoryShape>,
    /// Legacy scope names accepted for, and stored as, canonical ones.
    pub aliases: std::collections::BTreeMap<String, String>,
}

/// A category: a group of scopes granted together through a level.
#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryShape {
    /// Stable id, e.g. `mail`.
    pub id: String,
    /// Title, e.g. `Mail Send`.
    pub title: String,
    /// What its scopes reach.
    pub description: String,
    /// The levels it offers, in order: some of `none`, `read`, `write`,
    /// `full`.
    pub levels: Vec<&'static str>,
    /// Its scopes and the level each belongs to.
    pub scopes: Vec<ScopeShape>,
    /// Its scopes never combine with any scope outside it (billing).
    pub exclusive: bool,
}

/// One scope of a category.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeShape {
    /// e.g. `mail.send`.
    pub name: String,
    /// `read` (GET endpoints) or `write` (the others).
    pub access: &'static str,
}

impl CatalogReply {
    pub(super) fn of(catalog: &Catalog) -> Self {
        use crate::domain::catalog::AccessLevel;
        let categories = catalog
            .categories()
            .iter()
            .map(|category| {
                let read = category.grant(AccessLevel::Read);
                CategoryShape {
                    id: category.id.clone(),
                    title: category.title.clone(),
                    description: category.description.clone(),
                    levels: category.levels.iter().map(|l| l.as_str()).collect(),
                    scopes: category
                        .scopes
                        .iter()
                        .map(|id| ScopeShape {
                            name: catalog.name(*id).to_owned(),
                            access: if read.contains(*id) { "read" } else { "write" },
                        })
                        .collect(),
                    exclusive: category.exclusive,
                }
            })
            .collect();
        Self {
            categories,
            aliases: catalog.aliases().clone(),
        }
    }
}
