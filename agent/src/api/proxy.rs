//! The API's PROXY protocol fields (issue 12), all additive to PRODUCT.md's shapes: older
//! agents omit them and the CLI reads them as empty.
//!
//! - `stats`: `"proxy_headers": {"v1": {…}, "v2": {…}}`, each
//!   `{"client","local","malformed","missing","untrusted"}` (the metric
//!   `wsguard_proxy_headers_total{version,result}`), and `packets.reset`: proxied flows of banned
//!   clients cut with a TCP RST (`wsguard_packets_total{action="reset"}`).
//! - `status`: `"proxy_protocol": {"from": [CIDR…], "untrusted_senders": [{"addr","version",
//!   "flows","last_seen_s"}]}`: the trusted senders as configured, and the hosts that sent
//!   PROXY headers without being trusted (with nothing configured, every sender).
//!   `version` is `v1`, `v2` or `v1,v2` (both seen); senders now inside the list, or not heard
//!   from for an hour, are left out.
//! - `flows`: `"proxy_client"`, `"proxy_client_port"` (the client a PROXY header named, whom
//!   the flow is judged and banned by; `null` for direct flows) and `"proxy_state"` (`null`
//!   for direct flows, else `client|local|malformed|missing|untrusted` as in
//!   [`ProxyResultsJson`], `unconfigured` (a header while nothing is trusted: never judged),
//!   `awaiting` (the header came alone; the request is the next segment) or `cut`).
//! - `stats.proxy_headers.v1.missing` holds every trusted flow without a header (it has no
//!   version); `v2.missing` is always 0.

use serde::{Deserialize, Serialize};

/// Flows whose first payload was read as a PROXY header, of one version, by outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyResultsJson {
    /// A client named: the request after the header is judged and charged to it.
    pub client: u64,
    /// `LOCAL` (v2) or `UNKNOWN` (v1): the load balancer's own connection (a health check);
    /// no client, never counted.
    pub local: u64,
    /// From a trusted sender, a header that breaks the spec: passed, charged to nobody.
    pub malformed: u64,
    /// From a trusted sender, no header at all: passed, charged to nobody.
    pub missing: u64,
    /// From a sender outside `proxy_protocol_from` (or with nothing configured): the header is
    /// not believed.
    pub untrusted: u64,
}

impl ProxyResultsJson {
    pub fn items(&self) -> [(&'static str, u64); 5] {
        [
            ("client", self.client),
            ("local", self.local),
            ("malformed", self.malformed),
            ("missing", self.missing),
            ("untrusted", self.untrusted),
        ]
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHeadersJson {
    pub v1: ProxyResultsJson,
    pub v2: ProxyResultsJson,
}

impl ProxyHeadersJson {
    /// (version label, counts), in label order.
    pub fn versions(&self) -> [(&'static str, &ProxyResultsJson); 2] {
        [("v1", &self.v1), ("v2", &self.v2)]
    }
}

/// `status`'s PROXY protocol part.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatusJson {
    /// `proxy_protocol_from`, as configured.
    pub from: Vec<String>,
    /// Hosts that sent PROXY headers without being in `from`, most recent first.
    pub untrusted_senders: Vec<ProxySenderJson>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySenderJson {
    pub addr: String,
    /// `v1`, `v2`, or `v1,v2` when it sent both.
    pub version: String,
    /// Flows it began with a PROXY header.
    pub flows: u64,
    /// Seconds since the last one.
    pub last_seen_s: u64,
}
