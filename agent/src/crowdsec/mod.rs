//! CrowdSec's Local API (issue 13): wsguard as a bouncer (LAPI's ban decisions become XDP
//! bans with source `crowdsec`) and as a machine (this node's own bans are published as
//! alerts, so every node and every other bouncer gets them).
//!
//! This tree holds the protocol and the bookkeeping, independent of the agent: the HTTP
//! client (`http`), LAPI's routes (`api`) and JSON (`model`), Go durations (`godur`), the
//! decision ledger (`ledger`) and the push queue (`outbox`). `daemon::lapi` applies it to the
//! policy and the kernel maps.
//!
//! Decisions where PRODUCT.md and the issue are silent (also in deploy/README.md):
//! - Scenarios published: `wsguard/bad-websocket-handshake` (kernel bursts), `wsguard/<rule>`
//!   (log rules), `wsguard/manual`, `wsguard/import`. Origin `wsguard`. Permanent bans are
//!   published for 87600h (LAPI has no permanent decision).
//! - A batch of more than one ban is one alert per 10000 decisions, source scope
//!   `wsguard/batch` and value the machine id, like `cscli decisions import` does.
//! - `wsguard_crowdsec_pushes_total` counts bans (decisions), not HTTP requests.

pub mod api;
pub mod config;
pub mod godur;
pub mod http;
pub mod ledger;
pub mod model;
pub mod outbox;

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

pub use config::{CrowdsecConfig, CrowdsecFile};
use model::{Alert, AlertDecision, Ignored, Meta, Source};
use outbox::PushBan;

use crate::model::BanSource;

pub const ORIGIN: &str = "wsguard";
pub const SCENARIO: &str = "wsguard/bad-websocket-handshake";
/// Decisions per published alert.
pub const ALERT_BATCH: usize = 10_000;
/// What a permanent ban is published as.
const PERMANENT: &str = "87600h";

/// The scenario a ban of this node is published under.
pub fn scenario_of(source: BanSource, reason: &str) -> String {
    match source {
        BanSource::Log => match log_rule(reason) {
            Some(rule) => format!("wsguard/{rule}"),
            None => "wsguard/log".into(),
        },
        BanSource::Manual => "wsguard/manual".into(),
        BanSource::Import => "wsguard/import".into(),
        BanSource::Kernel | BanSource::Crowdsec => SCENARIO.into(),
    }
}

/// The rule name in a log ban's reason (`… (12 lines in 10s, rule NAME, log SOURCE)`).
fn log_rule(reason: &str) -> Option<&str> {
    let after = &reason[reason.rfind(", rule ")? + ", rule ".len()..];
    let name = &after[..after.find(", log ")?];
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic())).then_some(name)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The alerts that publish `bans` (already cut to at most [`ALERT_BATCH`]) at `now`: one
/// alert for a single ban, one per simulated/enforced group otherwise. Bans whose TTL ran out
/// before they could be sent are left out.
pub fn build_alerts(bans: &[PushBan], machine: &str, now: OffsetDateTime) -> Vec<Alert> {
    // LAPI computes `until = stop_at + duration` from RFC 3339 seconds.
    let stop = now.replace_nanosecond(0).unwrap_or(now);
    let stop_ms = stop.unix_timestamp() * 1000;
    let decision = |b: &PushBan| -> Option<AlertDecision> {
        let duration = match b.expires {
            None => PERMANENT.to_owned(),
            Some(e) if e <= stop_ms + 1000 => return None,
            Some(e) => format!("{}s", (e - stop_ms + 999) / 1000),
        };
        let (scope, value) = model::scope_value(&b.cidr);
        Some(AlertDecision {
            origin: ORIGIN.into(),
            kind: "ban".into(),
            scope: scope.into(),
            value,
            duration,
            scenario: b.scenario.clone(),
        })
    };
    let mut out = Vec::new();
    for simulated in [false, true] {
        let group: Vec<(&PushBan, AlertDecision)> = bans
            .iter()
            .filter(|b| b.simulated == simulated)
            .filter_map(|b| decision(b).map(|d| (b, d)))
            .collect();
        let (source, scenario, message) = match group.as_slice() {
            [] => continue,
            [(b, d)] => (
                Source {
                    scope: d.scope.clone(),
                    value: d.value.clone(),
                    ip: b.cidr.is_host().then(|| d.value.clone()),
                    range: (!b.cidr.is_host()).then(|| d.value.clone()),
                },
                b.scenario.clone(),
                format!("{machine}: {} {}", d.value, b.reason),
            ),
            many => (
                Source {
                    scope: "wsguard/batch".into(),
                    value: machine.into(),
                    ip: None,
                    range: None,
                },
                format!("wsguard: {} bans from {machine}", many.len()),
                format!(
                    "{machine}: {} bans published at once (an import or a storm); first: {} {}",
                    many.len(),
                    many[0].1.value,
                    many[0].0.reason
                ),
            ),
        };
        let n = group.len();
        out.push(Alert {
            scenario,
            scenario_hash: String::new(),
            scenario_version: String::new(),
            message,
            events_count: i32::try_from(n).unwrap_or(i32::MAX),
            start_at: rfc3339(stop),
            stop_at: rfc3339(stop),
            capacity: 0,
            leakspeed: "0".into(),
            simulated,
            remediation: true,
            events: Vec::new(),
            source,
            decisions: group.into_iter().map(|(_, d)| d).collect(),
            meta: vec![Meta {
                key: "wsguard_machine".into(),
                value: machine.into(),
            }],
        });
    }
    out
}

/// Why a decision was refused on this node: the `reason` label of
/// `wsguard_crowdsec_decisions_refused_total`.
pub const REFUSED: [&str; 2] = ["allowlisted", "full"];

/// Counters and facts behind `status` and the metrics; updated as the tasks go.
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicBool,
    pub added: AtomicU64,
    pub deleted: AtomicU64,
    /// Indexed like [`REFUSED`].
    pub refused: [AtomicU64; 2],
    /// Indexed like [`Ignored::ALL`].
    pub ignored: [AtomicU64; 7],
    /// Indexed like [`PULL_RESULTS`].
    pub pulls: [AtomicU64; 7],
    pub pushes_ok: AtomicU64,
    pub pushes_failed: AtomicU64,
    pub pushes_dropped: AtomicU64,
    pub last_pull_ms: AtomicU64,
    pub facts: Mutex<Facts>,
}

/// The `result` label of `wsguard_crowdsec_pulls_total`.
pub const PULL_RESULTS: [&str; 7] = [
    "ok",
    "unreachable",
    "timeout",
    "http_error",
    "too_large",
    "bad_answer",
    "login",
];

#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub last_pull: Option<OffsetDateTime>,
    pub last_push: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub down_since: Option<OffsetDateTime>,
}

impl Counters {
    pub fn ignore(&self, why: Ignored) {
        self.ignored[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn pull_result(&self, label: &str) {
        let i = PULL_RESULTS.iter().position(|l| *l == label).unwrap_or(1);
        self.pulls[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn metrics(&self, queue: u64) -> CrowdsecMetrics {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CrowdsecMetrics {
            up: self.up.load(Ordering::Relaxed),
            decisions: vec![
                ("added".into(), n(&self.added)),
                ("deleted".into(), n(&self.deleted)),
                ("refused".into(), self.refused.iter().map(n).sum()),
                ("ignored".into(), self.ignored.iter().map(n).sum()),
            ],
            refused: REFUSED
                .iter()
                .zip(&self.refused)
                .map(|(r, a)| ((*r).to_owned(), n(a)))
                .collect(),
            ignored: Ignored::ALL
                .iter()
                .zip(&self.ignored)
                .map(|(r, a)| (r.as_str().to_owned(), n(a)))
                .collect(),
            pulls: PULL_RESULTS
                .iter()
                .zip(&self.pulls)
                .map(|(r, a)| ((*r).to_owned(), n(a)))
                .collect(),
            pushes: vec![
                ("ok".into(), n(&self.pushes_ok)),
                ("failed".into(), n(&self.pushes_failed)),
                ("dropped".into(), n(&self.pushes_dropped)),
            ],
            last_pull_ms: n(&self.last_pull_ms),
            push_queue: queue,
        }
    }
}

/// The metrics of `[crowdsec]` (see `metrics.rs` for the names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrowdsecMetrics {
    pub up: bool,
    /// `added|deleted|refused|ignored`.
    pub decisions: Vec<(String, u64)>,
    pub refused: Vec<(String, u64)>,
    pub ignored: Vec<(String, u64)>,
    pub pulls: Vec<(String, u64)>,
    /// `ok|failed|dropped`, in bans.
    pub pushes: Vec<(String, u64)>,
    /// How long the last pull took, in milliseconds.
    pub last_pull_ms: u64,
    pub push_queue: u64,
}

/// `status`'s `crowdsec` object (present only with `[crowdsec]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrowdsecStatusJson {
    pub url: String,
    /// The last pull succeeded.
    pub up: bool,
    /// RFC 3339 of the last successful pull / push, `null` if none yet.
    pub last_pull: Option<String>,
    pub last_push: Option<String>,
    /// Since when pulls fail (RFC 3339), `null` while up.
    pub down_since: Option<String>,
    /// Active bans with source `crowdsec`.
    pub decisions_enforced: u64,
    /// LAPI decisions this node tracks (several may hold one ban).
    pub decisions_tracked: u64,
    /// This node publishes its bans.
    pub push: bool,
    pub push_queue: u64,
    pub last_error: Option<String>,
}

impl Facts {
    pub fn status(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.last_pull.map(rfc3339),
            self.last_push.map(rfc3339),
            self.down_since.map(rfc3339),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn b(a: &str, expires: Option<i64>, simulated: bool) -> PushBan {
        PushBan {
            cidr: a.parse().unwrap(),
            scenario: SCENARIO.into(),
            reason: "25 bad handshakes in 10s on port 80 (no_upgrade=25)".into(),
            expires,
            simulated,
        }
    }

    #[test]
    fn one_ban_one_alert_many_bans_one_alert_per_mode() {
        let now = datetime!(2030-01-01 00:00:00.600 UTC);
        let t0 = now.replace_nanosecond(0).unwrap().unix_timestamp() * 1000;
        let one = build_alerts(&[b("198.18.0.9", Some(t0 + 600_000), false)], "n1", now);
        assert_eq!(one.len(), 1);
        let a = &one[0];
        assert_eq!(
            (a.source.scope.as_str(), a.source.value.as_str()),
            ("Ip", "198.18.0.9")
        );
        assert_eq!(a.decisions[0].duration, "600s");
        assert_eq!(a.decisions[0].origin, "wsguard");
        assert_eq!(a.stop_at, "2030-01-01T00:00:00Z");
        assert!(a.message.contains("no_upgrade=25"), "{}", a.message);
        let many = build_alerts(
            &[
                b("198.18.0.9", Some(t0 + 10_500), false),
                b("198.18.1.0/24", None, false),
                b("fd00::1", Some(t0 + 60_000), true),
                b("fd00::2", Some(t0 + 100), false),
            ],
            "n1",
            now,
        );
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].decisions.len(), 2, "expired one left out");
        assert_eq!(many[0].decisions[0].duration, "11s", "rounded up");
        assert_eq!(many[0].decisions[1].duration, "87600h");
        assert_eq!(many[0].decisions[1].scope, "Range");
        assert_eq!(many[0].source.scope, "wsguard/batch");
        assert!(many[1].simulated && many[1].decisions.len() == 1);
        assert_eq!(many[1].source.value, "fd00::1");
        let v = serde_json::to_value(&many[0]).unwrap();
        for k in [
            "scenario",
            "scenario_hash",
            "scenario_version",
            "message",
            "events_count",
            "start_at",
            "stop_at",
            "capacity",
            "leakspeed",
            "simulated",
            "events",
            "source",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
    }

    #[test]
    fn scenarios() {
        assert_eq!(scenario_of(BanSource::Kernel, "x"), SCENARIO);
        assert_eq!(
            scenario_of(
                BanSource::Log,
                "no_upgrade (12 lines in 10s, rule ws-bad, log ingress)"
            ),
            "wsguard/ws-bad"
        );
        assert_eq!(scenario_of(BanSource::Log, "odd"), "wsguard/log");
        assert_eq!(scenario_of(BanSource::Import, "x"), "wsguard/import");
    }
}
