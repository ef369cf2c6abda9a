//! Small helpers for running commands and saying what is being done.

use anyhow::{Context as _, Result, bail};
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Run a command with inherited output; fail with the command line when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Run a command quietly and return its stdout if it succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Time a step and print how long it took; the durations are collected for a summary.
pub struct Timings(Vec<(String, f64)>);

impl Timings {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> {name}");
        let start = Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "<== {name}: {secs:.1}s{}",
            if r.is_err() { " (FAILED)" } else { "" }
        );
        self.0.push((name.to_owned(), secs));
        r
    }

    pub fn summary(&self) {
        println!("\n== timings ==");
        for (name, secs) in &self.0 {
            println!("{secs:>8.1}s  {name}");
        }
    }
}
