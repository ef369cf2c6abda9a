//! Cluster-wide bans through a real CrowdSec LAPI (Debian's crowdsec 1.4.6), issue 13: two
//! nodes, each with nginx, the backend and its own agent, sharing one LAPI. Decisions made
//! with `cscli` are dropped in XDP on both nodes and lifted on both; a burst found on one
//! node is published and dropped on the other without it ever seeing a bad handshake; an
//! outage of LAPI under attack unbans nothing, and the resync after it sweeps and adds.
//!
//! The agents poll every second (`update_frequency = "1s"`); waits below are generous bounds
//! (a slow machine only fails past them), never timing assertions.

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use std::{net::IpAddr, time::Duration};
use wsguard_tests::{
    crowdsec::{Lapi, cluster::Cluster, wait_until},
    lab::{expect::FINISH, summary::AttackSummary},
    lab_bins,
};

const WAIT: Duration = Duration::from_secs(20);

/// A cluster of `n` nodes whose agents pull every second and publish their bans.
fn cluster(n: usize, peers: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::start(lab_bins!(), n, peers)?;
    for i in 0..n {
        let key = c.lapi.add_bouncer(&format!("wsguard-node{i}"))?;
        let machine = format!("wsguard-node{i}");
        c.lapi.add_machine(&machine, "node-password-123")?;
        let cfg = Lapi::agent_config(
            &Cluster::lapi_url(),
            &key,
            &format!(
                "update_frequency = \"1s\"\ntimeout = \"2s\"\nmachine_id = \"{machine}\"\npassword = \"node-password-123\""
            ),
        );
        c.start_agent(i, &cfg, &["--threshold", "10"])?;
    }
    Ok(c)
}

fn ban_of(c: &Cluster, node: usize, addr: &str) -> Result<Option<Value>> {
    c.agent(node).ban_of(addr)
}

fn wait_banned(c: &Cluster, node: usize, addr: &str) -> Result<Value> {
    let mut found = None;
    wait_until(&format!("{addr} banned on node {node}"), WAIT, || {
        found = ban_of(c, node, addr)?;
        Ok(found.is_some())
    })?;
    Ok(found.expect("found"))
}

fn wait_lifted(c: &Cluster, node: usize, addr: &str) -> Result<()> {
    wait_until(&format!("{addr} lifted on node {node}"), WAIT, || {
        Ok(ban_of(c, node, addr)?.is_none())
    })
}

fn expires_in_s(ban: &Value) -> Result<f64> {
    let e = ban["expires_at"].as_str().context("no expiry")?;
    let t = wsguard_tests::lab::expect::rfc3339_secs(e)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    Ok(t - now)
}

#[test]
fn cscli_decisions_are_dropped_on_every_node_and_deletes_lift_them() -> Result<()> {
    let c = cluster(2, &["target", "ranger"])?;
    c.check(cscli_decisions(&c))
}

fn cscli_decisions(c: &Cluster) -> Result<()> {
    let target = c.peer("target");
    let ranger = c.peer("ranger");
    let (t4, r4, r6) = (
        IpAddr::V4(target.ip4),
        IpAddr::V4(ranger.ip4),
        IpAddr::V6(ranger.ip6),
    );
    for node in 0..2 {
        ensure!(
            c.ping("target", t4, node, 2)? == 2,
            "no ping before any ban"
        );
    }
    let t = target.ip4.to_string();
    c.lapi
        .cscli_ok(&["decisions", "add", "--ip", &t, "--duration", "1h"])?;
    // The same address again, v4-mapped and longer: one ban, the longest expiry wins.
    let mapped = format!("::ffff:{t}");
    c.lapi
        .cscli_ok(&["decisions", "add", "--ip", &mapped, "--duration", "3h"])?;
    let r_net = format!("{}/30", ranger.ip4);
    c.lapi
        .cscli_ok(&["decisions", "add", "--range", &r_net, "--duration", "2h"])?;
    let r_net6 = format!("{}/126", ranger.ip6);
    c.lapi
        .cscli_ok(&["decisions", "add", "--range", &r_net6, "--duration", "2h"])?;
    // Not enforceable: counted, nothing banned.
    c.lapi.cscli_ok(&[
        "decisions",
        "add",
        "--ip",
        "198.18.0.77",
        "--type",
        "captcha",
    ])?;
    for node in 0..2 {
        let b = wait_banned(c, node, &t)?;
        ensure!(b["source"] == "crowdsec", "source: {b}");
        ensure!(b["origin"] == "cscli", "origin: {b}");
        ensure!(
            b["scenario"].as_str().unwrap_or("").contains("manual"),
            "scenario: {b}"
        );
        // The two decisions may reach a node in two pulls: the 1h one alone bans it first.
        let mut left = expires_in_s(&b)?;
        let waited = wait_until(
            &format!("the 3h decision wins on node {node}"),
            WAIT,
            || {
                if let Some(b) = ban_of(c, node, &t)? {
                    left = expires_in_s(&b)?;
                }
                Ok(left > 2.5 * 3600.0)
            },
        );
        ensure!(waited.is_ok(), "the 3h decision did not win: {left}s left");
        wait_banned(c, node, &network4(&r_net))?;
        wait_banned(c, node, &network6(&r_net6))?;
        ensure!(
            ban_of(c, node, "198.18.0.77")?.is_none(),
            "a captcha decision was enforced"
        );
    }
    // A shorter decision never shortens the ban.
    c.lapi
        .cscli_ok(&["decisions", "add", "--ip", &t, "--duration", "10m"])?;
    std::thread::sleep(Duration::from_secs(3));
    for node in 0..2 {
        let b = ban_of(c, node, &t)?.context("ban gone")?;
        ensure!(
            expires_in_s(&b)? > 2.5 * 3600.0,
            "shortened by a 10m decision: {b}"
        );
        ensure!(
            c.ping("target", t4, node, 3)? == 0,
            "node {node} answers the banned target"
        );
        ensure!(
            c.ping("ranger", r4, node, 3)? == 0,
            "node {node} answers the banned range (v4)"
        );
        ensure!(
            c.ping("ranger", r6, node, 3)? == 0,
            "node {node} answers the banned range (v6)"
        );
        let m = metrics(c, node)?;
        ensure!(
            counter(&m["crowdsec"]["ignored"], "type")? >= 1,
            "captcha not counted: {m}"
        );
    }

    c.lapi.cscli_ok(&["decisions", "delete", "--ip", &t])?;
    c.lapi
        .cscli_ok(&["decisions", "delete", "--range", &r_net])?;
    for node in 0..2 {
        wait_lifted(c, node, &t)?;
        wait_lifted(c, node, &network4(&r_net))?;
        ensure!(
            c.ping("target", t4, node, 2)? == 2,
            "node {node} still drops the target"
        );
        ensure!(
            ban_of(c, node, &network6(&r_net6))?.is_some(),
            "the v6 range went with the others"
        );
        let m = metrics(c, node)?;
        ensure!(
            counter(&m["crowdsec"]["decisions"], "deleted")? >= 2,
            "deletions not counted: {m}"
        );
    }
    Ok(())
}

fn network4(cidr: &str) -> String {
    let n: std::net::Ipv4Addr = cidr
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or([0; 4].into());
    let p: u32 = cidr
        .split('/')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(32);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    std::net::Ipv4Addr::from(u32::from(n) & mask).to_string()
}

fn network6(cidr: &str) -> String {
    let n: std::net::Ipv6Addr = cidr
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED);
    let p: u32 = cidr
        .split('/')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(128);
    let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
    std::net::Ipv6Addr::from(u128::from(n) & mask).to_string()
}

/// The agent's metrics snapshot (`GET /v1/metrics` on its socket).
fn metrics(c: &Cluster, node: usize) -> Result<Value> {
    let r = wsguard_tests::agent::http::api(&c.agent(node).socket, "GET", "/v1/metrics", None)?;
    r.json()
}

/// A `(label, value)` pair list's value.
fn counter(pairs: &Value, label: &str) -> Result<u64> {
    pairs
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p[0].as_str() == Some(label))
                .and_then(|p| p[1].as_u64())
        })
        .with_context(|| format!("no {label} in {pairs}"))
}

#[test]
fn a_burst_found_on_one_node_is_dropped_on_the_other_and_ban_rm_lifts_it_everywhere() -> Result<()>
{
    let c = cluster(2, &["attacker"])?;
    c.check(burst_everywhere(&c))
}

fn burst_everywhere(c: &Cluster) -> Result<()> {
    let attacker = c.peer("attacker").ip4.to_string();
    let burst = c.attack("attacker", 0, 50, "2s")?;
    let a_ban = c.agent(0).wait_ban(&attacker, WAIT)?;
    ensure!(a_ban["source"] == "kernel", "node A: {a_ban}");
    burst.finish::<AttackSummary>(FINISH)?;

    let mut published = Vec::new();
    wait_until("the alert in LAPI", WAIT, || {
        published = c.lapi.decisions_of(&attacker)?;
        Ok(!published.is_empty())
    })?;
    let d = &published[0];
    ensure!(d["origin"] == "wsguard", "origin: {d}");
    ensure!(
        d["scenario"] == "wsguard/bad-websocket-handshake",
        "scenario: {d}"
    );
    ensure!(d["type"] == "ban", "type: {d}");
    ensure!(
        d["alert"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no_upgrade"),
        "the reason and counts are not in the alert: {d}"
    );

    let b_ban = wait_banned(c, 1, &attacker)?;
    ensure!(b_ban["source"] == "crowdsec", "node B: {b_ban}");
    ensure!(b_ban["origin"] == "wsguard", "node B origin: {b_ban}");
    // Node A keeps its own ban (its echo from LAPI does not take it over).
    std::thread::sleep(Duration::from_secs(2));
    let a_now = ban_of(c, 0, &attacker)?.context("A's ban went")?;
    ensure!(
        a_now["source"] == "kernel",
        "node A's ban replaced: {a_now}"
    );

    // Node B drops the attacker without ever judging one of its handshakes.
    let s: AttackSummary = c.attack("attacker", 1, 20, "2s")?.finish(FINISH)?;
    ensure!(
        s.attempts > 0 && s.timed_out == s.attempts,
        "node B answered the attacker: {s:?}"
    );
    let bad = c.agent(1).stat("handshakes", "bad")?;
    ensure!(bad == 0, "node B saw {bad} bad handshakes");
    ensure!(
        c.agent(1).stat("packets", "dropped")? > 0,
        "node B dropped nothing"
    );

    // `ban rm` on B deletes the decision in LAPI; A, whose ban it was, lifts it too.
    let out = c.agent(1).cli(&["ban", "rm", &attacker])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ban rm: {out:?}");
    ensure!(
        text.contains("deleted") && text.contains("LAPI"),
        "ban rm did not say it deleted in LAPI: {text}"
    );
    wait_lifted(c, 1, &attacker)?;
    wait_until("no decision left in LAPI", WAIT, || {
        Ok(c.lapi.decisions_of(&attacker)?.is_empty())
    })?;
    wait_lifted(c, 0, &attacker)?;
    let ok: AttackSummary = c
        .client(
            "attacker",
            "valid",
            &[
                "attack",
                "--target",
                &format!("{}:80", c.nodes[0].ip4),
                "--reason",
                "valid",
                "--rate",
                "5",
                "--duration",
                "1s",
                "--path",
                "/ws",
            ],
        )?
        .finish(FINISH)?;
    ensure!(
        ok.attempts > 0 && ok.statuses.get("101") == Some(&ok.attempts),
        "node A still blocks the attacker: {ok:?}"
    );
    // Nothing was pushed back by B (its ban was LAPI's), nothing was dropped.
    let m = metrics(c, 1)?;
    ensure!(
        counter(&m["crowdsec"]["pushes"], "ok")? == 0,
        "node B echoed a pulled ban: {m}"
    );
    let m = metrics(c, 0)?;
    ensure!(
        counter(&m["crowdsec"]["pushes"], "ok")? >= 1,
        "node A pushed nothing: {m}"
    );
    Ok(())
}

#[test]
fn lapi_outage_under_attack_unbans_nothing_and_the_resync_sweeps_and_adds() -> Result<()> {
    let mut c = cluster(2, &["attacker", "keep", "soft", "hard", "late"])?;
    let r = outage(&mut c);
    c.check(r)
}

fn outage(c: &mut Cluster) -> Result<()> {
    let ip = |n: &str| c.peer(n).ip4.to_string();
    let (attacker, keep, soft, hard, late) = (
        ip("attacker"),
        ip("keep"),
        ip("soft"),
        ip("hard"),
        ip("late"),
    );
    for a in [&keep, &soft, &hard] {
        c.lapi
            .cscli_ok(&["decisions", "add", "--ip", a, "--duration", "1h"])?;
    }
    for node in 0..2 {
        for a in [&keep, &soft, &hard] {
            wait_banned(c, node, a)?;
        }
    }
    // Under attack: the attacker bursts on A (banned there, published, dropped on B too)
    // and keeps going through the outage.
    let attack = c.attack("attacker", 0, 30, "100s")?;
    c.agent(0).wait_ban(&attacker, WAIT)?;
    wait_banned(c, 1, &attacker)?;

    c.lapi.kill();
    // A minute down, as the issue has it: some sixty update intervals, the backoff (1s
    // doubling, capped at 6s) at its cap most of the time; the pulls fail by refused
    // connections, then the resync must wait for LAPI to come back.
    std::thread::sleep(Duration::from_secs(60));
    for node in 0..2 {
        let st = c.agent(node).status()?;
        ensure!(
            st["crowdsec"]["up"] == false,
            "node {node} says LAPI is up: {st}"
        );
        ensure!(
            st["crowdsec"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("pull")),
            "no error shown: {st}"
        );
        for a in [&keep, &soft, &hard, &attacker] {
            ensure!(
                ban_of(c, node, a)?.is_some(),
                "node {node} unbanned {a} while LAPI was down"
            );
        }
        ensure!(
            c.ping("keep", c.peer("keep").ip4.into(), node, 2)? == 0,
            "node {node} stopped dropping"
        );
        let out = c.agent(node).cli(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("DOWN") && text.contains("stays enforced"),
            "`wsguard status` does not say LAPI is down:\n{text}"
        );
    }

    // LAPI comes back on its own side first (the nodes still cannot reach it), and the
    // world changes meanwhile: a soft delete, a hard delete (its alert), a new decision.
    c.lapi_ns.ip(&["link", "set", "eth0", "down"])?;
    c.lapi.restart(&c.lapi_ns)?;
    c.lapi.cscli_ok(&["decisions", "delete", "--ip", &soft])?;
    c.lapi.cscli_ok(&["alerts", "delete", "--ip", &hard])?;
    c.lapi
        .cscli_ok(&["decisions", "add", "--ip", &late, "--duration", "1h"])?;
    std::thread::sleep(Duration::from_secs(3));
    for node in 0..2 {
        ensure!(
            ban_of(c, node, &soft)?.is_some() && ban_of(c, node, &hard)?.is_some(),
            "node {node} changed bans while LAPI was unreachable"
        );
    }
    c.lapi_ns.ip(&["link", "set", "eth0", "up"])?;
    for node in 0..2 {
        wait_lifted(c, node, &soft)?;
        wait_lifted(c, node, &hard)?;
        wait_banned(c, node, &late)?;
        ensure!(ban_of(c, node, &keep)?.is_some(), "resync flushed {keep}");
        ensure!(
            ban_of(c, node, &attacker)?.is_some(),
            "resync flushed the attacker"
        );
        wait_until("status up again", WAIT, || {
            Ok(c.agent(node).status()?["crowdsec"]["up"] == true)
        })?;
    }
    let s: AttackSummary = attack.finish(Duration::from_secs(60))?;
    ensure!(s.timed_out > 0, "the attack was never dropped: {s:?}");
    Ok(())
}
