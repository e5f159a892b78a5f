//! SendGrid's key rules: how a grant is chosen, billing exclusivity, no
//! privilege escalation, and least privilege over lifecycle limits.

use super::catalog::{AccessLevel, Catalog, ScopeError};
use super::credits::Credits;
use super::rate::RateLimit;
use super::scope_set::ScopeSet;

/// Most entries accepted in one scope list: the catalog holds at most 256
/// scopes, so anything longer is abuse, refused before any lookup.
pub const MAX_SCOPE_ENTRIES: usize = 1024;

/// How a caller asked for a key's scopes.
#[derive(Debug, Clone, Copy)]
pub enum GrantRequest<'a> {
    /// Neither scopes nor access levels: a Full Access key.
    FullAccess,
    /// An explicit scope list.
    Scopes(&'a [String]),
    /// Category → access level, as SendGrid's UI offers.
    Access(&'a [(String, AccessLevel)]),
}

/// Why a grant request is invalid. The field it concerns is named by
/// [`GrantError::field`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A scope list longer than [`MAX_SCOPE_ENTRIES`].
    #[error("at most {MAX_SCOPE_ENTRIES} entries")]
    TooManyScopes,
    /// Unknown or repeated scope.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// An access map naming a category the catalog lacks.
    #[error("unknown category {0:?}")]
    UnknownCategory(String),
    /// A level the category does not offer.
    #[error("category {category:?} offers {offered}, not {level}")]
    LevelNotOffered {
        /// The category id.
        category: String,
        /// The level asked for.
        level: &'static str,
        /// The levels it offers.
        offered: String,
    },
    /// The request grants nothing.
    #[error("grants no scope")]
    Empty,
    /// Billing mixed with anything else.
    #[error("{0} scopes can never be combined with any other scope")]
    Exclusive(String),
}

impl GrantError {
    /// The request field the problem is in.
    #[must_use]
    pub fn field(&self, request: GrantRequest<'_>) -> &'static str {
        match (self, request) {
            (Self::UnknownCategory(_) | Self::LevelNotOffered { .. }, _)
            | (Self::Empty | Self::Exclusive(_), GrantRequest::Access(_)) => "access",
            _ => "scopes",
        }
    }
}

/// Resolves a grant request to the scope set it asks for, enforcing that
/// exclusive (billing) scopes stand alone.
pub fn resolve_grant(catalog: &Catalog, request: GrantRequest<'_>) -> Result<ScopeSet, GrantError> {
    let set = match request {
        GrantRequest::FullAccess => catalog.full_access(),
        GrantRequest::Scopes(names) => {
            if names.len() > MAX_SCOPE_ENTRIES {
                return Err(GrantError::TooManyScopes);
            }
            catalog.resolve(names)?
        }
        GrantRequest::Access(levels) => {
            let mut set = ScopeSet::EMPTY;
            for (category_id, level) in levels {
                let category = catalog
                    .category(category_id)
                    .ok_or_else(|| GrantError::UnknownCategory(category_id.clone()))?;
                if !category.levels.contains(level) {
                    return Err(GrantError::LevelNotOffered {
                        category: category.id.clone(),
                        level: level.as_str(),
                        offered: category
                            .levels
                            .iter()
                            .map(|l| l.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                set = set.union(&category.grant(*level));
            }
            set
        }
    };
    if set.is_empty() {
        return Err(GrantError::Empty);
    }
    if let Some(category) = catalog.exclusivity_violation(&set) {
        return Err(GrantError::Exclusive(category.title.clone()));
    }
    Ok(set)
}

/// "You may not assign an API Key greater permissions than you currently
/// have": the scopes of `grant` that `holder` lacks, if any.
#[must_use]
pub fn escalation(holder: &ScopeSet, grant: &ScopeSet) -> Option<ScopeSet> {
    (!holder.covers(grant)).then(|| holder.missing(grant))
}

// --- least privilege over lifecycle limits -----------------------------------------

/// A key's lifecycle limits: an expiry, an address allowlist (empty: any
/// address), a rate limit, usage credits. The one shape of these values:
/// a key's record holds them (`Access::limits`), a new key is created with
/// them, and least privilege compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Unix nanos from which the key is denied; `None`: never.
    pub expires_at: Option<i64>,
    /// Canonical address ranges (empty: any).
    pub allowed_cidrs: Vec<String>,
    /// Requests per period, if limited.
    pub rate_limit: Option<RateLimit>,
    /// Usage credits, if limited.
    pub credits: Option<Credits>,
}

/// One of the lifecycle limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The expiry.
    Expiry,
    /// The address allowlist.
    Allowlist,
    /// The rate limit.
    RateLimit,
    /// The usage credits.
    Credits,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Self; 4] = [
        Self::Expiry,
        Self::Allowlist,
        Self::RateLimit,
        Self::Credits,
    ];

    /// The request field that sets it.
    #[must_use]
    pub fn field(self) -> &'static str {
        match self {
            Self::Expiry => "expires_at",
            Self::Allowlist => "allowed_cidrs",
            Self::RateLimit => "rate_limit",
            Self::Credits => "credits",
        }
    }
}

impl Limits {
    /// These limits as of `now` (Unix nanos): credits with any refill due
    /// applied, as least privilege compares them.
    #[must_use]
    pub fn at(&self, now: i64) -> Self {
        Self {
            credits: self.credits.map(|credits| credits.due(now)),
            ..self.clone()
        }
    }

    /// Whether this limit is at least as strict as `bound`'s: expires no
    /// later, allows only addresses `bound` allows, admits no more
    /// requests per unit of time and no larger burst. No limit is
    /// looser than any.
    #[must_use]
    pub fn within(&self, bound: &Limits, limit: Limit) -> bool {
        match limit {
            Limit::Expiry => match (self.expires_at, bound.expires_at) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(at), Some(until)) => at <= until,
            },
            Limit::Allowlist => {
                bound.allowed_cidrs.is_empty()
                    || (!self.allowed_cidrs.is_empty()
                        && self.allowed_cidrs.iter().all(|range| {
                            range.parse::<ipnet::IpNet>().is_ok_and(|range| {
                                bound.allowed_cidrs.iter().any(|outer| {
                                    outer
                                        .parse::<ipnet::IpNet>()
                                        .is_ok_and(|outer| outer.contains(&range))
                                })
                            })
                        }))
            }
            Limit::RateLimit => match (self.rate_limit, bound.rate_limit) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(rate), Some(cap)) => {
                    // requests / period <= cap.requests / cap.period, crosswise.
                    u128::from(rate.requests()) * cap.period().as_nanos()
                        <= u128::from(cap.requests()) * rate.period().as_nanos()
                        && rate.burst() <= cap.burst()
                }
            },
            Limit::Credits => match (self.credits, bound.credits) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(credits), Some(cap)) => credits.within(&cap),
            },
        }
    }

    /// The first of `limits` in which this is less strict than `bound`.
    #[must_use]
    pub fn loosens(&self, bound: &Limits, limits: &[Limit]) -> Option<Limit> {
        limits
            .iter()
            .copied()
            .find(|limit| !self.within(bound, *limit))
    }
}

/// Why a change by a key was refused for loosening `limit` beyond what
/// `than` (the caller, or the key as it was) allows.
#[must_use]
pub fn loosening_refused(limit: Limit, than: &str) -> String {
    format!(
        "{}: an API key may not make a key less restricted than {than} (only the admin can)",
        limit.field()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn full_access_excludes_billing() {
        let catalog = Catalog::sendgrid();
        let set = resolve_grant(&catalog, GrantRequest::FullAccess).expect("full");
        assert_eq!(set, catalog.full_access());
        assert_eq!(set.len(), catalog.len() - 4);
    }

    #[test]
    fn billing_never_combines() {
        let catalog = Catalog::sendgrid();
        let mixed = strings(&["billing.read", "mail.send"]);
        let err = resolve_grant(&catalog, GrantRequest::Scopes(&mixed)).expect_err("mixed");
        assert_eq!(err, GrantError::Exclusive("Billing".into()));
        assert!(err.to_string().contains("never be combined"));
        let access = vec![
            ("billing".to_owned(), AccessLevel::Full),
            ("alerts".to_owned(), AccessLevel::Read),
        ];
        let err = resolve_grant(&catalog, GrantRequest::Access(&access)).expect_err("mixed");
        assert_eq!(err.field(GrantRequest::Access(&access)), "access");
        let billing = strings(&["billing.read", "billing.update"]);
        assert!(resolve_grant(&catalog, GrantRequest::Scopes(&billing)).is_ok());
    }

    #[test]
    fn access_levels_map_to_scopes() {
        let catalog = Catalog::sendgrid();
        let access = vec![
            ("alerts".to_owned(), AccessLevel::Read),
            ("mail".to_owned(), AccessLevel::Full),
        ];
        let set = resolve_grant(&catalog, GrantRequest::Access(&access)).expect("ok");
        assert_eq!(
            catalog.names(&set),
            strings(&[
                "alerts.read",
                "mail.batch.create",
                "mail.batch.delete",
                "mail.batch.read",
                "mail.batch.update",
                "mail.send"
            ])
        );
    }

    #[test]
    fn bad_grants_are_refused() {
        let catalog = Catalog::sendgrid();
        let offered = vec![("marketing_campaigns".to_owned(), AccessLevel::Read)];
        assert!(matches!(
            resolve_grant(&catalog, GrantRequest::Access(&offered)),
            Err(GrantError::LevelNotOffered { .. })
        ));
        let unknown = vec![("nope".to_owned(), AccessLevel::Read)];
        assert_eq!(
            resolve_grant(&catalog, GrantRequest::Access(&unknown)),
            Err(GrantError::UnknownCategory("nope".into()))
        );
        let none = vec![("alerts".to_owned(), AccessLevel::None)];
        assert_eq!(
            resolve_grant(&catalog, GrantRequest::Access(&none)),
            Err(GrantError::Empty)
        );
        let many = vec!["mail.send".to_owned(); MAX_SCOPE_ENTRIES + 1];
        assert_eq!(
            resolve_grant(&catalog, GrantRequest::Scopes(&many)),
            Err(GrantError::TooManyScopes)
        );
    }

    #[test]
    fn limits_compare_by_strictness() {
        let cidrs = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (office, desk, elsewhere) = (
            cidrs(&["10.0.0.0/8"]),
            cidrs(&["10.1.0.0/16"]),
            cidrs(&["192.168.0.0/16"]),
        );
        let rate = |n, secs| RateLimit::new(n, std::time::Duration::from_secs(secs), 0).ok();
        let credits = |n| Credits::new(n, None, 0).ok();
        let bound = Limits {
            expires_at: Some(100),
            allowed_cidrs: office,
            rate_limit: rate(10, 1),
            credits: credits(100),
        };
        let tighter = Limits {
            expires_at: Some(50),
            allowed_cidrs: desk,
            rate_limit: rate(5, 1),
            credits: credits(50),
        };
        assert_eq!(tighter.loosens(&bound, &Limit::ALL), None);
        let unlimited = Limits::default();
        for limit in Limit::ALL {
            assert!(!unlimited.within(&bound, limit), "{limit:?}");
            assert!(bound.within(&unlimited, limit), "{limit:?}");
        }
        let looser = Limits {
            expires_at: Some(101),
            allowed_cidrs: elsewhere,
            rate_limit: rate(11, 1),
            credits: credits(101),
        };
        for limit in Limit::ALL {
            assert!(!looser.within(&bound, limit), "{limit:?}");
        }
        // The same rate over a longer period, and a larger burst, are looser.
        let burst = Limits {
            rate_limit: RateLimit::new(10, std::time::Duration::from_secs(1), 20).ok(),
            ..bound.clone()
        };
        assert_eq!(burst.loosens(&bound, &Limit::ALL), Some(Limit::RateLimit));
    }

    #[test]
    fn escalation_names_what_the_holder_lacks() {
        let catalog = Catalog::sendgrid();
        let holder = catalog.resolve(&["mail.send", "alerts.read"]).expect("ok");
        let fine = catalog.resolve(&["mail.send"]).expect("ok");
        let greedy = catalog
            .resolve(&["mail.send", "alerts.create"])
            .expect("ok");
        assert_eq!(escalation(&holder, &fine), None);
        let missing = escalation(&holder, &greedy).expect("escalates");
        assert_eq!(catalog.names(&missing), strings(&["alerts.create"]));
    }
}
