//! Policies end to end: the allowlist always wins, observe mode drops nothing, and IPv6 and
//! VLAN-tagged attackers are banned like IPv4 ones. Issue 6, tests 7, 8 and 9.

use anyhow::{Result, ensure};
use std::time::Duration;
use wsguard_tests::{
    agent::send_frames,
    lab::{
        Lab,
        expect::{FINISH, all_clean, answered, start_legit},
        summary::AttackSummary,
        topology::{HTTP_PORT, NODE_IF, PeerSpec},
    },
    lab_bins,
    packet::{Pkt, TPID_8021Q, bad_request},
};

const BAN_WAIT: Duration = Duration::from_secs(5);

#[test]
fn allowlisted_attacker_is_never_banned_nor_dropped() -> Result<()> {
    let specs = [PeerSpec::new("partner")];
    let mut lab = Lab::start(lab_bins!(), &specs)?;
    let cidr = format!("{}/32", lab.peer("partner").ip4);
    lab.start_agent(&["--allow", &cidr])?;
    lab.check((|| {
        let agent = lab.agent.as_ref().expect("agent");
        let s: AttackSummary = lab
            .attack("partner", false, "no_upgrade", 50, "3s", "/ws")?
            .finish(FINISH)?;
        ensure!(s.attempts >= 100 && answered(&s) == s.attempts, "{s:?}");
        ensure!(agent.bans()?.is_empty(), "allowlisted source banned");
        let addr = lab.peer("partner").ip4.to_string();
        let out = agent.cli(&["ban", "add", &addr])?;
        ensure!(
            out.status.code() == Some(3),
            "ban add of an allowlisted address: {out:?}"
        );
        ensure!(
            agent.bans()?.is_empty(),
            "a refused ban add changed something"
        );
        ensure!(agent.stat("packets", "dropped")? == 0, "packets dropped");
        // The kernel's burst was refused as a ban (`packets.allowlisted` counts only packets
        // of a source both banned and allowlisted, which the agent never lets happen).
        let refused = agent.stat("bans", "refused")?;
        ensure!(refused > 0, "the refused kernel ban is not counted");
        Ok(())
    })())
}

#[test]
fn observe_mode_drops_nothing_and_counts_would_be_drops() -> Result<()> {
    let mut lab = Lab::start(lab_bins!(), &[PeerSpec::new("attacker")])?;
    lab.start_agent(&["--mode", "observe"])?;
    lab.check((|| {
        let agent = lab.agent.as_ref().expect("agent");
        let attacker = lab.peer("attacker").ip4.to_string();
        let attack = lab.attack("attacker", false, "no_upgrade", 50, "4s", "/ws")?;
        let ban = agent.wait_ban(&attacker, BAN_WAIT)?;
        ensure!(ban["mode"] == "observe", "not an observe ban: {ban}");
        let s: AttackSummary = attack.finish(FINISH)?;
        ensure!(
            s.timed_out == 0 && answered(&s) == s.attempts,
            "dropped: {s:?}"
        );
        ensure!(agent.stat("packets", "dropped")? == 0, "packets dropped");
        ensure!(
            agent.stat("packets", "would_drop")? > 0,
            "no would-be drops"
        );
        Ok(())
    })())
}

#[test]
fn ipv6_attacker_is_banned_while_ipv6_clients_see_nothing() -> Result<()> {
    let specs = [
        PeerSpec::new("legit0"),
        PeerSpec::new("legit1"),
        PeerSpec::new("attacker"),
    ];
    let mut lab = Lab::start(lab_bins!(), &specs)?;
    lab.start_agent(&[])?;
    lab.check(banned_among_clean(&lab, true))
}

/// This kernel has no 802.1Q support for the lab's own interfaces, so the tagged attacker is
/// crafted frames from its namespace (the node's stack cannot answer them; XDP still judges
/// them): a burst of bad handshakes behind a VLAN tag becomes a kernel ban, and the source's
/// tagged packets are dropped from then on, while untagged users keep working.
#[test]
fn vlan_tagged_attacker_is_banned_and_dropped() -> Result<()> {
    let specs = [PeerSpec::new("legit0"), PeerSpec::new("attacker")];
    let mut lab = Lab::start(lab_bins!(), &specs)?;
    lab.start_agent(&[])?;
    lab.check((|| {
        let agent = lab.agent.as_ref().expect("agent");
        let legit = start_legit(&lab, false, 2, "5s")?;
        let attacker = lab.peer("attacker");
        let (src, dst) = (attacker.ip4.to_string(), lab.topo.node_ip4.to_string());
        let mac = lab.topo.node_mac()?;
        let frames = |first_port: u16, n: u16| -> Vec<Vec<u8>> {
            (0..n)
                .map(|i| {
                    let mut f = Pkt::tcp(&src, first_port + i, &dst, HTTP_PORT)
                        .vlan(TPID_8021Q)
                        .payload(&bad_request("/ws"))
                        .build();
                    f[..6].copy_from_slice(&mac);
                    f
                })
                .collect()
        };
        send_frames(&attacker.ns, NODE_IF, &frames(40000, 30))?;
        let ban = agent.wait_ban(&src, BAN_WAIT)?;
        ensure!(ban["source"] == "kernel", "not a kernel ban: {ban}");
        let before = agent.stat("packets", "dropped")?;
        send_frames(&attacker.ns, NODE_IF, &frames(41000, 50))?;
        let dropped =
            agent.wait_stat("packets", "dropped", before + 50, Duration::from_secs(5))? - before;
        ensure!(dropped >= 50, "only {dropped} of 50 tagged packets dropped");
        all_clean(legit, 2)?;
        Ok(())
    })())
}

fn banned_among_clean(lab: &Lab, v6: bool) -> Result<()> {
    let agent = lab.agent.as_ref().expect("agent");
    let attacker = lab.peer("attacker").ip(v6).to_string();
    let legit = start_legit(lab, v6, 2, "8s")?;
    std::thread::sleep(Duration::from_secs(1));
    let attack = lab.attack("attacker", v6, "no_upgrade", 50, "5s", "/ws")?;
    let ban = agent.wait_ban(&attacker, BAN_WAIT)?;
    ensure!(ban["source"] == "kernel", "not a kernel ban: {ban}");
    let s: AttackSummary = attack.finish(FINISH)?;
    ensure!(s.timed_out > 0, "not blocked after the ban: {s:?}");
    ensure!(agent.stat("packets", "dropped")? > 0, "no XDP drops");
    all_clean(legit, 2)?;
    Ok(())
}
