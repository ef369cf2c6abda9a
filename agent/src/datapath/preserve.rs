//! `BAN_MAY_PRESERVE` on the bans the agent writes. A ban carries it only when the flow table
//! holds a flow of a client it covers: only such a ban can have a flow to preserve, so only its
//! packets pay the data plane's flow lookup.
//!
//! The table is read after the ban's `created_ns` was taken and before the ban is written, so
//! a flow the read misses was recorded after the ban was created and is not preserved anyway,
//! except one recorded in the few microseconds between its first packet and the read. A
//! handshake still in flight at the read is covered by the TC program, which sets the flag
//! when it sees such a flow become established.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd as _,
};

use aya::maps::IterableMap as _;
use wsguard_common::maps::{BAN_MAY_PRESERVE, BanValue, FlowKey, FlowValue};

use super::{DataPathError, maps::Maps, sys};
use crate::addr::Cidr;

/// Flows read per `BPF_MAP_LOOKUP_BATCH`.
const CHUNK: usize = 8192;

/// The clients of every flow in the flow table at one moment.
pub(super) struct FlowClients(HashSet<IpAddr>);

impl FlowClients {
    pub fn read(maps: &Maps) -> Result<Self, DataPathError> {
        let fd = maps.flows.map().fd().as_fd();
        let flows: Vec<(FlowKey, FlowValue)> = match sys::lookup_all(fd, CHUNK, usize::MAX) {
            Ok(Some(all)) => all,
            // No batch operations in this kernel: walk key by key.
            Ok(None) => maps.flows(usize::MAX),
            Err(e) => return Err(DataPathError::Other(format!("read FLOWS: {e}"))),
        };
        Ok(Self(flows.iter().map(|(k, _)| client(&k.client)).collect()))
    }

    /// `v` with `BAN_MAY_PRESERVE` set if a flow's client is covered by `c`.
    pub fn flagged(&self, c: &Cidr, v: &BanValue) -> BanValue {
        let mut v = *v;
        let covered = if c.is_host() {
            self.0.contains(&c.addr())
        } else {
            self.0.iter().any(|ip| c.contains(ip))
        };
        if covered {
            v.flags |= BAN_MAY_PRESERVE;
        }
        v
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
