//! The PROXY-protocol side of the data path (issue 12): the trusted senders the kernel believes,
//! the headers it counted, the senders whose headers it did not believe, and cutting the live
//! flows of a client behind a proxy when a hard ban covers it.

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::lpm_trie::Key;
use wsguard_common::maps::{
    CFG_CUT_PENDING, CFG_PROXY_TRUST, Counter, FlowValue, PROXY_AWAITING, PROXY_CLIENT,
    PROXY_CUT_PENDING, SENDER_UNCONFIGURED, SENDER_UNTRUSTED, SENDER_V1, SENDER_V2,
};

use super::{
    Counters, DataPath, DataPathError,
    maps::{LRU_WALK, err, full, unmap_key},
    sys,
};
use crate::addr::Cidr;

/// Capacity of each of `PROXY_FROM_V4` and `PROXY_FROM_V6` (the kernel crate's
/// `MAX_PROXY_FROM`).
pub const MAX_PROXY_FROM: usize = 1024;

/// `BPF_EXIST`: update an entry only if it is still there (a mark never re-creates a flow the
/// kernel removed meanwhile).
const BPF_EXIST: u64 = 2;

/// Headers of one version, by result (`wsguard_proxy_headers_total{version, result}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyHeaderCounts {
    pub client: u64,
    pub local: u64,
    pub malformed: u64,
    pub untrusted: u64,
}

/// The PROXY counters of `COUNTERS`, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    pub v1: ProxyHeaderCounts,
    pub v2: ProxyHeaderCounts,
    /// Flows from trusted senders that began without a header (a header has a version; a
    /// missing one has none).
    pub missing: u64,
    /// Flows cut (`Counter::Reset`): their segment became a RST towards the server.
    pub reset: u64,
}

impl ProxyCounters {
    pub fn from_counters(c: &Counters) -> Self {
        let at = |k: Counter| c[k as usize];
        Self {
            v1: ProxyHeaderCounts {
                client: at(Counter::ProxyV1Client),
                local: at(Counter::ProxyV1Local),
                malformed: at(Counter::ProxyV1Malformed),
                untrusted: at(Counter::ProxyV1Untrusted),
            },
            v2: ProxyHeaderCounts {
                client: at(Counter::ProxyV2Client),
                local: at(Counter::ProxyV2Local),
                malformed: at(Counter::ProxyV2Malformed),
                untrusted: at(Counter::ProxyV2Untrusted),
            },
            missing: at(Counter::ProxyMissing),
            reset: at(Counter::Reset),
        }
    }
}

/// A sender of valid PROXY headers that the kernel did not believe (`PROXY_SENDERS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySender {
    pub addr: IpAddr,
    /// Headers seen (one per flow).
    pub headers: u64,
    /// `CLOCK_BOOTTIME` ns, like every kernel time.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub v1: bool,
    pub v2: bool,
    /// Seen while no trusted sender was configured (its flows were never judged).
    pub unconfigured: bool,
    /// Seen while some were, itself outside the list (judged and charged as the client).
    pub untrusted: bool,
}

/// The real client (and its port) of a flow whose trusted PROXY header named one.
pub fn real_client(v: &FlowValue) -> Option<(IpAddr, u16)> {
    v.real_client().map(|a| (unmap_key(a), v.real_port))
}

fn trie_key(c: &Cidr) -> (bool, Vec<u8>, u32) {
    match c.addr() {
        IpAddr::V4(a) => (true, a.octets().to_vec(), u32::from(c.prefix_len())),
        IpAddr::V6(a) => (false, a.octets().to_vec(), u32::from(c.prefix_len())),
    }
}

impl DataPath {
    /// Make exactly `cidrs` the trusted PROXY senders (`proxy_protocol_from`): the tries are
    /// changed entry by entry, and `CFG_PROXY_TRUST` says whether the list is configured. In an
    /// order that never trusts a sender that is not in either list: entries are added before
    /// the flag is set, and the flag is cleared before the last entries go.
    ///
    /// Refused, changing nothing: `/0` (every sender could name any client) and more than
    /// [`MAX_PROXY_FROM`] entries of one family.
    pub fn set_proxy_trust(&mut self, cidrs: &[Cidr]) -> Result<(), DataPathError> {
        if let Some(c) = cidrs.iter().find(|c| c.is_everything()) {
            return Err(DataPathError::Other(format!(
                "proxy_protocol_from {c} would trust every sender's PROXY header; list the \
                 load balancers' addresses"
            )));
        }
        let want: BTreeSet<Cidr> = cidrs.iter().copied().collect();
        for v4 in [true, false] {
            let n = want.iter().filter(|c| c.is_v4() == v4).count();
            if n > MAX_PROXY_FROM {
                return Err(DataPathError::Other(format!(
                    "proxy_protocol_from: {n} IPv{} entries, at most {MAX_PROXY_FROM}",
                    if v4 { 4 } else { 6 }
                )));
            }
        }
        let have: BTreeSet<Cidr> = self.proxy_trust()?.into_iter().collect();
        for c in want.difference(&have) {
            self.trie_insert(c)?;
        }
        let mut cfg = self.maps.config()?;
        let flag = if want.is_empty() { 0 } else { CFG_PROXY_TRUST };
        if cfg.flags & CFG_PROXY_TRUST != flag {
            cfg.flags = (cfg.flags & !CFG_PROXY_TRUST) | flag;
            self.maps.write_config(&cfg)?;
        }
        for c in have.difference(&want) {
            self.trie_remove(c)?;
        }
        Ok(())
    }

    fn trie_insert(&mut self, c: &Cidr) -> Result<(), DataPathError> {
        let p = self.maps.proxy_mut()?;
        let r = match trie_key(c) {
            (true, a, len) => p
                .from_v4
                .insert(&Key::new(len, [a[0], a[1], a[2], a[3]]), 1, 0),
            (false, a, len) => {
                let mut k = [0u8; 16];
                k.copy_from_slice(&a);
                p.from_v6.insert(&Key::new(len, k), 1, 0)
            }
        };
        r.map_err(|e| match full(&e) {
            true => DataPathError::Other(format!(
                "the trusted PROXY sender map is full; {c} not added"
            )),
            false => DataPathError::Other(format!("trust {c} as a PROXY sender: {e}")),
        })
    }

    fn trie_remove(&mut self, c: &Cidr) -> Result<(), DataPathError> {
        let p = self.maps.proxy_mut()?;
        let r = match trie_key(c) {
            (true, a, len) => p.from_v4.remove(&Key::new(len, [a[0], a[1], a[2], a[3]])),
            (false, a, len) => {
                let mut k = [0u8; 16];
                k.copy_from_slice(&a);
                p.from_v6.remove(&Key::new(len, k))
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if super::maps::not_found(&e) => Ok(()),
            Err(e) => Err(DataPathError::Other(format!("untrust {c}: {e}"))),
        }
    }

    /// The trusted PROXY senders as the kernel holds them (empty: none configured).
    pub fn proxy_trust(&self) -> Result<Vec<Cidr>, DataPathError> {
        let p = self.maps.proxy()?;
        let mut out = Vec::new();
        for r in p.from_v4.keys().take(MAX_PROXY_FROM + 1) {
            let k = r.map_err(err("walk PROXY_FROM_V4"))?;
            out.extend(Cidr::new(IpAddr::from(k.data()), k.prefix_len() as u8).ok());
        }
        for r in p.from_v6.keys().take(MAX_PROXY_FROM + 1) {
            let k = r.map_err(err("walk PROXY_FROM_V6"))?;
            out.extend(Cidr::new(IpAddr::from(k.data()), k.prefix_len() as u8).ok());
        }
        Ok(out)
    }

    /// The PROXY header and reset counters.
    pub fn proxy_counters(&self) -> Result<ProxyCounters, DataPathError> {
        Ok(ProxyCounters::from_counters(&self.maps.counters()?))
    }

    /// Senders of valid PROXY headers the kernel did not believe, most headers first.
    pub fn proxy_senders(&self) -> Result<Vec<ProxySender>, DataPathError> {
        let p = self.maps.proxy()?;
        let mut out: Vec<ProxySender> = p
            .senders
            .iter()
            .take(LRU_WALK)
            .filter_map(Result::ok)
            .map(|(k, v)| ProxySender {
                addr: unmap_key(k),
                headers: v.headers,
                first_seen_ns: v.first_seen_ns,
                last_seen_ns: v.last_seen_ns,
                v1: v.flags & SENDER_V1 != 0,
                v2: v.flags & SENDER_V2 != 0,
                unconfigured: v.flags & SENDER_UNCONFIGURED != 0,
                untrusted: v.flags & SENDER_UNTRUSTED != 0,
            })
            .collect();
        out.sort_by(|a, b| (b.headers, a.addr).cmp(&(a.headers, b.addr)));
        Ok(out)
    }

    /// Mark every live flow whose real client (behind a trusted proxy) `cidr` covers, so that
    /// the kernel cuts it at its next packet (a RST towards the server, then the proxy's
    /// next packet answered with one): what a hard ban does to a client's established flows
    /// when its packets come from a proxy that must not be dropped. Sets `CFG_CUT_PENDING`
    /// (after the marks) so the kernel looks flows up until [`DataPath::settle_cuts`] finds
    /// none left. The number of flows marked. Call it for enforced hard bans only.
    pub fn cut_flows(&mut self, cidr: &Cidr) -> Result<usize, DataPathError> {
        let flows = self.read_flows()?;
        let table = self.maps.flows.current()?;
        let mut marked = 0;
        for (k, mut v) in flows {
            if v.proxy & !PROXY_AWAITING != PROXY_CLIENT {
                continue;
            }
            if !real_client(&v).is_some_and(|(ip, _)| cidr.contains(&ip)) {
                continue;
            }
            v.proxy = PROXY_CUT_PENDING;
            // Gone meanwhile (FIN, eviction): nothing to cut.
            if table.insert(k, v, BPF_EXIST).is_ok() {
                marked += 1;
            }
        }
        if marked > 0 {
            let mut cfg = self.maps.config()?;
            if cfg.flags & CFG_CUT_PENDING == 0 {
                cfg.flags |= CFG_CUT_PENDING;
                self.maps.write_config(&cfg)?;
            }
        }
        Ok(marked)
    }

    /// Flows still marked by [`DataPath::cut_flows`] and not yet cut (one read of the flow
    /// table while `CFG_CUT_PENDING` is set, none otherwise); at 0 the flag is cleared, so the
    /// packets of established flows go back to skipping the flow lookup. For the daemon's
    /// sweeper.
    pub fn settle_cuts(&mut self) -> Result<usize, DataPathError> {
        let mut cfg = self.maps.config()?;
        if cfg.flags & CFG_CUT_PENDING == 0 {
            return Ok(0);
        }
        let pending = self
            .read_flows()?
            .iter()
            .filter(|(_, v)| v.proxy == PROXY_CUT_PENDING)
            .count();
        if pending == 0 {
            cfg.flags &= !CFG_CUT_PENDING;
            self.maps.write_config(&cfg)?;
        }
        Ok(pending)
    }

    /// The whole flow table, batched where the kernel can.
    fn read_flows(&self) -> Result<Vec<(wsguard_common::maps::FlowKey, FlowValue)>, DataPathError> {
        match sys::lookup_all(self.maps.flows.fd(), 8192, usize::MAX) {
            Ok(Some(all)) => Ok(all),
            Ok(None) => Ok(self.maps.flows(LRU_WALK)),
            Err(e) => Err(DataPathError::Other(format!("read FLOWS: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsguard_common::maps::{PROXY_CUT, v4_mapped};

    #[test]
    fn counters_by_name() {
        let mut c = [0u64; wsguard_common::maps::COUNTERS_LEN as usize];
        c[Counter::ProxyV1Client as usize] = 1;
        c[Counter::ProxyV2Untrusted as usize] = 2;
        c[Counter::ProxyMissing as usize] = 3;
        c[Counter::Reset as usize] = 4;
        let p = ProxyCounters::from_counters(&c);
        assert_eq!(
            (p.v1.client, p.v2.untrusted, p.missing, p.reset),
            (1, 2, 3, 4)
        );
        assert_eq!(p.v2.client + p.v1.untrusted + p.v1.local, 0);
    }

    #[test]
    fn real_client_only_for_flows_that_name_one() {
        let mut v = FlowValue {
            real_client: v4_mapped([198, 19, 0, 7]),
            real_port: 4000,
            ..Default::default()
        };
        assert_eq!(real_client(&v), None, "a direct flow");
        for p in [
            PROXY_CLIENT,
            PROXY_CLIENT | PROXY_AWAITING,
            PROXY_CUT,
            PROXY_CUT_PENDING,
        ] {
            v.proxy = p;
            assert_eq!(
                real_client(&v),
                Some(("198.19.0.7".parse().unwrap(), 4000)),
                "{p:#x}"
            );
        }
    }
}
