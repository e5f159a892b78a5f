//! The module's share of keys' global rate limits. While the sidecar's
//! limits are global (it has a usage store, and the store answers), the
//! module's decisions spend leases as the sidecar's do (the same core
//! code: one atomic subtraction), and this task trades them every tick
//! through the sidecar's `TradeLeases` (the module never holds a
//! connection to the usage store). Otherwise, or while the sidecar does
//! not answer, each key's limit is this module's own, as without a usage
//! store; the sidecar is asked again each second.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use keyward_core::clock;
use keyward_core::domain::key::KeyId;
use keyward_core::domain::lease::{TRADE_TICK_NANOS, Trade, Turn};
use keyward_core::domain::rate::Gcra;
use keyward_core::index::{Index, Usage};
use tonic::transport::Channel;

use crate::copy::Shared;
use crate::pb::decision_feed_client::DecisionFeedClient;
use crate::pb::{LeaseTrade, TradeLeasesRequest, TradeLeasesResponse};
use crate::sync::{CallFailed, call_sidecar, log};

/// Keys waiting to be traded that decisions may enlist at once (more wait
/// for their next decision).
pub const ROSTER_BOUND: usize = 65_536;

/// Trades one call may carry (the sidecar's limit); more go in more calls.
const MAX_TRADES: usize = 10_000;

/// While limits are not global, or the sidecar did not answer: ask again
/// every this many ticks (a second).
const ASK_EVERY: u32 = 20;

/// Longest a trade call may take; its leases decide locally after
/// [`keyward_core::domain::lease::STALLED_NANOS`] meanwhile.
const CALL_DEADLINE: Duration = Duration::from_secs(1);

/// A lease taken for this tick's call.
struct InTrade {
    usage: Arc<Usage>,
    limit: Gcra,
    /// What the lease held (negative: owed), for [`keyward_core::domain::lease::Lease::failed`].
    held: i64,
}

/// The trading task's state.
#[derive(Default)]
struct Trader {
    /// Keys traded, with the trades each has gone without demand.
    leased: HashMap<KeyId, u32>,
    client: Option<DecisionFeedClient<Channel>>,
    /// The sidecar answered the last call.
    answered: bool,
}

/// Trades the leases of the keys decisions enlist, until the filter config
/// is destroyed.
pub async fn trade_leases(shared: Arc<Shared>, enlisted: Receiver<KeyId>) {
    let mut trader = Trader::default();
    let mut ticks = tokio::time::interval(Duration::from_nanos(TRADE_TICK_NANOS.unsigned_abs()));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u32 = 0;
    loop {
        ticks.tick().await;
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        tick = tick.wrapping_add(1);
        for id in enlisted.try_iter() {
            trader.leased.entry(id).or_insert(0);
        }
        let busy =
            trader.answered && shared.global.load(Ordering::Relaxed) && !trader.leased.is_empty();
        if !busy && !tick.is_multiple_of(ASK_EVERY) {
            continue;
        }
        let Some(index) = shared.live_index() else {
            continue;
        };
        let (asks, taken) = trader.turns(&index);
        // Calls of at most MAX_TRADES each, so every key is traded every
        // tick (and at least one call: an empty one asks whether limits
        // are global); after a failed call the rest fail too.
        let (mut asks, mut taken) = (asks.into_iter(), taken.into_iter());
        let mut failed: Option<CallFailed> = None;
        loop {
            let some_asks: Vec<LeaseTrade> = asks.by_ref().take(MAX_TRADES).collect();
            let some_taken: Vec<InTrade> = taken.by_ref().take(MAX_TRADES).collect();
            let result = match &failed {
                Some(failure) => Err(failure.clone()),
                None => {
                    call_sidecar(
                        &shared,
                        &mut trader.client,
                        CALL_DEADLINE,
                        TradeLeasesRequest { trades: some_asks },
                        |mut feed, request| async move { feed.trade_leases(request).await },
                    )
                    .await
                }
            };
            if let Err(failure) = &result {
                failed = Some(failure.clone());
            }
            trader.conclude(&shared, result, some_taken);
            if asks.len() == 0 {
                break;
            }
        }
    }
}

impl Trader {
    /// Takes every traded lease's turn: the trades to ask for, and the
    /// leases taken for them.
    fn turns(&mut self, index: &Index) -> (Vec<LeaseTrade>, Vec<InTrade>) {
        let now = clock::now_nanos();
        let mut taken = Vec::new();
        let mut trades = Vec::new();
        self.leased.retain(|id, idle| {
            let Some((limit, usage)) = index.limit_and_usage(id) else {
                return false;
            };
            let Some(limit) = limit else {
                usage.lease.forget();
                return false;
            };
            match usage.lease.turn(&limit, idle, now) {
                Turn::Rest => true,
                Turn::Retire => false,
                Turn::Trade {
                    give,
                    owed,
                    want,
                    taken: held,
                } => {
                    trades.push(LeaseTrade {
                        id: id.as_bytes().to_vec(),
                        give,
                        owed,
                        want,
                    });
                    taken.push(InTrade { usage, limit, held });
                    true
                }
            }
        });
        (trades, taken)
    }

    /// Applies a call's answer to the leases taken for it, and says (once
    /// per change) whether limits are global.
    fn conclude(
        &mut self,
        shared: &Shared,
        result: Result<TradeLeasesResponse, CallFailed>,
        taken: Vec<InTrade>,
    ) {
        match result {
            Ok(response) if response.global && response.grants.len() == taken.len() => {
                let now = clock::now_nanos();
                for (lease, grant) in taken.into_iter().zip(response.grants) {
                    let usage = &lease.usage;
                    if grant.traded {
                        let trade = Trade {
                            granted: grant.granted,
                            remaining: grant.remaining,
                            retry_after_ms: grant.retry_after_ms,
                        };
                        usage
                            .lease
                            .settle(trade, &lease.limit, Some(&usage.tat), now);
                    } else {
                        // The sidecar does not know the key's limit (yet,
                        // or any more): its debt stays owed, and the key is
                        // asked for again (or dropped once the copy says
                        // it has no limit).
                        usage.lease.failed(lease.held);
                    }
                }
                self.answered = true;
                if !shared.global.swap(true, Ordering::Relaxed) {
                    log(
                        "rate limits are global: this proxy's leases are traded through the sidecar",
                    );
                }
            }
            Ok(_) => {
                fail(taken);
                self.answered = true;
                if shared.global.swap(false, Ordering::Relaxed) {
                    log(
                        "rate limits are this proxy's own: the sidecar's are not global (no usage store, or it is away)",
                    );
                }
            }
            Err(problem) => {
                fail(taken);
                self.answered = false;
                if shared.global.swap(false, Ordering::Relaxed) {
                    log(&format!(
                        "rate limits are this proxy's own (a trade failed: {problem}); asking the sidecar again each second"
                    ));
                }
            }
        }
    }
}

/// Leases whose trade did not happen (or may have): tokens in hand count
/// as given, a debt stays owed.
fn fail(taken: Vec<InTrade>) {
    for lease in taken {
        lease.usage.lease.failed(lease.held);
    }
}
