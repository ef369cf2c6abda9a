//! The state file and the pinned maps across crashes: kill -9 (also in the middle of a batch of
//! ban writes, and in the middle of restoring bans after a reboot), a corrupt, truncated or
//! future-version state file, and a reboot that took the pins.

use anyhow::{Result, ensure};
use serde_json::json;
use std::{net::Ipv4Addr, time::Duration};
use wsguard_tests::agent::{Agent, AgentLab, lab::bans_of};

use crate::banned_by_burst;

#[test]
fn state_survives_kill9_and_restart_while_pins_keep_enforcing() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = s.start(&[])?;
    let ban = banned_by_burst(&s)?;
    agent.kill9()?;
    ensure!(
        s.pings(s.lab.ip_b2)? == 0,
        "fail-static: still dropped with the agent dead"
    );
    let _agent = s.start(&[])?;
    let again = s.ban(&s.lab.ip_b2.to_string())?.expect("still banned");
    ensure!(
        again["source"] == "kernel" && again["reason"] == ban["reason"],
        "{again}"
    );
    ensure!(
        s.pings(s.lab.ip_b2)? == 0 && s.pings(s.lab.ip_b)? == 3,
        "enforcing after restart"
    );
    Ok(())
}

#[test]
fn unusable_state_files_are_moved_aside_and_pinned_bans_are_adopted() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = s.start(&[])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success(), "clean exit on SIGTERM");
    let good = std::fs::read(s.state_dir().join("state.json"))?;
    let mut future: serde_json::Value = serde_json::from_slice(&good)?;
    future["version"] = 99.into();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("corrupt", b"\x00\xffnot json".to_vec(), "not a state file"),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "corrupt state file",
        ),
        (
            "future",
            serde_json::to_vec(&future)?,
            "unknown state version 99",
        ),
    ];
    for (i, (what, bytes, why)) in cases.into_iter().enumerate() {
        std::fs::write(s.state_dir().join("state.json"), &bytes)?;
        let mut agent = s.start(&[])?;
        let log = agent.log_text();
        ensure!(
            log.matches("state file unusable").count() == i + 1 && log.contains(why),
            "{what}: logged: {log}"
        );
        let aside: Vec<Vec<u8>> = std::fs::read_dir(s.state_dir())?
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.corrupt-")
            })
            .filter_map(|e| std::fs::read(e.path()).ok())
            .collect();
        ensure!(
            aside.len() == i + 1 && aside.contains(&bytes),
            "{what}: kept aside"
        );
        let ban = s.ban(&s.lab.ip_b2.to_string())?.expect("adopted");
        ensure!(ban["reason"] == "adopted from pinned maps", "{what}: {ban}");
        ensure!(
            s.pings(s.lab.ip_b2)? == 0,
            "{what}: the live ban was never wiped"
        );
        s.wait_state("the adopted ban", |st| !bans_of(st).is_empty())?;
        ensure!(agent.stop()?.success());
    }
    Ok(())
}

#[test]
fn bans_come_back_from_state_when_pins_are_gone() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = s.start(&[])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success());
    // A node reboot: programs and pins gone, the state file stays.
    wsguard::datapath::DataPath::detach_all(&s.pin_dir())?;
    ensure!(s.pings(s.lab.ip_b2)? == 3, "nothing enforces after detach");
    let _agent = s.start(&[])?;
    let ban = s.ban(&s.lab.ip_b2.to_string())?.expect("restored");
    ensure!(ban["source"] == "kernel", "{ban}");
    ensure!(s.pings(s.lab.ip_b2)? == 0, "restored ban enforced");
    Ok(())
}

fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 8, 0)) + i)
}

/// The API's bans and the kernel's agree, one for one.
fn consistent(s: &AgentLab, want: usize) -> Result<()> {
    let bans = s.bans()?;
    let (hosts, total) = s.kernel_bans()?;
    ensure!(
        bans.len() == want && total == want,
        "api {} kernel {total}, want {want}",
        bans.len()
    );
    for h in &hosts {
        ensure!(
            bans.iter().any(|b| b["addr"] == h.to_string()),
            "{h} in the maps, not in the API"
        );
    }
    Ok(())
}

#[test]
fn kill9_mid_batch_and_mid_restore_leaves_a_state_the_next_start_adopts() -> Result<()> {
    const BATCH: u32 = 100;
    const WRITTEN: u32 = 40;
    let s = AgentLab::new()?;
    let entries: Vec<_> = (0..BATCH)
        .map(|i| json!({"addr": host(i).to_string(), "ttl_s": 3600, "permanent": false, "reason": "feed"}))
        .collect();

    // The first kernel write is the burst's ban; the agent dies right after the import's
    // WRITTEN-th write, before the batch's state write.
    let env = [("WSGUARD_TEST_KILL_AFTER_BAN_WRITES", "41")];
    let mut agent = s.start_env(&[], &env)?;
    banned_by_burst(&s)?;
    let r = s.api("POST", "/v1/import", Some(json!({ "entries": entries })));
    ensure!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.status != 200),
        "the import died: {r:?}"
    );
    ensure!(
        !agent.wait_exit(Duration::from_secs(10))?.success(),
        "killed"
    );
    ensure!(s.kernel_bans()?.1 == WRITTEN as usize + 1, "died mid-batch");
    ensure!(s.pings(s.lab.ip_b2)? == 0, "fail-static while dead");

    let mut agent = s.start(&[])?;
    consistent(&s, WRITTEN as usize + 1)?;
    let kernel = s.ban(&s.lab.ip_b2.to_string())?.expect("kept");
    ensure!(
        kernel["source"] == "kernel",
        "state kept what it knew: {kernel}"
    );
    let adopted = s.ban(&host(0).to_string())?.expect("adopted");
    ensure!(adopted["reason"] == "adopted from pinned maps", "{adopted}");
    s.wait_state("every ban", |st| bans_of(st).len() == WRITTEN as usize + 1)?;
    ensure!(agent.stop()?.success());

    // A reboot, then a crash in the middle of writing the saved bans back.
    wsguard::datapath::DataPath::detach_all(&s.pin_dir())?;
    let mut dying = Agent::start_env(
        &s.lab.a,
        &s.log(),
        &s.base_args().iter().map(String::as_str).collect::<Vec<_>>(),
        &[("WSGUARD_TEST_KILL_AFTER_BAN_WRITES", "10")],
    )?;
    ensure!(
        !dying.wait_exit(Duration::from_secs(30))?.success(),
        "killed mid-restore"
    );
    ensure!(s.kernel_bans()?.1 == 10, "died mid-restore");
    ensure!(
        s.state_dir().join("restore-pending").exists(),
        "marker left behind"
    );

    let _agent = s.start(&[])?;
    consistent(&s, WRITTEN as usize + 1)?;
    ensure!(
        !s.state_dir().join("restore-pending").exists(),
        "marker removed"
    );
    ensure!(
        s.pings(s.lab.ip_b2)? == 0 && s.pings(s.lab.ip_b)? == 3,
        "enforcing"
    );
    Ok(())
}
