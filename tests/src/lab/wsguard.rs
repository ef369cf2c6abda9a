//! wsguard in the lab: `wsguard agent` on the node's NIC, entered with `nsenter --net` so its
//! pins (on a private bpffs) outlive it across restarts, and the operator CLI talking to it.

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::topology::{HTTP_PORT, NODE_IF};
use crate::netns::{BpfFs, NetNs, run_with_timeout};

/// What the agent prints once it is attached and serving (the daemon's own log line).
const READY: &str = " ready";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LabAgent {
    child: Option<Child>,
    ns: String,
    bin: PathBuf,
    args: Vec<String>,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    // Last: unmounting the private bpffs releases whatever the agent left pinned.
    bpffs: BpfFs,
}

impl LabAgent {
    /// Start `wsguard agent` in `ns` on the node's NIC; state, socket and log under `dir`.
    pub fn start(ns: &NetNs, bin: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        let bpffs = BpfFs::new()?;
        let pin_dir = bpffs.path().join("wsguard");
        let state_dir = dir.join("agent-state");
        let socket = dir.join("wsguard.sock");
        let port = HTTP_PORT.to_string();
        let mut args: Vec<String> = [
            "agent",
            "--iface",
            NODE_IF,
            "--ports",
            &port,
            "--pin-dir",
            &pin_dir.display().to_string(),
            "--state-dir",
            &state_dir.display().to_string(),
            "--socket",
            &socket.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Self {
            child: None,
            ns: ns.name().to_owned(),
            bin: bin.to_owned(),
            args,
            log: dir.join("agent.log"),
            socket,
            state_dir,
            pin_dir,
            bpffs,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let before = self.log_text().matches(READY).count();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start nsenter wsguard agent")?;
        self.child = Some(child);
        self.wait_log(READY, before + 1, START_TIMEOUT)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log holds `n` occurrences of `needle`; fails early if the agent exits.
    pub fn wait_log(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= n {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                self.child = None;
                bail!("wsguard agent exited ({st}):\n{}", self.log_text());
            }
            if Instant::now() > end {
                bail!(
                    "wsguard agent: no {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 and start again with the same flags, waiting until it is ready.
    pub fn restart_hard(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGTERM, wait for the exit, start again: what a rolling upgrade of the DaemonSet does.
    pub fn restart_graceful(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("wsguard agent ignored SIGTERM:\n{}", self.log_text());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.spawn()
    }

    /// `wsguard --socket SOCK ARGS…` (the CLI), bounded in time; the output whatever the exit.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(15),
        )
    }

    /// `wsguard -o json ARGS…`, which must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all)?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        if !out.status.success() {
            bail!(
                "`wsguard {}` failed ({}): {}{}",
                all.join(" "),
                out.status,
                stderr.trim(),
                stdout.trim()
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("`wsguard {}` printed no JSON: {stdout}", all.join(" ")))
    }

    /// `ban list -o json`.
    pub fn bans(&self) -> Result<Vec<Value>> {
        match self.cli_json(&["ban", "list"])? {
            Value::Array(a) => Ok(a),
            other => bail!("`ban list -o json` is not an array: {other}"),
        }
    }

    /// The ban of exactly `addr`, if any.
    pub fn ban_of(&self, addr: &str) -> Result<Option<Value>> {
        Ok(self
            .bans()?
            .into_iter()
            .find(|b| b["addr"].as_str() == Some(addr)))
    }

    /// Poll `ban list` until `addr` is banned; the ban, or an error after `timeout`.
    pub fn wait_ban(&self, addr: &str, timeout: Duration) -> Result<Value> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(b) = self.ban_of(addr)? {
                return Ok(b);
            }
            if Instant::now() > end {
                bail!("{addr} not banned within {timeout:?}: {:?}", self.bans()?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stats(&self) -> Result<Value> {
        self.cli_json(&["stats"])
    }

    pub fn status(&self) -> Result<Value> {
        self.cli_json(&["status"])
    }

    /// A counter of `stats`, e.g. `("packets", "dropped")`.
    pub fn stat(&self, group: &str, name: &str) -> Result<u64> {
        let s = self.stats()?;
        s[group][name]
            .as_u64()
            .with_context(|| format!("stats has no {group}.{name}: {s}"))
    }

    /// Poll a counter until it reaches `min` (kernel counters move as the softirq runs, a
    /// moment after the sender returns); its last value either way.
    pub fn wait_stat(&self, group: &str, name: &str, min: u64, timeout: Duration) -> Result<u64> {
        let end = Instant::now() + timeout;
        loop {
            let v = self.stat(group, name)?;
            if v >= min || Instant::now() > end {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn bpffs_path(&self) -> &Path {
        self.bpffs.path()
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}
