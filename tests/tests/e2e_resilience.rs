//! wsguard under traffic across its own restarts and over time: kill -9 and a graceful
//! restart (an upgrade) while the attack and the legitimate traffic run, and bans that expire
//! and come back four times longer. Issue 6, tests 5 and 6.

use anyhow::{Result, ensure};
use std::time::{Duration, Instant};
use wsguard_tests::{
    lab::{
        Lab,
        expect::{FINISH, all_clean, answered, ban_ttl_secs, legit_peers, start_legit},
        summary::AttackSummary,
        topology::PeerSpec,
    },
    lab_bins,
};

const BAN_WAIT: Duration = Duration::from_secs(5);

fn lab_with(extra: &[PeerSpec], legit: usize, flags: &[&str]) -> Result<Lab> {
    let mut specs = legit_peers(legit);
    specs.extend_from_slice(extra);
    let mut lab = Lab::start(lab_bins!(), &specs)?;
    lab.start_agent(flags)?;
    Ok(lab)
}

#[test]
fn kill9_and_restart_under_attack_loses_nothing() -> Result<()> {
    let mut lab = lab_with(&[PeerSpec::new("attacker")], 5, &[])?;
    let r = restart_under_attack(&mut lab, false);
    lab.check(r)
}

#[test]
fn graceful_restart_under_attack_loses_nothing() -> Result<()> {
    let mut lab = lab_with(&[PeerSpec::new("attacker")], 5, &[])?;
    let r = restart_under_attack(&mut lab, true);
    lab.check(r)
}

fn restart_under_attack(lab: &mut Lab, graceful: bool) -> Result<()> {
    let attacker = lab.peer("attacker").ip4.to_string();
    let legit = start_legit(lab, false, 2, "14s")?;
    std::thread::sleep(Duration::from_secs(1));
    let attack = lab.attack("attacker", false, "no_upgrade", 50, "10s", "/ws")?;
    lab.agent().wait_ban(&attacker, BAN_WAIT)?;
    // Let requests in flight at the ban finish, then note how far the attacker got.
    std::thread::sleep(Duration::from_millis(2500));
    let before: AttackSummary = attack.last_json().unwrap_or_default();

    let agent = lab.agent();
    if graceful {
        agent.restart_graceful()?;
    } else {
        agent.restart_hard()?;
    }
    ensure!(
        agent.ban_of(&attacker)?.is_some(),
        "the ban was lost across the restart"
    );
    let after: AttackSummary = attack.finish(FINISH)?;
    ensure!(
        answered(&after) == answered(&before),
        "the attacker got answers after the restart: {before:?} -> {after:?}"
    );
    ensure!(
        after.timed_out > before.timed_out,
        "attack stopped early: {after:?}"
    );
    all_clean(legit, 2)?;

    let status = lab.agent().status()?;
    let ifaces = status["interfaces"].as_array().cloned().unwrap_or_default();
    ensure!(ifaces.len() == 1, "expected one interface: {status}");
    let link = lab.topo.node.ip(&["-d", "link", "show", "dev", "eth0"])?;
    let progs = link.matches("prog/xdp").count();
    ensure!(
        progs == 1,
        "expected one XDP attachment, found {progs}:\n{link}"
    );
    Ok(())
}

/// The window is shorter than the TTL, as with the defaults (10 s and 10 m): the repeat
/// offence falls in a fresh window.
#[test]
fn expired_ban_lets_the_attacker_back_and_a_repeat_is_four_times_longer() -> Result<()> {
    let lab = lab_with(
        &[PeerSpec::new("attacker")],
        0,
        &["--ban-ttl", "3s", "--window", "2s"],
    )?;
    lab.check((|| {
        let agent = lab.agent.as_ref().expect("agent");
        let attacker = lab.peer("attacker").ip4.to_string();

        let burst = lab.attack("attacker", false, "no_upgrade", 50, "1s", "/ws")?;
        let first = agent.wait_ban(&attacker, BAN_WAIT)?;
        burst.finish::<AttackSummary>(FINISH)?;
        ensure!(ban_ttl_secs(&first)? == 3, "first ban TTL: {first}");

        let end = Instant::now() + Duration::from_secs(15);
        while agent.ban_of(&attacker)?.is_some() {
            ensure!(Instant::now() < end, "the ban never expired: {first}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // Back in: valid handshakes are answered again.
        let ok: AttackSummary = lab
            .attack("attacker", false, "valid", 5, "1s", "/ws")?
            .finish(FINISH)?;
        ensure!(
            ok.attempts > 0 && ok.statuses.get("101") == Some(&ok.attempts),
            "not let back in after expiry: {ok:?}"
        );

        let again = lab.attack("attacker", false, "no_upgrade", 50, "1s", "/ws")?;
        let second = agent.wait_ban(&attacker, BAN_WAIT)?;
        again.finish::<AttackSummary>(FINISH)?;
        ensure!(ban_ttl_secs(&second)? == 12, "repeat ban TTL: {second}");
        ensure!(second["offenses"] == 2, "offenses: {second}");
        Ok(())
    })())
}
