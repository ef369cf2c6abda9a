//! `cargo xtask bench`: the data-plane benchmark (`tests/src/bin/wsguard-bench.rs`), built in
//! release mode and run as root. It prints ratios measured side by side; it asserts nothing.

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
    bootstrap::run()?;
    sh(Command::new("cargo").current_dir(root()).args([
        "run",
        "--release",
        "--locked",
        "-p",
        "wsguard-tests",
        "--bin",
        "wsguard-bench",
    ]))
}
