//! Per-source counters: plain atomics written by the source's thread, read by anyone through
//! `snapshot()` (for `/metrics` and `status`).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use serde::Serialize;

use super::parse::ParseError;

/// Whether a followed file is being read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileStatus {
    /// The configured path or glob.
    pub pattern: String,
    /// Files it currently matches and that are being read.
    pub following: Vec<String>,
    /// Why nothing is read (missing file, no match, permission error), retried every poll.
    pub error: Option<String>,
}

#[derive(Default)]
pub struct SourceMetrics {
    pub lines_read: AtomicU64,
    pub lines_matched: AtomicU64,
    parse_errors: [AtomicU64; ParseError::ALL.len()],
    pub truncated_lines: AtomicU64,
    pub bursts: AtomicU64,
    pub upstream_error_lines: AtomicU64,
    pub upstream_bursts: AtomicU64,
    /// Hits dropped because the detector's table of sources was full.
    pub table_full: AtomicU64,
    pub rotations: AtomicU64,
    pub truncations: AtomicU64,
    pub files: Mutex<Vec<FileStatus>>,
}

/// A copy of one source's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceSnapshot {
    pub source: String,
    pub lines_read: u64,
    pub lines_matched: u64,
    /// Every reason in `ParseError::ALL`, zero or not, so a metric series never disappears.
    pub parse_errors: BTreeMap<&'static str, u64>,
    pub truncated_lines: u64,
    pub bursts: u64,
    pub upstream_error_lines: u64,
    pub upstream_bursts: u64,
    pub table_full: u64,
    pub rotations: u64,
    pub truncations: u64,
    pub files: Vec<FileStatus>,
}

impl SourceSnapshot {
    pub fn parse_errors_total(&self) -> u64 {
        self.parse_errors.values().sum()
    }
}

impl SourceMetrics {
    pub fn parse_error(&self, e: ParseError) {
        self.parse_errors[e.index()].fetch_add(1, Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn set_files(&self, files: Vec<FileStatus>) {
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = files;
    }

    pub fn snapshot(&self, source: &str) -> SourceSnapshot {
        SourceSnapshot {
            source: source.to_owned(),
            lines_read: self.lines_read.load(Relaxed),
            lines_matched: self.lines_matched.load(Relaxed),
            parse_errors: ParseError::ALL
                .iter()
                .map(|e| (e.as_str(), self.parse_errors[e.index()].load(Relaxed)))
                .collect(),
            truncated_lines: self.truncated_lines.load(Relaxed),
            bursts: self.bursts.load(Relaxed),
            upstream_error_lines: self.upstream_error_lines.load(Relaxed),
            upstream_bursts: self.upstream_bursts.load(Relaxed),
            table_full: self.table_full.load(Relaxed),
            rotations: self.rotations.load(Relaxed),
            truncations: self.truncations.load(Relaxed),
            files: self.files.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_every_reason() {
        let m = SourceMetrics::default();
        m.parse_error(ParseError::BadStatus);
        m.parse_error(ParseError::BadStatus);
        m.parse_error(ParseError::BadSyslog);
        SourceMetrics::add(&m.lines_read, 5);
        let s = m.snapshot("ingress");
        assert_eq!(s.parse_errors.len(), ParseError::ALL.len());
        assert_eq!(s.parse_errors["bad_status"], 2);
        assert_eq!(s.parse_errors["bad_syslog"], 1);
        assert_eq!(s.parse_errors["empty"], 0);
        assert_eq!(s.parse_errors_total(), 3);
        assert_eq!((s.source.as_str(), s.lines_read), ("ingress", 5));
    }
}
