//! The real `wsguard agent` in a lab namespace: bursts of bad handshakes crafted on a veth pair
//! become kernel bans that drop the source; bans survive restarts, a corrupt state file, and
//! expire while the agent is down. Pins live on a private bpffs, state in a tempdir.

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use std::{net::Ipv4Addr, path::Path, time::Duration};
use wsguard_tests::{
    agent::{Agent, send_frames},
    netns::{BpfFs, VethLab},
    packet::{Pkt, bad_request},
};

struct Setup {
    lab: VethLab,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Result<Self> {
        Ok(Self {
            lab: VethLab::new()?,
            bpffs: BpfFs::new()?,
            dir: tempfile::tempdir()?,
        })
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self, extra: &[&str]) -> Result<Agent> {
        let pin = self.bpffs.path().join("wsguard");
        let state = self.state_dir();
        let sock = self.dir.path().join("wsguard.sock");
        let mut args = vec![
            "--iface",
            &self.lab.if_a,
            "--pin-dir",
            pin.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--metrics-addr",
            "off",
            "--xdp-mode",
            "generic",
            "--threshold",
            "5",
        ];
        args.extend_from_slice(extra);
        let mut a = Agent::start(&self.lab.a, &self.dir.path().join("agent.log"), &args)?;
        let before = a.log_text().matches(" ready").count();
        a.wait_log(" ready", before + 1, Duration::from_secs(30))?;
        Ok(a)
    }

    /// `n` bad handshakes from `src`, each the first request of a new flow.
    fn burst(&self, src: Ipv4Addr, n: u16) -> Result<()> {
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                Pkt::tcp(&src.to_string(), 41000 + i, &self.lab.ip_a.to_string(), 80)
                    .payload(&bad_request("/"))
                    .build()
            })
            .collect();
        send_frames(&self.lab.b, &self.lab.if_b, &frames)
    }

    fn state(&self) -> Result<Value> {
        let p = self.state_dir().join("state.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The saved ban of `addr`, waiting for the debounced write.
    fn wait_ban(&self, addr: Ipv4Addr) -> Result<Value> {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = self.state()
                && let Some(b) = bans(&s).into_iter().find(|b| b["cidr"] == addr.to_string())
            {
                return Ok(b);
            }
            ensure!(
                std::time::Instant::now() < end,
                "no ban of {addr} in state: {:?}",
                self.state().ok()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pings(&self, from: Ipv4Addr) -> Result<u32> {
        self.lab.ping_from(from, 3, "0.2")
    }
}

fn bans(state: &Value) -> Vec<Value> {
    state["bans"].as_array().cloned().unwrap_or_default()
}

/// Burst → kernel ban → the banned source is dropped, a clean one is not.
fn banned_by_burst(s: &Setup) -> Result<Value> {
    let (bad, clean) = (s.lab.ip_b2, s.lab.ip_b);
    ensure!(s.pings(bad)? == 3, "source reachable before the burst");
    s.burst(bad, 10)?;
    let ban = s.wait_ban(bad)?;
    ensure!(ban["source"] == "kernel", "{ban}");
    ensure!(ban["mode"] == "enforce" && ban["offenses"] == 1, "{ban}");
    ensure!(s.pings(bad)? == 0, "banned source still answered");
    ensure!(s.pings(clean)? == 3, "clean source lost packets");
    Ok(ban)
}

#[test]
fn burst_of_bad_handshakes_bans_the_source_and_drops_it() -> Result<()> {
    let s = Setup::new()?;
    let _agent = s.start(&[])?;
    banned_by_burst(&s)?;
    Ok(())
}

#[test]
fn state_survives_kill9_and_restart_while_pins_keep_enforcing() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start(&[])?;
    let ban = banned_by_burst(&s)?;
    agent.kill9()?;
    ensure!(
        s.pings(s.lab.ip_b2)? == 0,
        "fail-static: still dropped with the agent dead"
    );
    let _agent = s.start(&[])?;
    let again = s.wait_ban(s.lab.ip_b2)?;
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
fn corrupt_state_is_moved_aside_and_pinned_bans_are_adopted() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start(&[])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success(), "clean exit on SIGTERM");
    std::fs::write(
        s.state_dir().join("state.json"),
        b"{\"version\":1,\"bans\":[{\"ci",
    )?;
    let agent = s.start(&[])?;
    ensure!(
        agent.log_text().contains("state file unusable"),
        "logged: {}",
        agent.log_text()
    );
    let aside = std::fs::read_dir(s.state_dir())?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("state.json.corrupt-")
    });
    ensure!(aside, "corrupt file kept aside");
    let ban = s.wait_ban(s.lab.ip_b2)?;
    ensure!(ban["reason"] == "adopted from pinned maps", "{ban}");
    ensure!(s.pings(s.lab.ip_b2)? == 0, "the live ban was never wiped");
    Ok(())
}

#[test]
fn bans_expire_while_the_agent_is_down() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start(&["--ban-ttl", "3s"])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success());
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        s.pings(s.lab.ip_b2)? == 3,
        "the kernel ignores the expired entry"
    );
    let _agent = s.start(&["--ban-ttl", "3s"])?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        bans(&s.state()?).is_empty(),
        "expired ban dropped at start: {}",
        s.state()?
    );
    Ok(())
}

#[test]
fn bans_come_back_from_state_when_pins_are_gone() -> Result<()> {
    let s = Setup::new()?;
    let mut agent = s.start(&[])?;
    banned_by_burst(&s)?;
    ensure!(agent.stop()?.success());
    // A node reboot: programs and pins gone, the state file stays.
    wsguard::datapath::DataPath::detach_all(&s.bpffs.path().join("wsguard"))?;
    ensure!(s.pings(s.lab.ip_b2)? == 3, "nothing enforces after detach");
    let _agent = s.start(&[])?;
    let ban = s.wait_ban(s.lab.ip_b2)?;
    ensure!(ban["source"] == "kernel", "{ban}");
    ensure!(s.pings(s.lab.ip_b2)? == 0, "restored ban enforced");
    Ok(())
}

#[test]
fn invalid_config_stops_the_agent_before_touching_the_kernel() -> Result<()> {
    let s = Setup::new()?;
    let log = s.dir.path().join("bad.log");
    let mut a = Agent::start(
        &s.lab.a,
        &log,
        &["--iface", &s.lab.if_a, "--ban-ttl", "10x"],
    )?;
    a.wait_log("ban_ttl", 1, Duration::from_secs(10))?;
    ensure!(a.log_text().contains(r#""10x""#), "{}", a.log_text());
    ensure!(!Path::new(&s.bpffs.path().join("wsguard")).exists());
    Ok(())
}
