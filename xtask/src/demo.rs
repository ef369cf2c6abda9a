//! `cargo xtask demo`: the README's first command.

use anyhow::Result;
use std::process::Command;

use crate::{
    bootstrap,
    cmd::{root, sh},
};

pub fn run_demo() -> Result<()> {
    bootstrap::run()?;
    sh(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "wsguard"]))?;
    let bin = root().join("target/release/wsguard");
    println!("\nwsguard is built: {}\n", bin.display());
    sh(Command::new(&bin).args(["agent", "--help"]))
}
