//! The decision counters' slots: one for allows, then one per deny reason,
//! from exhaustive matches in `keyward_core` (a new reason gets its own
//! counter without a list to keep up to date).

use crate::domain::decision::DenyReason;

/// A decision's slot among the decision counters: 0 for an allow, then one
/// per reason ([`DenyReason::index`]); [`DECISION_SLOTS`] in all.
#[must_use]
pub const fn decision_slot(reason: Option<DenyReason>) -> usize {
    match reason {
        None => 0,
        Some(reason) => reason.index() + 1,
    }
}

/// How many [`decision_slot`]s there are.
pub const DECISION_SLOTS: usize = DenyReason::COUNT + 1;

/// The reason counted at `slot` (`None`: allows).
#[must_use]
pub fn slot_reason(slot: usize) -> Option<DenyReason> {
    slot.checked_sub(1).map(|index| DenyReason::ALL[index])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        for slot in 0..DECISION_SLOTS {
            assert_eq!(decision_slot(slot_reason(slot)), slot);
        }
        for reason in DenyReason::ALL {
            assert_eq!(slot_reason(decision_slot(Some(reason))), Some(reason));
        }
    }
}
