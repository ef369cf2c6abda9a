//! `cargo xtask demo`: the README's first command. Installs what is missing (the eBPF
//! toolchain, nginx, iproute2), builds wsguard and the lab in release mode, and runs the
//! incident scenario live (`wsguard-lab demo`), which tears everything down when it ends.

use anyhow::{Result, bail};
use std::process::Command;

use crate::{
    bootstrap::{self, LAB_PACKAGES},
    cmd::{output, root, sh},
};

pub fn run_demo() -> Result<()> {
    if output(Command::new("id").arg("-u"))
        .as_deref()
        .map(str::trim)
        != Some("0")
    {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root \
             (sudo -E cargo xtask demo)"
        );
    }
    bootstrap::run_with(LAB_PACKAGES)?;
    sh(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "wsguard",
        "--bin",
        "wsguard",
        "-p",
        "wsguard-tests",
        "--bin",
        "wsguard-lab",
        "--bin",
        "wsguard-lab-backend",
        "--bin",
        "wsguard-lab-client",
    ]))?;
    // The lab bounds every step and its own run (about a minute), and removes its namespaces,
    // processes and pins on every exit path.
    sh(Command::new(root().join("target/release/wsguard-lab")).arg("demo"))
}
