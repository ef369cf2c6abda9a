use which::which;

fn main() {
    // Rebuild the object when bpf-linker changes (e.g. `cargo xtask` reinstalled it against a
    // different LLVM): cargo cannot see the linker as an input.
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // 32-bit ALU ops, which also enable BPF's atomic fetch-and-add (kernel 5.12+): the rate
    // tracker needs the value an atomic add returned to emit exactly one burst per window.
    // (rustc already passes `--cpu`, so the feature is added on its own.)
    println!("cargo:rustc-link-arg-bins=--cpu-features=+alu32");
}
