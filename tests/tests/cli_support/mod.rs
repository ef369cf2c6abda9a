//! Shared by the `cli_*` tests: a lab with a real agent, and the real `wsguard` binary run
//! against it with exit code, stdout and stderr captured.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use wsguard_tests::{
    agent::{Agent, wsguard_bin},
    netns::{BpfFs, VethLab},
};

pub struct Setup {
    pub lab: VethLab,
    pub bpffs: BpfFs,
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Setup {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Traversable by the non-root test user; the socket itself stays 0600.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            lab: VethLab::new()?,
            bpffs: BpfFs::new()?,
            dir,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("wsguard.sock")
    }

    pub fn pin_dir(&self, name: &str) -> PathBuf {
        self.bpffs.path().join(name)
    }

    /// An agent with its own pin dir and state dir (`name`), serving on `socket()`.
    pub fn start(&self, name: &str, extra: &[&str]) -> Result<Agent> {
        let pin = self.pin_dir(name);
        let state = self.dir.path().join(format!("state-{name}"));
        let sock = self.socket();
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
        ];
        args.extend_from_slice(extra);
        let mut a = Agent::start(
            &self.lab.a,
            &self.dir.path().join(format!("agent-{name}.log")),
            &args,
        )?;
        a.wait_log(" ready", 1, Duration::from_secs(30))?;
        // "ready" is logged as the API task starts: wait until it answers.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.cli(&["status"])?;
            if r.code == 0 {
                return Ok(a);
            }
            ensure!(
                Instant::now() < end,
                "API never answered: {r:?}\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn cli(&self, args: &[&str]) -> Result<Run> {
        self.cli_in(args, None)
    }

    /// `wsguard ARGS` with `WSGUARD_SOCKET` pointing at this agent and `stdin` fed if given.
    pub fn cli_in(&self, args: &[&str], stdin: Option<&Path>) -> Result<Run> {
        let mut c = Command::new(wsguard_bin()?);
        c.args(args).env("WSGUARD_SOCKET", self.socket());
        c.stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p)?),
            None => Stdio::null(),
        });
        run(&mut c, self.dir.path())
    }

    pub fn bans(&self) -> Result<Vec<Value>> {
        let r = self.cli(&["ban", "list", "-o", "json"])?;
        ensure!(r.code == 0, "ban list: {r:?}");
        Ok(r.json()?.as_array().context("array")?.clone())
    }

    /// The ban list without the fields that move by themselves.
    pub fn ban_set(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .bans()?
            .iter()
            .map(|b| {
                format!(
                    "{}/{} {} {} {}",
                    b["addr"], b["prefix_len"], b["source"], b["reason"], b["expires_at"]
                )
            })
            .collect())
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }
}

/// Run with a deadline, output into files: a 100k-line export would fill a pipe that nobody
/// reads until the process exits.
/// After a start with a full ban map: "ready" in the log (adopting or restoring 1M bans takes a
/// while), then `status` answering (`status()` runs it, true once it exits 0).
pub fn wait_full_start(a: &mut Agent, status: impl Fn() -> Result<bool>) -> Result<()> {
    a.wait_log(" ready", 1, Duration::from_secs(600))?;
    let end = Instant::now() + Duration::from_secs(60);
    while !status()? {
        ensure!(
            Instant::now() < end,
            "API never answered:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn run(c: &mut Command, dir: &Path) -> Result<Run> {
    let tag = wsguard_tests::netns::unique();
    let (o, e) = (
        dir.join(format!("out-{tag}")),
        dir.join(format!("err-{tag}")),
    );
    let mut child = c
        .stdout(std::fs::File::create(&o)?)
        .stderr(std::fs::File::create(&e)?)
        .spawn()
        .with_context(|| format!("spawn {c:?}"))?;
    let end = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{c:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let r = Run {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&o)?,
        stderr: std::fs::read_to_string(&e)?,
    };
    let _ = (std::fs::remove_file(o), std::fs::remove_file(e));
    Ok(r)
}

pub fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

pub fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

/// Seconds since the epoch of an RFC 3339 UTC time (`…Z`, optional fraction).
pub fn rfc3339(v: &Value) -> Result<f64> {
    let s = v.as_str().with_context(|| format!("not a string: {v}"))?;
    wsguard_tests::lab::expect::rfc3339_secs(s)
}

pub fn expect(r: &Run, code: i32, needles: &[&str]) -> Result<()> {
    ensure!(r.code == code, "expected exit {code}: {r:?}");
    for n in needles {
        ensure!(r.stderr.contains(n), "stderr lacks {n:?}: {r:?}");
    }
    Ok(())
}

pub fn check_ban_json(b: &Value) -> Result<()> {
    ensure!(
        keys(b)
            == set(&[
                "addr",
                "prefix_len",
                "source",
                "reason",
                "mode",
                "hard",
                "created_at",
                "expires_at",
                "dropped_packets",
                "offenses",
                "origin",
                "scenario"
            ]),
        "ban fields: {b}"
    );
    ensure!(!b["addr"].as_str().context("addr")?.contains('/'), "{b}");
    ensure!(b["prefix_len"].is_u64() && b["dropped_packets"].is_u64() && b["offenses"].is_u64());
    let source = b["source"].as_str().unwrap_or("");
    ensure!(["kernel", "log", "manual", "import", "crowdsec"].contains(&source));
    if source != "crowdsec" {
        ensure!(b["origin"].is_null() && b["scenario"].is_null(), "{b}");
    }
    ensure!(["enforce", "observe"].contains(&b["mode"].as_str().unwrap_or("")));
    ensure!(b["hard"].is_boolean() && b["reason"].is_string());
    rfc3339(&b["created_at"])?;
    if !b["expires_at"].is_null() {
        rfc3339(&b["expires_at"])?;
    }
    Ok(())
}

pub fn find<'a>(bans: &'a [Value], addr: &str) -> Result<&'a Value> {
    bans.iter()
        .find(|b| b["addr"] == addr)
        .with_context(|| format!("no ban of {addr} in {bans:?}"))
}
