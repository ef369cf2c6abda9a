//! `cargo xtask test`: the README's test command, and what CI runs.

use anyhow::{Result, bail};
use std::process::Command;

use crate::{
    bootstrap::{self, LAB_PACKAGES},
    bootstrap_py,
    cmd::{Timings, root, sh},
};

pub fn run_all(t: &mut Timings) -> Result<()> {
    if !bootstrap::is_root() {
        bail!(
            "the test suite loads BPF programs and creates network namespaces: run it as root \
             (sudo cargo xtask test)"
        );
    }
    t.step("bootstrap", || {
        bootstrap::run_with(LAB_PACKAGES)?;
        bootstrap_py::pip_packages(bootstrap_py::PY_PACKAGES)
    })?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(root());
        c
    };
    t.step("format", || {
        sh(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    t.step("build", || {
        sh(cargo().args(["build", "--all-targets", "--locked"]))
    })?;
    t.step("clippy (userspace)", || {
        sh(cargo().args([
            "clippy",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    let nightly = format!("+{}", bootstrap::nightly()?);
    t.step("clippy (kernel crate, BPF target)", || {
        sh(cargo().args([
            nightly.as_str(),
            "clippy",
            "--package",
            "wsguard-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    t.step("tests (unit, kernel, integration)", || {
        sh(cargo().args(["test", "--locked", "--no-fail-fast"]))
    })
}

pub fn run() -> Result<()> {
    let mut t = Timings::new();
    let r = run_all(&mut t);
    t.summary();
    r
}
