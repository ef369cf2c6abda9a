//! Line parsers for access and application logs, and the per-line classification against rules.
//!
//! Self-contained on purpose (std, `ipnet`, `regex`, `serde_json` only, nothing from the rest of
//! the crate): the fuzz crate (`agent/fuzz`) includes this directory by path, so it can be
//! fuzzed without building the agent and its kernel programs.

pub mod access;
pub mod classify;
pub mod client;
pub mod json;
pub mod syslog;

pub use classify::{Format, LineClassifier, Matcher, PatternMatch, StatusMatch, Verdict};
pub use json::JsonFields;

/// Why a line was skipped, as the `reason` label of the parse-error counters. A skipped line
/// never produces a ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParseError {
    /// Nothing but white space.
    Empty,
    /// The line does not have the configured format's structure.
    BadFormat,
    /// The status field is not a number in 100..=599.
    BadStatus,
    /// The client (peer) address field is not an IP address.
    BadAddress,
    /// Not a JSON object (JSON sources).
    BadJson,
    /// A configured JSON field (client or status) is missing or has the wrong type.
    MissingField,
    /// The peer is a trusted proxy and its forwarded header holds something that is not an
    /// address.
    BadForwarded,
    /// The peer is a trusted proxy and named no client: counting it would ban the proxy.
    ProxyWithoutForwarded,
    /// A syslog datagram without the `<PRI>` framing.
    BadSyslog,
}

impl ParseError {
    pub const ALL: [ParseError; 9] = [
        Self::Empty,
        Self::BadFormat,
        Self::BadStatus,
        Self::BadAddress,
        Self::BadJson,
        Self::MissingField,
        Self::BadForwarded,
        Self::ProxyWithoutForwarded,
        Self::BadSyslog,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::BadFormat => "bad_format",
            Self::BadStatus => "bad_status",
            Self::BadAddress => "bad_address",
            Self::BadJson => "bad_json",
            Self::MissingField => "missing_field",
            Self::BadForwarded => "bad_forwarded",
            Self::ProxyWithoutForwarded => "proxy_without_forwarded",
            Self::BadSyslog => "bad_syslog",
        }
    }

    /// Position in `ALL`, for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The path of an HTTP request line (`GET /ws?x=1 HTTP/1.1` -> `/ws?x=1`), if it has the shape
/// of one. nginx logs junk requests (TLS bytes sent to a plain port, say) as escaped bytes.
pub fn request_path(request: &str) -> Option<&str> {
    let mut it = request.split(' ');
    let _method = it.next().filter(|m| !m.is_empty())?;
    let path = it.next().filter(|p| !p.is_empty())?;
    Some(path)
}
