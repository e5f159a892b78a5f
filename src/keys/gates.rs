//! Per-account turns at the key writer's queue. The queue is first come,
//! first served: without a cap, one tenant's burst queues ahead of every
//! other tenant's write. With it, another account's write waits behind at
//! most [`MAX_QUEUED_PER_ACCOUNT`] of each busy account's changes; the
//! rest of a burst waits its turn outside the queue.

use std::collections::HashMap;
use std::sync::Arc;

/// Changes one account (or the admin token) may have waiting for the writer
/// at once. The writer's queue is first come, first served: without a cap,
/// one tenant's burst queues ahead of every other tenant's write. With it,
/// another account's write waits behind at most this many of each busy
/// account's changes; the rest of a burst waits its turn outside the queue.
pub const MAX_QUEUED_PER_ACCOUNT: usize = 16;

/// Per-account turns at the writer's queue (see [`MAX_QUEUED_PER_ACCOUNT`]);
/// `None` is the admin token. An account's entry lives while it has changes
/// in flight.
#[derive(Debug, Default)]
pub struct Gates {
    by_account: std::sync::Mutex<HashMap<Option<Arc<str>>, Arc<tokio::sync::Semaphore>>>,
}

/// A turn at the writer's queue; gives it back when dropped.
pub struct Turn<'a> {
    gates: &'a Gates,
    domain: Option<Arc<str>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Gates {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Option<Arc<str>>, Arc<tokio::sync::Semaphore>>> {
        self.by_account
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a turn for `domain` (an account; `None`: the admin).
    pub async fn enter(&self, domain: Option<&Arc<str>>) -> Turn<'_> {
        let domain = domain.cloned();
        let semaphore =
            {
                let mut gates = self.lock();
                // A caller cancelled while it waited never made a `Turn`, so
                // its account's entry is forgotten here instead.
                gates.retain(|_, semaphore| !idle(semaphore));
                Arc::clone(gates.entry(domain.clone()).or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_PER_ACCOUNT))
                }))
            };
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = semaphore.acquire_owned().await.ok();
        Turn {
            gates: self,
            domain,
            permit,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut gates = self.gates.lock();
        // Forget an account with nothing in flight (only the map holds it).
        if gates.get(&self.domain).is_some_and(idle) {
            gates.remove(&self.domain);
        }
    }
}

/// Nothing in flight for the account: only the map holds its semaphore.
fn idle(semaphore: &Arc<tokio::sync::Semaphore>) -> bool {
    Arc::strong_count(semaphore) == 1 && semaphore.available_permits() == MAX_QUEUED_PER_ACCOUNT
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_account_holds_at_most_its_share_of_turns() {
        let gates = Gates::default();
        let noisy: Arc<str> = Arc::from("noisy");
        let quiet: Arc<str> = Arc::from("quiet");
        let mut held = Vec::new();
        for _ in 0..MAX_QUEUED_PER_ACCOUNT {
            held.push(gates.enter(Some(&noisy)).await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(50), gates.enter(Some(&noisy)));
        assert!(waiting.await.is_err(), "the next turn waits");
        // Other accounts and the admin are not held up.
        let other = tokio::time::timeout(Duration::from_millis(50), gates.enter(Some(&quiet)));
        drop(other.await.expect("another account enters at once"));
        drop(gates.enter(None).await);
        held.pop();
        let next = tokio::time::timeout(Duration::from_millis(50), gates.enter(Some(&noisy)));
        drop(next.await.expect("a returned turn is reused"));
        drop(held);
        assert!(gates.lock().is_empty(), "idle accounts are forgotten");
    }
}
