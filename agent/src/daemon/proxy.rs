//! The agent's side of the PROXY protocol data path (issue 12): trusted senders written to the
//! kernel, cut flows of hard bans, and the kernel's PROXY counters, senders and per-flow
//! clients as the API shows them (`crate::api::proxy`).

use std::net::IpAddr;

use wsguard_common::maps::FlowValue;

use super::shared::Inner;
use crate::{
    api::{ProxyHeadersJson, ProxyStatusJson},
    config::AgentConfig,
};

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
