//! keyward's decision core, shared by the sidecar (`keyward`) and the Envoy
//! dynamic module (`keyward-envoy`), so both make the same decision from
//! the same code. Pure: no tokio, tonic, sled or I/O beyond the clock.
//!
//! # Layout
//! - [`decide`]: the one decision function: key → index → constant-time
//!   verify → lifecycle → route mask → AND → rate limit → [`Decision`].
//! - [`reply`]: what a gateway answers for a decision: status, SendGrid's
//!   error body, the identity and rate-limit headers.
//! - [`index`]: the in-memory, lock-free map of live keys decisions read.
//! - [`clock`]: wall-clock time for lifecycle checks, cached for decisions.
//! - [`domain`]: scopes, bitsets, catalog, routes, key format, rules,
//!   decisions.
//!
//! [`Decision`]: domain::decision::Decision

pub mod clock;
pub mod counts;
pub mod decide;
pub mod domain;
pub mod index;
pub mod reply;
