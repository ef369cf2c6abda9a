//! The agent's API over its Unix socket: HTTP/1.1 with JSON bodies. These types are the wire
//! contract between the agent and the CLI; the `*Json` shapes are exactly PRODUCT.md's.
//!
//! Routes (all under `/v1`):
//! - `GET /bans?source=S&offset=N&limit=N` -> `[BanJson]` (paged so 1M bans never sit in one
//!   buffer), `POST /bans` `BanAddRequest` -> `[BanJson]`, `DELETE /bans` `RemoveRequest` ->
//!   `RemoveResponse`
//! - `GET /allow` -> `[AllowJson]`, `POST /allow` `AllowAddRequest` -> `AllowJson`,
//!   `DELETE /allow` `RemoveRequest` -> `RemoveResponse`
//! - `GET /stats` -> `StatsJson`, `GET /top?n=N` -> `[TopJson]`, `GET /flows?addr=IP` ->
//!   `[FlowJson]`, `GET /status` -> `StatusJson`
//! - `POST /import` `ImportRequest` -> `ImportResponse`, `POST /detach` -> `{}`
//!
//! Errors: a non-2xx status with `ApiError` as the body; `kind` maps to the CLI's exit code.

use serde::{Deserialize, Serialize};

use crate::model::{AllowSource, BanSource, Mode};

mod proxy;
pub use proxy::{ProxyHeadersJson, ProxyResultsJson, ProxySenderJson, ProxyStatusJson};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanJson {
    pub addr: String,
    pub prefix_len: u8,
    pub source: BanSource,
    pub reason: String,
    pub mode: Mode,
    pub hard: bool,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC; `null` for permanent bans.
    pub expires_at: Option<String>,
    pub dropped_packets: u64,
    pub offenses: u32,
    /// LAPI's origin and scenario of a `crowdsec` ban; `null` for every other source.
    pub origin: Option<String>,
    pub scenario: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowJson {
    pub addr: String,
    pub prefix_len: u8,
    pub source: AllowSource,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketsJson {
    pub passed: u64,
    pub dropped: u64,
    pub would_drop: u64,
    pub allowlisted: u64,
    pub preserved: u64,
    pub unparsed: u64,
    /// Beyond PRODUCT.md: proxied flows of banned clients cut with a TCP RST (issue 12).
    #[serde(default)]
    pub reset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakesJson {
    pub valid: u64,
    pub bad: u64,
    pub incomplete: u64,
    pub tls: u64,
    pub ignored: u64,
    pub upstream_errors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadReasonsJson {
    pub no_upgrade: u64,
    pub no_connection_upgrade: u64,
    pub no_key: u64,
    pub bad_version: u64,
    pub bad_method: u64,
    pub server_rejected: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BansStatsJson {
    pub active: u64,
    pub created: u64,
    pub expired: u64,
    pub refused: u64,
    pub capacity: u64,
}

/// Each stats group as (JSON field name, value), in PRODUCT.md's order: what the CLI's table
/// and the metrics endpoint both print.
impl PacketsJson {
    pub fn items(&self) -> [(&'static str, u64); 7] {
        [
            ("passed", self.passed),
            ("dropped", self.dropped),
            ("would_drop", self.would_drop),
            ("allowlisted", self.allowlisted),
            ("preserved", self.preserved),
            ("unparsed", self.unparsed),
            ("reset", self.reset),
        ]
    }
}

impl HandshakesJson {
    pub fn items(&self) -> [(&'static str, u64); 6] {
        [
            ("valid", self.valid),
            ("bad", self.bad),
            ("incomplete", self.incomplete),
            ("tls", self.tls),
            ("ignored", self.ignored),
            ("upstream_errors", self.upstream_errors),
        ]
    }
}

impl BadReasonsJson {
    pub fn items(&self) -> [(&'static str, u64); 6] {
        [
            ("no_upgrade", self.no_upgrade),
            ("no_connection_upgrade", self.no_connection_upgrade),
            ("no_key", self.no_key),
            ("bad_version", self.bad_version),
            ("bad_method", self.bad_method),
            ("server_rejected", self.server_rejected),
        ]
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsJson {
    pub packets: PacketsJson,
    pub handshakes: HandshakesJson,
    pub bad_reasons: BadReasonsJson,
    pub bans: BansStatsJson,
    pub events_lost: u64,
    /// Beyond PRODUCT.md: PROXY protocol headers by version and outcome (issue 12).
    #[serde(default)]
    pub proxy_headers: ProxyHeadersJson,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceJson {
    pub name: String,
    /// `native` or `generic` (or `netlink-native`/`netlink-generic` when aya fell back to a
    /// netlink attachment that cannot be pinned).
    pub xdp_mode: String,
    pub xdp_prog_id: u32,
    /// `tcx` or `clsact`, or `none`.
    pub tc_egress: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanMapJson {
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusJson {
    pub version: String,
    pub mode: Mode,
    pub uptime_s: u64,
    pub pinned: bool,
    pub interfaces: Vec<InterfaceJson>,
    pub ban_map: BanMapJson,
    /// Beyond PRODUCT.md's fields: log detection, only when the agent has `[logs]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogsStatusJson>,
    /// CrowdSec LAPI (issue 13), only when the agent has `[crowdsec]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crowdsec: Option<crate::crowdsec::CrowdsecStatusJson>,
    /// Beyond PRODUCT.md: trusted PROXY senders and the untrusted ones seen (issue 12).
    #[serde(default)]
    pub proxy_protocol: ProxyStatusJson,
}

/// Log detection in `status` (issue 7): present only when the agent has `[logs]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsStatusJson {
    pub sources: Vec<LogSourceStatusJson>,
    /// Active bans with source `log`.
    pub bans: u64,
    /// Of those, bans no packet has hit: the logged address may not be the packet source XDP
    /// sees (a client behind a load balancer), so XDP may be unable to enforce them.
    pub bans_unmatched: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSourceStatusJson {
    pub name: String,
    pub lines: u64,
    pub matched: u64,
    pub parse_errors: u64,
    pub bursts: u64,
    /// One per configured path or glob.
    pub files: Vec<LogFileStatusJson>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFileStatusJson {
    /// The configured path or glob.
    pub path: String,
    /// The files it matches that are being read.
    pub following: Vec<String>,
    /// Why nothing is read (missing file, no match, permission); retried.
    pub error: Option<String>,
}

/// A row of `wsguard top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopJson {
    pub addr: String,
    pub bad_handshakes: u64,
    pub dropped_packets: u64,
    pub banned: bool,
}

/// A row of `wsguard flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowJson {
    pub client: String,
    pub client_port: u16,
    pub server: String,
    pub server_port: u16,
    /// `valid|bad|incomplete|tls|ignored`.
    pub verdict: String,
    pub reason: Option<String>,
    /// `handshake|answered|established`.
    pub state: String,
    /// Established before a ban of its client: its packets keep passing.
    pub preserved: bool,
    pub age_s: u64,
    /// Beyond PRODUCT.md (issue 12): for a flow from a trusted PROXY sender, the client its
    /// header named (the flow is judged and banned by it; `client` is then the load balancer).
    #[serde(default)]
    pub proxy_client: Option<String>,
    #[serde(default)]
    pub proxy_client_port: Option<u16>,
    /// `null` for a direct flow; else `client|local|malformed|missing|untrusted|awaiting|cut`.
    #[serde(default)]
    pub proxy_state: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanAddRequest {
    pub addrs: Vec<String>,
    /// Seconds; `None` with `permanent == false` means the agent's `ban_ttl`.
    pub ttl_s: Option<u64>,
    pub permanent: bool,
    pub reason: Option<String>,
    pub observe: bool,
    pub hard: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowAddRequest {
    pub addr: String,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub addrs: Vec<String>,
    /// `ban rm --local`: do not delete the decisions in CrowdSec LAPI.
    #[serde(default)]
    pub local: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub removed: Vec<String>,
    pub missing: Vec<String>,
    /// `ban rm` with `[crowdsec]`: addresses whose LAPI decisions were deleted (lifted on
    /// every node), with how many.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lapi_deleted: Vec<(String, u64)>,
    /// LAPI could not be reached: the deletion is queued and retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lapi_queued: Vec<String>,
    /// Bans from LAPI lifted on this node only (`--local`, or no machine credentials).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lapi_kept: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportEntry {
    pub addr: String,
    pub ttl_s: Option<u64>,
    pub permanent: bool,
    pub reason: Option<String>,
    /// Observe-only ban (from a JSON export's `"mode": "observe"`).
    #[serde(default)]
    pub observe: bool,
    /// Also drop flows established before the ban (from a JSON export's `"hard": true`).
    #[serde(default)]
    pub hard: bool,
}

/// Entries that share their terms, sent once for all of their addresses: an import of a
/// blocklist with one TTL and reason is mostly addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportGroup {
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub permanent: bool,
    pub reason: Option<String>,
    #[serde(default)]
    pub observe: bool,
    #[serde(default)]
    pub hard: bool,
    pub addrs: Vec<String>,
}

/// `entries` one by one, then `groups`; numbered in that order in errors. The CLI sends
/// groups; entries are what earlier CLIs sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<ImportEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<ImportGroup>,
}

impl ImportRequest {
    pub fn len(&self) -> usize {
        self.entries.len() + self.groups.iter().map(|g| g.addrs.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportResponse {
    pub imported: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad request or value (CLI exit 2).
    Invalid,
    /// Refused by policy: allowlisted, `/0`, map full (CLI exit 3).
    Refused,
    /// Peer not allowed to mutate, or anything else that failed (CLI exit 1).
    Denied,
    Internal,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Invalid => 2,
            Self::Refused => 3,
            Self::Denied | Self::Internal => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn invalid(m: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Invalid,
            message: m.into(),
        }
    }
    pub fn refused(m: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Refused,
            message: m.into(),
        }
    }
    pub fn denied(m: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Denied,
            message: m.into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: m.into(),
        }
    }
}

/// Counts behind the metrics endpoint that `StatsJson` does not carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub stats: StatsJson,
    /// Active bans per source (every source present, zero included).
    pub bans_active: Vec<(BanSource, u64)>,
    /// Bans created since start per source.
    pub bans_created: Vec<(BanSource, u64)>,
    /// Refused ban requests by reason: `allowlisted`, `full`, `rate_limited`.
    pub bans_refused: Vec<(String, u64)>,
    pub ban_map_entries: u64,
    pub ban_map_capacity: u64,
    /// Interfaces whose XDP attachment fell back to netlink (cannot be pinned).
    pub netlink_fallbacks: u64,
    /// The circuit breaker switched automatic bans to observe.
    pub breaker_open: bool,
    /// CrowdSec LAPI counters, only with `[crowdsec]`.
    #[serde(default)]
    pub crowdsec: Option<crate::crowdsec::CrowdsecMetrics>,
}

/// What the API server asks of the agent. The server authenticates the peer (SO_PEERCRED)
/// and writes the audit log; implementations only decide and apply.
pub trait Backend: Send + Sync + 'static {
    fn ban_add(&self, req: BanAddRequest) -> Result<Vec<BanJson>, ApiError>;
    fn ban_rm(&self, req: RemoveRequest) -> Result<RemoveResponse, ApiError>;
    fn ban_list(
        &self,
        source: Option<BanSource>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<BanJson>, ApiError>;
    fn allow_add(&self, req: AllowAddRequest) -> Result<AllowJson, ApiError>;
    fn allow_rm(&self, req: RemoveRequest) -> Result<RemoveResponse, ApiError>;
    fn allow_list(&self) -> Result<Vec<AllowJson>, ApiError>;
    fn stats(&self) -> Result<StatsJson, ApiError>;
    fn top(&self, n: usize) -> Result<Vec<TopJson>, ApiError>;
    fn flows(&self, addr: Option<std::net::IpAddr>) -> Result<Vec<FlowJson>, ApiError>;
    fn status(&self) -> Result<StatusJson, ApiError>;
    fn import(&self, req: ImportRequest) -> Result<ImportResponse, ApiError>;
    fn detach(&self) -> Result<(), ApiError>;
    fn metrics(&self) -> Result<MetricsSnapshot, ApiError>;
    /// `/readyz`: programs attached and the state loaded.
    fn ready(&self) -> bool;
}
