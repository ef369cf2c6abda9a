//! Every verb of the operator CLI end to end: the real `wsguard` binary against a real agent
//! in a lab namespace (pins on a private bpffs, state and socket in a tempdir), with the JSON
//! of PRODUCT.md checked field by field; and the kill switch with the agent dead.

use anyhow::{Context as _, Result, ensure};
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use wsguard_tests::agent::wsguard_bin;

mod cli_support;
use cli_support::*;

#[test]
fn every_verb_end_to_end_with_contract_json() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start("a", &["--max-bans", "5000"])?;

    // status
    let st = s.cli(&["status", "-o", "json"])?;
    ensure!(st.code == 0, "{st:?}");
    let st = st.json()?;
    ensure!(
        keys(&st)
            == set(&[
                "version",
                "mode",
                "uptime_s",
                "pinned",
                "interfaces",
                "ban_map",
                "proxy_protocol"
            ]),
        "{st}"
    );
    ensure!(
        keys(&st["proxy_protocol"]) == set(&["from", "untrusted_senders"])
            && st["proxy_protocol"]["from"] == serde_json::json!([])
            && st["proxy_protocol"]["untrusted_senders"] == serde_json::json!([]),
        "{st}"
    );
    ensure!(st["version"].is_string() && st["mode"] == "enforce" && st["uptime_s"].is_u64());
    ensure!(st["pinned"] == true, "{st}");
    let ifs = st["interfaces"].as_array().context("interfaces")?;
    ensure!(ifs.len() == 1, "{st}");
    ensure!(
        keys(&ifs[0]) == set(&["name", "xdp_mode", "xdp_prog_id", "tc_egress"]),
        "{st}"
    );
    ensure!(ifs[0]["name"] == s.lab.if_a.as_str() && ifs[0]["xdp_mode"] == "generic");
    ensure!(ifs[0]["xdp_prog_id"].as_u64().unwrap_or(0) > 0, "{st}");
    ensure!(
        keys(&st["ban_map"]) == set(&["entries", "capacity"]),
        "{st}"
    );
    ensure!(st["ban_map"]["capacity"] == 5000 && st["ban_map"]["entries"] == 0);
    let table = s.cli(&["status"])?;
    ensure!(table.code == 0, "{table:?}");
    for needle in ["INTERFACE", "wsg-a", "generic", "0 / 5,000 (0%)", "enforce"] {
        ensure!(table.stdout.contains(needle), "{needle}: {table:?}");
    }
    ensure!(!table.stdout.contains('\x1b'), "no colour into a pipe");

    // ban add (several at once, IPv4-mapped stored as IPv4), ban list in every output
    let r = s.cli(&[
        "ban",
        "add",
        "198.19.0.7",
        "198.19.1.0/24",
        "::ffff:198.19.2.9",
        "--ttl",
        "1h",
        "--reason",
        "flood",
    ])?;
    ensure!(r.code == 0, "{r:?}");
    ensure!(r.stdout.contains("banned 198.19.1.0/24 (1h left"), "{r:?}");
    let r = s.cli(&[
        "ban",
        "add",
        "fd00:77::5",
        "--permanent",
        "--hard",
        "--observe",
        "--reason",
        "x",
    ])?;
    ensure!(r.code == 0, "{r:?}");
    let bans = s.bans()?;
    ensure!(bans.len() == 4, "{bans:?}");
    for b in &bans {
        check_ban_json(b)?;
        ensure!(b["source"] == "manual" && b["offenses"] == 1, "{b}");
    }
    let net = find(&bans, "198.19.1.0")?;
    ensure!(net["prefix_len"] == 24 && net["reason"] == "flood" && net["mode"] == "enforce");
    let ttl = rfc3339(&net["expires_at"])? - rfc3339(&net["created_at"])?;
    ensure!((3599.0..=3601.0).contains(&ttl), "ttl {ttl}");
    ensure!(find(&bans, "198.19.2.9")?["prefix_len"] == 32);
    let v6 = find(&bans, "fd00:77::5")?;
    ensure!(
        v6["prefix_len"] == 128 && v6["expires_at"].is_null(),
        "{v6}"
    );
    ensure!(v6["hard"] == true && v6["mode"] == "observe", "{v6}");

    let t = s.cli(&["ban", "list"])?;
    ensure!(t.code == 0, "{t:?}");
    let lines: Vec<&str> = t.stdout.lines().collect();
    ensure!(lines.len() == 5, "{t:?}");
    ensure!(
        lines[0].starts_with("ADDR") && lines[0].contains("DROPPED"),
        "{t:?}"
    );
    let col = lines[0].find("SOURCE").context("SOURCE")?;
    ensure!(
        lines[1..].iter().all(|l| l[col..].starts_with("manual")),
        "aligned: {t:?}"
    );
    ensure!(
        t.stdout.contains("1h left") && t.stdout.contains("permanent"),
        "{t:?}"
    );
    let w = s.cli(&["ban", "list", "-o", "wide"])?;
    ensure!(
        w.code == 0 && w.stdout.contains("OFFENSES") && w.stdout.contains("HARD"),
        "{w:?}"
    );
    let k = s.cli(&["ban", "list", "--source", "kernel"])?;
    ensure!(k.code == 0 && k.stdout.contains("(no bans)"), "{k:?}");
    let k = s.cli(&["ban", "list", "--source", "manual", "-o", "json"])?;
    ensure!(k.json()?.as_array().map(Vec::len) == Some(4), "{k:?}");

    // allow add / list / rm
    let r = s.cli(&["allow", "add", "198.19.9.0/24", "--reason", "office"])?;
    ensure!(r.code == 0, "{r:?}");
    let al = s.cli(&["allow", "list", "-o", "json"])?;
    ensure!(al.code == 0, "{al:?}");
    let al = al.json()?;
    let al = al.as_array().context("array")?;
    for e in al {
        ensure!(
            keys(e) == set(&["addr", "prefix_len", "source", "reason"]),
            "{e}"
        );
        ensure!(["builtin", "config", "manual"].contains(&e["source"].as_str().unwrap_or("")));
    }
    ensure!(
        al.iter().any(|e| e["addr"] == "198.19.9.0"
            && e["prefix_len"] == 24
            && e["source"] == "manual"
            && e["reason"] == "office"),
        "{al:?}"
    );
    ensure!(
        al.iter()
            .any(|e| e["source"] == "builtin" && e["addr"] == "127.0.0.0"),
        "loopback built in: {al:?}"
    );
    let t = s.cli(&["allow", "list"])?;
    ensure!(
        t.code == 0 && t.stdout.starts_with("CIDR") && t.stdout.contains("office"),
        "{t:?}"
    );
    let r = s.cli(&["allow", "rm", "198.19.9.0/24"])?;
    ensure!(
        r.code == 0 && r.stdout.contains("removed 198.19.9.0/24"),
        "{r:?}"
    );

    // stats
    let st = s.cli(&["stats", "-o", "json"])?;
    ensure!(st.code == 0, "{st:?}");
    let st = st.json()?;
    ensure!(
        keys(&st)
            == set(&[
                "packets",
                "handshakes",
                "bad_reasons",
                "bans",
                "events_lost",
                "proxy_headers"
            ]),
        "{st}"
    );
    let groups: [(&str, &[&'static str]); 4] = [
        (
            "packets",
            &[
                "passed",
                "dropped",
                "would_drop",
                "allowlisted",
                "preserved",
                "unparsed",
                "reset",
            ],
        ),
        (
            "handshakes",
            &[
                "valid",
                "bad",
                "incomplete",
                "tls",
                "ignored",
                "upstream_errors",
            ],
        ),
        (
            "bad_reasons",
            &[
                "no_upgrade",
                "no_connection_upgrade",
                "no_key",
                "bad_version",
                "bad_method",
                "server_rejected",
            ],
        ),
        (
            "bans",
            &["active", "created", "expired", "refused", "capacity"],
        ),
    ];
    for (g, names) in groups {
        ensure!(keys(&st[g]) == set(names), "{g}: {st}");
        ensure!(names.iter().all(|n| st[g][n].is_u64()), "{g}: {st}");
    }
    ensure!(st["events_lost"].is_u64());
    for v in ["v1", "v2"] {
        let names = ["client", "local", "malformed", "missing", "untrusted"];
        let g = &st["proxy_headers"][v];
        ensure!(keys(g) == set(&names), "proxy_headers.{v}: {st}");
        ensure!(names.iter().all(|n| g[n] == 0), "no PROXY traffic: {st}");
    }
    ensure!(
        st["bans"]["active"] == 4 && st["bans"]["capacity"] == 5000,
        "{st}"
    );
    let t = s.cli(&["stats"])?;
    ensure!(
        t.code == 0 && t.stdout.contains("capacity") && t.stdout.contains("5,000"),
        "{t:?}"
    );

    // top, flows
    let top = s.cli(&["top", "-n", "5", "-o", "json"])?;
    ensure!(top.code == 0 && top.json()?.is_array(), "{top:?}");
    let top = s.cli(&["top"])?;
    ensure!(
        top.code == 0 && top.stdout.contains("BAD HANDSHAKES"),
        "{top:?}"
    );
    let fl = s.cli(&["flows", "--addr", "198.18.0.2", "-o", "json"])?;
    ensure!(fl.code == 0 && fl.json()?.is_array(), "{fl:?}");
    let fl = s.cli(&["flows"])?;
    ensure!(fl.code == 0 && fl.stdout.contains("CLIENT"), "{fl:?}");

    // watch: two frames, then Ctrl-C
    for verb in ["stats", "top"] {
        watch_two_frames(&s, verb)?;
    }

    // explain: the kernel's classifier, no agent involved
    let req = s.write(
        "req.txt",
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    let e = s.cli(&["explain", req.to_str().unwrap(), "-o", "json"])?;
    ensure!(e.code == 0, "{e:?}");
    let e = e.json()?;
    ensure!(
        e["verdict"] == "valid" && e["reason"].is_null() && e["path"] == "/ws",
        "{e}"
    );
    let bad = s.write(
        "bad.txt",
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n",
    )?;
    let e = s.cli_in(&["explain", "-"], Some(&bad))?;
    ensure!(
        e.code == 0 && e.stdout.contains("bad (no_upgrade)"),
        "{e:?}"
    );
    ensure!(e.stdout.contains("invalid Upgrade header: null"), "{e:?}");
    let e = s.cli(&[
        "explain",
        req.to_str().unwrap(),
        "--ws-path",
        "/other",
        "-o",
        "json",
    ])?;
    ensure!(e.json()?["verdict"] == "ignored", "{e:?}");

    // ban rm, then export/import in every format on a small list
    let r = s.cli(&["ban", "rm", "198.19.0.7", "198.19.2.9"])?;
    ensure!(
        r.code == 0 && r.stdout.contains("removed 198.19.0.7"),
        "{r:?}"
    );
    ensure!(s.bans()?.len() == 2);
    for fmt in ["lines", "csv", "json"] {
        let ex = s.cli(&["export", "--format", fmt])?;
        ensure!(ex.code == 0, "{ex:?}");
        ensure!(ex.stdout.contains("fd00:77::5"), "{fmt}: {ex:?}");
        let file = s.write(&format!("export.{fmt}"), &ex.stdout)?;
        let im = s.cli(&["import", file.to_str().unwrap(), "--format", fmt])?;
        ensure!(
            im.code == 0 && im.stdout.contains("imported 2 bans"),
            "{fmt}: {im:?}"
        );
    }
    let bans = s.bans()?;
    ensure!(bans.len() == 2, "{bans:?}");
    // Re-importing what is banned extends, never shortens: the permanent ban stays permanent
    // (the policy makes the API's source and reason the latest ones).
    let v6 = find(&bans, "fd00:77::5")?;
    ensure!(v6["expires_at"].is_null() && v6["hard"] == true, "{v6}");
    ensure!(v6["source"] == "import", "{v6}");

    // detach: the kill switch removes programs and pins, and the agent exits
    let d = s.cli(&["detach", "--yes"])?;
    ensure!(d.code == 0 && d.stdout.contains("detached"), "{d:?}");
    let st = agent.stop();
    ensure!(
        st.is_err() || st.as_ref().is_ok_and(|s| s.success()),
        "agent exit: {st:?}"
    );
    let left: Vec<_> = std::fs::read_dir(s.pin_dir("a"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "pins left after detach: {left:?}");
    let after = s.cli(&["status"])?;
    expect(
        &after,
        1,
        &["is the agent running? start it with `wsguard agent"],
    )?;
    Ok(())
}

fn watch_two_frames(s: &Setup, verb: &str) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(wsguard_bin()?);
    cmd.args([verb, "--watch"])
        .env("WSGUARD_SOCKET", s.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe signal(2) between fork and exec. A runner that started
    // the tests in the background (SIGINT ignored, inherited across exec) must not turn the
    // Ctrl-C below into nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        })
    };
    let mut child = cmd.spawn()?;
    let header = if verb == "stats" { "GROUP" } else { "ADDR" };
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(20);
    let mut frames = 0;
    while frames < 2 {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(header) => frames += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // SAFETY: plain kill(2) on our own child's pid: Ctrl-C.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            child.wait()?;
            anyhow::bail!("{verb} --watch did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(frames == 2, "{verb} --watch drew {frames} frames");
    ensure!(!st.success(), "--watch runs until interrupted: {st:?}");
    Ok(())
}

/// Fail-static keeps enforcing after the agent died; the kill switch still works then, through
/// the pins alone.
#[test]
fn detach_works_with_the_agent_dead() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start("a", &[])?;
    ensure!(s.cli(&["ban", "add", "198.19.0.1"])?.code == 0);
    agent.kill9()?;
    let link = s.lab.a.ip(&["link", "show", &s.lab.if_a])?;
    ensure!(link.contains("xdp"), "still attached after kill -9: {link}");
    let pin = s.pin_dir("a");
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", s.lab.a.name()))
        .arg(wsguard_bin()?)
        .args(["detach", "--yes", "--pin-dir", pin.to_str().unwrap()])
        .env("WSGUARD_SOCKET", s.socket())
        .stdin(Stdio::null());
    let r = run(&mut c, s.dir.path())?;
    ensure!(
        r.code == 0 && r.stdout.contains("the agent is not running"),
        "{r:?}"
    );
    let link = s.lab.a.ip(&["link", "show", &s.lab.if_a])?;
    ensure!(!link.contains("xdp"), "XDP detached: {link}");
    let left: Vec<_> = std::fs::read_dir(&pin)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "pins left: {left:?}");
    // Nothing left to detach: says so, names the directory.
    let r = s.cli(&["detach", "--yes", "--pin-dir", pin.to_str().unwrap()])?;
    expect(&r, 1, &["nothing to detach", pin.to_str().unwrap()])?;
    Ok(())
}
