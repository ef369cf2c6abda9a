//! The log detector as the daemon runs it: real files in a temp dir, real threads, a real UDP
//! socket on loopback, events from the channel. Waits are bounded; nothing asserts on timing.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use wsguard::logs::{LogDefaults, LogEvent, LogsFile, LogsHandle, SourceSnapshot};

fn config(dir: &Path, body: &str) -> wsguard::logs::LogsConfig {
    let text = format!(
        "state_dir = {:?}\npoll_interval = \"20ms\"\n{body}",
        dir.join("state").display().to_string()
    );
    let f: LogsFile = toml::from_str(&text).unwrap();
    f.validate(&LogDefaults::default()).unwrap()
}

fn bad_line(i: u32) -> String {
    format!(
        "198.51.100.7 - - [10/Oct/2024:13:55:36 +0000] \"GET /ws/{i} HTTP/1.1\" 426 0 \"-\" \"ua\"\n"
    )
}

fn good_line(tag: &str) -> String {
    format!("203.0.113.1 - - [t] \"GET /{tag} HTTP/1.1\" 200 0 \"-\" \"ua\"\n")
}

fn appender(p: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap()
}

/// Wait (bounded) until `cond` holds for the single source's snapshot.
fn wait_for(h: &LogsHandle, what: &str, cond: impl Fn(&SourceSnapshot) -> bool) -> SourceSnapshot {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = h.snapshot().remove(0);
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn drain(rx: &mut mpsc::Receiver<LogEvent>) -> Vec<LogEvent> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push(e);
    }
    v
}

const FILE_SOURCE: &str = r#"
[[sources]]
name = "ingress"
paths = ["LOG"]
format = "combined"
[[rules]]
name = "ws"
statuses = [426]
paths = ["/ws"]
threshold = 20
window = "1h"
"#;

fn file_source(dir: &Path) -> wsguard::logs::LogsConfig {
    config(
        dir,
        &FILE_SOURCE.replace("LOG", &dir.join("access.log").display().to_string()),
    )
}

/// Exactly one burst of exactly 20, and every line counted once.
fn assert_one_burst(rx: &mut mpsc::Receiver<LogEvent>, s: &SourceSnapshot, total_lines: u64) {
    assert_eq!(s.lines_read, total_lines, "{s:?}");
    assert_eq!(s.lines_matched, 20, "{s:?}");
    assert_eq!(s.parse_errors_total(), 0, "{s:?}");
    let events = drain(rx);
    assert_eq!(events.len(), 1, "{events:?}");
    let LogEvent::Burst(b) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (b.addr.to_string().as_str(), b.count, b.rule.as_str()),
        ("198.51.100.7", 20, "ws")
    );
}

#[test]
fn rotation_by_rename_in_the_middle_of_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut w = appender(&log);
    let (tx, mut rx) = mpsc::channel(16);
    let h = LogsHandle::start(&file_source(dir.path()), tx).unwrap();
    wait_for(&h, "the file to be followed", |s| {
        s.files.first().is_some_and(|f| !f.following.is_empty())
    });
    for i in 0..10 {
        w.write_all(bad_line(i).as_bytes()).unwrap();
    }
    wait_for(&h, "the first half", |s| s.lines_read == 10);
    fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    for i in 10..15 {
        w.write_all(bad_line(i).as_bytes()).unwrap();
    }
    let mut w2 = appender(&log);
    for i in 15..20 {
        w2.write_all(bad_line(i).as_bytes()).unwrap();
    }
    w2.write_all(good_line("end").as_bytes()).unwrap();
    let s = wait_for(&h, "every line", |s| s.lines_read >= 21);
    assert_one_burst(&mut rx, &s, 21);
    h.stop();
}

#[test]
fn rotation_by_truncation_in_the_middle_of_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut w = appender(&log);
    let (tx, mut rx) = mpsc::channel(16);
    let h = LogsHandle::start(&file_source(dir.path()), tx).unwrap();
    wait_for(&h, "the file to be followed", |s| {
        s.files.first().is_some_and(|f| !f.following.is_empty())
    });
    for i in 0..10 {
        w.write_all(bad_line(i).as_bytes()).unwrap();
    }
    wait_for(&h, "the first half", |s| s.lines_read == 10);
    // copytruncate; the writer appends on at the new end.
    fs::copy(&log, dir.path().join("access.log.1")).unwrap();
    w.set_len(0).unwrap();
    for i in 10..20 {
        w.write_all(bad_line(i).as_bytes()).unwrap();
    }
    w.write_all(good_line("end").as_bytes()).unwrap();
    let s = wait_for(&h, "every line", |s| s.lines_read >= 21);
    assert_eq!(s.truncations, 1);
    assert_one_burst(&mut rx, &s, 21);
    h.stop();
}

#[test]
fn restart_never_rereads_and_missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let cfg = file_source(dir.path());
    {
        let (tx, _rx) = mpsc::channel(16);
        let h = LogsHandle::start(&cfg, tx).unwrap();
        let s = wait_for(&h, "the missing file to be reported", |s| {
            s.files.first().is_some_and(|f| f.error.is_some())
        });
        assert!(
            s.files[0]
                .error
                .as_deref()
                .unwrap()
                .contains("no such file"),
            "{s:?}"
        );
        let mut w = appender(&log);
        for i in 0..15 {
            w.write_all(bad_line(i).as_bytes()).unwrap();
        }
        wait_for(&h, "the first lines", |s| {
            s.lines_read == 15 && s.files[0].error.is_none()
        });
        h.stop();
    }
    let mut w = appender(&log);
    for i in 15..20 {
        w.write_all(bad_line(i).as_bytes()).unwrap();
    }
    w.write_all(good_line("end").as_bytes()).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let h = LogsHandle::start(&cfg, tx).unwrap();
    let s = wait_for(&h, "the new lines", |s| s.lines_read >= 6);
    // Only the 6 lines written while down; the 5 bad ones do not reach 20 on their own.
    assert_eq!((s.lines_read, s.lines_matched), (6, 5), "{s:?}");
    assert!(drain(&mut rx).is_empty());
    h.stop();
}

#[test]
fn syslog_listener_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        r#"
        [[sources]]
        name = "ingress-syslog"
        syslog = "127.0.0.1:0"
        format = "ingress-nginx"
        [[rules]]
        name = "ws"
        statuses = [400]
        threshold = 3
        window = "1h"
        "#,
    );
    let (tx, mut rx) = mpsc::channel(16);
    let h = LogsHandle::start(&cfg, tx).unwrap();
    let addr = h.syslog_addr("ingress-syslog").unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let line =
        r#"[2001:db8::7]:5555 - - [t] "GET /ws HTTP/1.1" 400 0 "-" "ua" 1 0.1 [] [] - - - - id"#;
    for _ in 0..3 {
        sock.send_to(
            format!("<190>Oct 10 13:55:36 node nginx: {line}").as_bytes(),
            addr,
        )
        .unwrap();
    }
    sock.send_to(b"not syslog at all", addr).unwrap();
    let s = wait_for(&h, "4 datagrams", |s| s.lines_read >= 4);
    assert_eq!(
        (s.lines_read, s.lines_matched, s.parse_errors["bad_syslog"]),
        (4, 3, 1)
    );
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1, "{events:?}");
    let LogEvent::Burst(b) = &events[0] else {
        panic!()
    };
    assert_eq!(b.addr.to_string(), "2001:db8::7");
    h.stop();
}

#[test]
fn a_taken_port_is_an_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[sources]]\nname = \"s\"\nsyslog = \"{}\"\nformat = \"combined\"\n",
            taken.local_addr().unwrap()
        ),
    );
    let (tx, _rx) = mpsc::channel(1);
    let e = LogsHandle::start(&cfg, tx)
        .err()
        .expect("the port is taken");
    assert!(
        e.to_string()
            .contains(&taken.local_addr().unwrap().to_string()),
        "{e}"
    );
}
