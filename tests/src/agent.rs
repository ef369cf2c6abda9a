//! The real `wsguard agent` binary, run inside a lab namespace: started with `nsenter --net`
//! (not `ip netns exec`, whose private mount namespace would hide the pins from the next
//! start), logs captured to a file, killed on drop so a failing test leaves no process.

pub mod bans;
pub mod http;
pub mod lab;
pub mod stream;

pub use lab::AgentLab;

use anyhow::{Context as _, Result, bail};
use std::{
    ffi::CString,
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// `target/debug/wsguard` (under `CARGO_TARGET_DIR` when set), built once per test process
/// (the tests crate only links the library, so cargo does not build the binary for us).
pub fn wsguard_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // Without the test's CARGO_MANIFEST_DIR: ring's build script reruns when it
            // changes, and the next `cargo test` would rebuild ring, rustls and the agent.
            let st = Command::new(cargo)
                .env_remove("CARGO_MANIFEST_DIR")
                .args(["build", "-q", "-p", "wsguard", "--bin", "wsguard"])
                .current_dir(&root)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("cargo build -p wsguard: {st}"));
            }
            let target = match std::env::var_os("CARGO_TARGET_DIR") {
                // Relative: to the directory cargo ran in, `root`.
                Some(t) => root.join(t),
                None => root.join("target"),
            };
            Ok(target.join("debug/wsguard"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A running agent. `dir` holds its state, socket and log.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// `wsguard agent ARGS…` in `ns`.
    pub fn start(ns: &NetNs, log: &Path, args: &[&str]) -> Result<Self> {
        Self::start_env(ns, log, args, &[])
    }

    /// Like `start`, with extra environment (the `WSGUARD_TEST_*` hooks).
    pub fn start_env(ns: &NetNs, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(ns, log, args, env, |_| {})
    }

    /// Like `start_env`, with `setup` applied to the command before it is spawned, e.g.
    /// [`crate::seccomp::without_bpf_links`] to make the kernel answer like an older one.
    pub fn start_with(
        ns: &NetNs,
        log: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let bin = wsguard_bin()?;
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name()))
            .arg(&bin)
            .arg("agent")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        setup(&mut cmd);
        let child = cmd.spawn().context("spawn nsenter wsguard agent")?;
        Ok(Self {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The agent's pid (nsenter execs it, so the child's), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the agent is still running (not exited, not killed).
    pub fn is_running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log has `n` lines containing `needle`; fails early if the agent exits.
    pub fn wait_log(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= n {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!(
                    "agent exited ({st}) before {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > end {
                bail!("no {needle:?} within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (bounded) for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("agent not running")?;
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > end {
                bail!(
                    "agent still running after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait (10 s) for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.stop_within(Duration::from_secs(10))
    }

    /// SIGTERM and wait up to `timeout` for the exit (then SIGKILL and fail).
    pub fn stop_within(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("agent not running")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "agent still running {timeout:?} after SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill9();
        // For measuring by hand (scale runs): the agent's own timing lines, before the
        // temp directory holding its log goes.
        if std::env::var_os("WSGUARD_TEST_AGENT_TIMINGS").is_some() {
            for l in self.log_text().lines() {
                // Text logs colour field names; drop the escapes.
                let plain = l
                    .split('\x1b')
                    .enumerate()
                    .fold(String::new(), |mut acc, (i, p)| {
                        acc.push_str(if i == 0 {
                            p
                        } else {
                            p.split_once('m').map_or("", |x| x.1)
                        });
                        acc
                    });
                if plain.contains("ms=") {
                    eprintln!("[agent] {plain}");
                }
            }
        }
    }
}

/// Put raw Ethernet frames on `iface` inside `ns` (AF_PACKET), e.g. crafted handshakes.
pub fn send_frames(ns: &NetNs, iface: &str, frames: &[Vec<u8>]) -> Result<()> {
    let iface = iface.to_owned();
    ns.run(move || -> Result<()> {
        let name = CString::new(iface.as_str())?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is wrapped in an OwnedFd right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: all-zero sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for f in frames {
            // SAFETY: valid buffer and sockaddr of the given size.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                bail!("sendto {iface}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    })?
}
