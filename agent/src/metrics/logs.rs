//! The log detection families of `/metrics` (issue 7), per log source.

use std::fmt;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::{LogsProbe, family, single, value};
use crate::{daemon::LogsView, logs::SourceSnapshot};

pub(super) struct LogsCollector(pub(super) LogsProbe);

impl fmt::Debug for LogsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogsCollector")
    }
}

impl Collector for LogsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        match (self.0)() {
            Some(v) => encode_logs(&v, &mut enc),
            None => Ok(()),
        }
    }
}

type Field = fn(&SourceSnapshot) -> u64;

/// Counter families labelled by log source (the configured name). Named without `_total`:
/// the encoder appends it.
const COUNTERS: [(&str, &str, Field); 6] = [
    ("wsguard_log_lines", "Log lines read, by log source.", |s| {
        s.lines_read
    }),
    (
        "wsguard_log_lines_matched",
        "Log lines that matched a rule (counted against a client), by log source.",
        |s| s.lines_matched,
    ),
    (
        "wsguard_log_lines_truncated",
        "Over-long log lines cut at max_line_len, by log source.",
        |s| s.truncated_lines,
    ),
    (
        "wsguard_log_bursts",
        "Bursts found in the logs (each a ban request with source log), by log source.",
        |s| s.bursts,
    ),
    (
        "wsguard_log_upstream_errors",
        "Upstream-error (5xx) bursts: reported, never banned, by log source.",
        |s| s.upstream_bursts,
    ),
    (
        "wsguard_log_upstream_error_lines",
        "5xx lines, by log source.",
        |s| s.upstream_error_lines,
    ),
];

fn encode_logs(v: &LogsView, enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    for (name, help, f) in COUNTERS {
        let values: Vec<(&str, u64)> = v
            .sources
            .iter()
            .map(|s| (s.source.as_str(), f(s)))
            .collect();
        family(enc, name, help, MetricType::Counter, "source", &values)?;
    }
    let mut me = enc.encode_descriptor(
        "wsguard_log_parse_errors",
        "Malformed log lines, skipped, by log source and reason.",
        None,
        MetricType::Counter,
    )?;
    for s in &v.sources {
        for (reason, n) in &s.parse_errors {
            let labels: [(&str, &str); 2] = [("source", &s.source), ("reason", reason)];
            value(&labels, MetricType::Counter, *n, &mut me)?;
        }
    }
    let mut me = enc.encode_descriptor(
        "wsguard_log_file_missing",
        "1 while a configured log path or glob matches no readable file (retried), by log \
         source and path.",
        None,
        MetricType::Gauge,
    )?;
    for s in &v.sources {
        for f in &s.files {
            let labels: [(&str, &str); 2] = [("source", &s.source), ("path", &f.pattern)];
            value(
                &labels,
                MetricType::Gauge,
                u64::from(f.error.is_some()),
                &mut me,
            )?;
        }
    }
    single(
        enc,
        "wsguard_log_bans_active",
        "Active bans with source log.",
        MetricType::Gauge,
        v.bans,
    )?;
    single(
        enc,
        "wsguard_log_bans_unmatched",
        "Active log bans that no packet has hit: the logged address may not be the packet \
         source XDP sees (a client behind a load balancer).",
        MetricType::Gauge,
        v.bans_unmatched,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::logs::FileStatus;

    #[test]
    fn log_metrics_per_source() {
        let mut src = SourceSnapshot {
            source: "ingress".into(),
            lines_read: 9,
            lines_matched: 4,
            bursts: 1,
            upstream_bursts: 2,
            ..Default::default()
        };
        src.parse_errors.insert("bad_status", 3);
        src.files.push(FileStatus {
            pattern: "/var/log/a.log".into(),
            following: vec![],
            error: Some("no such file".into()),
        });
        let view = LogsView {
            sources: vec![src],
            bans: 2,
            bans_unmatched: 1,
        };
        let mut text = String::new();
        let mut reg = Registry::default();
        let probe: LogsProbe = Arc::new(move || Some(view.clone()));
        reg.register_collector(Box::new(LogsCollector(probe)));
        encode(&mut text, &reg).unwrap();
        for line in [
            "wsguard_log_lines_total{source=\"ingress\"} 9",
            "wsguard_log_lines_matched_total{source=\"ingress\"} 4",
            "wsguard_log_parse_errors_total{source=\"ingress\",reason=\"bad_status\"} 3",
            "wsguard_log_bursts_total{source=\"ingress\"} 1",
            "wsguard_log_upstream_errors_total{source=\"ingress\"} 2",
            "wsguard_log_file_missing{source=\"ingress\",path=\"/var/log/a.log\"} 1",
            "wsguard_log_bans_active 2",
            "wsguard_log_bans_unmatched 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Without [logs] the probe says so and no family appears.
        let mut text = String::new();
        let mut reg = Registry::default();
        reg.register_collector(Box::new(LogsCollector(Arc::new(|| None))));
        encode(&mut text, &reg).unwrap();
        assert!(!text.contains("wsguard_log_"), "{text}");
    }
}
