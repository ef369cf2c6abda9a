//! Python tools the test suite drives, installed from PyPI like the rest of the bootstrap: only
//! what is missing, saying what it does, so a second run does nothing.

use anyhow::{Result, anyhow};
use std::process::Command;

use crate::cmd::{output, sh, show};

/// Validates the deploy/ manifests against the Kubernetes JSON schemas, which the package
/// bundles (the tests run with no network but the package registries). Pinned: its version
/// decides which Kubernetes releases the manifests are checked against.
pub const PY_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0"];

/// Install the `pkgs` (pip requirement strings, `name` or `name==version`) that
/// `python3 -m pip show` does not report at the wanted version.
pub fn pip_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !pip_installed(p)).collect();
    if missing.is_empty() {
        println!("ok: Python packages present ({})", pkgs.join(", "));
        return Ok(());
    }
    println!("missing Python packages: {}", missing.join(" "));
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    // pip warns about running as root on every install; the bootstrap runs as root by design.
    if crate::bootstrap::is_root() {
        cmd.arg("--root-user-action=ignore");
    }
    cmd.args(&missing);
    if sh(&mut cmd).is_ok() {
        return Ok(());
    }
    // A distribution's own Python (PEP 668, "externally managed") refuses pip installs; the
    // test suite runs as root on a throwaway machine, so install beside the distribution's
    // packages, as pip's own error message suggests.
    if externally_managed() {
        println!("python3 is externally managed (PEP 668): retrying with --break-system-packages");
        cmd.arg("--break-system-packages");
        if sh(&mut cmd).is_ok() {
            return Ok(());
        }
    }
    Err(anyhow!(
        "could not install {}\n  install it by hand with: {}",
        missing.join(", "),
        show(&cmd)
    ))
}

fn externally_managed() -> bool {
    output(Command::new("python3").args([
        "-c",
        "import sysconfig, os; print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
    ]))
    .is_some_and(|o| o.trim() == "True")
}

fn pip_installed(req: &str) -> bool {
    let (name, version) = req.split_once("==").unwrap_or((req, ""));
    let Some(info) = output(Command::new("python3").args(["-m", "pip", "show", name])) else {
        return false;
    };
    version.is_empty()
        || info.lines().any(|l| {
            l.strip_prefix("Version:")
                .is_some_and(|v| v.trim() == version)
        })
}
