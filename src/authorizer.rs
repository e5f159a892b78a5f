//! The read path every adapter calls: the core's one decision function
//! ([`Decider`]), and on an on-demand replica the fetch of a key seen for
//! the first time before it.

use std::net::IpAddr;
use std::sync::Arc;

pub use keyward_core::decide::{AuthFailure, Decider, bearer_credential};

use crate::domain::decision::{Decision, DenyReason};
use crate::domain::key::KeyId;
use crate::domain::route::{Method, RouteTable};
use crate::keys::KeyError;
use crate::keys::demand::{Lookup, OnDemand};
use crate::store::index::{Index, Verified};
use crate::usage::credits::{CreditKeeper, RESERVE_PATIENCE};

/// Fetches of one first sight a decision makes (see
/// [`Authorizer::decide_fetching`]).
const FIRST_SIGHT_ATTEMPTS: usize = 2;

/// Reservations one decision waits for (see
/// [`Authorizer::decide_fetching`]).
const RESERVATION_ATTEMPTS: usize = 2;

/// Decides requests. Synchronous, allocation-free, never touches disk.
/// On an on-demand replica, a key the index does not hold is fetched
/// first ([`Self::decide_fetching`]); every other decision is the same.
#[derive(Debug, Clone)]
pub struct Authorizer {
    decider: Decider,
    demand: Option<Arc<OnDemand>>,
    credits: Option<Arc<CreditKeeper>>,
}

impl Authorizer {
    /// An authorizer over the live index and a compiled route table.
    #[must_use]
    pub fn new(index: Arc<Index>, routes: Arc<RouteTable>) -> Self {
        Self {
            decider: Decider::new(index, routes),
            demand: None,
            credits: None,
        }
    }

    /// The same, over an on-demand replica's index: keys it does not hold
    /// are fetched through `demand` at their first sight.
    #[must_use]
    pub fn with_on_demand(mut self, demand: Option<Arc<OnDemand>>) -> Self {
        self.demand = demand;
        self
    }

    /// The same, its rate limits global while the usage plane's switch
    /// holds, the keys whose leases decisions spend sent to its roster
    /// (see [`keyward_core::domain::lease`]).
    #[must_use]
    pub fn with_usage(mut self, usage: Option<&crate::usage::UsagePlane>) -> Self {
        if let Some(usage) = usage {
            self.decider = self
                .decider
                .with_global_limits(usage.global_limits())
                .with_roster(usage.roster());
        }
        self
    }

    /// The same, reserving credits through `keeper` when a decision finds
    /// a key's lease empty (see [`Self::decide_fetching`]).
    #[must_use]
    pub fn with_credits(mut self, keeper: Arc<CreditKeeper>) -> Self {
        self.credits = Some(keeper);
        self
    }

    /// [`Self::decide`], fetching the key first if this is an on-demand
    /// replica that does not hold it, and waiting for a reservation when
    /// the key's credits lease is empty while its record has some. Every
    /// other decision (every decision in the steady state) is made with no
    /// await: the same path as `decide`.
    pub async fn decide_fetching(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let mut decision = self.fetching(credential, client, method, path).await;
        let Some(keeper) = &self.credits else {
            return decision;
        };
        // Twice at most: the credits one reservation brings can be spent by
        // requests deciding alongside before this one decides again.
        for _ in 0..RESERVATION_ATTEMPTS {
            let (true, Some(id)) = (decision.credits_reservable, decision.key_id) else {
                return decision;
            };
            match tokio::time::timeout(RESERVE_PATIENCE, keeper.top_up(id)).await {
                Ok(Ok(())) => decision = self.decide(credential, client, method, path),
                // None left after all (another sidecar took the last), or
                // the credits were removed meanwhile: decided again once,
                // with no wait left to offer.
                Ok(Err(KeyError::NoCreditsLeft)) => {
                    decision = self.decide(credential, client, method, path);
                    decision.credits_reservable = false;
                    return decision;
                }
                // The store of truth cannot take a reservation now: refused
                // as unverifiable (503, retry later), never allowed on
                // credit.
                Ok(Err(_)) | Err(_) => {
                    return AuthFailure::new(DenyReason::KeyUnverifiable, Some(id)).decision();
                }
            }
        }
        match decision.key_id {
            // Both reservations were spent by requests deciding alongside
            // while the record still has credits: refused as unverifiable
            // (503, retry), as the module refuses it, not as used up.
            Some(id) if decision.credits_reservable => {
                AuthFailure::new(DenyReason::KeyUnverifiable, Some(id)).decision()
            }
            _ => decision,
        }
    }

    /// [`Self::decide`], fetching the key first if this is an on-demand
    /// replica that does not hold it.
    async fn fetching(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        let mut decision = self.decide(credential, client, method, path);
        // Twice at most: a key fetched can be evicted again before it is
        // read only when the held set churns faster than a fetch.
        for _ in 0..FIRST_SIGHT_ATTEMPTS {
            let Some((demand, id)) =
                self.first_sight(decision.deny, decision.wrong_secret, decision.key_id)
            else {
                return decision;
            };
            match demand.lookup(id).await {
                Lookup::Held => decision = self.decide(credential, client, method, path),
                Lookup::Absent => return decision,
                Lookup::Unverifiable => break,
            }
        }
        match self.first_sight(decision.deny, decision.wrong_secret, decision.key_id) {
            Some((_, id)) => AuthFailure::new(DenyReason::KeyUnverifiable, Some(id)).decision(),
            None => decision,
        }
    }

    /// [`Self::authenticate`], fetching the key first as
    /// [`Self::decide_fetching`] does.
    pub async fn authenticate_fetching(
        &self,
        credential: &str,
        client: Option<IpAddr>,
    ) -> Result<Verified, AuthFailure> {
        let mut verified = self.authenticate(credential, client);
        for _ in 0..FIRST_SIGHT_ATTEMPTS {
            let Some((demand, id)) = self.first_sight_of(&verified) else {
                return verified;
            };
            match demand.lookup(id).await {
                Lookup::Held => verified = self.authenticate(credential, client),
                Lookup::Absent => return verified,
                Lookup::Unverifiable => break,
            }
        }
        match self.first_sight_of(&verified) {
            Some((_, id)) => Err(AuthFailure::new(DenyReason::KeyUnverifiable, Some(id))),
            None => verified,
        }
    }

    fn first_sight_of(
        &self,
        verified: &Result<Verified, AuthFailure>,
    ) -> Option<(&OnDemand, KeyId)> {
        let failure = verified.as_ref().err()?;
        self.first_sight(Some(failure.reason), failure.wrong_secret, failure.key_id)
    }

    /// A well-formed key id the index does not hold, on an on-demand
    /// replica (a wrong secret for a held key is not a first sight).
    fn first_sight(
        &self,
        deny: Option<DenyReason>,
        wrong_secret: bool,
        id: Option<KeyId>,
    ) -> Option<(&OnDemand, KeyId)> {
        match (&self.demand, deny, id) {
            (Some(demand), Some(DenyReason::UnknownKey), Some(id)) if !wrong_secret => {
                Some((demand, id))
            }
            _ => None,
        }
    }

    /// Verifies a credential as an API key (see [`Decider::authenticate`]).
    pub fn authenticate(
        &self,
        credential: &str,
        client: Option<IpAddr>,
    ) -> Result<Verified, AuthFailure> {
        self.decider.authenticate(credential, client)
    }

    /// Decides one request from `client` (see [`Decider::decide`]).
    #[must_use]
    pub fn decide(
        &self,
        credential: &str,
        client: Option<IpAddr>,
        method: Option<Method>,
        path: &str,
    ) -> Decision {
        self.decider.decide(credential, client, method, path)
    }
}
