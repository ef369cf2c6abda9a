//! The audit log: one JSON line per successful mutation (who, what, why, TTL).

use std::{
    fs::{DirBuilder, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::PathBuf,
    sync::Mutex,
};

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::Peer;

#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub verb: &'a str,
    pub addrs: Vec<String>,
    pub reason: Option<&'a str>,
    /// `10m`, `permanent`, or `null` for the agent's default.
    pub ttl: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    uid: Option<u32>,
    pid: Option<i32>,
    #[serde(flatten)]
    record: &'a Record<'a>,
}

pub struct AuditLog {
    path: PathBuf,
    // Serialises appends so concurrent mutations never interleave within a line.
    lock: Mutex<()>,
}

impl AuditLog {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    /// The mutation already happened: a failed append is logged, never turned into an API
    /// error the caller would retry.
    pub fn append(&self, peer: &Peer, record: &Record<'_>) {
        if let Err(e) = self.try_append(peer, record) {
            tracing::error!(path = %self.path.display(), "cannot write the audit log: {e}");
        }
    }

    fn try_append(&self, peer: &Peer, record: &Record<'_>) -> std::io::Result<()> {
        let line = Line {
            time: OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_default(),
            uid: peer.uid,
            pid: peer.pid,
            record,
        };
        let mut buf = serde_json::to_vec(&line)?;
        buf.push(b'\n');
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let open = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
        };
        let mut f = match open() {
            // The first mutation can come before the state directory's first write.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = self.path.parent() {
                    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
                }
                open()?
            }
            r => r?,
        };
        f.write_all(&buf)
    }
}

pub fn ttl_of(ttl_s: Option<u64>, permanent: bool) -> Option<String> {
    if permanent {
        Some("permanent".into())
    } else {
        ttl_s.map(|s| crate::duration::human(std::time::Duration::from_secs(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_json_lines_0600() {
        let dir = tempfile::tempdir().unwrap();
        // The state directory may not exist yet at the first mutation.
        let path = dir.path().join("state/audit.log");
        let log = AuditLog::new(path.clone());
        let peer = Peer {
            uid: Some(0),
            gid: Some(0),
            pid: Some(42),
        };
        for verb in ["ban add", "ban rm"] {
            log.append(
                &peer,
                &Record {
                    verb,
                    addrs: vec!["198.51.100.7".into()],
                    reason: Some("flood"),
                    ttl: ttl_of(Some(600), false),
                },
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["verb"], "ban add");
        assert_eq!(lines[0]["uid"], 0);
        assert_eq!(lines[0]["pid"], 42);
        assert_eq!(lines[0]["ttl"], "10m");
        assert_eq!(lines[1]["addrs"][0], "198.51.100.7");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
