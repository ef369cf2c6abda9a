//! Builds the kernel crate for the BPF target (nightly, `-Z build-std=core`) and leaves the
//! object in OUT_DIR, where `src/bpf.rs` embeds it. Reruns when the kernel crate or the shared
//! crate change.
use aya_build::{Package, Toolchain};

/// The dated nightly the kernel crate pins (see its rust-toolchain.toml for why).
fn ebpf_toolchain() -> anyhow::Result<String> {
    let path = "../ebpf/wsguard-ebpf/rust-toolchain.toml";
    println!("cargo:rerun-if-changed={path}");
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("{path}: no `channel = \"…\"` line"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/wsguard-common/src");
    let toolchain = ebpf_toolchain()?;
    aya_build::build_ebpf(
        [Package {
            name: "wsguard-ebpf",
            root_dir: "../ebpf/wsguard-ebpf",
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
