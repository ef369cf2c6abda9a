//! The real `wsguard agent` in a lab namespace: bursts of bad handshakes crafted on a veth pair
//! become kernel bans that drop the source; the safety rails refuse and count; bans survive
//! restarts, upgrades, crashes, a corrupt state file and a reboot, and expire while the agent is
//! down. Pins live on a private bpffs, state in a tempdir; the API is spoken over its socket.

#[path = "agent_daemon/lifecycle.rs"]
mod lifecycle;
#[path = "agent_daemon/policy.rs"]
mod policy;
#[path = "agent_daemon/state.rs"]
mod state;

use anyhow::{Result, ensure};
use serde_json::Value;
use std::{path::Path, time::Duration};
use wsguard_tests::agent::{
    Agent, AgentLab,
    lab::{bans_of, ttl_secs},
};

/// Burst → kernel ban → the banned source is dropped, a clean one is not.
pub fn banned_by_burst(s: &AgentLab) -> Result<Value> {
    let (bad, clean) = (s.lab.ip_b2, s.lab.ip_b);
    ensure!(s.pings(bad)? == 3, "source reachable before the burst");
    s.burst(bad, 10)?;
    let ban = s.wait_ban(bad)?;
    ensure!(ban["source"] == "kernel", "{ban}");
    ensure!(ban["mode"] == "enforce" && ban["offenses"] == 1, "{ban}");
    ensure!(s.pings(bad)? == 0, "banned source still answered");
    ensure!(s.pings(clean)? == 3, "clean source lost packets");
    // Its handshakes were never answered: no flow to preserve, so the sweeper turns the ban's
    // flow lookups off.
    wsguard_tests::agent::lab::wait_until("the ban's BAN_MAY_PRESERVE cleared", || {
        let bans: aya::maps::HashMap<_, [u8; 4], wsguard_common::maps::BanValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(
                aya::maps::MapData::from_pin(s.pin_dir().join("maps/BANS_V4"))?,
            )?)?;
        let flags = bans.get(&bad.octets(), 0)?.flags;
        Ok(flags & wsguard_common::maps::BAN_MAY_PRESERVE == 0)
    })?;
    Ok(ban)
}

#[test]
fn burst_of_bad_handshakes_bans_the_source_and_drops_it() -> Result<()> {
    let s = AgentLab::new()?;
    let _agent = s.start(&[])?;
    let ban = banned_by_burst(&s)?;
    let api = s.ban(&s.lab.ip_b2.to_string())?.expect("listed by the API");
    ensure!(
        api["source"] == "kernel"
            && api["prefix_len"] == 32
            && api["dropped_packets"].as_u64() > Some(0),
        "{api}"
    );
    ensure!(
        ban["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no_upgrade")),
        "{ban}"
    );
    // IPv6 sources go through the same path.
    let v6: std::net::Ipv6Addr = "fd00:5753::99".parse()?;
    s.burst(v6, 10)?;
    wsguard_tests::agent::lab::wait_until("the IPv6 ban", || {
        Ok(s.ban(&v6.to_string())?.is_some())
    })?;
    let b6 = s.ban(&v6.to_string())?.expect("checked");
    ensure!(b6["prefix_len"] == 128 && b6["source"] == "kernel", "{b6}");
    ensure!(s.kernel_bans()?.1 == 2, "both in the maps");
    // An IPv4-mapped address is an IPv4 ban.
    let r = s.ban_add("::ffff:198.18.9.9", None, false)?;
    let j = r.json()?;
    ensure!(
        r.status == 200 && j[0]["addr"] == "198.18.9.9" && j[0]["prefix_len"] == 32,
        "{j}"
    );
    ensure!(
        s.kernel_bans()?.0.contains(&"198.18.9.9".parse()?),
        "stored as IPv4"
    );
    Ok(())
}

#[test]
fn invalid_config_stops_the_agent_before_touching_the_kernel() -> Result<()> {
    let s = AgentLab::new()?;
    let log = s.dir.path().join("bad.log");
    let pin = s.pin_dir();
    let mut a = Agent::start(
        &s.lab.a,
        &log,
        &[
            "--iface",
            &s.lab.if_a,
            "--pin-dir",
            pin.to_str().unwrap(),
            "--ban-ttl",
            "10x",
        ],
    )?;
    ensure!(
        !a.wait_exit(Duration::from_secs(10))?.success(),
        "exit status says failure"
    );
    ensure!(
        a.log_text().contains("ban_ttl") && a.log_text().contains(r#""10x""#),
        "{}",
        a.log_text()
    );
    ensure!(!Path::new(&pin).exists(), "nothing pinned");
    Ok(())
}

#[test]
fn config_file_applies_and_flags_override_it() -> Result<()> {
    let s = AgentLab::new()?;
    let file = s.dir.path().join("agent.toml");
    // threshold 5 (file) makes a 6-handshake burst a ban where the default (20) would not;
    // mode observe (file) loses to --mode enforce (flag); ban_ttl 7m (file) beats the default.
    std::fs::write(
        &file,
        "threshold = 5\nmode = \"observe\"\nban_ttl = \"7m\"\nmetrics_addr = \"off\"\n",
    )?;
    let f = file.to_str().unwrap();
    let _agent = s.start_raw(&["--config", f, "--mode", "enforce"], &[])?;
    s.burst(s.lab.ip_b2, 6)?;
    let ban = s.wait_ban(s.lab.ip_b2)?;
    ensure!(ban["mode"] == "enforce", "flag beats file: {ban}");
    ensure!(
        (ttl_secs(&ban)? - 420.0).abs() < 1.0,
        "file beats default: {ban}"
    );
    ensure!(s.pings(s.lab.ip_b2)? == 0, "enforced");

    std::fs::write(&file, "threshold = 5\nban_max_ttl = \"forever\"\n")?;
    let log = s.dir.path().join("bad.log");
    let mut bad = Agent::start(&s.lab.a, &log, &["--iface", &s.lab.if_a, "--config", f])?;
    ensure!(!bad.wait_exit(Duration::from_secs(10))?.success());
    let text = bad.log_text();
    ensure!(
        text.contains("ban_max_ttl") && text.contains(r#""forever""#),
        "{text}"
    );
    Ok(())
}

#[test]
fn bans_expire_while_the_agent_is_down() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = s.start(&["--ban-ttl", "3s"])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success());
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        s.pings(s.lab.ip_b2)? == 3,
        "the kernel ignores the expired entry"
    );
    let _agent = s.start(&["--ban-ttl", "3s"])?;
    ensure!(s.bans()?.is_empty(), "expired ban not adopted");
    let stats = s.get("/v1/stats")?;
    ensure!(stats["bans"]["expired"] == 1, "counted: {stats}");
    ensure!(s.kernel_bans()?.1 == 0, "deleted from the maps");
    s.wait_state("no bans", |st| bans_of(st).is_empty())?;
    Ok(())
}
