//! Following log files: appends, rotation by rename (the old file is drained before it is let
//! go), rotation by truncation (`copytruncate`), files that appear later, and restarts (offsets
//! persisted per source; see `offsets`).
//!
//! Files are tracked by identity (device, inode), not by name, so a rotated file that still
//! matches a glob is not read twice, and a truncated-and-rewritten file is told apart from an
//! appended one by a fingerprint of its first bytes.
//!
//! `Follower::poll` is one synchronous step; the source thread calls it every poll interval.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use super::{
    config::StartAt,
    glob,
    metrics::FileStatus,
    offsets::{self, FINGERPRINT_LEN, FileOffset, Fingerprint, Offsets},
};

/// How long a file that was renamed away or deleted is still drained: a writer may append to
/// it until it reopens its log (nginx does on USR1).
pub const ROTATED_GRACE: Duration = Duration::from_secs(5);

/// Read at most this much from one file in one poll, so one busy file cannot starve others.
const MAX_READ_PER_POLL: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Files that were renamed away or deleted and have been let go.
    pub rotations: u64,
    pub truncations: u64,
    pub truncated_lines: u64,
}

struct Tail {
    dev: u64,
    ino: u64,
    path: PathBuf,
    file: File,
    /// Bytes read from the file.
    offset: u64,
    /// Bytes after the last newline, not yet a line.
    partial: Vec<u8>,
    /// Inside an over-long line whose head has been handed on: drop bytes up to its newline.
    skipping: bool,
    fingerprint: Fingerprint,
    gone_since: Option<Instant>,
}

impl Tail {
    /// End of the last complete line handed on: where a restart resumes.
    fn consumed(&self) -> u64 {
        self.offset - self.partial.len() as u64
    }
}

pub struct Follower {
    patterns: Vec<String>,
    start_at: StartAt,
    max_line_len: usize,
    state_path: PathBuf,
    tails: Vec<Tail>,
    /// Offsets from the last run, used once, at the first scan, and when they were saved.
    saved: Option<Offsets>,
    saved_at: Option<SystemTime>,
    first_scan: bool,
    /// Whether the persisted offsets are behind.
    dirty: bool,
    last_save: Option<Instant>,
    buf: Vec<u8>,
}

impl Follower {
    /// A corrupt state file is an error: the caller reports it (starting over could re-read
    /// or skip lines, so it should be seen).
    pub fn new(
        patterns: Vec<String>,
        start_at: StartAt,
        max_line_len: usize,
        state_path: PathBuf,
    ) -> io::Result<Self> {
        let saved = offsets::load(&state_path)?;
        let saved_at = fs::metadata(&state_path).and_then(|m| m.modified()).ok();
        Ok(Self {
            patterns,
            start_at,
            max_line_len,
            state_path,
            tails: Vec::new(),
            saved,
            saved_at,
            first_scan: true,
            dirty: false,
            last_save: None,
            buf: vec![0; 256 << 10],
        })
    }

    /// Find files, read what was appended, hand each complete line to `emit(line, truncated)`
    /// (without its newline). Returns what happened and the status of each pattern.
    pub fn poll(
        &mut self,
        now: Instant,
        emit: &mut dyn FnMut(&[u8], bool),
    ) -> (PollStats, Vec<FileStatus>) {
        let mut stats = PollStats::default();
        let mut statuses = Vec::new();
        let mut seen: Vec<(u64, u64)> = Vec::new();
        let patterns = self.patterns.clone();
        for pattern in &patterns {
            let mut st = FileStatus {
                pattern: pattern.clone(),
                following: Vec::new(),
                error: None,
            };
            match glob::expand(pattern) {
                Ok(paths) if paths.is_empty() => {
                    st.error = Some(if glob::has_magic(pattern) {
                        "no file matches (retrying)".into()
                    } else {
                        "no such file (retrying)".into()
                    });
                }
                Ok(paths) => {
                    for path in paths {
                        match self.track(&path) {
                            Ok(Some(id)) => {
                                seen.push(id);
                                st.following.push(path.display().to_string());
                            }
                            Ok(None) => {}
                            Err(e) => {
                                st.error = Some(format!("{}: {e} (retrying)", path.display()))
                            }
                        }
                    }
                }
                Err(e) => st.error = Some(format!("{e} (retrying)")),
            }
            statuses.push(st);
        }
        self.first_scan = false;
        self.saved = None;

        let max = self.max_line_len;
        let buf = &mut self.buf;
        for t in &mut self.tails {
            if !seen.contains(&(t.dev, t.ino)) {
                t.gone_since.get_or_insert(now);
            }
            match read_tail(t, buf, max, emit, &mut stats) {
                Ok(true) => self.dirty = true,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("log file {}: read failed: {e}", t.path.display());
                }
            }
        }
        // Let go of rotated files after the grace period, handing on a last line that never
        // got its newline.
        let mut kept = Vec::with_capacity(self.tails.len());
        for mut t in self.tails.drain(..) {
            match t.gone_since {
                Some(g) if now.saturating_duration_since(g) >= ROTATED_GRACE => {
                    if !t.partial.is_empty() {
                        let (line, cut) = clip(&t.partial, max);
                        stats.truncated_lines += u64::from(cut);
                        emit(line, cut);
                        t.partial.clear();
                    }
                    stats.rotations += 1;
                    self.dirty = true;
                }
                _ => kept.push(t),
            }
        }
        self.tails = kept;
        (stats, statuses)
    }

    /// Start tracking `path` if its file is new. `None`: not a regular file.
    fn track(&mut self, path: &Path) -> io::Result<Option<(u64, u64)>> {
        let meta = fs::metadata(path)?;
        if !meta.is_file() {
            return Ok(None);
        }
        let id = (meta.dev(), meta.ino());
        if let Some(t) = self.tails.iter_mut().find(|t| (t.dev, t.ino) == id) {
            t.path = path.to_owned();
            t.gone_since = None;
            return Ok(Some(id));
        }
        let file = File::open(path)?;
        let head = read_head(&file)?;
        let fingerprint = Fingerprint::of(&head);
        let start = match self.start_at {
            StartAt::Beginning => 0,
            StartAt::End => meta.len(),
        };
        let offset = match (&self.saved, self.first_scan) {
            // A file that appeared while we run is new: all of it.
            (_, false) => 0,
            (Some(saved), true) => {
                let resumed = saved.files.iter().find(|f| {
                    (f.dev, f.ino) == id
                        && f.offset <= meta.len()
                        && f.fingerprint.len as usize <= head.len()
                        && Fingerprint::of(&head[..f.fingerprint.len as usize]) == f.fingerprint
                });
                // Created after we stopped (where the file system tells).
                let born_since = meta
                    .created()
                    .ok()
                    .zip(self.saved_at)
                    .is_some_and(|(c, s)| c > s);
                match resumed {
                    Some(f) => f.offset,
                    // Our file's name, another file: rotated while we were down, all unread.
                    None if saved.files.iter().any(|f| f.path == path) || born_since => 0,
                    // A file we never followed (the config changed): like a first start, so
                    // old history is not replayed as a burst.
                    None => start,
                }
            }
            (None, true) => start,
        };
        // Starting at the end of a file mid-line would hand on half a line.
        let skipping = offset > 0 && {
            let mut b = [0u8; 1];
            file.read_at(&mut b, offset - 1)? == 1 && b[0] != b'\n'
        };
        self.tails.push(Tail {
            dev: id.0,
            ino: id.1,
            path: path.to_owned(),
            file,
            offset,
            partial: Vec::new(),
            skipping,
            fingerprint,
            gone_since: None,
        });
        self.dirty = true;
        Ok(Some(id))
    }

    /// Write the offsets if they moved, at most once a second unless `force`.
    pub fn persist(&mut self, now: Instant, force: bool) -> io::Result<()> {
        if !self.dirty
            || (!force
                && self
                    .last_save
                    .is_some_and(|s| now.saturating_duration_since(s) < Duration::from_secs(1)))
        {
            return Ok(());
        }
        let state = Offsets {
            files: self
                .tails
                .iter()
                .map(|t| FileOffset {
                    path: t.path.clone(),
                    dev: t.dev,
                    ino: t.ino,
                    offset: t.consumed(),
                    fingerprint: t.fingerprint,
                })
                .collect(),
        };
        offsets::save(&self.state_path, &state)?;
        self.dirty = false;
        self.last_save = Some(now);
        Ok(())
    }
}

fn read_head(f: &File) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; FINGERPRINT_LEN];
    let mut n = 0;
    while n < head.len() {
        let r = f.read_at(&mut head[n..], n as u64)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    head.truncate(n);
    Ok(head)
}

/// Cut an over-long line at `max` bytes (on a char boundary if one is near, so the cut line
/// stays readable; parsers cope with either).
fn clip(line: &[u8], max: usize) -> (&[u8], bool) {
    if line.len() <= max {
        return (line, false);
    }
    let mut end = max;
    while end > max.saturating_sub(3) && end > 0 && (line[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    (&line[..end], true)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Notice truncation or rewrite, then read what was appended. `Ok(true)` if the offset moved.
fn read_tail(
    t: &mut Tail,
    buf: &mut [u8],
    max: usize,
    emit: &mut dyn FnMut(&[u8], bool),
    stats: &mut PollStats,
) -> io::Result<bool> {
    let len = t.file.metadata()?.len();
    let rewritten = len < t.offset || {
        let head = read_head(&t.file)?;
        let n = t.fingerprint.len as usize;
        head.len() < n || Fingerprint::of(&head[..n]) != t.fingerprint
    };
    let mut moved = false;
    if rewritten {
        stats.truncations += 1;
        t.offset = 0;
        t.partial.clear();
        t.skipping = false;
        t.fingerprint = Fingerprint::default();
        moved = true;
    }
    let mut read_now = 0u64;
    while read_now < MAX_READ_PER_POLL {
        let n = t.file.read_at(buf, t.offset)?;
        if n == 0 {
            break;
        }
        t.offset += n as u64;
        read_now += n as u64;
        moved = true;
        split_lines(t, &buf[..n], max, emit, stats);
    }
    if (t.fingerprint.len as usize) < FINGERPRINT_LEN && t.offset > u64::from(t.fingerprint.len) {
        t.fingerprint = Fingerprint::of(&read_head(&t.file)?);
    }
    Ok(moved)
}

fn split_lines(
    t: &mut Tail,
    mut chunk: &[u8],
    max: usize,
    emit: &mut dyn FnMut(&[u8], bool),
    stats: &mut PollStats,
) {
    while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
        let seg = &chunk[..i];
        chunk = &chunk[i + 1..];
        if t.skipping {
            t.skipping = false;
            continue;
        }
        let (line, cut) = if t.partial.is_empty() {
            clip(strip_cr(seg), max)
        } else {
            t.partial.extend_from_slice(seg);
            let (l, c) = clip(strip_cr(&t.partial), max);
            stats.truncated_lines += u64::from(c);
            emit(l, c);
            t.partial.clear();
            continue;
        };
        stats.truncated_lines += u64::from(cut);
        emit(line, cut);
    }
    if t.skipping || chunk.is_empty() {
        return;
    }
    t.partial.extend_from_slice(chunk);
    if t.partial.len() > max {
        let (l, _) = clip(&t.partial, max);
        stats.truncated_lines += 1;
        emit(l, true);
        t.partial.clear();
        t.skipping = true;
    }
}

#[cfg(test)]
#[path = "follow_tests.rs"]
mod tests;
