//! The module's leases on keys' usage credits. A decision spends a credit
//! from the key's lease in this process (the core's one compare-and-swap);
//! this task borrows credits for the lease from the sidecar's own lease
//! (`LendCredits`: the sidecar reserves from the key's record when it
//! must) a little ahead of demand, and gives back what a quiet key holds.
//! A request that finds the lease empty is paused (Envoy's scheduler, see
//! `ffi`), the loan asked for at once, and the request decided again when
//! it comes back: allowed on a credit lent, refused as exhausted when the
//! sidecar had none to lend, or as unverifiable (503) when it could not
//! answer in time. Never more is spent than was lent.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use keyward_core::clock;
use keyward_core::domain::credits::DemandWindow;
use keyward_core::domain::key::KeyId;
use keyward_core::index::{CreditsHeld, Index, Usage};
use tonic::transport::Channel;

use crate::copy::Shared;
use crate::pb::decision_feed_client::DecisionFeedClient;
use crate::pb::{CreditLoan, LendCreditsRequest};
use crate::sync::{call_sidecar, log};

/// Requests that may wait for a tick's loans; more are refused (503) at
/// once rather than held. With those of the call under way, at most twice
/// this many requests are paused at once.
pub const MAX_WAITING: usize = 4096;

/// How often leases are looked at.
const TICK: Duration = Duration::from_millis(50);

/// Ticks without demand after which a lease is given back (five seconds:
/// credits a quiet module holds are out of every other decider's reach).
const IDLE_TICKS: u32 = 100;

/// Fewest credits a loan asks for.
const MIN_LOAN: u64 = 2;

/// Loans one call may carry (the sidecar's limit); more go in more calls.
const MAX_LOANS: usize = 10_000;

/// Longest a loan call may take (a reservation in the store included),
/// after which its waiting requests are decided again without it.
const CALL_DEADLINE: Duration = Duration::from_millis(2500);

/// After the sidecar had no credits to lend for a key, how long its
/// requests are refused as exhausted without asking again.
pub const DRY_NANOS: i64 = 1_000_000_000;

/// Wakes a paused request (on its Envoy worker) to be decided again.
pub trait Wake: Send + Sync {
    /// Schedules the request's decision again.
    fn wake(&self);
}

/// A request paused until its key's lease is topped up.
pub struct Waiter {
    /// The key it presented.
    pub key: KeyId,
    /// How to wake it.
    pub wake: Arc<dyn Wake>,
}

/// A loan asked for this tick, and where its answer goes.
struct Asked {
    key: KeyId,
    usage: Arc<Usage>,
    /// Credits wanted (0: only giving back).
    want: u64,
    /// Credits given back, and their period.
    give: (u64, i64),
    /// The key's credits as this copy holds them.
    held: CreditsHeld,
    waiters: Vec<Arc<dyn Wake>>,
}

/// Keeps the credit leases of keys whose requests reached them, until the
/// filter config is destroyed (then gives every lease back).
pub async fn keep_credits(shared: Arc<Shared>, waiting: Receiver<Waiter>) {
    let mut kept: HashMap<KeyId, DemandWindow> = HashMap::new();
    let mut client: Option<DecisionFeedClient<Channel>> = None;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let stopping = shared.stop.load(Ordering::Relaxed);
        let mut waiters: HashMap<KeyId, Vec<Arc<dyn Wake>>> = HashMap::new();
        for waiter in waiting.try_iter() {
            waiters.entry(waiter.key).or_default().push(waiter.wake);
        }
        let Some(index) = shared.live_index() else {
            wake_all(waiters.into_values().flatten());
            continue;
        };
        for key in waiters.keys() {
            kept.entry(*key).or_default();
        }
        let (loans, asked) = look(&index, &mut kept, &mut waiters, stopping);
        wake_all(waiters.into_values().flatten());
        lend(&shared, &mut client, loans, asked).await;
        if stopping {
            return;
        }
    }
}

/// One look at every kept key: the loans to ask for (credits wanted, or
/// given back), and the keys they are for. Keys that have nothing in hand
/// and no demand are no longer kept.
fn look(
    index: &Index,
    kept: &mut HashMap<KeyId, DemandWindow>,
    waiters: &mut HashMap<KeyId, Vec<Arc<dyn Wake>>>,
    stopping: bool,
) -> (Vec<CreditLoan>, Vec<Asked>) {
    let mut loans = Vec::new();
    let mut asked = Vec::new();
    kept.retain(|key, window| {
        let Some((usage, held)) = credits_of(index, key) else {
            return false;
        };
        // A paused request's demand is in the window already (counted when
        // it found the lease empty).
        window.push(usage.credits.take_demand());
        let in_hand = usage.credits.in_hand(held.period);
        let waiting = waiters.remove(key).unwrap_or_default();
        let second = window.second();
        let idle = window.idle() >= IDLE_TICKS && waiting.is_empty();
        let keep = 2 * second.max(1);
        let (want, give) = if stopping || idle {
            (0, usage.credits.take(u64::MAX))
        } else if !waiting.is_empty() || (second > 0 && in_hand * 2 < second.max(MIN_LOAN)) {
            let wanted = second.max(waiting.len() as u64).max(MIN_LOAN);
            (wanted.saturating_sub(in_hand).max(1), (0, 0))
        } else if held.unreserved == 0 && in_hand > keep {
            // None left to reserve: what this module holds beyond two
            // seconds of its demand goes back for the other deciders.
            (0, usage.credits.take(in_hand - keep))
        } else {
            return in_hand > 0 || second > 0;
        };
        if want == 0 && give.0 == 0 {
            return false;
        }
        loans.push(CreditLoan {
            id: key.as_bytes().to_vec(),
            want,
            give: give.0,
            period: give.1,
        });
        asked.push(Asked {
            key: *key,
            usage,
            want,
            give,
            held,
            waiters: waiting,
        });
        !(stopping || idle)
    });
    (loans, asked)
}

/// A live key's per-request state and credits, if it has credits.
fn credits_of(index: &Index, key: &KeyId) -> Option<(Arc<Usage>, CreditsHeld)> {
    let entry = index.entry(key)?;
    let held = entry.credits.as_deref().copied()?;
    Some((entry.usage, held))
}

/// Asks the sidecar for the loans (calls of at most [`MAX_LOANS`]), puts
/// what it lent into the leases, marks keys it had none for as dry, and
/// wakes the requests waiting on them whatever the outcome.
async fn lend(
    shared: &Shared,
    client: &mut Option<DecisionFeedClient<Channel>>,
    loans: Vec<CreditLoan>,
    asked: Vec<Asked>,
) {
    let (mut loans, mut asked) = (loans.into_iter(), asked.into_iter());
    while loans.len() > 0 {
        let some_loans: Vec<CreditLoan> = loans.by_ref().take(MAX_LOANS).collect();
        let some_asked: Vec<Asked> = asked.by_ref().take(MAX_LOANS).collect();
        let called = call_sidecar(
            shared,
            client,
            CALL_DEADLINE,
            LendCreditsRequest { loans: some_loans },
            |mut feed, request| async move { feed.lend_credits(request).await },
        )
        .await;
        match called.map(|response| response.grants) {
            Ok(grants) if grants.len() == some_asked.len() => {
                let now = clock::now_nanos();
                for (asked, grant) in some_asked.into_iter().zip(grants) {
                    if grant.granted > 0 {
                        asked.usage.credits.add(grant.granted, grant.period);
                        shared.dry.remove(&asked.key);
                    } else if asked.want > 0 && !grant.unavailable {
                        shared
                            .dry
                            .insert(asked.key, asked.held.dry_until(now, DRY_NANOS));
                    }
                    wake_all(asked.waiters);
                }
            }
            Ok(_) => {
                log("credits: the sidecar answered loans it was not asked for (a protocol error)");
                wake_all(some_asked.into_iter().flat_map(|asked| asked.waiters));
            }
            Err(failed) => {
                // Credits being given back are lost when the call may have
                // been applied: never granted twice.
                if !failed.maybe_applied {
                    for asked in &some_asked {
                        if asked.give.0 > 0 {
                            asked.usage.credits.add(asked.give.0, asked.give.1);
                        }
                    }
                }
                log(&format!("credits: a loan call failed: {}", failed.problem));
                wake_all(some_asked.into_iter().flat_map(|asked| asked.waiters));
            }
        }
    }
}

fn wake_all(waiters: impl IntoIterator<Item = Arc<dyn Wake>>) {
    for waiter in waiters {
        waiter.wake();
    }
}
