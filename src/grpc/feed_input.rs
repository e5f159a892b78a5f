//! What the decision feed's calls carry, checked before anything moves:
//! reported counts, lease trades and credit loans (16-byte ids, each key
//! once a call, at most [`MAX_USES_PER_REPORT`] entries; counts' minutes
//! and outcomes). Bad input is INVALID_ARGUMENT naming the field.

use tonic::Status;

use crate::domain::key::KeyId;
use crate::pb::v1 as pb;
use crate::refusal::invalid;
use keyward_core::counts::{KeyMinute, OUTCOMES, Tally, outcome};

/// Entries one call may carry (uses, counts, trades, loans).
pub const MAX_USES_PER_REPORT: usize = 10_000;

/// A call's lease trades, checked: 16-byte ids, each once, at most
/// [`MAX_USES_PER_REPORT`] of them.
pub(super) fn parse_trades(trades: &[pb::LeaseTrade]) -> Result<Vec<crate::usage::Ask>, Status> {
    let ids = unique_ids(
        trades.iter().map(|trade| trade.id.as_slice()),
        ("trades", "trades.id"),
    )?;
    Ok(ids
        .into_iter()
        .zip(trades)
        .map(|(id, trade)| crate::usage::Ask {
            id,
            give: trade.give,
            owed: trade.owed,
            want: trade.want,
        })
        .collect())
}

/// A call's credit loans, checked as [`parse_trades`] checks trades.
pub(super) fn parse_loans(
    loans: &[pb::CreditLoan],
) -> Result<Vec<(KeyId, pb::CreditLoan)>, Status> {
    let ids = unique_ids(
        loans.iter().map(|loan| loan.id.as_slice()),
        ("loans", "loans.id"),
    )?;
    Ok(ids.into_iter().zip(loans.iter().cloned()).collect())
}

/// The key ids of a call's entries (`field`): 16 bytes each, each once, at
/// most [`MAX_USES_PER_REPORT`].
fn unique_ids<'a>(
    ids: impl ExactSizeIterator<Item = &'a [u8]>,
    (field, id_field): (&'static str, &'static str),
) -> Result<Vec<KeyId>, Status> {
    if ids.len() > MAX_USES_PER_REPORT {
        return Err(invalid(
            field,
            format!("at most {MAX_USES_PER_REPORT} per call"),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.enumerate()
        .map(|(at, id)| {
            let id = <[u8; 16]>::try_from(id)
                .map_err(|_| invalid(id_field, format!("entry {at}: must be 16 bytes")))?;
            if !seen.insert(id) {
                return Err(invalid(
                    id_field,
                    format!("entry {at}: a key may appear once a call"),
                ));
            }
            Ok(KeyId::from_bytes(id))
        })
        .collect()
}

/// A report's decision counts, checked: 16-byte ids, minutes within the
/// last hour (and not ahead), known outcomes, at most
/// [`MAX_USES_PER_REPORT`] entries.
pub(super) fn parse_counts(counts: &[pb::KeyCounts]) -> Result<Vec<KeyMinute>, Status> {
    if counts.len() > MAX_USES_PER_REPORT {
        return Err(invalid(
            "counts",
            format!("at most {MAX_USES_PER_REPORT} per report"),
        ));
    }
    let now = crate::clock::now_nanos() / 1_000_000_000;
    counts
        .iter()
        .enumerate()
        .map(|(at, counted)| {
            let id = <[u8; 16]>::try_from(counted.id.as_slice())
                .map_err(|_| invalid("counts.id", format!("entry {at}: must be 16 bytes")))?;
            let minute = counted.minute_unix;
            if minute.rem_euclid(60) != 0 || !(now - 3600..=now + 60).contains(&minute) {
                return Err(invalid(
                    "counts.minute_unix",
                    format!("entry {at}: must be a minute's start within the last hour"),
                ));
            }
            let mut tally: Tally = [0; OUTCOMES];
            for (label, count) in &counted.outcomes {
                let outcome = outcome(label).ok_or_else(|| {
                    invalid(
                        "counts.outcomes",
                        format!("entry {at}: unknown outcome {label:?}"),
                    )
                })?;
                tally[outcome] = tally[outcome].saturating_add(*count);
            }
            Ok(((KeyId::from_bytes(id), minute), tally))
        })
        .collect()
}
