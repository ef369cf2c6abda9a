//! The embedded data-plane object and how it is loaded.

use aya::{Ebpf, EbpfLoader};

/// The kernel programs, built by `build.rs` from `ebpf/wsguard-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsguard-ebpf"));

/// Load the object without pinning anything (tests, `explain`, benchmarks).
pub fn load_unpinned() -> Result<Ebpf, aya::EbpfError> {
    EbpfLoader::new().load(OBJECT)
}
