//! What the hooks need besides Envoy: a filter config from its JSON, the
//! downstream address from Envoy's `ip:port` text, and the details string
//! Envoy logs for a local reply.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

use arc_swap::ArcSwapOption;
use keyward_core::domain::allowlist;
use keyward_core::domain::lease::Roster;
use keyward_core::reply::{DENY_REASON_HEADER, Reply};

use crate::copy::{Shared, USES_BUFFER};
use crate::settings::Settings;

/// A filter config: its settings, and the sync thread that keeps its copy.
pub fn new_config(config: &[u8]) -> Result<Arc<Shared>, String> {
    let settings = Settings::parse(config)?;
    let (uses, reports) = std::sync::mpsc::sync_channel(USES_BUFFER);
    let (roster, enlisted) = Roster::new(crate::trade::ROSTER_BOUND);
    let (waiters, waiting) = std::sync::mpsc::sync_channel(crate::credits::MAX_WAITING);
    let shared = Arc::new(Shared {
        copy: ArcSwapOption::empty(),
        heard: AtomicI64::new(0),
        live: AtomicBool::new(false),
        uses,
        uses_dropped: AtomicU64::new(0),
        counts: keyward_core::counts::Counts::default(),
        global: Arc::default(),
        roster,
        waiters,
        dry: dashmap::DashMap::new(),
        settings,
        stop: AtomicBool::new(false),
    });
    crate::sync::start(Arc::clone(&shared), reports, enlisted, waiting)
        .map_err(|e| format!("cannot start the sync thread: {e}"))?;
    Ok(shared)
}

/// The client address in Envoy's `SourceAddress` attribute (`ip:port` or
/// `[v6]:port`): the port dropped, then read as ext_authz reads addresses
/// ([`allowlist::client`]: IPv4-mapped IPv6 as IPv4). The attribute is
/// Envoy's trusted client address: the TCP peer with `use_remote_address:
/// true` (the shipped config), or the entry `xff_num_trusted_hops` names;
/// ext_authz computes the same with `--xff-trusted-hops`
/// ([`allowlist::forwarded_client`]). Without `use_remote_address` Envoy
/// takes it from a client's own `X-Forwarded-For`.
#[must_use]
pub fn client_address(text: &str) -> Option<IpAddr> {
    let host = match text.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (host.starts_with('[') || !host.contains(':')) =>
        {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => text,
    };
    allowlist::client(host).ok().flatten()
}

/// Envoy's response-code details for a local reply: `keyward_<reason>`.
#[must_use]
pub fn details(reply: &Reply) -> String {
    let reason = reply
        .headers
        .iter()
        .find(|(name, _)| *name == DENY_REASON_HEADER)
        .map_or("invalid_request", |(_, value)| value.as_str());
    format!("keyward_{reason}")
}
