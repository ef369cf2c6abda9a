//! The embedded data-plane object and how it is loaded.

use aya::{Ebpf, EbpfLoader};
use wsguard_common::maps::names;

/// The kernel programs, built by `build.rs` from `ebpf/wsguard-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsguard-ebpf"));

/// Load the object without pinning anything (tests, `explain`, benchmarks).
pub fn load_unpinned() -> Result<Ebpf, aya::EbpfError> {
    EbpfLoader::new().load(OBJECT)
}

/// Size the ban maps for `max_bans`, and `BAN_TABLE_V4` with its bucket bits (`bits`, from
/// `wsguard_common::table::bucket_bits(max_bans)`, borrowed for as long as the loader).
pub fn size<'a>(loader: &mut EbpfLoader<'a>, max_bans: u32, bits: &'a u32) {
    for name in crate::datapath::BAN_MAPS {
        loader.map_max_entries(name, max_bans);
    }
    loader.map_max_entries(names::BAN_TABLE_V4, 1 << *bits);
    loader.override_global(names::TABLE_BITS_V4, bits, true);
}
