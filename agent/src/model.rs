//! What the agent knows about bans and the allowlist, independent of how it is stored (kernel
//! maps, state file) or shown (API JSON, tables).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::addr::Cidr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BanSource {
    /// A burst of bad handshakes seen by the data plane.
    Kernel,
    /// A burst found in access or application logs.
    Log,
    /// `wsguard ban add`.
    Manual,
    /// `wsguard import`.
    Import,
    /// A decision pulled from CrowdSec's Local API.
    Crowdsec,
}

impl BanSource {
    pub const ALL: [BanSource; 5] = [
        Self::Kernel,
        Self::Log,
        Self::Manual,
        Self::Import,
        Self::Crowdsec,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Log => "log",
            Self::Manual => "manual",
            Self::Import => "import",
            Self::Crowdsec => "crowdsec",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Observe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Observe => "observe",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowSource {
    /// Loopback, link-local, the node's own addresses.
    Builtin,
    /// `--allow` / `allow` in the config file.
    Config,
    /// `wsguard allow add`.
    Manual,
    /// A trusted PROXY protocol sender (`proxy_protocol_from`): never banned, never charged.
    Proxy,
}

impl AllowSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Config => "config",
            Self::Manual => "manual",
            Self::Proxy => "proxy",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub cidr: Cidr,
    pub source: BanSource,
    pub reason: String,
    pub mode: Mode,
    pub hard: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `None`: permanent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// How many times this source has been banned (1 for the first ban).
    pub offenses: u32,
    /// For `crowdsec` bans: the LAPI decision's origin (`cscli`, `crowdsec`, `CAPI`, ...).
    #[serde(default)]
    pub origin: Option<String>,
    /// For `crowdsec` bans: the LAPI decision's scenario.
    #[serde(default)]
    pub scenario: Option<String>,
}

impl Ban {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    pub cidr: Cidr,
    pub source: AllowSource,
    pub reason: String,
}
