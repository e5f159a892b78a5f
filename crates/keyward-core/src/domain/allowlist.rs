//! Address allowlists: the client addresses a key may be used from.
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`) count as the IPv4 address
//! they carry, in ranges and in clients alike. A key with an allowlist and a
//! request without a client address is refused (fail closed).

use std::net::IpAddr;

use ipnet::IpNet;

/// Most ranges one key may carry.
pub const MAX_CIDRS: usize = 16;

/// A key's allowlist, parsed once when the key is loaded or changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    nets: Box<[IpNet]>,
    restricted: bool,
}

impl Allowlist {
    /// From stored canonical ranges. A stored range that no longer parses
    /// is dropped, but the key stays restricted: it can only lose reach.
    #[must_use]
    pub fn from_stored(cidrs: &[String]) -> Self {
        Self {
            nets: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            restricted: !cidrs.is_empty(),
        }
    }

    /// The ranges, and whether the key is restricted at all (a restricted
    /// key whose every range was dropped admits nobody).
    #[must_use]
    pub fn ranges(&self) -> (Vec<String>, bool) {
        (
            self.nets.iter().map(ToString::to_string).collect(),
            self.restricted,
        )
    }

    /// The allowlist [`Self::ranges`] described (in another process).
    #[must_use]
    pub fn from_ranges(cidrs: &[String], restricted: bool) -> Self {
        Self {
            nets: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            restricted: restricted || !cidrs.is_empty(),
        }
    }

    /// Whether a request from `client` may use the key. Allocation-free.
    #[must_use]
    pub fn permits(&self, client: Option<IpAddr>) -> bool {
        if !self.restricted {
            return true;
        }
        client.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.nets.iter().any(|net| net.contains(&ip))
        })
    }
}

/// Request ranges in canonical form, or the problem with the first bad one:
/// at most [`MAX_CIDRS`], each `address/prefix` with no host bits set (a bare
/// address is one host), IPv4-mapped IPv6 ranges as IPv4, no duplicates.
pub fn canonical(cidrs: &[String]) -> Result<Vec<String>, String> {
    if cidrs.len() > MAX_CIDRS {
        return Err(format!("at most {MAX_CIDRS} ranges"));
    }
    let mut out: Vec<String> = Vec::with_capacity(cidrs.len());
    for (n, text) in cidrs.iter().enumerate() {
        let net: IpNet = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(format!(
                        "{} is not an address or a CIDR range",
                        shown(n, text)
                    ));
                }
            },
        };
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        let net = unmapped(net);
        let canonical = net.to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

/// An entry as an error may quote it: itself when it is shaped like an
/// address (hex digits, `.`, `:`, `/`; at most 49 characters), else only
/// its position: a secret pasted into the list is never echoed or logged.
fn shown(n: usize, text: &str) -> String {
    let address_shaped = text.len() <= 49
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b".:/".contains(&b));
    if address_shaped {
        format!("{text:?}")
    } else {
        format!("entry {} (not shown)", n + 1)
    }
}

/// `::ffff:a.b.c.d/n` (n ≥ 96) as the IPv4 range it means.
fn unmapped(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4);
    }
    net
}

/// A client address from a request (`client_ip`, Envoy's source address);
/// empty is none.
pub fn client(text: &str) -> Result<Option<IpAddr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<IpAddr>()
        .map(|ip| Some(ip.to_canonical()))
        .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))
}

/// Most proxies in front of Envoy that may be trusted to append the
/// address they saw to `X-Forwarded-For`.
pub const MAX_TRUSTED_HOPS: u32 = 16;

/// The client address Envoy computes with `use_remote_address: true` and
/// `xff_num_trusted_hops: hops`, from what ext_authz receives: the direct
/// peer (`attributes.source.address`) and `X-Forwarded-For` as Envoy
/// forwards it, that is with one entry appended by Envoy itself (the peer,
/// or Envoy's own node address when the peer is 127.0.0.1 or ::1).
///
/// - `hops` 0: the peer. `X-Forwarded-For` is the client's to write, so
///   it is never read.
/// - `hops` N: Envoy's own entry set aside, the N-th entry from the right
///   of the header as it reached Envoy (each trusted proxy appended the
///   address it saw, so that entry was written by the outermost trusted
///   proxy); the peer when there are fewer entries or that entry is not an
///   address, as Envoy does.
/// - `hops` N with no header at all: `None` (fail closed). Envoy appends
///   an entry whenever `use_remote_address` is on, so a missing header
///   means the ext_authz filter was not given it (`allowed_headers`):
///   deciding on the balancer's address instead is the mistake this
///   guards against.
#[must_use]
pub fn forwarded_client(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    hops: u32,
) -> Option<IpAddr> {
    if hops == 0 {
        return peer;
    }
    let header = forwarded_for?;
    // Skip Envoy's own entry, then `hops - 1` trusted ones.
    let chosen = header
        .rsplit(',')
        .map(str::trim)
        .nth(usize::try_from(hops).ok()?);
    chosen.and_then(|text| client(text).ok().flatten()).or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ranges_are_checked_and_made_canonical() {
        assert_eq!(
            canonical(&strings(&[
                "10.0.0.0/8",
                "2001:db8::/32",
                "192.0.2.7",
                "::ffff:10.1.0.0/112",
                "10.0.0.0/8"
            ])),
            Ok(strings(&[
                "10.0.0.0/8",
                "2001:db8::/32",
                "192.0.2.7/32",
                "10.1.0.0/16"
            ]))
        );
        assert!(
            canonical(&strings(&["10.0.0.1/8"]))
                .expect_err("host bits")
                .contains("10.0.0.0/8")
        );
        assert!(canonical(&strings(&["nope"])).is_err());
        // An entry is quoted only when it is shaped like an address: a
        // secret pasted here is never echoed.
        let secret = "SG.aaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let refused = canonical(&strings(&["10.0.0.0/8", secret])).expect_err("not an address");
        assert!(
            refused.starts_with("entry 2 (not shown)") && !refused.contains("SG."),
            "{refused}"
        );
        assert!(
            canonical(&strings(&["10.0.0.300"]))
                .expect_err("bad")
                .contains("\"10.0.0.300\"")
        );
        assert!(canonical(&strings(&["10.0.0.0/33"])).is_err());
        assert!(canonical(&vec!["10.0.0.0/8".to_owned(); 17]).is_err());
    }

    #[test]
    fn clients_match_their_ranges_and_mapped_addresses_count_as_ipv4() {
        let list = Allowlist::from_stored(&strings(&["10.0.0.0/8", "2001:db8::/32"]));
        let ip = |s: &str| client(s).expect("address");
        assert!(list.permits(ip("10.20.30.40")));
        assert!(list.permits(ip("::ffff:10.20.30.40")));
        assert!(list.permits(ip("2001:db8::1")));
        assert!(!list.permits(ip("11.0.0.1")));
        assert!(!list.permits(None), "no address: refused");
        assert!(Allowlist::default().permits(None), "no allowlist: any");
        let broken = Allowlist::from_stored(&strings(&["garbage"]));
        assert!(
            !broken.permits(ip("10.0.0.1")),
            "an unreadable list fails closed"
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn the_forwarded_client_is_envoys_trusted_client_address() {
        let balancer = Some(ip("127.0.0.2"));
        // No trusted hop: the peer, whatever the client wrote.
        assert_eq!(
            forwarded_client(balancer, Some("10.1.1.1, 127.0.0.2"), 0),
            balancer
        );
        // One trusted hop: what the balancer appended, after Envoy's own
        // entry (the balancer) is set aside.
        assert_eq!(
            forwarded_client(balancer, Some("10.1.1.1, 127.0.0.1, 127.0.0.2"), 1),
            Some(ip("127.0.0.1"))
        );
        // A balancer on exact loopback: Envoy appends its own node address
        // instead, which is set aside all the same.
        assert_eq!(
            forwarded_client(Some(ip("127.0.0.1")), Some("8.8.8.8,192.0.2.2"), 1),
            Some(ip("8.8.8.8"))
        );
        assert_eq!(
            forwarded_client(balancer, Some("8.8.8.8, 10.0.0.1, 192.0.2.1, 127.0.0.2"), 2),
            Some(ip("10.0.0.1"))
        );
        // Fewer entries than hops, or not an address: the peer, as Envoy.
        assert_eq!(forwarded_client(balancer, Some("127.0.0.2"), 1), balancer);
        assert_eq!(
            forwarded_client(balancer, Some("unknown, 127.0.0.2"), 1),
            balancer
        );
        assert_eq!(
            forwarded_client(balancer, Some("::ffff:10.1.2.3, 127.0.0.2"), 1),
            Some(ip("10.1.2.3"))
        );
        // Trusted hops but no header at all: fail closed.
        assert_eq!(forwarded_client(balancer, None, 1), None);
    }
}
