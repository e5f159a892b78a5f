//! The per-account entries under `accounts/`: an account's key count and
//! key ids ([`Account`]), and reading an account's keys a page at a time.

use super::record::KeyRecord;
use super::{Etcd, EtcdError, decode_value};
use crate::domain::key::KeyId;
use crate::pb::mvccpb::KeyValue;

impl Etcd {
    /// Up to `limit` of `account`'s keys in creation order, strictly after
    /// `after` (creation time, id), from the ids its entry holds; when
    /// there are more, the position of the last one returned. `None` for
    /// an account whose entry holds a count only ([`Account::listed`]).
    pub async fn account_page(
        &self,
        account: &str,
        after: Option<(i64, KeyId)>,
        limit: usize,
    ) -> Result<Option<AccountPage>, EtcdError> {
        let held = self.account(&self.account_path(account)).await?;
        if !held.listed {
            return Ok(None);
        }
        let mut records = Vec::with_capacity(held.ids.len());
        // One transaction of reads per chunk, within etcd's op limit.
        for chunk in held.ids.chunks(64) {
            for kv in self
                .get_many(chunk.iter().map(|id| self.key_path(id)))
                .await?
                .into_iter()
                .flatten()
            {
                records.push(decode_value(&kv.key, &kv.value)?);
            }
        }
        records.sort_by_key(|record| (record.created_at, record.id));
        records.retain(|record| after.is_none_or(|after| (record.created_at, record.id) > after));
        let more = records.len() > limit;
        records.truncate(limit);
        let last = records
            .last()
            .filter(|_| more)
            .map(|record| (record.created_at, record.id));
        Ok(Some((records, last)))
    }

    /// An account's key count and the revision it was last written at (0, 0
    /// when absent).
    pub async fn count(&self, account: &[u8]) -> Result<(u64, i64), EtcdError> {
        let held = self.account(account).await?;
        Ok((held.count, held.revision))
    }

    /// An account's count and key ids, and the revision they were written
    /// at (empty, 0 when absent).
    pub async fn account(&self, account: &[u8]) -> Result<Account, EtcdError> {
        self.get_kv(account)
            .await?
            .map_or_else(|| Ok(Account::default()), |kv| Account::parse(&kv))
    }

    /// Several accounts ([`Self::account`]), read in one transaction.
    pub(super) async fn accounts(
        &self,
        paths: impl Iterator<Item = Vec<u8>>,
    ) -> Result<Vec<Account>, EtcdError> {
        self.get_many(paths)
            .await?
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .map_or_else(|| Ok(Account::default()), Account::parse)
            })
            .collect()
    }
}

/// A page of an account's keys, and the position of its last key when
/// there are more.
pub type AccountPage = (Vec<KeyRecord>, Option<(i64, KeyId)>);

/// An account's entry: its key count, its key ids, and the revision it
/// was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Live keys.
    pub count: u64,
    /// Their ids (when `listed`).
    pub ids: Vec<KeyId>,
    /// Whether the ids are kept (a count alone was written by a keyward
    /// from before they were).
    pub listed: bool,
    /// The revision the entry was last written at (0: absent).
    pub revision: i64,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            count: 0,
            ids: Vec::new(),
            listed: true,
            revision: 0,
        }
    }
}

impl Account {
    pub(super) fn parse(kv: &KeyValue) -> Result<Self, EtcdError> {
        let invalid = || EtcdError::Value {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            problem: "not a key count and key ids".into(),
        };
        let text = std::str::from_utf8(&kv.value).map_err(|_| invalid())?;
        let mut words = text.split(' ');
        let count: u64 = words
            .next()
            .and_then(|count| count.parse().ok())
            .ok_or_else(invalid)?;
        let ids = words
            .map(|id| id.parse().map_err(|_| invalid()))
            .collect::<Result<Vec<KeyId>, _>>()?;
        Ok(Self {
            count,
            listed: !ids.is_empty() || count == 0,
            ids,
            revision: kv.mod_revision,
        })
    }

    /// The value to write: the count, then the ids (the count alone for an
    /// account written before ids were kept: a partial list would pass for
    /// a whole one).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut text = self.count.to_string();
        if self.listed {
            for id in &self.ids {
                text.push(' ');
                text.push_str(&id.to_string());
            }
        }
        text.into_bytes()
    }

    /// The entry with `added` keys more.
    #[must_use]
    pub fn with(&self, added: &[KeyId]) -> Self {
        let mut ids = self.ids.clone();
        ids.extend_from_slice(added);
        Self {
            count: self.count + added.len() as u64,
            ids,
            ..self.clone()
        }
    }

    /// The entry without `id`.
    #[must_use]
    pub fn without(&self, id: &KeyId) -> Self {
        Self {
            count: self.count.saturating_sub(1),
            ids: self
                .ids
                .iter()
                .filter(|kept| *kept != id)
                .copied()
                .collect(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str) -> KeyValue {
        KeyValue {
            key: b"/keyward/accounts/acme".to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 7,
            ..KeyValue::default()
        }
    }

    #[test]
    fn an_account_entry_keeps_its_count_and_its_key_ids() {
        let (a, b) = (KeyId::from_bytes([1; 16]), KeyId::from_bytes([2; 16]));
        let held = Account::default().with(&[a, b]);
        assert_eq!((held.count, held.ids.clone()), (2, vec![a, b]));
        let read = Account::parse(&entry(std::str::from_utf8(&held.encode()).expect("text")))
            .expect("parses");
        assert_eq!(read.ids, vec![a, b]);
        assert!(read.listed);
        assert_eq!(read.revision, 7);
        let fewer = read.without(&a);
        assert_eq!((fewer.count, fewer.ids), (1, vec![b]));
    }

    #[test]
    fn a_count_alone_stays_a_count() {
        let legacy = Account::parse(&entry("3")).expect("parses");
        assert!(!legacy.listed, "written before ids were kept");
        let more = legacy.with(&[KeyId::from_bytes([9; 16])]);
        assert_eq!(more.encode(), b"4".to_vec(), "never a partial list");
        assert!(Account::parse(&entry("0")).expect("parses").listed);
        assert!(Account::parse(&entry("two")).is_err());
        assert!(Account::parse(&entry("1 not-an-id")).is_err());
    }
}
