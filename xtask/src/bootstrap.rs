//! Install what building and testing wsguard needs, and only what is missing.
//!
//! Each prerequisite is checked cheaply first, so a second run does nothing and is fast. When
//! something cannot be installed here (not root, no network), the error names the prerequisite
//! and the exact command that installs it.

use anyhow::{Result, bail};
use std::process::Command;

use crate::cmd::{output, sh, show};

/// The kernel crate's dated nightly, read from its rust-toolchain.toml (the one place it is set).
pub fn nightly() -> Result<String> {
    let path = crate::cmd::root().join("ebpf/wsguard-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("{}: no `channel = \"…\"` line", path.display()))
}
/// bpf-linker is built against this LLVM (Debian's llvm-22 packages).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";
/// Libraries bpf-linker links to, and the headers it builds against.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Real peers the integration tests drive. `crowdsec` is the real LAPI of issue 13's tests
/// (each test runs its own, see `tests/src/crowdsec.rs`); `haproxy` the PROXY-protocol load
/// balancer of issue 12's.
pub const LAB_PACKAGES: &[&str] = &[
    "crowdsec",
    "haproxy",
    "iproute2",
    "iputils-ping",
    "nginx",
    "procps",
    "util-linux",
];
/// Debian's crowdsec registers with CrowdSec's Central API in its postinst unless this file
/// exists and is not empty; offline that registration fails and leaves dpkg broken for every
/// later apt call. The tests never use the Central API.
const CROWDSEC_ONLINE_CREDENTIALS: &str = "/etc/crowdsec/online_api_credentials.yaml";
/// The benchmark's peer (xdp-filter, from xdp-tools) and the namespace it runs in.
pub const BENCH_PACKAGES: &[&str] = &["iproute2", "xdp-tools"];

/// What a run did, for the summary line.
#[derive(Default)]
pub struct Report {
    pub installed: Vec<String>,
}

pub fn run_with(packages: &[&str]) -> Result<Report> {
    let mut report = Report::default();
    nightly_rust_src(&mut report)?;
    apt_packages(LLVM_PACKAGES.iter().chain(packages).copied(), &mut report)?;
    bpf_linker(&mut report)?;
    if report.installed.is_empty() {
        println!("bootstrap: all prerequisites present, nothing to do");
    } else {
        println!("bootstrap: installed {}", report.installed.join(", "));
    }
    Ok(report)
}

pub fn run() -> Result<Report> {
    run_with(&[])
}

fn nightly_rust_src(report: &mut Report) -> Result<()> {
    let nightly = nightly()?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &nightly,
    ]));
    let has = |c: &str| {
        installed
            .as_deref()
            .is_some_and(|l| l.lines().any(|x| x.starts_with(c)))
    };
    if has("rust-src") && has("clippy") && has("rustc") {
        println!("ok: {nightly} toolchain with rust-src and clippy");
        return Ok(());
    }
    if has("rust-src") && !has("rustc") {
        // Seen after two installs raced: rustup then calls the toolchain unchanged and never
        // puts rustc back.
        bail!(
            "the {nightly} toolchain is broken (components listed, rustc missing): remove it with \
             `rm -rf ~/.rustup/toolchains/{nightly}-*` and run `cargo xtask` again"
        );
    }
    println!(
        "missing: the {nightly} toolchain with rust-src and clippy (builds and lints the kernel \
         crate; a dated nightly because bpf-linker reads only LLVM 22 bitcode)"
    );
    // A dated channel: installing it never moves a toolchain the machine already has.
    let mut cmd = Command::new("rustup");
    cmd.args([
        "toolchain",
        "install",
        &nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy",
    ]);
    try_install(&mut cmd, &format!("{nightly} with rust-src"))?;
    report
        .installed
        .push(format!("{nightly} (rust-src, clippy)"));
    Ok(())
}

fn apt_packages<'a>(wanted: impl Iterator<Item = &'a str>, report: &mut Report) -> Result<()> {
    let missing: Vec<&str> = wanted.filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("ok: Debian packages present");
        return Ok(());
    }
    println!("missing Debian packages: {}", missing.join(" "));
    if missing.contains(&"crowdsec") && is_root() {
        crowdsec_offline()?;
    }
    if !is_root() {
        bail!(
            "cannot install {} without root; run: sudo apt-get update && sudo apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    try_install(
        Command::new("apt-get").arg("update").arg("-q"),
        "the apt package lists",
    )?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"])
        .args(&missing);
    try_install(&mut install, &missing.join(", "))?;
    report
        .installed
        .extend(missing.iter().map(|s| s.to_string()));
    Ok(())
}

/// Keep crowdsec's postinst offline (see [`CROWDSEC_ONLINE_CREDENTIALS`]).
fn crowdsec_offline() -> Result<()> {
    let p = std::path::Path::new(CROWDSEC_ONLINE_CREDENTIALS);
    if std::fs::metadata(p).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    println!(
        "writing {CROWDSEC_ONLINE_CREDENTIALS} first: crowdsec must not register with its Central API"
    );
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(
            p,
            "# Written by wsguard's bootstrap: no Central API (the tests run their own LAPI).\n\
             url: http://127.0.0.1:0/\n\
             login: none\n\
             password: none\n",
        )
    };
    write().map_err(|e| anyhow::anyhow!("cannot write {CROWDSEC_ONLINE_CREDENTIALS}: {e}"))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn bpf_linker(report: &mut Report) -> Result<()> {
    // Running it proves both that it is there and that the LLVM libraries it links to load.
    let version = output(Command::new("bpf-linker").arg("--version"));
    if let Some(v) = version.as_deref()
        && v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(BPF_LINKER_VERSION))
    {
        println!("ok: {}", v.trim());
        return Ok(());
    }
    match version {
        Some(v) => println!("bpf-linker {} found, want {BPF_LINKER_VERSION}.x", v.trim()),
        None => println!("missing: bpf-linker (links the BPF object; built against LLVM 22)"),
    }
    println!("building bpf-linker against {LLVM_PREFIX} (a few minutes)");
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--version",
        &format!("~{BPF_LINKER_VERSION}"),
        "--no-default-features",
        "--features",
        "llvm-22",
        "--locked",
        "--force",
    ]);
    try_install(&mut cmd, "bpf-linker")?;
    report.installed.push("bpf-linker".into());
    Ok(())
}

fn try_install(cmd: &mut Command, what: &str) -> Result<()> {
    sh(cmd).map_err(|e| {
        anyhow::anyhow!(
            "could not install {what}: {e}\n  install it by hand with: {}",
            show(cmd)
        )
    })
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}
