use std::{fs::OpenOptions, io::Write};

use super::*;

struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn follower(&self, pattern: &str, start: StartAt, max: usize) -> Follower {
        Follower::new(
            vec![self.path(pattern).display().to_string()],
            start,
            max,
            self.path("offsets_test.json"),
        )
        .unwrap()
    }

    /// An appending writer, as nginx opens its logs.
    fn writer(&self, name: &str) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap()
    }
}

fn lines(range: std::ops::Range<u32>) -> String {
    range.map(|i| format!("line {i:04}\n")).collect()
}

fn poll(f: &mut Follower, now: Instant) -> (Vec<String>, PollStats, Vec<FileStatus>) {
    let mut got = Vec::new();
    let (stats, st) = f.poll(now, &mut |l, _| {
        got.push(String::from_utf8_lossy(l).into_owned())
    });
    (got, stats, st)
}

fn want(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("line {i:04}")).collect()
}

#[test]
fn appends_and_partial_lines() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    w.write_all(b"one\ntw").unwrap();
    let mut f = lab.follower("a.log", StartAt::Beginning, 1024);
    let t = Instant::now();
    assert_eq!(poll(&mut f, t).0, vec!["one"]);
    w.write_all(b"o\r\nthree\n").unwrap();
    assert_eq!(poll(&mut f, t).0, vec!["two", "three"]);
    assert!(poll(&mut f, t).0.is_empty());
}

#[test]
fn starts_at_the_end_by_default() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    w.write_all(lines(0..5).as_bytes()).unwrap();
    w.write_all(b"half a li").unwrap();
    let mut f = lab.follower("a.log", StartAt::End, 1024);
    let t = Instant::now();
    assert!(poll(&mut f, t).0.is_empty());
    // The rest of the line that was being written when we started is not half a line.
    w.write_all(b"ne\n").unwrap();
    w.write_all(lines(5..7).as_bytes()).unwrap();
    assert_eq!(poll(&mut f, t).0, want(5..7));
}

#[test]
fn rotation_by_rename_mid_burst_loses_and_repeats_nothing() {
    let lab = Lab::new();
    let mut old = lab.writer("access.log");
    let mut f = lab.follower("access.log", StartAt::Beginning, 1024);
    let t = Instant::now();
    old.write_all(lines(0..10).as_bytes()).unwrap();
    let (mut got, _, _) = poll(&mut f, t);
    fs::rename(lab.path("access.log"), lab.path("access.log.1")).unwrap();
    // The writer has not reopened yet: these land in the renamed file...
    old.write_all(lines(10..15).as_bytes()).unwrap();
    // ...then it reopens and carries on in a new file.
    let mut new = lab.writer("access.log");
    new.write_all(lines(15..18).as_bytes()).unwrap();
    got.extend(poll(&mut f, t).0);
    // Late bytes in the old file within the grace period are still read.
    old.write_all(lines(18..19).as_bytes()).unwrap();
    new.write_all(lines(19..20).as_bytes()).unwrap();
    let (more, stats, st) = poll(&mut f, t + Duration::from_secs(1));
    got.extend(more);
    assert_eq!(stats.rotations, 0);
    assert_eq!(
        st[0].following,
        vec![lab.path("access.log").display().to_string()]
    );
    let (more, stats, _) = poll(&mut f, t + ROTATED_GRACE);
    got.extend(more);
    assert_eq!(stats.rotations, 1);
    got.sort();
    assert_eq!(got, want(0..20));
}

#[test]
fn rotation_by_truncation_mid_burst_loses_and_repeats_nothing() {
    let lab = Lab::new();
    let mut w = lab.writer("access.log");
    let mut f = lab.follower("access.log", StartAt::Beginning, 1024);
    let t = Instant::now();
    w.write_all(lines(0..10).as_bytes()).unwrap();
    let (mut got, _, _) = poll(&mut f, t);
    // copytruncate, then the writer (O_APPEND) carries on at the new end. The file is as
    // long as before by the next poll, so only the fingerprint can tell.
    w.set_len(0).unwrap();
    w.write_all(lines(10..20).as_bytes()).unwrap();
    let (more, stats, _) = poll(&mut f, t);
    got.extend(more);
    assert_eq!(stats.truncations, 1);
    // Truncated again, to something shorter than what was read.
    w.set_len(0).unwrap();
    w.write_all(lines(20..23).as_bytes()).unwrap();
    let (more, stats, _) = poll(&mut f, t);
    got.extend(more);
    assert_eq!(stats.truncations, 1);
    assert!(poll(&mut f, t).0.is_empty());
    assert_eq!(got, want(0..23));
}

#[test]
fn restart_resumes_where_it_stopped() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    w.write_all(lines(0..10).as_bytes()).unwrap();
    w.write_all(b"partial").unwrap();
    let t = Instant::now();
    {
        let mut f = lab.follower("a.log", StartAt::Beginning, 1024);
        assert_eq!(poll(&mut f, t).0, want(0..10));
        f.persist(t, true).unwrap();
    }
    w.write_all(b" line\n").unwrap();
    w.write_all(lines(10..12).as_bytes()).unwrap();
    // Even configured to start at the beginning, nothing already read comes back.
    let mut f = lab.follower("a.log", StartAt::Beginning, 1024);
    let (got, _, _) = poll(&mut f, t);
    let mut expect = vec!["partial line".to_string()];
    expect.extend(want(10..12));
    assert_eq!(got, expect);
}

#[test]
fn restart_after_rotation_while_down_reads_the_new_file() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    w.write_all(lines(0..10).as_bytes()).unwrap();
    let t = Instant::now();
    {
        let mut f = lab.follower("a.log", StartAt::End, 1024);
        assert!(poll(&mut f, t).0.is_empty());
        f.persist(t, true).unwrap();
    }
    fs::rename(lab.path("a.log"), lab.path("a.log.1")).unwrap();
    lab.writer("a.log")
        .write_all(lines(10..13).as_bytes())
        .unwrap();
    let mut f = lab.follower("a.log", StartAt::End, 1024);
    assert_eq!(poll(&mut f, t).0, want(10..13));
}

#[test]
fn renamed_file_still_matching_the_glob_is_not_read_twice() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    let mut f = lab.follower("a.log*", StartAt::Beginning, 1024);
    let t = Instant::now();
    w.write_all(lines(0..3).as_bytes()).unwrap();
    assert_eq!(poll(&mut f, t).0, want(0..3));
    fs::rename(lab.path("a.log"), lab.path("a.log.1")).unwrap();
    w.write_all(lines(3..4).as_bytes()).unwrap();
    lab.writer("a.log")
        .write_all(lines(4..5).as_bytes())
        .unwrap();
    let (got, _, st) = poll(&mut f, t + ROTATED_GRACE * 2);
    assert_eq!(got, vec!["line 0003", "line 0004"]);
    assert_eq!(st[0].following.len(), 2);
}

#[test]
fn over_long_lines_are_cut_and_the_rest_skipped() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    let mut f = lab.follower("a.log", StartAt::Beginning, 256);
    let t = Instant::now();
    w.write_all(&[b'x'; 1000]).unwrap();
    w.write_all(b"\nshort\n").unwrap();
    let mut got = Vec::new();
    let (stats, _) = f.poll(t, &mut |l, cut| got.push((l.len(), cut)));
    assert_eq!(got, vec![(256, true), (5, false)]);
    assert_eq!(stats.truncated_lines, 1);
    // Over-long without its newline yet: the head now, the rest skipped when it comes.
    w.write_all(&[b'y'; 300]).unwrap();
    got.clear();
    f.poll(t, &mut |l, cut| got.push((l.len(), cut)));
    assert_eq!(got, vec![(256, true)]);
    w.write_all(&[b'y'; 5000]).unwrap();
    w.write_all(b"\nnext\n").unwrap();
    got.clear();
    f.poll(t, &mut |l, cut| got.push((l.len(), cut)));
    assert_eq!(got, vec![(4, false)]);
    // A multi-byte char straddling the cut is not split.
    let mut long = vec![b'a'; 255];
    long.extend("é".as_bytes());
    long.extend([b'b'; 10]);
    long.push(b'\n');
    w.write_all(&long).unwrap();
    let mut lines = Vec::new();
    f.poll(t, &mut |l, _| lines.push(l.to_vec()));
    assert_eq!(lines, vec![vec![b'a'; 255]]);
}

#[test]
fn missing_files_are_reported_and_retried() {
    let lab = Lab::new();
    let mut f = lab.follower("later.log", StartAt::End, 1024);
    let t = Instant::now();
    let (got, _, st) = poll(&mut f, t);
    assert!(got.is_empty());
    assert_eq!(st[0].error.as_deref(), Some("no such file (retrying)"));
    // A file that appears after the start is new: read from its beginning.
    lab.writer("later.log")
        .write_all(lines(0..2).as_bytes())
        .unwrap();
    let (got, _, st) = poll(&mut f, t);
    assert_eq!(got, want(0..2));
    assert_eq!(st[0].error, None);
    let mut g = lab.follower("*.nomatch", StartAt::End, 1024);
    assert_eq!(
        poll(&mut g, t).2[0].error.as_deref(),
        Some("no file matches (retrying)")
    );
}

#[test]
fn deleted_file_is_drained_then_released() {
    let lab = Lab::new();
    let mut w = lab.writer("a.log");
    let mut f = lab.follower("a.log", StartAt::Beginning, 1024);
    let t = Instant::now();
    w.write_all(lines(0..1).as_bytes()).unwrap();
    assert_eq!(poll(&mut f, t).0, want(0..1));
    fs::remove_file(lab.path("a.log")).unwrap();
    w.write_all(b"no newline at the end").unwrap();
    assert!(poll(&mut f, t).0.is_empty());
    let (got, stats, st) = poll(&mut f, t + ROTATED_GRACE);
    assert_eq!(got, vec!["no newline at the end"]);
    assert_eq!(stats.rotations, 1);
    assert!(st[0].error.is_some());
}

#[test]
fn corrupt_state_is_an_error() {
    let lab = Lab::new();
    fs::write(lab.path("offsets_test.json"), "garbage").unwrap();
    let r = Follower::new(vec![], StartAt::End, 1024, lab.path("offsets_test.json"));
    assert!(r.is_err());
}

#[test]
fn restart_with_a_newly_configured_old_file_does_not_replay_it() {
    let lab = Lab::new();
    lab.writer("old.log")
        .write_all(lines(0..50).as_bytes())
        .unwrap();
    let t = Instant::now();
    {
        let mut f = lab.follower("a.log", StartAt::End, 1024);
        poll(&mut f, t);
        f.persist(t, true).unwrap();
    }
    // The operator widens the pattern to a file that has been there all along.
    let mut f = lab.follower("*.log", StartAt::End, 1024);
    assert!(poll(&mut f, t).0.is_empty());
    lab.writer("old.log")
        .write_all(lines(50..51).as_bytes())
        .unwrap();
    assert_eq!(poll(&mut f, t).0, want(50..51));
}
