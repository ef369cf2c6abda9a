//! The policy engine's rails on a real agent: allowlist (built-in, config, API) and `/0`
//! refusals, the `--max-bans` cap, the circuit breaker, TTL escalation across restarts,
//! re-bans that only extend, expiry, and observe mode. Each refusal is counted in the stats
//! and the metrics.

use anyhow::{Result, ensure};
use serde_json::json;
use std::net::Ipv4Addr;
use wsguard_tests::agent::{
    AgentLab,
    lab::{bans_of, sample, ttl_secs, unix_secs, wait_until},
};

const METRICS: &str = "127.0.0.1:9477";

fn refused(s: &AgentLab) -> Result<u64> {
    Ok(s.get("/v1/stats")?["bans"]["refused"].as_u64().unwrap_or(0))
}

#[test]
fn allowlisted_and_everything_bans_are_refused_and_counted() -> Result<()> {
    let s = AgentLab::new()?;
    let b2 = s.lab.ip_b2.to_string();
    let _agent = s.start(&["--allow", &format!("{b2}/32"), "--metrics-addr", METRICS])?;
    // A burst from a config-allowlisted source is refused; the next source's burst is a ban,
    // and events are handled in order, so once it shows the first one was decided.
    s.burst(s.lab.ip_b2, 10)?;
    let other = Ipv4Addr::new(198, 18, 1, 9);
    s.burst(other, 10)?;
    s.wait_ban(other)?;
    ensure!(s.ban(&b2)?.is_none(), "allowlisted source banned");
    ensure!(s.pings(s.lab.ip_b2)? == 3, "allowlisted source dropped");
    let after_burst = refused(&s)?;
    ensure!(after_burst >= 1, "the burst's refusal counted");

    let allow = s.api(
        "POST",
        "/v1/allow",
        Some(json!({"addr": "198.18.7.0/24", "reason": "office"})),
    )?;
    ensure!(allow.status == 200, "{}", allow.text());
    let node = s.lab.ip_a.to_string();
    let cases = [
        ("0.0.0.0/0", "/0 ban would ban everything"),
        ("::/0", "/0 ban would ban everything"),
        ("127.0.0.1", "127.0.0.0/8 (builtin: loopback)"),
        ("169.254.10.1", "169.254.0.0/16 (builtin: link-local)"),
        ("fe80::1", "fe80::/10 (builtin: link-local)"),
        (node.as_str(), "(builtin: node address)"),
        ("198.18.0.0/24", "overlaps the allowlist entry"),
        (b2.as_str(), "(config: agent config)"),
        ("198.18.7.7", "198.18.7.0/24 (manual: office)"),
        ("198.18.0.0/15", "overlaps the allowlist entry"),
    ];
    for (addr, why) in cases {
        let r = s.ban_add(addr, None, false)?;
        ensure!(r.status == 409, "{addr}: {} {}", r.status, r.text());
        let e = r.json()?;
        ensure!(e["kind"] == "refused", "{addr}: {e}");
        let msg = e["message"].as_str().unwrap_or_default();
        ensure!(
            msg.contains(addr.trim_end_matches("/0")) && msg.contains(why),
            "{addr}: {msg}"
        );
    }
    let n = cases.len() as u64;
    ensure!(refused(&s)? == after_burst + n, "every refusal counted");
    let m = s.metrics(METRICS)?;
    ensure!(
        sample(&m, r#"wsguard_bans_refused_total{reason="allowlisted"}"#)
            == Some((after_burst + n) as f64),
        "metric: {m}"
    );
    let bans = s.bans()?;
    ensure!(
        bans.len() == 1 && bans[0]["addr"] == other.to_string(),
        "nothing else changed: {bans:?}"
    );
    let list = s.get("/v1/allow")?;
    for (addr, source) in [
        ("127.0.0.0", "builtin"),
        (b2.as_str(), "config"),
        ("198.18.7.0", "manual"),
    ] {
        ensure!(
            list.as_array()
                .is_some_and(|l| l.iter().any(|e| e["addr"] == addr && e["source"] == source)),
            "{addr} {source} in {list}"
        );
    }
    let st = s.wait_state("the API allowlist entry", |st| {
        st["allow"].to_string().contains("198.18.7.0")
    })?;
    ensure!(
        !st["allow"].to_string().contains("127.0.0.0"),
        "only API entries persisted: {st}"
    );
    Ok(())
}

#[test]
fn full_ban_map_refuses_new_bans_and_never_evicts() -> Result<()> {
    let s = AgentLab::new()?;
    let _agent = s.start(&["--max-bans", "3", "--metrics-addr", METRICS])?;
    let old = ["198.18.2.1", "198.18.2.2", "198.18.2.3"];
    for a in old {
        let r = s.ban_add(a, Some(3600), false)?;
        ensure!(r.status == 200, "{a}: {}", r.text());
    }
    let r = s.ban_add("198.18.2.4", None, false)?;
    ensure!(
        r.status == 409 && r.text().contains("full"),
        "{} {}",
        r.status,
        r.text()
    );
    // A kernel burst meets the same cap.
    s.burst(s.lab.ip_b2, 10)?;
    wait_until("the burst's refusal", || Ok(refused(&s)? == 2))?;
    ensure!(s.pings(s.lab.ip_b2)? == 3, "not banned");
    let mut listed: Vec<String> = s
        .bans()?
        .iter()
        .map(|b| b["addr"].as_str().unwrap_or("").to_owned())
        .collect();
    listed.sort();
    ensure!(listed == old, "old bans stay, nothing evicted: {listed:?}");
    ensure!(s.kernel_bans()?.1 == 3, "kernel holds exactly the old bans");
    let m = s.metrics(METRICS)?;
    ensure!(
        sample(&m, r#"wsguard_bans_refused_total{reason="full"}"#) == Some(2.0),
        "{m}"
    );
    ensure!(sample(&m, "wsguard_ban_map_entries") == Some(3.0), "{m}");
    ensure!(sample(&m, "wsguard_ban_map_capacity") == Some(3.0), "{m}");

    let rm = s.api("DELETE", "/v1/bans", Some(json!({"addrs": ["198.18.2.1"]})))?;
    ensure!(rm.status == 200, "{}", rm.text());
    // A fresh source: the refused one's window has already had its event.
    let fresh = Ipv4Addr::new(198, 18, 2, 9);
    s.burst(fresh, 10)?;
    s.wait_ban(fresh)?;
    ensure!(s.kernel_bans()?.0.contains(&fresh), "room again: banned");
    Ok(())
}

#[test]
fn storm_of_new_sources_switches_auto_bans_to_observe_then_refuses() -> Result<()> {
    let s = AgentLab::new()?;
    let agent = s.start(&[
        "--ban-rate-limit",
        "2",
        "--ban-rate-hard-limit",
        "4",
        "--ban-rate-window",
        "10m",
        "--metrics-addr",
        METRICS,
    ])?;
    let m = s.metrics(METRICS)?;
    ensure!(
        sample(&m, "wsguard_circuit_breaker_open") == Some(0.0),
        "closed at start: {m}"
    );
    for i in 1..=6 {
        s.burst(Ipv4Addr::new(198, 18, 3, i), 10)?;
    }
    wait_until("six decisions", || {
        let st = s.get("/v1/stats")?;
        Ok(st["bans"]["created"].as_u64().unwrap_or(0)
            + st["bans"]["refused"].as_u64().unwrap_or(0)
            >= 6)
    })?;
    let bans = s.bans()?;
    let enforce = bans.iter().filter(|b| b["mode"] == "enforce").count();
    let observe: Vec<_> = bans.iter().filter(|b| b["mode"] == "observe").collect();
    ensure!(
        bans.len() == 4 && enforce == 2 && observe.len() == 2,
        "{bans:?}"
    );
    ensure!(
        observe.iter().all(|b| b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rate limit"))),
        "{observe:?}"
    );
    let m = s.metrics(METRICS)?;
    ensure!(
        sample(&m, "wsguard_circuit_breaker_open") == Some(1.0),
        "alert raised: {m}"
    );
    ensure!(
        sample(&m, r#"wsguard_bans_refused_total{reason="rate_limited"}"#) == Some(2.0),
        "{m}"
    );
    for (name, v) in [
        (r#"wsguard_bans_created_total{source="kernel"}"#, 4.0),
        (r#"wsguard_bans_active{source="kernel"}"#, 4.0),
        (r#"wsguard_bans_active{source="manual"}"#, 0.0),
    ] {
        ensure!(sample(&m, name) == Some(v), "{name}: {m}");
    }
    let log = agent.log_text();
    ensure!(
        log.matches("circuit breaker open").count() == 1,
        "said once: {log}"
    );
    // Operators are never rate limited.
    let r = s.ban_add("198.18.3.50", None, false)?;
    ensure!(
        r.status == 200 && r.json()?[0]["mode"] == "enforce",
        "{}",
        r.text()
    );
    Ok(())
}

#[test]
fn ttl_escalates_per_offence_across_restarts_and_rebans_only_extend() -> Result<()> {
    let s = AgentLab::new()?;
    let args = [
        "--ban-ttl",
        "1s",
        "--ban-max-ttl",
        "10s",
        "--window",
        "500ms",
    ];
    let mut agent = s.start(&args)?;
    let b2 = s.lab.ip_b2.to_string();
    let offence = |n: u64, ttl: f64| -> Result<()> {
        s.burst(s.lab.ip_b2, 10)?;
        let st = s.wait_state(&format!("offence {n}"), |st| {
            bans_of(st).first().is_some_and(|b| b["offenses"] == n)
        })?;
        let ban = &bans_of(&st)[0];
        ensure!((ttl_secs(ban)? - ttl).abs() < 0.01, "offence {n}: {ban}");
        // The agent deletes it once expired (the kernel ignores it before that).
        wait_until("the expired ban's removal", || {
            Ok(s.kernel_bans()?.0.is_empty())
        })?;
        s.wait_state("no ban", |st| bans_of(st).is_empty())?;
        Ok(())
    };
    offence(1, 1.0)?;
    ensure!(
        s.get("/v1/stats")?["bans"]["expired"] == 1,
        "expiry counted"
    );
    ensure!(agent.stop()?.success());
    let _agent = s.start(&args)?;
    offence(2, 4.0)?;
    offence(3, 10.0)?;
    let st = s.wait_state("3 offences", |st| st["offenses"][&b2]["count"] == 3)?;
    ensure!(st["offenses"][&b2]["last"].is_string(), "{st}");

    // A re-ban extends, never shortens.
    let at = |r: wsguard_tests::agent::http::Response| -> Result<f64> {
        ensure!(r.status == 200, "{}", r.text());
        unix_secs(r.json()?[0]["expires_at"].as_str().unwrap_or(""))
    };
    let first = at(s.ban_add("198.18.4.4", Some(3600), false)?)?;
    ensure!(
        at(s.ban_add("198.18.4.4", Some(60), false)?)? == first,
        "not shortened"
    );
    ensure!(
        at(s.ban_add("198.18.4.4", Some(7200), false)?)? > first + 3000.0,
        "extended"
    );
    Ok(())
}

#[test]
fn observe_mode_global_and_per_ban_drops_nothing() -> Result<()> {
    let s = AgentLab::new()?;
    let (b, b2) = (s.lab.ip_b, s.lab.ip_b2);
    let mut agent = s.start(&["--mode", "observe"])?;
    s.burst(b2, 10)?;
    let ban = s.wait_ban(b2)?;
    ensure!(ban["mode"] == "observe", "{ban}");
    ensure!(s.pings(b2)? == 3, "observe mode drops nothing");
    let st = s.get("/v1/stats")?;
    ensure!(
        st["packets"]["would_drop"].as_u64() >= Some(3) && st["packets"]["dropped"] == 0,
        "{st}"
    );
    ensure!(agent.stop()?.success());

    // Enforce mode; the observe ban stays an observe ban until a request strengthens it.
    let _agent = s.start(&[])?;
    ensure!(
        s.pings(b2)? == 3,
        "per-ban observe survives the mode change"
    );
    let r = s.ban_add(&b.to_string(), None, true)?;
    ensure!(
        r.status == 200 && r.json()?[0]["mode"] == "observe",
        "{}",
        r.text()
    );
    ensure!(s.pings(b)? == 3, "per-ban observe drops nothing");
    let counted = s
        .ban(&b.to_string())?
        .map(|v| v["dropped_packets"].as_u64());
    ensure!(
        counted >= Some(Some(3)),
        "would-drops counted per ban: {counted:?}"
    );
    let r = s.ban_add(&b2.to_string(), None, false)?;
    ensure!(
        r.status == 200 && r.json()?[0]["mode"] == "enforce",
        "{}",
        r.text()
    );
    ensure!(s.pings(b2)? == 0, "now enforced");
    Ok(())
}

/// A batch the kernel stops taking part way (its map fills before the agent's count says so:
/// entries the agent did not write are in it) is decided and written in a pipeline of chunks;
/// everything the kernel did not take, in the failed chunk and in those decided after it, is
/// rolled back, so the API lists exactly the bans in force.
#[test]
fn a_kernel_refusal_mid_batch_rolls_back_what_it_did_not_take() -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use std::net::Ipv6Addr;
    use wsguard_common::maps::{BanValue, names};

    let s = AgentLab::new()?;
    let _agent = s.start(&["--max-bans", "3000"])?;
    let pin = s.pin_dir().join("maps").join(names::BANS_V6);
    let mut v6: HashMap<_, [u8; 16], BanValue> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
    // 2,000 entries behind the agent's back: the kernel map has room for 1,000 more.
    for i in 0..2000u16 {
        let k = Ipv6Addr::new(0xfd00, 0x5e, 0, 0, 0, 0, 0, i).octets();
        v6.insert(k, BanValue::default(), 0)?;
    }
    let addrs: Vec<String> = (0..2000u16)
        .map(|i| Ipv6Addr::new(0xfd00, 0x5d, 0, 0, 0, 0, 0, i).to_string())
        .collect();
    let r = s.api(
        "POST",
        "/v1/import",
        Some(json!({"groups": [{"ttl_s": 3600, "reason": "t", "addrs": addrs}]})),
    )?;
    ensure!(
        r.status == 409 && r.text().contains("full"),
        "{} {}",
        r.status,
        r.text()
    );
    let listed: std::collections::BTreeSet<String> = s
        .get("/v1/bans?limit=10000")?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| b["addr"].as_str().unwrap_or("").to_owned())
        .collect();
    let ours: std::collections::BTreeSet<String> = v6
        .keys()
        .filter_map(|k| k.ok())
        .map(Ipv6Addr::from)
        .filter(|a| a.segments()[1] == 0x5d)
        .map(|a| a.to_string())
        .collect();
    ensure!(
        ours.len() == 1000,
        "the kernel took what it had room for: {}",
        ours.len()
    );
    ensure!(listed == ours, "the API lists exactly the bans in force");
    Ok(())
}
