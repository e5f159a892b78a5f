//! A key's usage as management shows it: totals over a range, and a series
//! of buckets (minutes for the last hour, hours beyond), every bucket
//! present, zero or not, so a chart reads at a glance.

use std::collections::BTreeMap;

/// How far back a usage reply reaches, and its bucket size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// The last hour, by minute.
    Hour,
    /// The last 24 hours, by hour.
    Day,
    /// The last 7 days, by hour.
    Week,
    /// The last 30 days, by hour.
    Month,
}

impl Range {
    /// The accepted spellings, for error messages.
    pub const ACCEPTED: &'static str = "1h, 24h, 7d or 30d";

    /// A range from its spelling (`1h`, `24h`, `7d`, `30d`; empty: `1h`).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "" | "1h" => Some(Self::Hour),
            "24h" | "1d" => Some(Self::Day),
            "7d" => Some(Self::Week),
            "30d" => Some(Self::Month),
            _ => None,
        }
    }

    /// Its canonical spelling.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "24h",
            Self::Week => "7d",
            Self::Month => "30d",
        }
    }

    /// Whether buckets are hours (else minutes).
    #[must_use]
    pub fn by_hour(self) -> bool {
        self != Self::Hour
    }

    /// Seconds per bucket.
    #[must_use]
    pub fn bucket_seconds(self) -> i64 {
        if self.by_hour() { 3600 } else { 60 }
    }

    /// Buckets in the range, the current one included.
    #[must_use]
    pub fn buckets(self) -> i64 {
        match self {
            Self::Hour => 60,
            Self::Day => 24,
            Self::Week => 7 * 24,
            Self::Month => 30 * 24,
        }
    }

    /// The first bucket's start for a reply at `now` (Unix seconds).
    #[must_use]
    pub fn start(self, now: i64) -> i64 {
        let size = self.bucket_seconds();
        now - now.rem_euclid(size) - (self.buckets() - 1) * size
    }
}

/// Allowed and denied requests, denied split by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Counts {
    /// Requests allowed.
    pub allowed: u64,
    /// Requests denied, every reason.
    pub denied: u64,
    /// Requests denied, by reason label (`rate_limited`, …).
    pub denied_by_reason: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, label: &str, count: u64) {
        if label == "allowed" {
            self.allowed += count;
        } else {
            self.denied += count;
            *self.denied_by_reason.entry(label.to_owned()).or_default() += count;
        }
    }
}

/// One bucket of a series.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Bucket {
    /// The bucket's start, Unix seconds.
    pub start: i64,
    /// What it counted.
    #[serde(flatten)]
    pub counts: Counts,
}

/// A key's usage over a range, summed over every sidecar.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct KeyUsage {
    /// The range's spelling.
    pub range: &'static str,
    /// `minute` or `hour`.
    pub bucket: &'static str,
    /// The whole range.
    pub totals: Counts,
    /// Every bucket, oldest first.
    pub series: Vec<Bucket>,
}

impl KeyUsage {
    /// The reply from stored buckets (start, label, count) from `from` on,
    /// at `now`.
    #[must_use]
    pub fn from_buckets(range: Range, from: i64, now: i64, stored: &[(i64, String, u64)]) -> Self {
        let size = range.bucket_seconds();
        let mut series: Vec<Bucket> = (0..range.buckets())
            .map(|n| from + n * size)
            .take_while(|start| *start <= now)
            .map(|start| Bucket {
                start,
                counts: Counts::default(),
            })
            .collect();
        let mut totals = Counts::default();
        for (start, label, count) in stored {
            let Ok(slot) = usize::try_from((start - from) / size) else {
                continue;
            };
            if let Some(bucket) = series.get_mut(slot) {
                bucket.counts.add(label, *count);
                totals.add(label, *count);
            }
        }
        Self {
            range: range.name(),
            bucket: if range.by_hour() { "hour" } else { "minute" },
            totals,
            series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bucket_is_present_and_totals_split_denials_by_reason() {
        let now = 10 * 3600 + 125;
        let from = Range::Hour.start(now);
        assert_eq!(from, 10 * 3600 + 120 - 59 * 60);
        let stored = vec![
            (from, "allowed".to_owned(), 3),
            (10 * 3600 + 120, "allowed".to_owned(), 2),
            (10 * 3600 + 120, "rate_limited".to_owned(), 4),
            (from - 60, "allowed".to_owned(), 100),
        ];
        let usage = KeyUsage::from_buckets(Range::Hour, from, now, &stored);
        assert_eq!(usage.series.len(), 60);
        assert_eq!(
            usage.totals.allowed, 5,
            "the bucket before the range is not counted"
        );
        assert_eq!(usage.totals.denied, 4);
        assert_eq!(usage.totals.denied_by_reason["rate_limited"], 4);
        assert_eq!(usage.series[59].counts.allowed, 2);
        assert_eq!(Range::parse("7d"), Some(Range::Week));
        assert_eq!(Range::parse("2h"), None);
    }
}
