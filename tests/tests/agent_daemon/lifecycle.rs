//! Fail-static exit, `--detach-on-exit`, and restarts and upgrades under steady traffic: not a
//! packet of a clean source lost, not a packet of a banned one let through, the established
//! TCP connection never retransmits, and exactly one attachment per interface afterwards.

use anyhow::{Result, ensure};
use serde_json::json;
use std::time::Duration;
use wsguard_common::maps::LAYOUT_VERSION;
use wsguard_tests::agent::{
    Agent, AgentLab,
    stream::{TcpEcho, UdpStream},
};

fn ban_b2(s: &AgentLab) -> Result<()> {
    let body = json!({"addrs": [s.lab.ip_b2.to_string()], "ttl_s": null, "permanent": true,
                      "reason": "steady", "observe": false, "hard": true});
    let r = s.api("POST", "/v1/bans", Some(body))?;
    ensure!(r.status == 200, "{}", r.text());
    Ok(())
}

fn status_prog_id(s: &AgentLab) -> Result<u64> {
    let st = s.get("/v1/status")?;
    st["interfaces"][0]["xdp_prog_id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no prog id: {st}"))
}

#[test]
fn sigterm_keeps_enforcing_and_detach_on_exit_removes_everything() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = s.start(&[])?;
    ban_b2(&s)?;
    let id = status_prog_id(&s)?;
    ensure!(agent.stop()?.success(), "clean exit");
    ensure!(
        agent.log_text().contains("keep enforcing"),
        "{}",
        agent.log_text()
    );
    let ids = s.xdp_prog_ids()?;
    ensure!(
        ids == vec![id as u32],
        "XDP stays attached: {ids:?}, status said {id}: {}",
        s.lab.a.ip(&["-j", "link", "show", "dev", &s.lab.if_a])?
    );
    let tc = s.tc_attachments()?;
    ensure!(tc == 1, "TC egress stays attached: {tc} attachments");
    ensure!(
        s.pings(s.lab.ip_b2)? == 0 && s.pings(s.lab.ip_b)? == 3,
        "fail-static"
    );

    let mut agent = s.start(&["--detach-on-exit"])?;
    ensure!(status_prog_id(&s)? == id, "adopted, not reloaded");
    ensure!(agent.stop()?.success(), "clean exit");
    ensure!(
        s.xdp_prog_ids()?.is_empty() && s.tc_attachments()? == 0,
        "programs removed"
    );
    ensure!(
        std::fs::read_dir(s.pin_dir()).map_or(true, |mut d| d.next().is_none()),
        "pins removed"
    );
    ensure!(s.pings(s.lab.ip_b2)? == 3, "nothing enforces");
    Ok(())
}

#[test]
fn restarts_and_upgrades_lose_no_packet_and_no_connection() -> Result<()> {
    let s = AgentLab::new()?;
    let (a, b, b2) = (s.lab.ip_a, s.lab.ip_b, s.lab.ip_b2);
    let mut agent = s.start(&[])?;
    ban_b2(&s)?;
    let first = status_prog_id(&s)?;
    let udp = UdpStream::start(&s.lab.a, &s.lab.b, a, 7000, &[b, b2])?;
    // On the watched port, so the flow also goes through the data plane's inspection.
    let tcp = TcpEcho::start(&s.lab.a, &s.lab.b, a, 80, b)?;
    let pause = || std::thread::sleep(Duration::from_millis(300));
    pause();

    // Crash and restart of the same build: adopted, the program never changes.
    agent.kill9()?;
    pause();
    let mut agent = s.start(&[])?;
    ensure!(
        status_prog_id(&s)? == first,
        "same build adopts the running program"
    );
    pause();

    // Upgrade to another build: swapped atomically through the pinned link.
    ensure!(agent.stop()?.success());
    let mut agent = s.start_env(&[], &[("WSGUARD_TEST_BUILD_ID", "5eed0000000000a1")])?;
    let second = status_prog_id(&s)?;
    ensure!(second != first, "the new build's program runs");
    pause();

    // Upgrade to a build whose map layout differs: maps migrated, then swapped.
    ensure!(agent.stop()?.success());
    let layout = (LAYOUT_VERSION + 1).to_string();
    let _agent = s.start_env(&[], &[("WSGUARD_TEST_LAYOUT_VERSION", &layout)])?;
    let third = status_prog_id(&s)?;
    ensure!(third != second, "the migrated generation runs");
    pause();

    let (echoes, retrans_client, retrans_server) = tcp.finish()?;
    let got = udp.finish()?;
    let clean = &got[&b];
    ensure!(
        clean.sent > 100,
        "the stream ran across the restarts: {}",
        clean.sent
    );
    ensure!(
        clean.received.len() as u32 == clean.sent
            && clean.received.last() == Some(&(clean.sent - 1)),
        "clean source lost {} of {} datagrams",
        clean.sent - clean.received.len() as u32,
        clean.sent
    );
    ensure!(
        got[&b2].sent > 100 && got[&b2].received.is_empty(),
        "banned source got through: {:?}",
        got[&b2].received.len()
    );
    ensure!(
        echoes > 100,
        "the connection carried traffic throughout: {echoes}"
    );
    ensure!(
        retrans_client == 0 && retrans_server == 0,
        "TCP retransmitted: {retrans_client}/{retrans_server}"
    );

    ensure!(
        s.xdp_prog_ids()? == vec![third as u32],
        "exactly one XDP attachment"
    );
    ensure!(s.tc_attachments()? == 1, "exactly one TC attachment");
    let ban = s.ban(&b2.to_string())?.expect("migrated");
    ensure!(
        ban["reason"] == "steady" && ban["hard"] == true && ban["expires_at"].is_null(),
        "{ban}"
    );
    Ok(())
}

#[test]
fn pin_dir_off_bpffs_refuses_enforce_and_observe_runs_unpinned() -> Result<()> {
    let s = AgentLab::new()?;
    // Its parent holds files, so the agent must not mount bpffs over it.
    std::fs::write(s.dir.path().join("keep"), b"x")?;
    let pins = s.dir.path().join("pins");
    let (pins, state, sock) = (
        pins.to_str().unwrap().to_owned(),
        s.state_dir().to_string_lossy().into_owned(),
        s.socket().to_string_lossy().into_owned(),
    );
    let args = |mode: &'static str| {
        vec![
            "--iface",
            &s.lab.if_a,
            "--pin-dir",
            &pins,
            "--state-dir",
            &state,
            "--socket",
            &sock,
            "--metrics-addr",
            "off",
            "--xdp-mode",
            "generic",
            "--mode",
            mode,
        ]
    };
    let mut a = Agent::start(&s.lab.a, &s.log(), &args("enforce"))?;
    ensure!(
        !a.wait_exit(Duration::from_secs(30))?.success(),
        "enforce refused"
    );
    let log = a.log_text();
    ensure!(
        log.contains("refusing to enforce")
            && log.contains(&pins)
            && log.contains("--mode observe"),
        "{log}"
    );
    ensure!(s.xdp_prog_ids()?.is_empty(), "nothing attached");

    let mut a = Agent::start(&s.lab.a, &s.log(), &args("observe"))?;
    a.wait_log(" ready", 1, Duration::from_secs(30))?;
    let st = s.get("/v1/status")?;
    ensure!(st["pinned"] == false && st["mode"] == "observe", "{st}");
    ensure!(s.xdp_prog_ids()?.len() == 1, "attached while running");
    ensure!(a.stop()?.success());
    ensure!(
        s.xdp_prog_ids()?.is_empty(),
        "unpinned programs go with the agent"
    );
    Ok(())
}

/// A second agent given the same pin directory (its own socket and state) must not touch the
/// first one's programs and maps: it stops at start, saying why, and the first runs on.
#[test]
fn a_second_agent_on_the_same_pins_stops_and_the_first_runs_on() -> Result<()> {
    let s = AgentLab::new()?;
    let _first = s.start(&[])?;
    ban_b2(&s)?;
    let prog = status_prog_id(&s)?;
    let other = tempfile::tempdir()?;
    let (state, socket) = (other.path().join("state"), other.path().join("second.sock"));
    let pin_dir = s.pin_dir();
    let args = [
        "--iface",
        s.lab.if_a.as_str(),
        "--pin-dir",
        pin_dir.to_str().unwrap_or_default(),
        "--state-dir",
        state.to_str().unwrap_or_default(),
        "--socket",
        socket.to_str().unwrap_or_default(),
        "--xdp-mode",
        "generic",
        "--metrics-addr",
        "off",
    ];
    let log = other.path().join("second.log");
    let mut second = Agent::start(&s.lab.a, &log, &args)?;
    let st = second.wait_exit(Duration::from_secs(60))?;
    let text = second.log_text();
    ensure!(
        !st.success(),
        "a second agent ran on the same pins:\n{text}"
    );
    ensure!(
        text.contains("in use by another wsguard agent"),
        "no reason given:\n{text}"
    );
    ensure!(
        status_prog_id(&s)? == prog,
        "the first agent's program changed"
    );
    ensure!(
        s.lab.ping_from(s.lab.ip_b2, 3, "0.2")? == 0,
        "the first agent's ban no longer enforced"
    );
    Ok(())
}
