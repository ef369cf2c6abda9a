//! wsguard never bans a legitimate client: not during a reconnect storm against a dead backend
//! (nginx answers 502), not for thousands of valid handshakes in every allowed spelling, not
//! for a source that stays just under the threshold. Issue 6, test 3.

use anyhow::{Result, ensure};
use std::time::Duration;
use wsguard_tests::{
    lab::{
        Lab,
        expect::{FINISH, legit_peers, start_legit},
        summary::{AttackSummary, LegitSummary, SpellingsSummary},
        topology::PeerSpec,
    },
    lab_bins,
};

fn no_bans(lab: &Lab) -> Result<()> {
    let bans = lab.agent.as_ref().expect("agent").bans()?;
    ensure!(bans.is_empty(), "legitimate sources banned: {bans:?}");
    Ok(())
}

#[test]
fn backend_restart_storm_of_502s_bans_nobody() -> Result<()> {
    let mut lab = Lab::start(lab_bins!(), &legit_peers(5))?;
    lab.start_agent(&[])?;
    let r = storm(&mut lab);
    lab.check(r)
}

fn storm(lab: &mut Lab) -> Result<()> {
    let legit = start_legit(lab, false, 2, "10s")?;
    std::thread::sleep(Duration::from_secs(2));
    // Every client is cut off and retries every 250 ms: 2 clients per source for 4 s is far
    // more than 20 refused handshakes per source, all of them 502.
    lab.stop_backend();
    std::thread::sleep(Duration::from_secs(4));
    lab.start_backend()?;
    let mut got_502 = 0;
    let mut reconnected = 0;
    for p in legit {
        let s: LegitSummary = p.finish(FINISH)?;
        got_502 += s.statuses.get("502").copied().unwrap_or(0);
        reconnected += s.connections.saturating_sub(2);
        ensure!(
            s.failures == 0 || s.disconnects > 0,
            "failed without the outage: {s:?}"
        );
    }
    ensure!(
        got_502 >= 100,
        "the storm was too small: {got_502} answers 502"
    );
    ensure!(
        reconnected >= 10,
        "clients did not come back: {reconnected} reconnects"
    );
    let agent = lab.agent.as_ref().expect("agent");
    let upstream = agent.stat("handshakes", "upstream_errors")?;
    ensure!(upstream > 0, "5xx answers not counted as upstream_errors");
    let rejected = agent.stat("bad_reasons", "server_rejected")?;
    ensure!(rejected == 0, "5xx counted as server_rejected: {rejected}");
    no_bans(lab)
}

#[test]
fn thousands_of_valid_spellings_ban_nobody() -> Result<()> {
    let mut lab = Lab::start(lab_bins!(), &[PeerSpec::new("browser")])?;
    lab.start_agent(&[])?;
    lab.check((|| {
        let s: SpellingsSummary = lab
            .client(
                "browser",
                "spellings",
                false,
                &[
                    "spellings",
                    "--target",
                    &lab.http_target(false).to_string(),
                    "--count",
                    "2600",
                    "--concurrency",
                    "16",
                ],
            )?
            .finish(Duration::from_secs(180))?;
        ensure!(s.attempts == 2600, "not all sent: {s:?}");
        ensure!(
            s.ok == s.attempts && s.failures == 0,
            "spellings refused: {s:?}"
        );
        let bad = lab
            .agent
            .as_ref()
            .expect("agent")
            .stat("handshakes", "bad")?;
        ensure!(bad == 0, "{bad} valid handshakes judged bad");
        no_bans(&lab)
    })())
}

#[test]
fn a_source_just_under_the_threshold_is_never_banned() -> Result<()> {
    let mut lab = Lab::start(lab_bins!(), &[PeerSpec::new("grey")])?;
    lab.start_agent(&["--threshold", "10", "--window", "2s"])?;
    lab.check((|| {
        // 3 per second: at most 7 in any 2 s window, against a threshold of 10; 24 in all.
        let s: AttackSummary = lab
            .attack("grey", false, "no_upgrade", 3, "8s", "/ws")?
            .finish(FINISH)?;
        ensure!(s.statuses.get("400").copied().unwrap_or(0) >= 20, "{s:?}");
        ensure!(s.timed_out == 0, "the grey source was dropped: {s:?}");
        let agent = lab.agent.as_ref().expect("agent");
        let bad = agent.stat("bad_reasons", "no_upgrade")?;
        ensure!(bad >= 20, "kernel counted only {bad} bad handshakes");
        no_bans(&lab)
    })())
}
