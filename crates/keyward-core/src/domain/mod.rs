//! The policy domain: scopes, catalog, routes, keys, rules and decisions.
//! Pure: no tokio, tonic or sled.

pub mod allowlist;
pub mod catalog;
pub mod credits;
pub mod decision;
pub mod key;
pub mod lease;
pub mod load_error;
pub mod path;
pub mod rate;
pub mod record;
pub mod route;
pub mod rules;
pub mod scope_set;
