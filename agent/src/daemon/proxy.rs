//! The agent's side of the PROXY protocol data path (issue 12): trusted senders written to the
//! kernel, cut flows of hard bans, and the kernel's PROXY counters, senders and per-flow
//! clients as the API shows them (`crate::api::proxy`).

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    time::Duration,
};

use tracing::{debug, info, warn};
use wsguard_common::maps::{
    FlowKey, FlowValue, PROXY_AWAITING, PROXY_CLIENT, PROXY_CUT, PROXY_CUT_PENDING, PROXY_LOCAL,
    PROXY_MALFORMED, PROXY_MISSING, PROXY_NONE, PROXY_UNCONFIGURED, PROXY_UNTRUSTED,
};

use super::shared::Inner;
use crate::{
    addr::Cidr,
    api::{ProxyHeadersJson, ProxyResultsJson, ProxySenderJson, ProxyStatusJson},
    config::AgentConfig,
    datapath::{Counters, ProxyCounters, ProxyHeaderCounts, ProxySender, real_client},
    model::{Ban, Mode},
};

/// Untrusted senders not heard from for this long drop out of `status` (the kernel's sender
/// map is pinned and outlives restarts and config changes).
pub const SENDER_STALE: Duration = Duration::from_secs(3600);

/// Proxied flows of clients under a new (or newly) hard, enforced ban are cut at their next
/// packet: a hard ban preserves nothing. A failure leaves the flows to the ban's own drop path
/// and is logged.
///
/// `cut_flows` walks the flow table once per call, so a batch (an import of many hard bans)
/// first finds, in one walk, the real clients of live proxied flows that the batch covers, and
/// cuts only those.
pub fn cut_hard<'a>(g: &mut Inner, bans: impl IntoIterator<Item = &'a Ban>) {
    let hard: Vec<Cidr> = bans
        .into_iter()
        .filter(|b| b.hard && b.mode == Mode::Enforce)
        .map(|b| b.cidr)
        .collect();
    let targets = match hard.len() {
        0 => return,
        1 => hard,
        _ => match g.dp.flows() {
            Ok(flows) => covered_clients(&flows, &hard),
            Err(e) => {
                warn!("cannot read the flows to cut for hard bans: {e}");
                return;
            }
        },
    };
    for cidr in targets {
        match g.dp.cut_flows(&cidr) {
            Ok(0) => {}
            Ok(n) => info!(addr = %cidr, flows = n, "hard ban: cutting its proxied flows"),
            Err(e) => warn!(addr = %cidr, "cannot mark the proxied flows of a hard ban: {e}"),
        }
    }
}

/// The real clients (as host CIDRs) of proxied, judged flows that one of `bans` covers.
fn covered_clients(flows: &[(FlowKey, FlowValue)], bans: &[Cidr]) -> Vec<Cidr> {
    let hosts: HashSet<Cidr> = bans.iter().filter(|c| c.is_host()).copied().collect();
    let nets: Vec<&Cidr> = bans.iter().filter(|c| !c.is_host()).collect();
    let clients: BTreeSet<Cidr> = flows
        .iter()
        .filter(|(_, v)| v.proxy_state() == PROXY_CLIENT)
        .filter_map(|(_, v)| real_client(v))
        .map(|(ip, _)| Cidr::host(ip))
        .filter(|c| hosts.contains(c) || nets.iter().any(|n| n.contains(&c.addr())))
        .collect();
    clients.into_iter().collect()
}

/// The sweeper's part: clear the kernel's "cut pending" flag once every marked flow is cut.
pub fn settle(g: &mut Inner) {
    match g.dp.settle_cuts() {
        Ok(0) => {}
        Ok(n) => debug!(flows = n, "proxied flows still to cut"),
        Err(e) => warn!("cannot settle the cut proxied flows: {e}"),
    }
}

/// `packets.reset`: proxied flows cut with a RST.
pub fn reset(k: &Counters) -> u64 {
    ProxyCounters::from_counters(k).reset
}

/// `stats.proxy_headers`. A missing header has no version: the kernel counts it once, and it
/// is reported under `v1` (`v2.missing` stays 0), so that sums over versions stay right.
pub fn headers(k: &Counters) -> ProxyHeadersJson {
    let c = ProxyCounters::from_counters(k);
    let r = |h: &ProxyHeaderCounts, missing| ProxyResultsJson {
        client: h.client,
        local: h.local,
        malformed: h.malformed,
        missing,
        untrusted: h.untrusted,
    };
    ProxyHeadersJson {
        v1: r(&c.v1, c.missing),
        v2: r(&c.v2, 0),
    }
}

/// What a flow entry says about its PROXY header.
pub struct Proxied {
    pub client: Option<IpAddr>,
    pub port: u16,
    pub state: Option<&'static str>,
}

/// `flows`' `proxy_state` names: the metric's results, plus `unconfigured` (a header while
/// nothing is trusted: never judged), `awaiting` (the header came alone, the request is the
/// next segment) and `cut` (the client is banned: reset, or marked to be).
pub fn flow(v: &FlowValue) -> Proxied {
    let awaiting = v.proxy & PROXY_AWAITING != 0;
    let state = match v.proxy_state() {
        PROXY_NONE => None,
        PROXY_CLIENT | PROXY_UNTRUSTED if awaiting => Some("awaiting"),
        PROXY_CLIENT => Some("client"),
        PROXY_LOCAL => Some("local"),
        PROXY_MALFORMED => Some("malformed"),
        PROXY_MISSING => Some("missing"),
        PROXY_UNTRUSTED => Some("untrusted"),
        PROXY_UNCONFIGURED => Some("unconfigured"),
        PROXY_CUT | PROXY_CUT_PENDING => Some("cut"),
        _ => Some("unknown"),
    };
    let rc = real_client(v);
    Proxied {
        client: rc.map(|(ip, _)| ip),
        port: rc.map_or(0, |(_, p)| p),
        state,
    }
}

/// `status.proxy_protocol`: the configured list, and the senders the kernel did not believe
/// that are still outside it and were heard from within [`SENDER_STALE`].
pub fn status(cfg: &AgentConfig, g: &Inner) -> ProxyStatusJson {
    let senders = match g.dp.proxy_senders() {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot read the PROXY senders map: {e}");
            Vec::new()
        }
    };
    ProxyStatusJson {
        from: cfg
            .proxy_protocol_from
            .iter()
            .map(|c| c.to_string())
            .collect(),
        untrusted_senders: untrusted(
            &senders,
            &cfg.proxy_protocol_from,
            crate::datapath::boot_ns(),
        ),
    }
}

fn untrusted(senders: &[ProxySender], trusted: &[Cidr], now_ns: u64) -> Vec<ProxySenderJson> {
    let stale = SENDER_STALE.as_nanos() as u64;
    let mut out: Vec<(u64, ProxySenderJson)> = senders
        .iter()
        .filter(|s| !trusted.iter().any(|c| c.contains(&s.addr)))
        .filter(|s| now_ns.saturating_sub(s.last_seen_ns) < stale)
        .map(|s| {
            let version = match (s.v1, s.v2) {
                (true, true) => "v1,v2",
                (true, false) => "v1",
                _ => "v2",
            };
            (
                s.last_seen_ns,
                ProxySenderJson {
                    addr: s.addr.to_string(),
                    version: version.into(),
                    flows: s.headers,
                    last_seen_s: now_ns.saturating_sub(s.last_seen_ns) / 1_000_000_000,
                },
            )
        })
        .collect();
    // Most recent first.
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.addr.cmp(&b.1.addr)));
    out.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(addr: &str, last_s: u64, v1: bool, v2: bool) -> ProxySender {
        ProxySender {
            addr: addr.parse().unwrap(),
            headers: 7,
            first_seen_ns: 0,
            last_seen_ns: last_s * 1_000_000_000,
            v1,
            v2,
            unconfigured: true,
            untrusted: false,
        }
    }

    #[test]
    fn untrusted_senders_exclude_trusted_and_stale_ones() {
        let now = 10_000 * 1_000_000_000;
        let s = [
            sender("198.18.0.10", 9_990, false, true),
            sender("198.18.0.11", 9_999, true, true),
            sender("198.18.0.12", 1_000, true, false),
            sender("fd00::5", 9_995, true, false),
        ];
        let trusted: Vec<Cidr> = vec!["fd00::/64".parse().unwrap()];
        let out = untrusted(&s, &trusted, now);
        let got: Vec<(&str, &str, u64)> = out
            .iter()
            .map(|s| (s.addr.as_str(), s.version.as_str(), s.last_seen_s))
            .collect();
        assert_eq!(
            got,
            [("198.18.0.11", "v1,v2", 1), ("198.18.0.10", "v2", 10)]
        );
    }

    #[test]
    fn a_batch_of_hard_bans_cuts_the_clients_it_covers() {
        let flow = |client: [u8; 16], proxy: u8| {
            let v = FlowValue {
                proxy,
                real_client: client,
                real_port: 1,
                ..Default::default()
            };
            (FlowKey::default(), v)
        };
        let m = wsguard_common::maps::v4_mapped;
        let flows = [
            flow(m([203, 0, 113, 7]), PROXY_CLIENT),
            flow(m([203, 0, 113, 7]), PROXY_CLIENT | PROXY_AWAITING),
            flow(m([198, 51, 100, 9]), PROXY_CLIENT),
            flow(m([192, 0, 2, 1]), PROXY_CLIENT),
            flow(m([203, 0, 113, 8]), PROXY_CUT),
            flow(m([203, 0, 113, 9]), PROXY_NONE),
        ];
        let bans: Vec<Cidr> = ["203.0.113.0/24", "198.51.100.9", "10.0.0.1"]
            .map(|s| s.parse().unwrap())
            .to_vec();
        let got: Vec<String> = covered_clients(&flows, &bans)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, ["198.51.100.9", "203.0.113.7"]);
    }

    #[test]
    fn missing_is_reported_under_v1() {
        let mut k: Counters = [0; wsguard_common::maps::COUNTERS_LEN as usize];
        k[wsguard_common::maps::Counter::ProxyMissing as usize] = 3;
        k[wsguard_common::maps::Counter::ProxyV2Local as usize] = 5;
        k[wsguard_common::maps::Counter::Reset as usize] = 2;
        let h = headers(&k);
        assert_eq!((h.v1.missing, h.v2.missing, h.v2.local), (3, 0, 5));
        assert_eq!(reset(&k), 2);
    }
}
