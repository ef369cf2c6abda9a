//! `BAN_MAY_PRESERVE` on the bans the agent writes. A ban keeps it only while the flow table
//! may hold a flow of a client it covers that was established before the ban: only such a ban
//! can have a flow to preserve, so only its packets pay the data plane's flow lookup.
//!
//! Two ways, by cost. A ban written on its own ([`DataPath::put_ban`]: kernel bursts, one per
//! event) gets the flag at once, and [`DataPath::settle_preserve`] (the daemon's sweeper, once a
//! second) clears it after one read of the flow table for every ban written since, when no flow
//! of a covered client is established. That read comes after the ban reached the kernel, so a
//! flow established later sees the ban: the TC program sets the flag then. A read of a full
//! table takes about 0.1 s, which is why a single ban does not wait for it.
//!
//! A batch ([`DataPath::put_bans`]: imports, restores, the API) reads the table once before its
//! writes and flags bans covering a flow that is established or still in its handshake; a flow
//! whose first request and 101 both fall between that read and the write is not preserved.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

use wsguard_common::maps::{
    BAN_MAY_PRESERVE, BanValue, FLOW_ANSWERED, FLOW_ESTABLISHED, FlowKey, FlowValue,
};

use super::{DataPath, DataPathError, maps::Maps, sys};
use crate::addr::Cidr;

/// Flows read per `BPF_MAP_LOOKUP_BATCH`.
const CHUNK: usize = 8192;

/// The clients of the flows in the flow table at one moment that may be preserved (the real
/// client of a proxied flow, not its proxy).
pub(super) struct FlowClients(HashSet<IpAddr>);

/// Which flows [`FlowClients::read`] keeps.
#[derive(Clone, Copy)]
pub(super) enum Keep {
    /// Established, or still in the handshake (may become established before the ban write).
    Live,
    /// Established only (a later one finds the ban and is marked by the TC program).
    Established,
}

impl FlowClients {
    pub fn read(maps: &Maps, keep: Keep) -> Result<Self, DataPathError> {
        let fd = maps.flows.fd();
        let flows: Vec<(FlowKey, FlowValue)> = match sys::lookup_all(fd, CHUNK, usize::MAX) {
            Ok(Some(all)) => all,
            // No batch operations in this kernel: walk key by key.
            Ok(None) => maps.flows(usize::MAX),
            Err(e) => return Err(DataPathError::Other(format!("read FLOWS: {e}"))),
        };
        let kept = |v: &FlowValue| match keep {
            Keep::Live => v.state != FLOW_ANSWERED,
            Keep::Established => v.state == FLOW_ESTABLISHED,
        };
        Ok(Self(
            flows
                .iter()
                .filter(|(_, v)| kept(v))
                .map(|(k, v)| client(&v.real_client().unwrap_or(k.client)))
                .collect(),
        ))
    }

    /// Whether a kept flow's client is covered by `c`.
    pub fn covers(&self, c: &Cidr) -> bool {
        if c.is_host() {
            self.0.contains(&c.addr())
        } else {
            self.0.iter().any(|ip| c.contains(ip))
        }
    }

    /// `v` with `BAN_MAY_PRESERVE` set if a kept flow's client is covered by `c`.
    pub fn flagged(&self, c: &Cidr, v: &BanValue) -> BanValue {
        let mut v = *v;
        if self.covers(c) {
            v.flags |= BAN_MAY_PRESERVE;
        }
        v
    }
}

impl DataPath {
    /// Clear the flag [`DataPath::put_ban`] set at once on the bans it wrote since the last
    /// call whose clients have no established flow now (see the module doc); the number
    /// cleared. One read of the flow table, none when nothing is waiting.
    pub fn settle_preserve(&mut self) -> Result<u64, DataPathError> {
        if self.preserve_pending.is_empty() {
            return Ok(0);
        }
        let flows = FlowClients::read(&self.maps, Keep::Established)?;
        let mut cleared = 0;
        for c in std::mem::take(&mut self.preserve_pending) {
            if flows.covers(&c) {
                continue;
            }
            // Read again just before the write: the drop counter keeps moving. A flow turning
            // established between the two (the TC program setting the flag) loses its flag:
            // a window of one syscall.
            if let Some(v) = self.maps.get_ban(&c)?
                && v.flags & BAN_MAY_PRESERVE != 0
            {
                let v = BanValue {
                    flags: v.flags & !BAN_MAY_PRESERVE,
                    ..v
                };
                self.maps
                    .insert_ban(&c, &v)
                    .map_err(|e| super::maps::ban_err(&e, c, self.max_bans))?;
                cleared += 1;
            }
        }
        Ok(cleared)
    }
}

/// A flow key's client address (IPv4 is IPv4-mapped there) as the address it is.
fn client(a: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use wsguard_common::maps::v4_mapped;

    fn clients(ips: &[&str]) -> FlowClients {
        FlowClients(ips.iter().map(|s| s.parse().unwrap()).collect())
    }

    #[test]
    fn flags_bans_covering_a_flow_client_only() {
        let f = clients(&["198.18.0.5", "fd00::5"]);
        let v = BanValue::default();
        for (cidr, want) in [
            ("198.18.0.5/32", true),
            ("198.18.0.6/32", false),
            ("198.18.0.0/24", true),
            ("198.18.1.0/24", false),
            ("fd00::5/128", true),
            ("fd00::/64", true),
            ("fd01::/64", false),
        ] {
            let c: Cidr = cidr.parse().unwrap();
            assert_eq!(
                f.flagged(&c, &v).flags & BAN_MAY_PRESERVE != 0,
                want,
                "{cidr}"
            );
        }
    }

    #[test]
    fn ipv4_flow_keys_are_ipv4_clients() {
        let ip = Ipv4Addr::new(198, 18, 0, 5);
        assert_eq!(client(&v4_mapped(ip.octets())), IpAddr::V4(ip));
        assert!(client(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets()).is_ipv6());
    }
}
