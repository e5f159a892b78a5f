//! keyward's decision inside Envoy: a dynamic module (an HTTP filter) that
//! decides every request as keyward's ext_authz would, from the same code
//! (`keyward-core`), against its own copy of the keys, kept live by the
//! sidecar's decision feed (`keyward.v1.DecisionFeed`).
//!
//! # Layout
//! - [`ffi`]: the ABI: hooks Envoy calls, callbacks into Envoy. The only
//!   `unsafe` in the crate; every other module forbids it.
//! - [`filter`]: a filter config from its JSON; small helpers the hooks use.
//! - [`copy`]: the copy the workers decide from, and the decision itself
//!   (the core's, plus "not synced" and "too stale").
//! - [`sync`]: the module's own thread: follows the feed, swaps in fresh
//!   copies, applies changes, reports uses.
//! - [`trade`]: the module's leases on global rate limits, traded
//!   through the sidecar.
//! - [`credits`]: the module's leases on usage credits, lent by the
//!   sidecar; requests paused while a loan is asked for.
//! - [`settings`]: the `filter_config` JSON.
//! - [`pb`]: the feed's generated client.
#![deny(unsafe_code)]

pub mod copy;
pub mod credits;
pub mod ffi;
pub mod filter;
pub mod pb;
pub mod settings;
pub mod sync;
pub mod trade;
