//! Replicated mode's write path: etcd as the truth of each change.
//!
//! A change runs the same rules as standalone (`stage::Rules`) over a view
//! of etcd ([`Remote::view`]) that remembers every key it read, then
//! commits in one etcd transaction that compares each of them (the
//! caller's key, the target, the account's count) with the revision it was
//! read at ([`EtcdView::commit`]). If anything moved since, nothing is
//! written and the rules run again on what is there now. So "the caller
//! still holds its scopes", "never more than the limit" and "ids are
//! unique" hold across every sidecar, with no lock. Calls block the writer
//! thread on the etcd runtime, retrying through transient errors until the
//! caller's deadline.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::change::KeyError;
use super::stage::{Staged, View, Write};
use crate::domain::key::KeyId;
use crate::store::etcd::{Account, Etcd, EtcdError, Listing, Mutation, Page};
use crate::store::record::{self, KeyRecord};

/// How much earlier than its caller's deadline a change gives up on etcd.
const REPLY_MARGIN: Duration = Duration::from_millis(100);
/// Pause between retries of a failed etcd call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for one page of a full read.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The key writer's connection to etcd.
#[derive(Debug)]
pub struct Remote {
    etcd: Etcd,
    runtime: Handle,
    page_keys: u32,
}

impl Remote {
    /// The key writer's connection through `etcd`, blocking on `runtime`.
    #[must_use]
    pub fn new(etcd: Etcd, runtime: Handle, page_keys: u32) -> Self {
        Self {
            etcd,
            runtime,
            page_keys,
        }
    }

    /// A view of etcd for one change's rules, until `deadline` (less a
    /// margin: answered before the caller gives up, whose timeout would
    /// report the local disk as not responding). It remembers what the
    /// rules read, for [`EtcdView::commit`]'s compares.
    #[must_use]
    pub fn view(&self, deadline: Instant) -> EtcdView<'_> {
        EtcdView {
            remote: self,
            deadline: deadline.checked_sub(REPLY_MARGIN).unwrap_or(deadline),
            read: Vec::new(),
            accounts: HashMap::new(),
        }
    }

    /// Whether `staged`'s write is in etcd (then the revision to apply it
    /// at): the exact record for a create or replace, no record for a
    /// removal.
    fn landed(&self, staged: &Staged, deadline: Instant) -> Result<Option<i64>, KeyError> {
        let record = &staged.committed.after;
        let key = self.etcd.key_path(&record.id);
        let (kv, revision) = self.call(deadline, || self.etcd.get_at(&key))?;
        Ok(match (staged.write, kv) {
            (Write::Remove, None) => Some(revision),
            (Write::Create | Write::Replace, Some(kv)) if kv.value == record::encode(record) => {
                Some(kv.mod_revision)
            }
            _ => None,
        })
    }

    /// A full read of the key set, for rebuilding the replica on the
    /// writer thread ([`Self::next_page`]).
    #[must_use]
    pub fn list(&self) -> Listing {
        self.etcd.list(self.page_keys)
    }

    /// The next page of `listing`, waiting on the writer thread.
    pub fn next_page(&self, listing: &mut Listing) -> Result<Option<Page>, EtcdError> {
        self.runtime.block_on(async {
            tokio::time::timeout(PAGE_TIMEOUT, listing.next_page())
                .await
                .unwrap_or_else(|_| {
                    Err(EtcdError::Rpc(tonic::Status::deadline_exceeded(
                        "etcd did not answer a page of the full read in time",
                    )))
                })
        })
    }

    /// Runs a read from the writer thread until `deadline`, retrying
    /// through transient errors.
    fn call<T, F: Future<Output = Result<T, EtcdError>>>(
        &self,
        deadline: Instant,
        call: impl Fn() -> F,
    ) -> Result<T, KeyError> {
        loop {
            match self.attempt(deadline, &call) {
                Ok(value) => return Ok(value),
                Err(Attempt::Transient) => Self::pause(deadline)?,
                Err(Attempt::Failed) => return Err(KeyError::Unavailable),
            }
        }
    }

    /// One etcd call from the writer thread, until `deadline`; renews an
    /// expired etcd token once.
    fn attempt<T, F: Future<Output = Result<T, EtcdError>>>(
        &self,
        deadline: Instant,
        call: impl Fn() -> F,
    ) -> Result<T, Attempt> {
        self.runtime.block_on(async {
            let mut renewed = false;
            loop {
                match tokio::time::timeout_at(deadline.into(), call()).await {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(error)) => {
                        if !renewed && self.etcd.renew_if_expired(&error).await {
                            renewed = true;
                            continue;
                        }
                        tracing::debug!(%error, "etcd call failed");
                        return Err(if error.is_transient() {
                            Attempt::Transient
                        } else {
                            tracing::warn!(%error, "etcd refused a call; the change was not acknowledged");
                            Attempt::Failed
                        });
                    }
                    Err(_) => {
                        tracing::warn!(
                            "etcd did not answer in time; the change was not acknowledged"
                        );
                        return Err(Attempt::Failed);
                    }
                }
            }
        })
    }

    /// Waits a moment before retrying; `Unavailable` once past `deadline`.
    fn pause(deadline: Instant) -> Result<(), KeyError> {
        let next = Instant::now() + RETRY_PAUSE;
        if next >= deadline {
            tracing::warn!("etcd unreachable until the deadline; the change was not acknowledged");
            return Err(KeyError::Unavailable);
        }
        std::thread::sleep(RETRY_PAUSE);
        Ok(())
    }
}

/// How one etcd call failed.
enum Attempt {
    /// A lost member, a leader election, a dropped connection: try again.
    Transient,
    /// Refused, unreadable, or out of time.
    Failed,
}

/// etcd as a [`View`]: remembers every key read and its revision, for the
/// transaction's compares.
#[derive(Debug)]
pub struct EtcdView<'a> {
    remote: &'a Remote,
    deadline: Instant,
    read: Vec<(Vec<u8>, i64)>,
    accounts: HashMap<String, Account>,
}

impl View for EtcdView<'_> {
    fn get(&mut self, id: &KeyId) -> Result<Option<KeyRecord>, KeyError> {
        let key = self.remote.etcd.key_path(id);
        let etcd = &self.remote.etcd;
        let kv = self.remote.call(self.deadline, || etcd.get_kv(&key))?;
        self.read
            .push((key.clone(), kv.as_ref().map_or(0, |kv| kv.mod_revision)));
        kv.map(|kv| {
            record::decode(&kv.value).map_err(|error| {
                tracing::error!(key_id = %id, %error, "unreadable key record in etcd");
                KeyError::Unavailable
            })
        })
        .transpose()
    }

    fn count(&mut self, account: &str) -> Result<usize, KeyError> {
        Ok(usize::try_from(self.account(account)?.count).unwrap_or(usize::MAX))
    }
}

impl EtcdView<'_> {
    /// Commits `staged` in one etcd transaction that compares every key
    /// the rules read (the caller's key, the target, the account's count)
    /// with the revision it was read at: the revision it committed at, or
    /// `None` when anything moved since (nothing written: the rules run
    /// again on what is there now). Retries through transient etcd errors
    /// (a member lost, a leader election) until the deadline; a
    /// transaction whose reply was lost may have committed, so then it
    /// looks whether its write is there.
    pub fn commit(mut self, staged: &Staged) -> Result<Option<i64>, KeyError> {
        let record = &staged.committed.after;
        let account = match staged.write {
            Write::Create | Write::Remove => self.account(&record.account)?,
            Write::Replace => Account::default(),
        };
        let remote = self.remote;
        let mutation = match staged.write {
            Write::Create => {
                // Ids are random; this makes uniqueness a guarantee.
                self.read.push((remote.etcd.key_path(&record.id), 0));
                Mutation::Create {
                    record,
                    account: &account,
                }
            }
            Write::Replace => Mutation::Replace { record },
            Write::Remove => Mutation::Remove {
                record,
                account: &account,
            },
        };
        let (read, deadline) = (&self.read, self.deadline);
        match remote.attempt(deadline, || remote.etcd.commit(read, &mutation)) {
            Ok(revision) => Ok(revision),
            Err(Attempt::Transient) => {
                Remote::pause(deadline)?;
                match remote.landed(staged, deadline)? {
                    Some(revision) => Ok(Some(revision)),
                    // Not ours in etcd now: never written, or written and
                    // since changed by another sidecar. A change that must
                    // not run twice fails rather than be run again.
                    None if staged.once => Err(KeyError::Unavailable),
                    None => Ok(None),
                }
            }
            Err(Attempt::Failed) => Err(KeyError::Unavailable),
        }
    }

    /// The account's entry as read for this change (read once, and noted
    /// for the transaction's compares).
    fn account(&mut self, account: &str) -> Result<Account, KeyError> {
        if let Some(held) = self.accounts.get(account) {
            return Ok(held.clone());
        }
        let path = self.remote.etcd.account_path(account);
        let etcd = &self.remote.etcd;
        let held = self.remote.call(self.deadline, || etcd.account(&path))?;
        self.read.push((path, held.revision));
        self.accounts.insert(account.to_owned(), held.clone());
        Ok(held)
    }
}
