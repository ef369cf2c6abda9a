//! `[logs]` in the agent's TOML config: log sources, rules, trusted proxies. `LogsFile` is what
//! serde reads; `LogsFile::validate` turns it into `LogsConfig` or an error naming the key
//! (`logs.rules[1].window`) and the value.
//!
//! ```toml
//! [logs]
//! trusted_proxies = ["10.0.0.0/8"]
//!
//! [[logs.sources]]
//! name = "ingress"
//! paths = ["/var/log/ingress/access.log"]
//! format = "ingress-nginx"            # ingress-nginx | combined | json | text
//!
//! [[logs.sources]]
//! name = "ingress-syslog"
//! syslog = "127.0.0.1:5140"
//! format = "json"
//! fields = { client = "remote_addr", status = "status", path = "uri" }
//!
//! [[logs.rules]]
//! name = "ws_4xx"
//! statuses = [400, 403, "426"]        # codes, "4xx" or "400-499"
//! paths = ["/ws"]
//! threshold = 20
//! window = "10s"
//!
//! [[logs.rules]]
//! name = "spring_upgrade_null"
//! pattern = 'Handshake failed due to invalid Upgrade header: null.*client=(?P<client>\S+)'
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    detect::Threshold,
    parse::{Format, StatusMatch},
};
use crate::addr::Cidr;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsFile {
    #[serde(default)]
    pub sources: Vec<SourceFile>,
    /// None given: one built-in rule (`bad_handshake`, see `LogDefaults`).
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    /// Peers whose forwarded header is believed. Unset: the agent's `proxy_protocol_from`
    /// (the load balancers the data plane trusts are trusted here too); `[]` trusts nobody.
    #[serde(default)]
    pub trusted_proxies: Option<Vec<String>>,
    /// Where read offsets are kept; default `<state_dir>/logs`.
    pub state_dir: Option<PathBuf>,
    /// Longer lines are cut here (and counted); default 16384.
    pub max_line_len: Option<i64>,
    /// How often files are checked for new lines and rotation; default 250ms.
    pub poll_interval: Option<String>,
    /// 5xx lines per source per window that are reported as an upstream-error burst; default:
    /// the agent's threshold and window.
    pub upstream_error_threshold: Option<i64>,
    pub upstream_error_window: Option<String>,
    /// Sources tracked per log source at once; default 100000.
    pub max_tracked_sources: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub name: String,
    /// Files or globs (`*`, `?` in any component). Exactly one of `paths` and `syslog`.
    pub paths: Option<Vec<String>>,
    /// A loopback `addr:port` to receive syslog datagrams on.
    pub syslog: Option<String>,
    pub format: String,
    /// `end` (default) or `beginning`: where to start in files found at the first start.
    pub start_at: Option<String>,
    /// Rule names; default: every rule that applies to the format.
    pub rules: Option<Vec<String>>,
    /// JSON field names (format `json` only).
    pub fields: Option<JsonFieldsFile>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFieldsFile {
    pub client: Option<String>,
    pub status: Option<String>,
    pub path: Option<String>,
    pub request: Option<String>,
    pub forwarded: Option<String>,
    pub upstream: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    Code(i64),
    Text(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: String,
    /// Access-log rule: these statuses (exactly one of `statuses` and `pattern`).
    pub statuses: Option<Vec<StatusSpec>>,
    /// Path prefixes for `statuses`; default every path.
    pub paths: Option<Vec<String>>,
    /// Application-log rule: a regex with a named capture `client`.
    pub pattern: Option<String>,
    pub threshold: Option<i64>,
    pub window: Option<String>,
    pub reason: Option<String>,
    /// 5xx statuses may only be listed with this set: they are the server's fault.
    pub ban_on_5xx: Option<bool>,
}

/// Values from the rest of the agent config that the log config defaults to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogDefaults {
    /// The kernel detector's threshold and window (`threshold`, `window`).
    pub threshold: u32,
    pub window: Duration,
    /// `ws_path`: the default rule's path prefixes.
    pub ws_paths: Vec<String>,
    pub state_dir: PathBuf,
    /// `proxy_protocol_from`: `trusted_proxies` when `[logs]` does not set it.
    pub proxy_protocol_from: Vec<Cidr>,
}

impl Default for LogDefaults {
    fn default() -> Self {
        Self {
            threshold: 20,
            window: Duration::from_secs(10),
            ws_paths: Vec::new(),
            state_dir: PathBuf::from("/var/lib/wsguard"),
            proxy_protocol_from: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogsConfig {
    pub sources: Vec<SourceConfig>,
    pub rules: Vec<RuleConfig>,
    pub trusted_proxies: Vec<Cidr>,
    pub state_dir: PathBuf,
    pub max_line_len: usize,
    pub poll_interval: Duration,
    pub upstream: Threshold,
    pub max_tracked_sources: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Files(Vec<String>),
    Syslog(SocketAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    End,
    Beginning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    pub name: String,
    pub input: Input,
    pub format: Format,
    pub start_at: StartAt,
    /// Indices into `LogsConfig::rules`.
    pub rules: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleKind {
    Status(StatusMatch),
    /// The regex source; it compiled at validation.
    Pattern(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleConfig {
    pub name: String,
    pub kind: RuleKind,
    pub threshold: Threshold,
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogsConfigError {
    #[error("invalid value for {key}: {value:?}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

pub(super) fn bad(
    key: impl Into<String>,
    value: impl Into<String>,
    why: impl ToString,
) -> LogsConfigError {
    LogsConfigError::Invalid {
        key: key.into(),
        value: value.into(),
        why: why.to_string(),
    }
}

mod validate;

pub use validate::DEFAULT_STATUSES;

#[cfg(test)]
mod tests;
