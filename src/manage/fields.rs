//! Field checks on plain values, the same for both front doors, each
//! naming the field it rejects (as gRPC names it; [`crate::refusal`] gives
//! the REST name). A front door reads its protobuf or JSON into these
//! values and nothing else.

use std::time::Duration;

use crate::domain::catalog::{AccessLevel, Catalog};
use crate::domain::key::{CREDENTIAL_REFUSED, KeyId};
use crate::domain::rate::RateLimit;
use crate::domain::rules::{GrantRequest, resolve_grant};
use crate::domain::scope_set::ScopeSet;
use crate::keys::KeyError;

/// Longest key name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Longest rotation overlap accepted.
pub const MAX_OVERLAP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default page size of a listing.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Larger pages are capped, as AIP-158 suggests.
pub const MAX_PAGE_SIZE: usize = 1000;

/// A duration as a request gave it: `None` when it was negative or out of
/// range (refused by the check of its field).
pub type GivenDuration = Option<Duration>;

/// A point in time as a request gave it, Unix seconds and nanos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixTime {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Nanoseconds within the second (0 to 999,999,999 to be valid).
    pub nanos: i32,
}

/// A rate limit as a request gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitInput {
    /// Requests per period.
    pub requests: u32,
    /// The period (`None`: not given).
    pub period: Option<GivenDuration>,
    /// Most at once (0: `requests`).
    pub burst: u32,
}

/// Usage credits as a request gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditsInput {
    /// Credits to start with.
    pub remaining: u64,
    /// The refill, if any: the amount and the period (`None`: not given).
    pub refill: Option<(u64, Option<GivenDuration>)>,
}

/// The scopes a request asks for, by name (`scopes`) or by category level
/// (`access`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantInput {
    /// Scope names (`None`: not given; `Some([])` asks for nothing, which
    /// is refused rather than read as everything).
    pub scopes: Option<Vec<String>>,
    /// Category → level (`None`: not a level keyward knows).
    pub access: Vec<(String, Option<AccessLevel>)>,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// Characters that change how text around them is shown without showing
/// themselves: bidirectional overrides and isolates (a name that reads
/// differently than it is), zero-width characters and the BOM.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks a key name: 1 to 100 characters, not blank, no control or
/// invisible formatting characters, nothing shaped like a secret.
pub fn name(name: &str) -> Result<String, KeyError> {
    let refuse = |problem| Err(invalid("name", problem));
    if name.trim().is_empty() {
        return refuse("required");
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return refuse("at most 100 characters");
    }
    if name.chars().any(char::is_control) {
        return refuse("must not contain control characters");
    }
    if name.chars().any(is_invisible_format) {
        return refuse("must not contain bidirectional or zero-width formatting characters");
    }
    if crate::domain::key::looks_like_secret(name) {
        return refuse(CREDENTIAL_REFUSED);
    }
    Ok(name.to_owned())
}

/// Parses a key id field.
pub fn key_id(text: &str) -> Result<KeyId, KeyError> {
    text.parse().map_err(|e| {
        invalid(
            "key_id",
            if text.is_empty() {
                "required".into()
            } else {
                format!("{e}")
            },
        )
    })
}

/// Resolves a grant against `catalog`. Neither scopes nor access given:
/// `Ok(None)`.
pub fn grant(catalog: &Catalog, given: &GrantInput) -> Result<Option<ScopeSet>, KeyError> {
    let levels: Vec<(String, AccessLevel)>;
    let request = match (given.scopes.as_deref(), given.access.is_empty()) {
        // Refused rather than granting everything for it, which would fail
        // open.
        (Some([]), _) => {
            return Err(invalid(
                "scopes",
                "an empty list grants no scope (omit scopes for a Full Access key)",
            ));
        }
        (None, true) => return Ok(None),
        (Some(_), false) => {
            return Err(invalid("scopes", "set either scopes or access, not both"));
        }
        (Some(scopes), true) => {
            if scopes
                .iter()
                .any(|scope| crate::domain::key::looks_like_secret(scope))
            {
                return Err(invalid("scopes", CREDENTIAL_REFUSED));
            }
            GrantRequest::Scopes(scopes)
        }
        (None, false) => {
            let mut sorted: Vec<_> = given.access.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            levels = sorted
                .into_iter()
                .map(|(category, level)| {
                    let level = level.ok_or_else(|| {
                        invalid(
                            "access",
                            format!(
                                "category {category:?}: level must be NONE, READ, WRITE or FULL"
                            ),
                        )
                    })?;
                    Ok((category.clone(), level))
                })
                .collect::<Result<_, KeyError>>()?;
            GrantRequest::Access(&levels)
        }
    };
    resolve_grant(catalog, request)
        .map(Some)
        .map_err(|e| invalid(e.field(request), e.to_string()))
}

/// A rate limit: unset is none.
pub fn rate_limit(limit: Option<RateLimitInput>) -> Result<Option<RateLimit>, KeyError> {
    let Some(limit) = limit else {
        return Ok(None);
    };
    let period = limit
        .period
        .ok_or_else(|| invalid("rate_limit.period", "required"))?
        .ok_or_else(|| invalid("rate_limit.period", "must be 1ms to 24h"))?;
    RateLimit::new(limit.requests, period, limit.burst)
        .map(Some)
        .map_err(|e| {
            invalid(
                match e.field {
                    "period" => "rate_limit.period",
                    "burst" => "rate_limit.burst",
                    _ => "rate_limit.requests",
                },
                e.problem,
            )
        })
}

/// Usage credits set at `now`: unset is none.
pub fn credits(
    credits: Option<CreditsInput>,
    now: i64,
) -> Result<Option<crate::domain::credits::Credits>, KeyError> {
    use crate::domain::credits::{Credits, Refill};
    let Some(credits) = credits else {
        return Ok(None);
    };
    let named = |e: crate::domain::credits::InvalidCredits| {
        invalid(
            match e.field {
                "refill.amount" => "credits.refill.amount",
                "refill.period" => "credits.refill.period",
                _ => "credits.remaining",
            },
            e.problem,
        )
    };
    let refill = match credits.refill {
        None => None,
        Some((amount, period)) => {
            let period = period
                .ok_or_else(|| invalid("credits.refill.period", "required"))?
                .ok_or_else(|| invalid("credits.refill.period", "must be 1s to 366d"))?;
            Some(Refill::new(amount, period).map_err(named)?)
        }
    };
    Credits::new(credits.remaining, refill, now)
        .map(Some)
        .map_err(named)
}

/// A filter on how long keys have gone unused: unset is none.
pub fn unused_for(duration: Option<GivenDuration>) -> Result<Option<Duration>, KeyError> {
    duration
        .map(|d| d.ok_or_else(|| invalid("unused_for", "must be a non-negative duration")))
        .transpose()
}

/// Address ranges, canonical (see `domain::allowlist`).
pub fn allowed_cidrs(cidrs: &[String]) -> Result<Vec<String>, KeyError> {
    crate::domain::allowlist::canonical(cidrs).map_err(|problem| invalid("allowed_cidrs", problem))
}

/// A rotation overlap: unset is zero; 0 to [`MAX_OVERLAP`].
pub fn overlap(duration: Option<GivenDuration>) -> Result<Duration, KeyError> {
    let Some(duration) = duration else {
        return Ok(Duration::ZERO);
    };
    duration
        .filter(|d| *d <= MAX_OVERLAP)
        .ok_or_else(|| invalid("overlap", "must be 0 to 30 days"))
}

/// An expiry time: unset is none; a set time must be valid and in the
/// future. Unix nanos.
pub fn expires_at(time: Option<UnixTime>) -> Result<Option<i64>, KeyError> {
    let Some(time) = time else {
        return Ok(None);
    };
    let refuse = |problem| invalid("expires_at", problem);
    if !(0..1_000_000_000).contains(&time.nanos) {
        return Err(refuse("nanos must be 0 to 999,999,999"));
    }
    let nanos = time
        .seconds
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(i64::from(time.nanos)))
        .filter(|n| *n > 0)
        .ok_or_else(|| refuse("out of range"))?;
    if nanos <= crate::clock::now_nanos() {
        return Err(refuse("must be in the future"));
    }
    Ok(Some(nanos))
}

/// A page size: negative is invalid, 0 is the default, past the maximum
/// is capped.
pub fn page_size(size: i64) -> Result<usize, KeyError> {
    match usize::try_from(size) {
        Err(_) => Err(invalid("page_size", "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// A usage range (`1h`, `24h`, `7d`, `30d`; empty: `1h`).
pub fn usage_range(text: &str) -> Result<crate::usage::Range, KeyError> {
    crate::usage::Range::parse(text).ok_or_else(|| KeyError::Invalid {
        field: "range",
        problem: format!("must be {}", crate::usage::Range::ACCEPTED),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem<T: std::fmt::Debug>(result: Result<T, KeyError>) -> (&'static str, String) {
        match result.expect_err("refused") {
            KeyError::Invalid { field, problem } => (field, problem),
            other => panic!("not Invalid: {other}"),
        }
    }

    #[test]
    fn names_are_checked_and_secrets_refused_unechoed() {
        assert_eq!(name("ci deploy").ok().as_deref(), Some("ci deploy"));
        assert_eq!(problem(name(" ")).1, "required");
        assert_eq!(problem(name(&"x".repeat(101))).0, "name");
        assert!(name("a\u{202E}b").is_err());
        let key = format!("SG.{}.{}", "a".repeat(22), "b".repeat(43));
        assert_eq!(problem(name(&key)).1, CREDENTIAL_REFUSED);
    }

    #[test]
    fn a_grant_is_scopes_or_levels_never_both_never_empty() {
        let catalog = Catalog::sendgrid();
        assert_eq!(grant(&catalog, &GrantInput::default()).ok(), Some(None));
        let empty = GrantInput {
            scopes: Some(Vec::new()),
            access: Vec::new(),
        };
        assert_eq!(problem(grant(&catalog, &empty)).0, "scopes");
        let both = GrantInput {
            scopes: Some(vec!["mail.send".into()]),
            access: vec![("mail".into(), Some(AccessLevel::Full))],
        };
        assert!(grant(&catalog, &both).is_err());
        let unknown_level = GrantInput {
            scopes: None,
            access: vec![("mail".into(), None)],
        };
        assert_eq!(problem(grant(&catalog, &unknown_level)).0, "access");
        let named = GrantInput {
            scopes: Some(vec!["mail.send".into()]),
            access: Vec::new(),
        };
        let set = grant(&catalog, &named).ok().flatten().expect("granted");
        assert_eq!(catalog.names(&set), vec!["mail.send".to_owned()]);
    }

    #[test]
    fn durations_and_times_name_their_fields() {
        assert_eq!(overlap(None).ok(), Some(Duration::ZERO));
        assert_eq!(problem(overlap(Some(None))).0, "overlap");
        assert!(overlap(Some(Some(MAX_OVERLAP + Duration::from_secs(1)))).is_err());
        assert_eq!(problem(unused_for(Some(None))).0, "unused_for");
        let missing = RateLimitInput {
            requests: 10,
            period: None,
            burst: 0,
        };
        assert_eq!(
            problem(rate_limit(Some(missing))),
            ("rate_limit.period", "required".to_owned())
        );
        let past = UnixTime {
            seconds: 1,
            nanos: 0,
        };
        assert_eq!(problem(expires_at(Some(past))).1, "must be in the future");
        assert_eq!(page_size(0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(1 << 40).ok(), Some(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }
}
