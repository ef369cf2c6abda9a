//! The JSON each `wsguard-lab-client` subcommand prints last: written by the client, read back
//! by the lab, so both sides share these types.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counts by HTTP status ("101", "400", "502", …) of the answers a client got.
pub type Statuses = BTreeMap<String, u64>;

/// Legitimate clients: long WebSockets exchanging a message every interval.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegitSummary {
    /// WebSockets established (initial ones and reconnects).
    pub connections: u64,
    pub messages_ok: u64,
    /// Messages not echoed intact within the timeout, or that could not be sent.
    pub failures: u64,
    /// Established WebSockets that ended before the client was done.
    pub disconnects: u64,
    /// Connection or handshake attempts that did not end in a WebSocket.
    pub connect_failures: u64,
    /// Statuses of refused handshakes.
    pub statuses: Statuses,
    pub elapsed_ms: u64,
    /// False for the progress lines printed with `--report-every`.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Attackers: raw handshakes of one kind at a rate.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttackSummary {
    pub reason: String,
    pub attempts: u64,
    /// TCP connects that succeeded.
    pub connected: u64,
    /// Connects refused, reset or unreachable.
    pub connect_failed: u64,
    /// Connects with no answer within the timeout (what a dropped SYN looks like).
    pub timed_out: u64,
    /// Connected, request sent, but no HTTP status came back in time.
    pub no_response: u64,
    /// Connected, request sent, then closed or reset by the other side with no status: what a
    /// flow cut by wsguard behind a load balancer looks like (it fails fast, it does not hang).
    #[serde(default)]
    pub closed: u64,
    pub statuses: Statuses,
    pub elapsed_ms: u64,
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Valid handshakes in every allowed spelling.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpellingsSummary {
    pub attempts: u64,
    /// Answered 101.
    pub ok: u64,
    pub failures: u64,
    pub statuses: Statuses,
    /// Per spelling: [ok, failed].
    pub by_spelling: BTreeMap<String, [u64; 2]>,
    pub elapsed_ms: u64,
}

/// SYNs sent by non-blocking connects that are abandoned after a short hold.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynfloodSummary {
    pub syns: u64,
    /// Connects that completed during the hold (the server answered).
    pub established: u64,
    pub elapsed_ms: u64,
}
