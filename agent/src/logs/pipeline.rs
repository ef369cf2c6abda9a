//! One log source's processing: line -> classifier -> detector -> events, counting as it goes.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    config::{LogsConfig, RuleKind, SourceConfig},
    detect::{Detector, Hit},
    metrics::SourceMetrics,
    parse::{LineClassifier, Matcher, PatternMatch, syslog},
};
use crate::duration;

/// A burst of bad handshakes from one address, found in one log source by one rule: the
/// daemon turns it into a ban request with source `log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBurst {
    /// The log source's configured name.
    pub source: String,
    pub addr: IpAddr,
    pub rule: String,
    /// Matching lines in the window (the rule's threshold).
    pub count: u32,
    pub window: Duration,
    /// The rule's reason text.
    pub reason: String,
}

impl LogBurst {
    /// The text for the ban's `reason`.
    pub fn ban_reason(&self) -> String {
        format!(
            "{} ({} lines in {}, rule {}, log {})",
            self.reason,
            self.count,
            duration::human(self.window),
            self.rule,
            self.source
        )
    }
}

/// Many 5xx answers in one log source: an upstream outage, reported, never banned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamBurst {
    pub source: String,
    pub count: u32,
    pub window: Duration,
    /// The upstream of the last 5xx line, when the format logs it.
    pub upstream: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEvent {
    Burst(LogBurst),
    UpstreamErrors(UpstreamBurst),
}

struct RuleInfo {
    name: String,
    reason: String,
    window: Duration,
}

pub struct Pipeline {
    source: String,
    classifier: LineClassifier,
    rules: Vec<RuleInfo>,
    detector: Detector,
    upstream_window: Duration,
    metrics: Arc<SourceMetrics>,
    hits: Vec<(usize, IpAddr)>,
    last_upstream: Option<String>,
}

impl Pipeline {
    pub fn new(
        src: &SourceConfig,
        cfg: &LogsConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<Self, String> {
        let mut matchers = Vec::new();
        let mut rules = Vec::new();
        let mut thresholds = Vec::new();
        for &i in &src.rules {
            let r = &cfg.rules[i];
            matchers.push(match &r.kind {
                RuleKind::Status(s) => Matcher::Status(s.clone()),
                RuleKind::Pattern(p) => Matcher::Pattern(
                    PatternMatch::new(p).map_err(|e| format!("rule {}: {e}", r.name))?,
                ),
            });
            rules.push(RuleInfo {
                name: r.name.clone(),
                reason: r.reason.clone(),
                window: r.threshold.window,
            });
            thresholds.push(r.threshold);
        }
        Ok(Self {
            source: src.name.clone(),
            classifier: LineClassifier {
                format: src.format.clone(),
                matchers,
                trusted: cfg.trusted_proxies.iter().map(|c| c.net()).collect(),
            },
            rules,
            detector: Detector::new(thresholds, cfg.upstream, cfg.max_tracked_sources),
            upstream_window: cfg.upstream.window,
            metrics,
            hits: Vec::new(),
            last_upstream: None,
        })
    }

    /// One line (no newline), as read from a file or taken out of a syslog datagram.
    pub fn line(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<LogEvent>) {
        SourceMetrics::add(&self.metrics.lines_read, 1);
        let text = String::from_utf8_lossy(bytes);
        self.text(&text, now, out);
    }

    /// One syslog datagram: the framing is removed, the message is the line.
    pub fn datagram(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<LogEvent>) {
        SourceMetrics::add(&self.metrics.lines_read, 1);
        let text = String::from_utf8_lossy(bytes);
        match syslog::message(&text) {
            Ok(msg) => self.text(msg, now, out),
            Err(e) => self.metrics.parse_error(e),
        }
    }

    fn text(&mut self, text: &str, now: Instant, out: &mut Vec<LogEvent>) {
        let verdict = match self.classifier.classify(text, &mut self.hits) {
            Ok(v) => v,
            Err(e) => {
                self.metrics.parse_error(e);
                return;
            }
        };
        if !self.hits.is_empty() {
            SourceMetrics::add(&self.metrics.lines_matched, 1);
        }
        for &(rule, addr) in &self.hits {
            match self.detector.hit(rule, addr, now) {
                Hit::Counted => {}
                Hit::Burst(count) => {
                    SourceMetrics::add(&self.metrics.bursts, 1);
                    let r = &self.rules[rule];
                    out.push(LogEvent::Burst(LogBurst {
                        source: self.source.clone(),
                        addr,
                        rule: r.name.clone(),
                        count,
                        window: r.window,
                        reason: r.reason.clone(),
                    }));
                }
                Hit::TableFull => SourceMetrics::add(&self.metrics.table_full, 1),
            }
        }
        if verdict.is_server_error() {
            SourceMetrics::add(&self.metrics.upstream_error_lines, 1);
            if verdict.upstream.is_some() {
                self.last_upstream = verdict.upstream;
            }
            if let Some(count) = self.detector.server_error(now) {
                SourceMetrics::add(&self.metrics.upstream_bursts, 1);
                out.push(LogEvent::UpstreamErrors(UpstreamBurst {
                    source: self.source.clone(),
                    count,
                    window: self.upstream_window,
                    upstream: self.last_upstream.clone(),
                }));
            }
        }
        self.detector.maintain(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::config::{LogDefaults, LogsFile};

    fn config(toml_text: &str) -> LogsConfig {
        let f: LogsFile = toml::from_str(toml_text).unwrap();
        f.validate(&LogDefaults::default()).unwrap()
    }

    fn line(addr: &str, status: u16) -> String {
        format!(
            r#"{addr} - - [t] "GET /ws HTTP/1.1" {status} 0 "-" "ua" 1 0.1 [svc] [] 10.244.0.9:8080 0 0.1 {status} id"#
        )
    }

    #[test]
    fn bursts_upstream_errors_and_counters() {
        let cfg = config(
            r#"
            upstream_error_threshold = 3
            [[sources]]
            name = "ingress"
            paths = ["/x.log"]
            format = "ingress-nginx"
            [[rules]]
            name = "ws"
            statuses = [400]
            threshold = 3
            reason = "bad handshakes"
            "#,
        );
        let m = Arc::new(SourceMetrics::default());
        let mut p = Pipeline::new(&cfg.sources[0], &cfg, m.clone()).unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..3 {
            p.line(line("198.51.100.7", 400).as_bytes(), t, &mut out);
            p.line(line("198.51.100.8", 503).as_bytes(), t, &mut out);
        }
        p.line(b"garbage", t, &mut out);
        p.line(line("not-an-ip", 400).as_bytes(), t, &mut out);
        assert_eq!(
            out,
            vec![
                LogEvent::Burst(LogBurst {
                    source: "ingress".into(),
                    addr: "198.51.100.7".parse().unwrap(),
                    rule: "ws".into(),
                    count: 3,
                    window: Duration::from_secs(10),
                    reason: "bad handshakes".into(),
                }),
                LogEvent::UpstreamErrors(UpstreamBurst {
                    source: "ingress".into(),
                    count: 3,
                    window: Duration::from_secs(10),
                    upstream: Some("10.244.0.9:8080".into()),
                }),
            ]
        );
        let s = m.snapshot("ingress");
        assert_eq!(
            (s.lines_read, s.lines_matched, s.bursts, s.upstream_bursts),
            (8, 3, 1, 1)
        );
        assert_eq!(s.upstream_error_lines, 3);
        assert_eq!(s.parse_errors["bad_format"], 1);
        assert_eq!(s.parse_errors["bad_address"], 1);
        let LogEvent::Burst(b) = &out[0] else {
            panic!()
        };
        assert_eq!(
            b.ban_reason(),
            "bad handshakes (3 lines in 10s, rule ws, log ingress)"
        );
    }

    #[test]
    fn syslog_datagrams() {
        let cfg = config(
            r#"
            [[sources]]
            name = "app"
            syslog = "127.0.0.1:5140"
            format = "text"
            [[rules]]
            name = "spring"
            pattern = 'invalid Upgrade header: null.*client=(?P<client>\S+)'
            threshold = 2
            "#,
        );
        let m = Arc::new(SourceMetrics::default());
        let mut p = Pipeline::new(&cfg.sources[0], &cfg, m.clone()).unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        let d = b"<11>Oct 10 13:55:36 pod app: Handshake failed due to invalid Upgrade header: null client=[2001:db8::5]:3000";
        p.datagram(d, t, &mut out);
        p.datagram(b"no framing", t, &mut out);
        p.datagram(d, t, &mut out);
        assert_eq!(out.len(), 1);
        let LogEvent::Burst(b) = &out[0] else {
            panic!()
        };
        assert_eq!(b.addr, "2001:db8::5".parse::<IpAddr>().unwrap());
        let s = m.snapshot("app");
        assert_eq!(
            (s.lines_read, s.lines_matched, s.parse_errors["bad_syslog"]),
            (3, 2, 1)
        );
    }
}
