//! The lab's network: a node namespace (the Kubernetes node: nginx, the backend, wsguard on its
//! NIC) and one namespace per peer (legitimate clients, attackers), all joined by a bridge that
//! lives in a namespace of its own, like hosts on a switch. Every link is created inside a lab
//! namespace, never in the host's, and deleting the namespaces on drop removes all of it.

use anyhow::{Result, ensure};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netns::NetNs;

/// The node's NIC, where wsguard attaches.
pub const NODE_IF: &str = "eth0";
/// The port nginx listens on: the port wsguard watches.
pub const HTTP_PORT: u16 = 80;
/// The switch's end of the node's NIC.
pub const NODE_PORT: &str = "pnode";
/// Peers share one subnet with the node.
const NET4: [u8; 3] = [198, 18, 0];
const NET6: &str = "fd00:5753::";
/// Host part of the first peer; the node is `.1`.
const FIRST_PEER: u8 = 10;
const MAX_PEERS: usize = 200;

/// What a peer is: its role name, which names its namespace's processes and logs. (VLAN
/// interfaces are not used: kernels without 8021q cannot create them; tagged traffic is sent
/// as crafted frames instead, see `tests/tests/e2e_policy.rs`.)
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: String,
}

impl PeerSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

/// One client or attacker host.
pub struct Peer {
    pub name: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: NetNs,
}

impl Peer {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 { self.ip6.into() } else { self.ip4.into() }
    }
}

pub struct Topology {
    // Field order is drop order: peers and node first, the switch last (each namespace takes
    // its veth ends with it).
    pub peers: Vec<Peer>,
    pub node_ip4: Ipv4Addr,
    pub node_ip6: Ipv6Addr,
    pub node: NetNs,
    switch: NetNs,
}

impl Topology {
    /// Build the node, the switch and one namespace per peer, all links up and addressed.
    pub fn new(specs: &[PeerSpec]) -> Result<Self> {
        ensure!(
            specs.len() <= MAX_PEERS,
            "at most {MAX_PEERS} peers, got {}",
            specs.len()
        );
        let switch = NetNs::new()?;
        switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let node = NetNs::new()?;
        let mut topo = Self {
            peers: Vec::new(),
            node_ip4: host4(NET4, 1),
            node_ip6: host6(NET6, 1),
            node,
            switch,
        };
        plug(&topo.node, &topo.switch, NODE_PORT)?;
        let (v4, v6) = (topo.node_ip4, topo.node_ip6);
        address(&topo.node, NODE_IF, v4, v6)?;
        for (i, spec) in specs.iter().enumerate() {
            let ns = NetNs::new()?;
            plug(&ns, &topo.switch, &format!("p{i}"))?;
            let host = FIRST_PEER + i as u8;
            let (ip4, ip6) = (host4(NET4, host), host6(NET6, host));
            address(&ns, NODE_IF, ip4, ip6)?;
            topo.peers.push(Peer {
                name: spec.name.clone(),
                ip4,
                ip6,
                ns,
            });
        }
        Ok(topo)
    }

    /// The peer named `name` (panics on a typo in a test: the names are the test's own).
    pub fn peer(&self, name: &str) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer named {name:?} in this lab"))
    }

    /// The switch's namespace (the bridge and the peers' ports; the node's is `pnode`).
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// The node's address of the family `v6` selects.
    pub fn node_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.node_ip6.into()
        } else {
            self.node_ip4.into()
        }
    }

    /// The MAC address of the node's NIC, for crafted frames.
    pub fn node_mac(&self) -> Result<[u8; 6]> {
        let out = self.node.ip(&["-br", "link", "show", "dev", NODE_IF])?;
        let mac = out
            .split_whitespace()
            .nth(2)
            .and_then(|m| {
                let b: Vec<u8> = m
                    .split(':')
                    .filter_map(|x| u8::from_str_radix(x, 16).ok())
                    .collect();
                <[u8; 6]>::try_from(b).ok()
            })
            .ok_or_else(|| anyhow::anyhow!("no MAC in {out:?}"))?;
        Ok(mac)
    }
}

fn host4(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

fn host6(net: &str, host: u8) -> Ipv6Addr {
    format!("{net}{host:x}")
        .parse()
        .expect("a valid IPv6 literal")
}

/// A veth from `ns` (named `eth0` there) to a bridge port `port` in `switch`. Created inside
/// `ns` with the peer end moved straight into `switch`: never in the host's namespace.
fn plug(ns: &NetNs, switch: &NetNs, port: &str) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        NODE_IF,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        switch.name(),
    ])?;
    switch.ip(&["link", "set", port, "master", "br0"])?;
    switch.ip(&["link", "set", port, "up"])?;
    ns.ip(&["link", "set", NODE_IF, "up"])?;
    Ok(())
}

fn address(ns: &NetNs, iface: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", iface])?;
    // nodad: the address is usable at once instead of after duplicate detection.
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
    Ok(())
}
