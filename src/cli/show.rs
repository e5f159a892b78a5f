//! How `keyward keys` shows its results: lines for people, and JSON with
//! stable field names for scripts.

use std::fmt::Write as _;

use super::Shown;
use crate::pb::v1 as pb;

/// A key in both forms.
pub(super) fn show_key(key: &pb::ApiKey) -> Shown {
    Shown {
        text: key_text(key),
        json: key_json(key),
    }
}

/// A key for scripts: stable field names (README, "Output for scripts").
pub(super) fn key_json(key: &pb::ApiKey) -> serde_json::Value {
    let time = |t: Option<&prost_types::Timestamp>| t.map(ToString::to_string);
    serde_json::json!({
        "key_id": key.key_id,
        "name": key.name,
        "kind": kind_name(key.kind),
        "account_id": key.account_id,
        "scopes": key.scopes,
        "enabled": key.enabled,
        "expired": key.expired,
        "created_at": time(key.created_at.as_ref()),
        "expires_at": time(key.expires_at.as_ref()),
        "last_used_at": time(key.last_used_at.as_ref()),
        "previous_secret_valid_until": time(key.previous_secret_valid_until.as_ref()),
        "allowed_cidrs": key.allowed_cidrs,
        "rate_limit": key.rate_limit.as_ref().map(|limit| serde_json::json!({
            "requests": limit.requests,
            "period_seconds": limit
                .period
                .and_then(|p| std::time::Duration::try_from(p).ok())
                .map(|p| p.as_secs_f64()),
            "burst": limit.burst,
        })),
        "credits": key.credits.as_ref().map(|credits| serde_json::json!({
            "remaining": credits.remaining,
            "refill": credits.refill.as_ref().map(|refill| serde_json::json!({
                "amount": refill.amount,
                "period_seconds": refill
                    .period
                    .and_then(|p| std::time::Duration::try_from(p).ok())
                    .map(|p| p.as_secs()),
            })),
            "next_refill_at": time(credits.next_refill_at.as_ref()),
        })),
        "leak": key.leak.as_ref().map(|leak| serde_json::json!({
            "reported_at": time(leak.reported_at.as_ref()),
            "url": leak.url,
            "source": leak.source,
            "type": leak.r#type,
            "previous_secret": leak.previous_secret,
        })),
    })
}

/// A key for people, one field a line.
pub(super) fn key_text(key: &pb::ApiKey) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "key_id:     {}", key.key_id);
    let _ = writeln!(out, "name:       {}", key.name);
    let _ = writeln!(out, "kind:       {}", kind_name(key.kind));
    let _ = writeln!(out, "account_id: {}", key.account_id);
    if let Some(created) = &key.created_at {
        let _ = writeln!(out, "created_at: {created}");
    }
    let _ = writeln!(out, "scopes:     {}", key.scopes.join(" "));
    let _ = writeln!(out, "enabled:    {}", key.enabled);
    match &key.expires_at {
        Some(at) => {
            let _ = writeln!(
                out,
                "expires_at: {at}{}",
                if key.expired { " (expired)" } else { "" }
            );
        }
        None => out.push_str("expires_at: never\n"),
    }
    if key.allowed_cidrs.is_empty() {
        out.push_str("allowed_from: any address\n");
    } else {
        let _ = writeln!(out, "allowed_from: {}", key.allowed_cidrs.join(" "));
    }
    match &key.rate_limit {
        Some(limit) => {
            let period = limit
                .period
                .and_then(|p| std::time::Duration::try_from(p).ok())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "rate_limit: {}/{} per sidecar, burst {}",
                limit.requests,
                humantime::format_duration(period),
                limit.burst
            );
        }
        None => out.push_str("rate_limit: none\n"),
    }
    match &key.credits {
        Some(credits) => {
            let _ = write!(out, "credits:    {} remaining", credits.remaining);
            if let (Some(refill), Some(next)) = (&credits.refill, &credits.next_refill_at) {
                let period = refill
                    .period
                    .and_then(|p| std::time::Duration::try_from(p).ok())
                    .unwrap_or_default();
                let _ = write!(
                    out,
                    ", set to {} every {} (next {next})",
                    refill.amount,
                    humantime::format_duration(period)
                );
            }
            out.push('\n');
        }
        None => out.push_str("credits:    unlimited\n"),
    }
    match &key.last_used_at {
        Some(at) => {
            let _ = writeln!(out, "last_used:  {}", to_the_minute(at));
        }
        None => out.push_str("last_used:  never\n"),
    }
    if let Some(until) = &key.previous_secret_valid_until {
        let _ = writeln!(out, "previous secret valid until: {until}");
    }
    if let Some(leak) = &key.leak {
        leak_line(&mut out, key, leak);
    }
    out
}

/// What is known of a key's leak, and what to do about it.
fn leak_line(out: &mut String, key: &pb::ApiKey, leak: &pb::KeyLeak) {
    let _ = writeln!(
        out,
        "leaked:     {} secret found in public at {} ({}, {}), reported {}; {}",
        if leak.previous_secret {
            "its previous"
        } else {
            "its"
        },
        if leak.url.is_empty() {
            "an unknown URL"
        } else {
            &leak.url
        },
        if leak.source.is_empty() {
            "unknown source"
        } else {
            &leak.source
        },
        leak.r#type,
        leak.reported_at
            .as_ref()
            .map_or_else(|| "at an unknown time".to_owned(), ToString::to_string),
        if leak.previous_secret {
            "its rotation overlap was ended"
        } else if key.enabled {
            "rotate it: `keyward keys rotate`"
        } else {
            "disabled: rotate it, then the admin enables it"
        }
    );
}

/// A key with its new secret, which is shown this once (create, rotate).
pub(super) fn show_new_secret(key: Option<&pb::ApiKey>, secret: &str) -> Shown {
    let mut out = key.map(key_text).unwrap_or_default();
    let _ = writeln!(out, "secret:     {secret}");
    out.push_str("Store the secret now: keyward keeps only its hash and cannot show it again.\n");
    Shown {
        text: out,
        json: serde_json::json!({ "key": key.map(key_json), "secret": secret }),
    }
}

/// A timestamp as `2026-11-23T17:42Z` (last-used times are kept to the
/// minute).
pub(super) fn to_the_minute(at: &prost_types::Timestamp) -> String {
    let text = at.to_string();
    text.get(..16)
        .map_or(text.clone(), |minute| format!("{minute}Z"))
}

/// A key kind as the output names it.
pub(super) fn kind_name(kind: i32) -> &'static str {
    match pb::KeyKind::try_from(kind) {
        Ok(pb::KeyKind::FullAccess) => "full_access",
        Ok(pb::KeyKind::RestrictedAccess) => "restricted_access",
        Ok(pb::KeyKind::Billing) => "billing",
        _ => "unspecified",
    }
}

/// An access level as the output names it.
pub(super) fn level_name(level: i32) -> &'static str {
    match pb::AccessLevel::try_from(level) {
        Ok(pb::AccessLevel::None) => "none",
        Ok(pb::AccessLevel::Read) => "read",
        Ok(pb::AccessLevel::Write) => "write",
        Ok(pb::AccessLevel::Full) => "full",
        _ => "unspecified",
    }
}

/// A key's usage: totals and a bar per bucket (people), or every bucket
/// (scripts).
pub(super) fn show_usage(usage: &pb::KeyUsage) -> Shown {
    let counts_json = |counts: Option<&pb::UsageCounts>| {
        let counts = counts.cloned().unwrap_or_default();
        let by_reason: std::collections::BTreeMap<_, _> =
            counts.denied_by_reason.into_iter().collect();
        serde_json::json!({
            "allowed": counts.allowed,
            "denied": counts.denied,
            "denied_by_reason": by_reason,
        })
    };
    let json = serde_json::json!({
        "range": usage.range,
        "bucket": usage.bucket,
        "totals": counts_json(usage.totals.as_ref()),
        "series": usage.series.iter().map(|bucket| {
            let mut counts = counts_json(bucket.counts.as_ref());
            counts["start"] = bucket.start.as_ref().map(ToString::to_string).into();
            counts
        }).collect::<Vec<_>>(),
    });
    Shown {
        text: usage_text(usage),
        json,
    }
}

/// Width of the longest bar in `keys usage`.
const BAR_WIDTH: u64 = 40;

fn usage_text(usage: &pb::KeyUsage) -> String {
    let totals = usage.totals.clone().unwrap_or_default();
    let mut text = format!(
        "last {} by {}: {} allowed, {} denied\n",
        usage.range, usage.bucket, totals.allowed, totals.denied
    );
    let mut reasons: Vec<_> = totals.denied_by_reason.iter().collect();
    reasons.sort();
    for (reason, count) in reasons {
        let _ = writeln!(text, "  denied {reason}: {count}");
    }
    let most = usage
        .series
        .iter()
        .filter_map(|bucket| bucket.counts.as_ref())
        .map(|counts| counts.allowed + counts.denied)
        .max()
        .unwrap_or(0)
        .max(1);
    // Buckets with no requests are left out of the chart (the JSON has
    // every one): an idle hour of minutes is one line, not sixty.
    for bucket in &usage.series {
        let counts = bucket.counts.clone().unwrap_or_default();
        if counts.allowed + counts.denied == 0 {
            continue;
        }
        let bar = |n: u64| usize::try_from((n * BAR_WIDTH).div_ceil(most)).unwrap_or(0);
        let _ = writeln!(
            text,
            "{} {}{} {} allowed, {} denied",
            bucket
                .start
                .as_ref()
                .map_or_else(String::new, to_the_minute),
            "#".repeat(bar(counts.allowed)),
            "x".repeat(bar(counts.denied)),
            counts.allowed,
            counts.denied,
        );
    }
    if usage.series.iter().all(|bucket| {
        bucket
            .counts
            .as_ref()
            .is_none_or(|counts| counts.allowed + counts.denied == 0)
    }) {
        text.push_str("no requests in this range\n");
    }
    text
}
