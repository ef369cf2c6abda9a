//! Log detection (issue 7) in the daemon: log bursts become bans through the same rails as
//! kernel bursts, and the sources' counters feed `/metrics` and `status`.

use tracing::warn;

use super::shared::Agent;
use crate::{
    addr::Cidr,
    duration,
    logs::{LogEvent, LogsHandle, SourceSnapshot},
    model::BanSource,
    policy::{BanRequest, Ttl},
};

/// Log detection as `/metrics` and `status` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogsView {
    pub sources: Vec<SourceSnapshot>,
    /// Active bans with source `log`.
    pub bans: u64,
    /// Of those, the ones no packet has hit yet: the address may not be the packet source
    /// XDP sees (a client behind a load balancer), so enforcement there may not be possible.
    pub bans_unmatched: u64,
}

impl LogsView {
    /// The `logs` part of `status`.
    pub fn status_json(&self) -> crate::api::LogsStatusJson {
        crate::api::LogsStatusJson {
            sources: self
                .sources
                .iter()
                .map(|s| crate::api::LogSourceStatusJson {
                    name: s.source.clone(),
                    lines: s.lines_read,
                    matched: s.lines_matched,
                    parse_errors: s.parse_errors_total(),
                    bursts: s.bursts,
                    files: s
                        .files
                        .iter()
                        .map(|f| crate::api::LogFileStatusJson {
                            path: f.pattern.clone(),
                            following: f.following.clone(),
                            error: f.error.clone(),
                        })
                        .collect(),
                })
                .collect(),
            bans: self.bans,
            bans_unmatched: self.bans_unmatched,
        }
    }
}

impl Agent {
    /// A log source's event: a burst becomes a ban through the same rails as a kernel burst;
    /// an upstream-error burst is only reported (the metric counts it).
    pub fn on_log_event(&self, ev: LogEvent) {
        match ev {
            LogEvent::Burst(b) => self.auto_ban(BanRequest {
                cidr: Cidr::host(b.addr),
                source: BanSource::Log,
                reason: b.ban_reason(),
                ttl: Ttl::Default,
                observe: false,
                hard: false,
            }),
            LogEvent::UpstreamErrors(u) => warn!(
                log_source = %u.source,
                count = u.count,
                window = %duration::human(u.window),
                upstream = u.upstream.as_deref().unwrap_or("-"),
                "upstream errors (5xx) in the log: an outage or a deploy, not counted against clients"
            ),
        }
    }

    pub fn set_logs(&self, h: LogsHandle) {
        *self.logs.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Stop the log sources (they save their offsets).
    pub fn stop_logs(&self) {
        let h = self.logs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            h.stop();
        }
    }

    /// `None` without `[logs]`.
    pub fn logs_view(&self) -> Option<LogsView> {
        let sources = self
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()?
            .snapshot();
        let mut g = self.lock();
        let log_bans: Vec<Cidr> = g
            .policy
            .bans()
            .filter(|b| b.source == BanSource::Log)
            .map(|b| b.cidr)
            .collect();
        // Reading the drop counters walks the kernel map (cached for a second): only when
        // there is a log ban to look up.
        let unmatched = if log_bans.is_empty() {
            0
        } else {
            let drops = g.drops(std::time::Duration::from_secs(1));
            log_bans
                .iter()
                .filter(|c| drops.get(c).copied().unwrap_or(0) == 0)
                .count()
        };
        Some(LogsView {
            sources,
            bans: log_bans.len() as u64,
            bans_unmatched: unmatched as u64,
        })
    }
}
