//! A lab process (backend, nginx, a client) run in a namespace with `ip netns exec`, its output
//! captured to files. It gets a process group of its own so that drop kills it and everything
//! it started (nginx's workers) even when a test fails halfway.

use anyhow::{Context as _, Result, bail};
use serde::de::DeserializeOwned;
use std::{
    ffi::OsStr,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    /// Start `program args…` inside `ns`; output goes to `dir/<name>.out` and `.err`.
    pub fn spawn<S: AsRef<OsStr>>(
        ns: &NetNs,
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[S],
    ) -> Result<Self> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout)?)
            .stderr(fs::File::create(&stderr)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn out_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn err_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it is still running (false once it exited or was killed).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until stdout contains `needle`; fails at once if the process exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if self.out_text().contains(needle) {
                return Ok(());
            }
            if !self.running() {
                bail!(
                    "{} exited before printing {needle:?}:\n{}{}",
                    self.name,
                    self.out_text(),
                    self.err_text()
                );
            }
            if Instant::now() > end {
                bail!("{} did not print {needle:?} within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last line of stdout that parses as `T` (the clients' progress and final summaries).
    pub fn last_json<T: DeserializeOwned>(&self) -> Option<T> {
        self.out_text()
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the process group this Proc created.
            unsafe { libc::kill(-pid, sig) };
        }
    }

    /// Wait for the process to exit by itself, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > end {
                self.child = Some(child);
                self.kill();
                bail!("{} still running after {timeout:?}: killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for a client to finish its run and return its final summary.
    pub fn finish<T: DeserializeOwned>(mut self, timeout: Duration) -> Result<T> {
        let st = self.wait(timeout)?;
        if !st.success() {
            bail!("{} failed ({st}):\n{}", self.name, self.err_text());
        }
        self.last_json()
            .with_context(|| format!("{} printed no summary:\n{}", self.name, self.out_text()))
    }

    /// SIGTERM (clients print their summary and exit), then the final summary.
    pub fn stop<T: DeserializeOwned>(self, timeout: Duration) -> Result<T> {
        self.signal(libc::SIGTERM);
        self.finish(timeout)
    }

    /// SIGKILL the whole group and reap the child.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group this Proc created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
