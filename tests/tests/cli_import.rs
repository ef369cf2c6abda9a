//! `wsguard import` / `export` against a real agent: all-or-nothing validation with every bad
//! line numbered, nginx deny lines, capacity checked up front, progress on a terminal, and a
//! lossless round trip of 100k entries between two agents.

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use std::process::{Command, Stdio};
use wsguard_tests::agent::wsguard_bin;

mod cli_support;
use cli_support::*;

#[test]
fn import_with_one_bad_line_in_the_middle_applies_nothing() -> Result<()> {
    let s = Setup::new()?;
    let _agent = s.start("a", &["--max-bans", "500"])?;
    let mut text = String::from("# from the WAF\n");
    for i in 0..1000u32 {
        if i == 500 {
            text.push_str("198.19.400.1\n");
        } else {
            text.push_str(&format!("198.19.{}.{}\n", i / 250, i % 250 + 1));
        }
    }
    let f = s.write("waf.txt", &text)?;
    let r = s.cli(&["import", f.to_str().unwrap()])?;
    expect(&r, 2, &["line 502", "\"198.19.400.1\"", "nothing imported"])?;
    ensure!(
        r.stderr.matches("line ").count() == 1,
        "only the bad line: {r:?}"
    );
    ensure!(s.bans()?.is_empty(), "nothing applied");

    // nginx deny lines migrate in one command; other directives are skipped.
    let conf = "server {\n  location /ws {\n    allow 198.18.0.0/24;\n    deny 198.19.8.1;\n    deny fd00:77::/64;\n    deny all;\n  }\n}\n";
    let f = s.write("deny.conf", conf)?;
    let r = s.cli(&[
        "import",
        f.to_str().unwrap(),
        "--ttl",
        "2h",
        "--reason",
        "nginx",
    ])?;
    ensure!(r.code == 0 && r.stdout.contains("imported 2 bans"), "{r:?}");
    let bans = s.bans()?;
    ensure!(bans.len() == 2, "{bans:?}");
    for b in &bans {
        ensure!(b["source"] == "import" && b["reason"] == "nginx", "{b}");
    }
    ensure!(find(&bans, "fd00:77::")?["prefix_len"] == 64);

    // The ban map (500) has no room for 600 more: refused up front, nothing applied.
    let many: String = (0..600u32)
        .map(|i| format!("198.19.{}.{}\n", 10 + i / 200, i % 200 + 1))
        .collect();
    let f = s.write("many.txt", &many)?;
    let r = s.cli(&["import", f.to_str().unwrap()])?;
    expect(
        &r,
        3,
        &["600 new bans do not fit", "2 of 500", "nothing imported"],
    )?;
    ensure!(s.bans()?.len() == 2, "nothing applied");
    // Exactly full, then one more ban is refused with exit 3 and changes nothing.
    let fill: String = many.lines().take(498).map(|l| format!("{l}\n")).collect();
    let f = s.write("fill.txt", &fill)?;
    let r = s.cli(&["import", f.to_str().unwrap()])?;
    ensure!(
        r.code == 0 && r.stdout.contains("imported 498 bans"),
        "{r:?}"
    );
    let before = s.ban_set()?;
    let r = s.cli(&["ban", "add", "198.19.99.1"])?;
    expect(&r, 3, &["198.19.99.1", "full"])?;
    ensure!(s.ban_set()? == before, "a refused ban changes nothing");

    // A full map is a degraded state: `status` warns, in red on a terminal only.
    let st = s.cli(&["status"])?;
    ensure!(
        st.code == 0 && st.stdout.contains("warning: ban map 100% full"),
        "{st:?}"
    );
    ensure!(!st.stdout.contains('\x1b'), "no colour into a pipe: {st:?}");
    let cmd = format!("{} status", wsguard_bin()?.display());
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"])
        .env("WSGUARD_SOCKET", s.socket())
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    let tty = run(&mut c, s.dir.path())?;
    ensure!(
        tty.code == 0 && tty.stdout.contains("\x1b[31mwarning: ban map 100% full"),
        "red on a terminal: {tty:?}"
    );
    Ok(())
}

/// Parsed CSV export rows: addr → (ttl, reason).
fn csv_rows(text: &str) -> Result<std::collections::BTreeMap<String, (String, String)>> {
    let mut m = std::collections::BTreeMap::new();
    for l in text.lines().skip(1) {
        let (addr, rest) = l.split_once(',').with_context(|| format!("row {l:?}"))?;
        let (ttl, reason) = rest.split_once(',').with_context(|| format!("row {l:?}"))?;
        let reason = reason
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .map_or_else(|| reason.to_owned(), |r| r.replace("\"\"", "\""));
        m.insert(addr.to_owned(), (ttl.to_owned(), reason));
    }
    Ok(m)
}

#[test]
fn import_export_round_trip_of_100k_entries() -> Result<()> {
    const N: u32 = 100_000;
    let s = Setup::new()?;
    let mut agent = s.start("a", &[])?;
    let mut text = String::from("addr,ttl,reason\n");
    let mut want = std::collections::BTreeMap::new();
    for i in 0..N {
        let addr = if i < 60_000 {
            format!("198.19.{}.{}", i / 250, i % 250 + 1)
        } else {
            // Canonical text, as the agent prints it back.
            std::net::Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, (i >> 16) as u16, i as u16)
                .to_string()
        };
        let (ttl, reason) = match i % 3 {
            0 => ("permanent", format!("waf rule {}", i % 7)),
            1 => ("2h", "say \"hi\", then flood".to_owned()),
            _ => ("1d", String::new()),
        };
        let quoted = if reason.contains([',', '"']) {
            format!("\"{}\"", reason.replace('"', "\"\""))
        } else {
            reason.clone()
        };
        text.push_str(&format!("{addr},{ttl},{quoted}\n"));
        let reason = if reason.is_empty() {
            "import".to_owned()
        } else {
            reason
        };
        want.insert(addr, (ttl, reason));
    }
    let f = s.write("big.csv", &text)?;
    // On a terminal (`script` gives it one) a large import shows its progress.
    let cmd = format!("{} import {}", wsguard_bin()?.display(), f.display());
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"])
        .env("WSGUARD_SOCKET", s.socket())
        .stdin(Stdio::null());
    let r = run(&mut c, s.dir.path())?;
    ensure!(
        r.code == 0 && r.stdout.contains("imported 100,000 bans"),
        "{r:?}"
    );
    ensure!(
        r.stdout.contains("importing: 10,000 / 100,000")
            && r.stdout.contains("importing: 100,000 / 100,000"),
        "progress: {r:?}"
    );

    let ex = s.cli(&["export", "--format", "csv"])?;
    ensure!(
        ex.code == 0 && ex.stdout.starts_with("addr,ttl,reason\n"),
        "{:?}",
        ex.stderr
    );
    let got = csv_rows(&ex.stdout)?;
    ensure!(got.len() == N as usize, "{} rows exported", got.len());
    for (addr, (ttl, reason)) in &want {
        let (gttl, greason) = got
            .get(addr)
            .with_context(|| format!("{addr} not exported"))?;
        ensure!(
            greason == reason,
            "{addr}: reason {greason:?} != {reason:?}"
        );
        let ok = match *ttl {
            "permanent" => gttl == "permanent",
            t => {
                let full = wsguard::duration::parse(t)?.as_secs();
                let left: u64 = gttl.trim_end_matches('s').parse()?;
                // Minutes at most pass between import and export.
                left <= full && left + 600 > full
            }
        };
        ensure!(ok, "{addr}: ttl {gttl} for {ttl}");
    }

    // The table streams every row.
    let t = s.cli(&["ban", "list"])?;
    ensure!(
        t.code == 0 && t.stdout.lines().count() == N as usize + 1,
        "{}",
        t.stderr
    );

    // The default export (JSON) round trips into a fresh agent: everything but the source (now
    // `import`) and the creation time survives.
    let ex = s.cli(&["export"])?;
    ensure!(ex.code == 0, "{}", ex.stderr);
    let first: Vec<Value> = serde_json::from_str(&ex.stdout)?;
    ensure!(first.len() == N as usize);
    let file = s.write("big.json", &ex.stdout)?;
    ensure!(s.cli(&["detach", "--yes"])?.code == 0);
    let _ = agent.stop();
    let _agent2 = s.start("b", &[])?;
    ensure!(s.bans()?.is_empty(), "a fresh agent");
    let r = s.cli_in(&["import", "-", "--format", "json"], Some(&file))?;
    ensure!(
        r.code == 0 && r.stdout.contains("imported 100,000 bans"),
        "{r:?}"
    );
    let second: Vec<Value> = serde_json::from_str(&s.cli(&["export", "--format", "json"])?.stdout)?;
    ensure!(second.len() == first.len());
    let key = |b: &Value| format!("{}/{}", b["addr"], b["prefix_len"]);
    let index: std::collections::HashMap<String, &Value> =
        second.iter().map(|b| (key(b), b)).collect();
    for a in &first {
        let b = index
            .get(&key(a))
            .with_context(|| format!("{} lost", key(a)))?;
        for f in ["reason", "mode", "hard"] {
            ensure!(a[f] == b[f], "{}: {f} {} != {}", key(a), a[f], b[f]);
        }
        ensure!(b["source"] == "import", "{b}");
        match (a["expires_at"].is_null(), b["expires_at"].is_null()) {
            (true, true) => {}
            (false, false) => {
                let d = rfc3339(&b["expires_at"])? - rfc3339(&a["expires_at"])?;
                ensure!(d.abs() <= 5.0, "{}: expiry moved {d}s", key(a));
            }
            _ => bail!("{}: permanence changed: {a} {b}", key(a)),
        }
    }
    Ok(())
}
