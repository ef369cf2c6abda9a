//! Builds the kernel crate for the BPF target (the pinned nightly, `-Z build-std=core`) and
//! leaves the object in OUT_DIR, where `src/bpf.rs` embeds it. Reruns when the kernel crate or
//! the shared crate change.
//!
//! This is aya-build's job, done here because aya-build 0.2 sets the nested build's rustflags
//! itself, with no way to add one: the BPF CPU. The default (`generic`, ISA v1) has no 32-bit
//! jumps, so every narrow comparison becomes a widen-and-mask sequence; v3 (kernel 5.1+, below
//! the 6.6 TCX needs) has them and 32-bit ALU ops, which also give BPF's atomic fetch-and-add
//! that the rate tracker's one-burst-per-window rule relies on. On this code, v3 is about a
//! quarter fewer instructions and 2-3 ns less per packet (`cargo xtask bench`). And LLVM may
//! read a header field or an address at any alignment with one load instead of byte by byte:
//! the verifier allows misaligned packet and map-value access where the CPU does it cheaply
//! (x86-64, arm64: `CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`); on others it would refuse the
//! program at load, loudly.
use anyhow::{Context as _, Result, bail};
use std::{env, fs, path::PathBuf, process::Command};

/// The BPF instruction set the kernel crate is compiled for (`-C target-cpu`, which rustc hands
/// to bpf-linker as `--cpu`).
const BPF_CPU: &str = "v3";
/// Handed to bpf-linker directly (rustc calls this LLVM 22 feature unstable and warns).
const BPF_FEATURES: &str = "+allows-misaligned-mem-access";
const CRATE: &str = "wsguard-ebpf";
const ROOT: &str = "../ebpf/wsguard-ebpf";

/// The dated nightly the kernel crate pins (see its rust-toolchain.toml for why).
fn ebpf_toolchain() -> Result<String> {
    let path = format!("{ROOT}/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("{path}: no `channel = \"…\"` line"))
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed={ROOT}");
    println!("cargo:rerun-if-changed=../ebpf/wsguard-common/src");
    let toolchain = ebpf_toolchain()?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    // aya-ebpf reads the architecture whose kernel structures it describes from this cfg.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        format!("-Ctarget-cpu={BPF_CPU}"),
        format!("-Clink-arg=--cpu-features={BPF_FEATURES}"),
    ]
    .join("\x1f");
    // Apart from OUT_DIR's artifacts, and from the outer build's lock.
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo", "build", "--package", CRATE])
        .args(["--bins", "--release", "--target", target])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer build's compiler settings are for the host toolchain, not the nightly.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        // A build script's stdout is read for `cargo:` lines; the nested build's goes to stderr.
        .stdout(std::io::stderr());
    let status = cmd
        .status()
        .with_context(|| format!("run {cmd:?} (rustup is installed by `cargo xtask`)"))?;
    if !status.success() {
        bail!("building the kernel crate failed ({status}): {cmd:?}");
    }
    let built = target_dir.join(target).join("release").join(CRATE);
    let dst = out_dir.join(CRATE);
    fs::copy(&built, &dst)
        .with_context(|| format!("copy {} to {}", built.display(), dst.display()))?;
    Ok(())
}
