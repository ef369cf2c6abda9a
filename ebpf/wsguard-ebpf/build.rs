use which::which;

fn main() {
    // Rebuild the object when bpf-linker changes (e.g. `cargo xtask` reinstalled it against a
    // different LLVM): cargo cannot see the linker as an input.
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // The BPF CPU (v3, with its 32-bit ALU ops and atomic fetch-and-add) comes from
    // `-C target-cpu` in agent/build.rs, which builds this crate.
}
