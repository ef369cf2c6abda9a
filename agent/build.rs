//! Builds the kernel crate for the BPF target (nightly, `-Z build-std=core`) and leaves the
//! object in OUT_DIR, where `src/bpf.rs` embeds it. Reruns when the kernel crate or the shared
//! crate change.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/wsguard-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "wsguard-ebpf",
            root_dir: "../ebpf/wsguard-ebpf",
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
