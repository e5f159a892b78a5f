//! A fixed-width scope bitset: the unit of every permission check.

use std::fmt;

/// The most scopes one catalog may define. 256 bits keep a key's grant in 32
/// bytes and a check in four word operations; SendGrid's catalog uses ~200.
pub const MAX_SCOPES: usize = 256;
const WORDS: usize = MAX_SCOPES / 64;

/// A scope's position in the catalog. Positions are assigned at catalog load
/// and never stored: records keep names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeId(u16);

impl ScopeId {
    /// The id at `index`, if it fits the bitset.
    #[must_use]
    pub fn new(index: usize) -> Option<Self> {
        (index < MAX_SCOPES)
            .then(|| u16::try_from(index).ok())
            .flatten()
            .map(Self)
    }

    /// The bit position.
    #[must_use]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A set of scopes as a fixed-width bitset. Copy, no heap.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet([u64; WORDS]);

impl ScopeSet {
    /// The empty set.
    pub const EMPTY: Self = Self([0; WORDS]);

    /// Bytes of [`Self::to_le_bytes`].
    pub const BYTES: usize = WORDS * 8;

    /// The bits as little-endian words: a form another process with the
    /// same catalog reads back with [`Self::from_le_bytes`].
    #[must_use]
    pub fn to_le_bytes(&self) -> [u8; Self::BYTES] {
        let mut bytes = [0; Self::BYTES];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// The set [`Self::to_le_bytes`] wrote; `None` for any other length.
    #[must_use]
    pub fn from_le_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::BYTES {
            return None;
        }
        let mut words = [0; WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(Self(words))
    }

    /// Adds one scope.
    pub fn insert(&mut self, id: ScopeId) {
        self.0[id.index() / 64] |= 1 << (id.index() % 64);
    }

    /// Whether the set holds `id`.
    #[must_use]
    pub fn contains(&self, id: ScopeId) -> bool {
        self.0[id.index() / 64] & (1 << (id.index() % 64)) != 0
    }

    /// Whether every scope of `need` is held: `(have & need) == need`.
    /// Branch-free over all words, so its time does not depend on the data.
    #[inline]
    #[must_use]
    pub fn covers(&self, need: &Self) -> bool {
        let mut lacking = 0;
        for (have, need) in self.0.iter().zip(need.0.iter()) {
            lacking |= need & !have;
        }
        lacking == 0
    }

    /// The scopes of `need` that this set lacks.
    #[must_use]
    pub fn missing(&self, need: &Self) -> Self {
        need.difference(self)
    }

    /// `self ∪ other`.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a | b)
    }

    /// `self ∩ other`.
    #[must_use]
    pub fn intersection(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & b)
    }

    /// `self ∖ other`.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & !b)
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// How many scopes the set holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The scopes in bit order.
    pub fn iter(&self) -> impl Iterator<Item = ScopeId> + '_ {
        (0..MAX_SCOPES)
            .filter(|i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .filter_map(ScopeId::new)
    }

    fn zip_with(&self, other: &Self, op: impl Fn(u64, u64) -> u64) -> Self {
        let mut out = [0; WORDS];
        for (i, word) in out.iter_mut().enumerate() {
            *word = op(self.0[i], other.0[i]);
        }
        Self(out)
    }
}

impl FromIterator<ScopeId> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = ScopeId>>(iter: I) -> Self {
        let mut set = Self::EMPTY;
        for id in iter {
            set.insert(id);
        }
        set
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(ScopeId::index))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_refuse_other_lengths() {
        let set: ScopeSet = [0, 63, 64, 200, 255]
            .into_iter()
            .filter_map(ScopeId::new)
            .collect();
        assert_eq!(ScopeSet::from_le_bytes(&set.to_le_bytes()), Some(set));
        assert_eq!(ScopeSet::from_le_bytes(&[0; 31]), None);
        assert_eq!(ScopeSet::from_le_bytes(&[]), None);
    }

    fn set(ids: &[usize]) -> ScopeSet {
        ids.iter().filter_map(|i| ScopeId::new(*i)).collect()
    }

    #[test]
    fn covers_is_subset() {
        let have = set(&[0, 63, 64, 200, 255]);
        assert!(have.covers(&set(&[0, 255])));
        assert!(have.covers(&ScopeSet::EMPTY));
        assert!(!have.covers(&set(&[0, 1])));
        assert!(!ScopeSet::EMPTY.covers(&set(&[128])));
    }

    #[test]
    fn missing_names_exactly_the_gap() {
        let have = set(&[1, 2, 3]);
        let need = set(&[2, 3, 4, 130]);
        assert_eq!(have.missing(&need), set(&[4, 130]));
        assert_eq!(have.missing(&need).len(), 2);
    }

    #[test]
    fn algebra_and_iteration() {
        let a = set(&[1, 65, 129]);
        let b = set(&[65, 200]);
        assert_eq!(a.union(&b), set(&[1, 65, 129, 200]));
        assert_eq!(a.intersection(&b), set(&[65]));
        assert_eq!(a.difference(&b), set(&[1, 129]));
        assert_eq!(
            a.iter().map(ScopeId::index).collect::<Vec<_>>(),
            vec![1, 65, 129]
        );
        assert!(ScopeSet::EMPTY.is_empty());
        assert!(!a.is_empty());
    }

    #[test]
    fn ids_beyond_width_are_refused() {
        assert!(ScopeId::new(MAX_SCOPES - 1).is_some());
        assert!(ScopeId::new(MAX_SCOPES).is_none());
    }
}
