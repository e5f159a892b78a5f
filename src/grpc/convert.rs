//! Protobuf in and out of the management service: a request's fields as
//! the plain values [`crate::manage`] checks (nothing refused here: the
//! service refuses, naming the field), and records as the API shows them.

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::catalog::{AccessLevel, KeyKind};
use crate::domain::record::KeyRecord;
use crate::manage::fields::{CreditsInput, GivenDuration, GrantInput, RateLimitInput, UnixTime};
use crate::pb::v1 as pb;

/// A grant as asked: `scopes` (none: not given) or `access` levels.
#[must_use]
pub fn grant<S: std::hash::BuildHasher>(
    scopes: &[String],
    access: &HashMap<String, i32, S>,
) -> GrantInput {
    GrantInput {
        scopes: (!scopes.is_empty()).then(|| scopes.to_vec()),
        access: access
            .iter()
            .map(|(category, level)| (category.clone(), access_level(*level)))
            .collect(),
    }
}

/// A domain level (`None`: unspecified or unknown).
fn access_level(level: i32) -> Option<AccessLevel> {
    match pb::AccessLevel::try_from(level) {
        Ok(pb::AccessLevel::None) => Some(AccessLevel::None),
        Ok(pb::AccessLevel::Read) => Some(AccessLevel::Read),
        Ok(pb::AccessLevel::Write) => Some(AccessLevel::Write),
        Ok(pb::AccessLevel::Full) => Some(AccessLevel::Full),
        Ok(pb::AccessLevel::Unspecified) | Err(_) => None,
    }
}

/// A duration field (`None`: unset; `Some(None)`: negative or out of range).
#[must_use]
pub fn duration(duration: Option<&prost_types::Duration>) -> Option<GivenDuration> {
    duration.map(|d| Duration::try_from(*d).ok())
}

/// A timestamp field.
#[must_use]
pub fn time(time: Option<&prost_types::Timestamp>) -> Option<UnixTime> {
    time.map(|time| UnixTime {
        seconds: time.seconds,
        nanos: time.nanos,
    })
}

/// A rate limit field.
#[must_use]
pub fn rate_limit(limit: Option<&pb::RateLimit>) -> Option<RateLimitInput> {
    limit.map(|limit| RateLimitInput {
        requests: limit.requests,
        period: duration(limit.period.as_ref()),
        burst: limit.burst,
    })
}

/// A credits field.
#[must_use]
pub fn credits(credits: Option<&pb::Credits>) -> Option<CreditsInput> {
    credits.map(|credits| CreditsInput {
        remaining: credits.remaining,
        refill: credits
            .refill
            .as_ref()
            .map(|refill| (refill.amount, duration(refill.period.as_ref()))),
    })
}

/// A key's credits as the API shows them.
#[must_use]
pub fn credits_pb(credits: &crate::domain::credits::Credits, now: i64) -> pb::Credits {
    let credits = credits.due(now);
    pb::Credits {
        remaining: credits.remaining,
        refill: credits.refill.map(|refill| pb::CreditRefill {
            amount: refill.amount(),
            period: prost_types::Duration::try_from(refill.period()).ok(),
        }),
        next_refill_at: credits.refill.map(|_| timestamp(credits.next_refill())),
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
        expires_at: access.limits.expires_at.map(timestamp),
        enabled: !access.disabled,
        expired: access.expired_at(now),
        previous_secret_valid_until: access.previous_open_at(now).map(timestamp),
        allowed_cidrs: access.limits.allowed_cidrs.clone(),
        rate_limit: access.limits.rate_limit.map(|limit| pb::RateLimit {
            requests: limit.requests(),
            period: prost_types::Duration::try_from(limit.period()).ok(),
            burst: limit.burst(),
        }),
        credits: access
            .limits
            .credits
            .map(|credits| credits_pb(&credits, now)),
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

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or_default(),
    }
}

/// A key's usage as KeyManager answers it.
#[must_use]
pub fn key_usage(usage: &crate::usage::KeyUsage) -> pb::KeyUsage {
    let counts = |counts: &crate::usage::series::Counts| pb::UsageCounts {
        allowed: counts.allowed,
        denied: counts.denied,
        denied_by_reason: counts
            .denied_by_reason
            .iter()
            .map(|(reason, count)| (reason.clone(), *count))
            .collect(),
    };
    pb::KeyUsage {
        range: usage.range.to_owned(),
        bucket: usage.bucket.to_owned(),
        totals: Some(counts(&usage.totals)),
        series: usage
            .series
            .iter()
            .map(|bucket| pb::UsageBucket {
                start: Some(timestamp(bucket.start.saturating_mul(1_000_000_000))),
                counts: Some(counts(&bucket.counts)),
            })
            .collect(),
    }
}
