//! Protobuf ↔ domain conversions, each naming the field it rejects.

use std::collections::HashMap;

use crate::domain::catalog::{AccessLevel, Catalog, KeyKind};
use crate::domain::key::KeyId;
use crate::domain::rate::RateLimit;
use crate::domain::record::KeyRecord;
use crate::domain::rules::{GrantRequest, resolve_grant};
use crate::domain::scope_set::ScopeSet;
use crate::keys::KeyError;
use crate::pb::v1 as pb;

use crate::domain::key::CREDENTIAL_REFUSED;

/// Longest key name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Characters that change how text around them is shown without showing
/// themselves: bidirectional overrides and isolates (a name that reads
/// differently than it is), zero-width characters and the BOM.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks a key name: 1 to 100 characters, not blank, no control or
/// invisible formatting characters, nothing shaped like a secret.
pub fn name(name: &str) -> Result<String, KeyError> {
    let invalid = |problem: &str| KeyError::Invalid {
        field: "name",
        problem: problem.into(),
    };
    if name.trim().is_empty() {
        return Err(invalid("required"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid("at most 100 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    if name.chars().any(is_invisible_format) {
        return Err(invalid(
            "must not contain bidirectional or zero-width formatting characters",
        ));
    }
    if crate::domain::key::looks_like_secret(name) {
        return Err(invalid(CREDENTIAL_REFUSED));
    }
    Ok(name.to_owned())
}

/// Parses a key id field.
pub fn key_id(text: &str) -> Result<KeyId, KeyError> {
    text.parse().map_err(|e| KeyError::Invalid {
        field: "key_id",
        problem: if text.is_empty() {
            "required".into()
        } else {
            format!("{e}")
        },
    })
}

/// Resolves `scopes` / `access` to a grant. Neither set: `Ok(None)`.
pub fn grant<S: std::hash::BuildHasher>(
    catalog: &Catalog,
    scopes: &[String],
    access: &HashMap<String, i32, S>,
) -> Result<Option<ScopeSet>, KeyError> {
    let levels: Vec<(String, AccessLevel)>;
    let request = match (scopes.is_empty(), access.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {
            return Err(KeyError::Invalid {
                field: "scopes",
                problem: "set either scopes or access, not both".into(),
            });
        }
        (false, true) => {
            if scopes
                .iter()
                .any(|scope| crate::domain::key::looks_like_secret(scope))
            {
                return Err(KeyError::Invalid {
                    field: "scopes",
                    problem: CREDENTIAL_REFUSED.into(),
                });
            }
            GrantRequest::Scopes(scopes)
        }
        (true, false) => {
            let mut sorted: Vec<_> = access.iter().collect();
            sorted.sort();
            levels = sorted
                .into_iter()
                .map(|(category, level)| Ok((category.clone(), access_level(category, *level)?)))
                .collect::<Result<_, KeyError>>()?;
            GrantRequest::Access(&levels)
        }
    };
    resolve_grant(catalog, request)
        .map(Some)
        .map_err(|e| KeyError::Invalid {
            field: e.field(request),
            problem: e.to_string(),
        })
}

fn access_level(category: &str, level: i32) -> Result<AccessLevel, KeyError> {
    match pb::AccessLevel::try_from(level) {
        Ok(pb::AccessLevel::None) => Ok(AccessLevel::None),
        Ok(pb::AccessLevel::Read) => Ok(AccessLevel::Read),
        Ok(pb::AccessLevel::Write) => Ok(AccessLevel::Write),
        Ok(pb::AccessLevel::Full) => Ok(AccessLevel::Full),
        Ok(pb::AccessLevel::Unspecified) | Err(_) => Err(KeyError::Invalid {
            field: "access",
            problem: format!("category {category:?}: level must be NONE, READ, WRITE or FULL"),
        }),
    }
}

/// The protobuf level of a domain level.
#[must_use]
pub fn access_level_pb(level: AccessLevel) -> pb::AccessLevel {
    match level {
        AccessLevel::None => pb::AccessLevel::None,
        AccessLevel::Read => pb::AccessLevel::Read,
        AccessLevel::Write => pb::AccessLevel::Write,
        AccessLevel::Full => pb::AccessLevel::Full,
    }
}

/// A stored record as the API shows it (never with its hash), with when
/// it was last used (Unix nanos; 0: never).
#[must_use]
pub fn api_key(record: &KeyRecord, last_used: i64) -> pb::ApiKey {
    let access = &record.access;
    let now = crate::clock::now_nanos();
    pb::ApiKey {
        key_id: record.id.to_string(),
        name: record.name.clone(),
        kind: kind(record.kind) as i32,
        scopes: record.scopes.clone(),
        account_id: record.account.clone(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        expires_at: access.expires_at.map(timestamp),
        enabled: !access.disabled,
        expired: access.expired_at(now),
        previous_secret_valid_until: access.previous_open_at(now).map(timestamp),
        allowed_cidrs: access.allowed_cidrs.clone(),
        rate_limit: access.rate_limit.map(|limit| pb::RateLimit {
            requests: limit.requests(),
            period: prost_types::Duration::try_from(limit.period()).ok(),
            burst: limit.burst(),
        }),
        last_used_at: (last_used != 0).then(|| timestamp(last_used)),
        leak: record.leak.as_ref().map(|leak| pb::KeyLeak {
            reported_at: Some(timestamp(leak.reported_at)),
            url: leak.url.clone(),
            source: leak.source.clone(),
            r#type: leak.kind.clone(),
            previous_secret: leak.previous_secret,
        }),
    }
}

/// The API's kind of a key.
fn kind(kind: KeyKind) -> pb::KeyKind {
    match kind {
        KeyKind::FullAccess => pb::KeyKind::FullAccess,
        KeyKind::RestrictedAccess => pb::KeyKind::RestrictedAccess,
        KeyKind::Billing => pb::KeyKind::Billing,
    }
}

/// A rate limit from a request: unset is none.
pub fn rate_limit(limit: Option<&pb::RateLimit>) -> Result<Option<RateLimit>, KeyError> {
    let Some(limit) = limit else {
        return Ok(None);
    };
    let period = limit
        .period
        .ok_or_else(|| KeyError::Invalid {
            field: "rate_limit.period",
            problem: "required".into(),
        })
        .and_then(|period| {
            std::time::Duration::try_from(period).map_err(|_| KeyError::Invalid {
                field: "rate_limit.period",
                problem: "must be 1ms to 24h".into(),
            })
        })?;
    RateLimit::new(limit.requests, period, limit.burst)
        .map(Some)
        .map_err(|e| KeyError::Invalid {
            field: match e.field {
                "period" => "rate_limit.period",
                "burst" => "rate_limit.burst",
                _ => "rate_limit.requests",
            },
            problem: e.problem,
        })
}

/// A non-negative duration filter (`unused_for`): unset is none.
pub fn unused_for(
    duration: Option<&prost_types::Duration>,
) -> Result<Option<std::time::Duration>, KeyError> {
    duration
        .map(|d| {
            std::time::Duration::try_from(*d).map_err(|_| KeyError::Invalid {
                field: "unused_for",
                problem: "must be a non-negative duration".into(),
            })
        })
        .transpose()
}

/// Address ranges from a request, canonical (see `domain::allowlist`).
pub fn allowed_cidrs(cidrs: &[String]) -> Result<Vec<String>, KeyError> {
    crate::domain::allowlist::canonical(cidrs).map_err(|problem| KeyError::Invalid {
        field: "allowed_cidrs",
        problem,
    })
}

/// Longest rotation overlap accepted.
pub const MAX_OVERLAP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// A rotation overlap: unset is zero; 0 to [`MAX_OVERLAP`].
pub fn overlap(duration: Option<&prost_types::Duration>) -> Result<std::time::Duration, KeyError> {
    let Some(duration) = duration else {
        return Ok(std::time::Duration::ZERO);
    };
    std::time::Duration::try_from(*duration)
        .ok()
        .filter(|d| *d <= MAX_OVERLAP)
        .ok_or_else(|| KeyError::Invalid {
            field: "overlap",
            problem: "must be 0 to 30 days".into(),
        })
}

/// An expiry time from a request: unset is none; a set time must be a valid
/// timestamp in the future.
pub fn expires_at(time: Option<&prost_types::Timestamp>) -> Result<Option<i64>, KeyError> {
    let Some(time) = time else {
        return Ok(None);
    };
    let invalid = |problem: &str| KeyError::Invalid {
        field: "expires_at",
        problem: problem.into(),
    };
    if !(0..1_000_000_000).contains(&time.nanos) {
        return Err(invalid("nanos must be 0 to 999,999,999"));
    }
    let nanos = time
        .seconds
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(i64::from(time.nanos)))
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid("out of range"))?;
    if nanos <= crate::clock::now_nanos() {
        return Err(invalid("must be in the future"));
    }
    Ok(Some(nanos))
}

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or_default(),
    }
}

/// Default and maximum page sizes for ListKeys.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Larger requests are capped, as AIP-158 suggests.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks a page size: negative is invalid, 0 is the default.
pub fn page_size(size: i32) -> Result<usize, KeyError> {
    match usize::try_from(size) {
        Err(_) => Err(KeyError::Invalid {
            field: "page_size",
            problem: "must not be negative".into(),
        }),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}
