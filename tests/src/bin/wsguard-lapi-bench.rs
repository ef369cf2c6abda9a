//! `cargo xtask bench`, CrowdSec part (issue 13): a real LAPI (crowdsec 1.4.6) in a lab
//! namespace and the release agent on a lab node. Prints, asserts nothing:
//! - 100k decisions at startup: how long until all are enforced, how long LAPI took to answer
//!   and the agent to apply, and how long `status` calls waited meanwhile (API stalls);
//! - a 100k `wsguard import` published to LAPI: how long until LAPI accepted every ban.
//!
//! Needs the release binaries next to it (xtask builds them first).

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use std::time::{Duration, Instant};
use wsguard_tests::{
    agent::http,
    crowdsec::{Lapi, cluster::Cluster, wait_until},
    lab::Bins,
};

fn main() -> Result<()> {
    let bins = Bins::siblings()?;
    startup_100k(bins.clone())?;
    push_100k(bins)
}

fn status(c: &Cluster) -> Result<Value> {
    http::api(&c.agent(0).socket, "GET", "/v1/status", None)?.json()
}

fn addrs(n: u32, base: [u8; 4]) -> Vec<String> {
    let b = u32::from(std::net::Ipv4Addr::from(base));
    (0..n)
        .map(|i| std::net::Ipv4Addr::from(b + i).to_string())
        .collect()
}

fn startup_100k(bins: Bins) -> Result<()> {
    let mut c = Cluster::start(bins, 1, &[])?;
    let key = c.lapi.add_bouncer("bench-node")?;
    let mut csv = String::from("duration,scope,value\n");
    for a in addrs(100_000, [198, 18, 64, 0]) {
        csv.push_str(&format!("4h,Ip,{a}\n"));
    }
    let f = c.lapi.dir().join("import.csv");
    std::fs::write(&f, csv)?;
    let t = Instant::now();
    c.lapi
        .cscli_ok(&["decisions", "import", "-i", &f.display().to_string()])?;
    println!(
        "crowdsec: cscli decisions import of 100000 decisions: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let cfg = Lapi::agent_config(&Cluster::lapi_url(), &key, "update_frequency = \"10s\"");
    let t = Instant::now();
    c.start_agent(0, &cfg, &[])?;
    let ready = t.elapsed();
    let mut waits = Vec::new();
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let q = Instant::now();
        let st = status(&c)?;
        waits.push(q.elapsed());
        if st["crowdsec"]["decisions_enforced"] == 100_000 {
            break;
        }
        if Instant::now() > end {
            bail!("100k not enforced within 300 s: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = t.elapsed();
    let log = c.agent(0).log_text();
    let applied_ms = log
        .lines()
        .find(|l| l.contains("LAPI full pull applied"))
        .map(plain)
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ms=").map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    let lapi = c.lapi.log();
    let answer = lapi
        .lines()
        .find(|l| l.contains("startup=true"))
        .and_then(|l| l.split(" 200 ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    waits.sort();
    let max = waits.last().copied().unwrap_or_default();
    let median = waits[waits.len() / 2];
    println!(
        "crowdsec: 100000 decisions at startup: all enforced {:.1} s after the agent started \
         (ready after {:.1} s; LAPI answered in {answer}; pull and apply {applied_ms} ms)",
        all.as_secs_f64(),
        ready.as_secs_f64()
    );
    println!(
        "crowdsec: API during the apply: {} status calls, median {:.1} ms, max {:.1} ms",
        waits.len(),
        median.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    Ok(())
}

/// A log line without the text format's colour escapes.
fn plain(l: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in l.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

fn push_100k(bins: Bins) -> Result<()> {
    let mut c = Cluster::start(bins, 1, &[])?;
    let key = c.lapi.add_bouncer("bench-node")?;
    c.lapi.add_machine("bench-node", "bench-password-123")?;
    let cfg = Lapi::agent_config(
        &Cluster::lapi_url(),
        &key,
        "machine_id = \"bench-node\"\npassword = \"bench-password-123\"\ntimeout = \"120s\"",
    );
    c.start_agent(0, &cfg, &[])?;
    let f = c.dir().join("bans.txt");
    std::fs::write(&f, addrs(100_000, [198, 18, 64, 0]).join("\n"))?;
    let t = Instant::now();
    let out = c.agent(0).cli(&[
        "import",
        &f.display().to_string(),
        "--ttl",
        "4h",
        "--reason",
        "bench",
    ])?;
    if !out.status.success() {
        bail!("import failed: {out:?}");
    }
    let imported = t.elapsed();
    let ok = |c: &Cluster| -> Result<u64> {
        let m = http::api(&c.agent(0).socket, "GET", "/v1/metrics", None)?.json()?;
        m["crowdsec"]["pushes"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p[0] == "ok"))
            .and_then(|p| p[1].as_u64())
            .context("no pushes ok")
    };
    wait_until("100k published", Duration::from_secs(600), || {
        Ok(ok(&c)? >= 100_000)
    })?;
    let lapi = c.lapi.log();
    let posts: Vec<&str> = lapi
        .lines()
        .filter(|l| l.contains("POST /v1/alerts"))
        .collect();
    println!(
        "crowdsec: wsguard import of 100000 bans: imported in {:.1} s, all accepted by LAPI {:.1} s \
         after the import started ({} POST /v1/alerts)",
        imported.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        posts.len()
    );
    Ok(())
}
