//! `cargo xtask bench`: the data-plane benchmark (`tests/src/bin/wsguard-bench/`: wsguard, a
//! reference program and xdp-filter side by side, with the bare floors, in one run) and the log
//! parsers' throughput (`agent/examples/logs_bench.rs`, lines per second on one core against
//! issue 7's 200k/s goal), both built in release mode, then the CrowdSec LAPI figures (issue 13)
//! and the agent at 10k/100k/1M bans (issue 14). They print what they measure; they
//! assert nothing.

use anyhow::{Result, bail};
use std::process::Command;

use crate::{
    bootstrap,
    cmd::{root, sh},
};

pub fn run() -> Result<()> {
    if !bootstrap::is_root() {
        bail!("the benchmark loads BPF programs: run it as root (sudo cargo xtask bench)");
    }
    bootstrap::run_with(bootstrap::BENCH_PACKAGES)?;
    sh(Command::new("cargo").current_dir(root()).args([
        "run",
        "--release",
        "--locked",
        "-p",
        "wsguard-tests",
        "--bin",
        "wsguard-bench",
    ]))?;
    println!("\nlog parsers, one core (goal: at least 200000 lines/s per format):");
    sh(Command::new("cargo").current_dir(root()).args([
        "run",
        "--release",
        "--locked",
        "-p",
        "wsguard",
        "--example",
        "logs_bench",
    ]))?;
    crowdsec()?;
    scale()
}

/// Issue 14: the agent at 10k, 100k and 1M bans (import, list, restart, RSS peaks;
/// `tests/src/bin/wsguard-scale-bench.rs`, next to the release `wsguard` it drives).
fn scale() -> Result<()> {
    println!("\nthe agent at scale: 10k, 100k and 1M bans:");
    release_bin("wsguard-scale-bench")
}

/// Issue 13: a real LAPI, 100k decisions at startup and 100k bans published
/// (`tests/src/bin/wsguard-lapi-bench.rs`, next to the release lab binaries it drives).
fn crowdsec() -> Result<()> {
    println!("\nCrowdSec LAPI: 100k decisions at startup, 100k bans published:");
    bootstrap::run_with(bootstrap::LAB_PACKAGES)?;
    release_bin("wsguard-lapi-bench")
}

/// Build the test crate's binaries and `wsguard` in release mode (a no-op once built: the
/// lab binaries a bench drives sit next to it), then run the bench binary `name`.
fn release_bin(name: &str) -> Result<()> {
    sh(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "wsguard-tests",
        "--bins",
        "-p",
        "wsguard",
        "--bin",
        "wsguard",
    ]))?;
    sh(&mut Command::new(root().join("target/release").join(name)))
}
