//! Loading the embedded object: which maps are pinned where, their sizes, and whether the
//! pinned maps still match what this build would create.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapInfo},
    programs::{SchedClassifier, Xdp},
};
use wsguard_common::maps::{
    BanValue, Config, FlowKey, FlowValue, ProxySenderValue, RateValue, names, programs,
};

use wsguard_common::table::{self, BanBucket};

use super::DataPathError;
use crate::bpf::OBJECT;

/// Maps shared across program generations, pinned under `maps/`. `SCRATCH` is left out on
/// purpose: it is per-program working memory, and a fresh one per load means its layout can
/// change freely between builds. `BAN_FILTER` is pinned so that an adopted program and the agent
/// writing bans share one pre-filter (an unpinned one per load would let the running program
/// read a stale bitmap); a migration starts it empty and the open refills it. `HOST_FILTER` is
/// pinned for the same reason; a generation from before it gets one created (empty: "look
/// up") at its next open.
pub const PINNED_MAPS: [&str; 18] = [
    names::CONFIG,
    names::PORTS,
    names::COUNTERS,
    names::BANS_V4,
    names::BANS_V6,
    names::BAN_CIDRS_V4,
    names::BAN_CIDRS_V6,
    names::ALLOW_V4,
    names::ALLOW_V6,
    names::FLOWS,
    names::RATES,
    names::BURSTS,
    names::BAN_FILTER,
    names::HOST_FILTER,
    names::BAN_TABLE_V4,
    names::PROXY_FROM_V4,
    names::PROXY_FROM_V6,
    names::PROXY_SENDERS,
];

pub const BAN_MAPS: [&str; 4] = [
    names::BANS_V4,
    names::BANS_V6,
    names::BAN_CIDRS_V4,
    names::BAN_CIDRS_V6,
];

/// FNV-1a of the object: stable across compilers, so two agent binaries carrying the same
/// kernel object agree that the running program is theirs.
pub fn build_id() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Load the object (maps created, or reused from `map_dir` when pinned there) and both
/// programs into the kernel, unattached.
pub fn load(map_dir: Option<&Path>, max_bans: u32) -> Result<Ebpf, DataPathError> {
    let mut loader = EbpfLoader::new();
    let bits = table::bucket_bits(max_bans);
    crate::bpf::size(&mut loader, max_bans, &bits);
    let settings = map_dir.map(pinned_settings).transpose()?.flatten();
    if let Some(dir) = map_dir {
        for name in PINNED_MAPS {
            loader.map_pin_path(names::in_object(name), dir.join(name));
        }
    }
    // The loader writes the settings section's value into its map, pinned or fresh: written
    // back as they are, the running generation's settings stay what they were.
    if let Some(cfg) = &settings {
        loader.override_global(names::CONFIG, cfg, true);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| DataPathError::Other(format!("load the BPF object: {e}")))?;
    let xdp: &mut Xdp = program(&mut ebpf, programs::XDP)?;
    xdp.load().map_err(|e| {
        DataPathError::Other(format!("the verifier rejected {}: {e:?}", programs::XDP))
    })?;
    let tc: &mut SchedClassifier = program(&mut ebpf, programs::TC_EGRESS)?;
    tc.load().map_err(|e| {
        DataPathError::Other(format!(
            "the verifier rejected {}: {e:?}",
            programs::TC_EGRESS
        ))
    })?;
    Ok(ebpf)
}

/// The settings pinned in `dir`, if a `CONFIG` is pinned there.
fn pinned_settings(dir: &Path) -> Result<Option<Config>, DataPathError> {
    let path = dir.join(names::CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let read = || -> Result<Config, String> {
        let data = MapData::from_pin(&path).map_err(|e| e.to_string())?;
        let map = Array::<_, Config>::try_from(Map::Array(data)).map_err(|e| e.to_string())?;
        map.get(&0, 0).map_err(|e| e.to_string())
    };
    read()
        .map(Some)
        .map_err(|e| DataPathError::Other(format!("read the pinned {}: {e}", path.display())))
}

pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DataPathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| DataPathError::Other(format!("program {name} missing from the object")))?;
    p.try_into()
        .map_err(|_| DataPathError::Other(format!("program {name} has an unexpected type")))
}

/// Why the maps pinned in `dir` cannot be reused by this build as they are, if they cannot:
/// a key or value size differs, or the ban maps were sized for another `--max-bans`.
pub fn pinned_mismatch(dir: &Path, max_bans: u32) -> Option<String> {
    let sizes = |k: usize, v: usize| (k as u32, v as u32);
    let lpm = |k: usize| 4 + k;
    let expected: [(&str, (u32, u32), Option<u32>); 14] = [
        (names::CONFIG, sizes(4, size_of::<Config>()), None),
        (names::PORTS, sizes(4, 1), None),
        (names::COUNTERS, sizes(4, 8), None),
        (
            names::BANS_V4,
            sizes(4, size_of::<BanValue>()),
            Some(max_bans),
        ),
        (
            names::BANS_V6,
            sizes(16, size_of::<BanValue>()),
            Some(max_bans),
        ),
        (
            names::BAN_CIDRS_V4,
            sizes(lpm(4), size_of::<BanValue>()),
            Some(max_bans),
        ),
        (
            names::BAN_CIDRS_V6,
            sizes(lpm(16), size_of::<BanValue>()),
            Some(max_bans),
        ),
        (names::ALLOW_V4, sizes(lpm(4), 4), None),
        (names::ALLOW_V6, sizes(lpm(16), 4), None),
        (
            names::FLOWS,
            sizes(size_of::<FlowKey>(), size_of::<FlowValue>()),
            None,
        ),
        (names::RATES, sizes(16, size_of::<RateValue>()), None),
        (names::PROXY_FROM_V4, sizes(lpm(4), 4), None),
        (names::PROXY_FROM_V6, sizes(lpm(16), 4), None),
        (
            names::PROXY_SENDERS,
            sizes(16, size_of::<ProxySenderValue>()),
            None,
        ),
    ];
    for (name, (key, value), max) in expected {
        let info = match MapInfo::from_pin(dir.join(name)) {
            Ok(i) => i,
            Err(e) => return Some(format!("{name}: not pinned ({e})")),
        };
        if (info.key_size(), info.value_size()) != (key, value) {
            return Some(format!(
                "{name}: key/value {}/{} bytes, this build uses {key}/{value}",
                info.key_size(),
                info.value_size()
            ));
        }
        if let Some(max) = max.filter(|m| *m != info.max_entries()) {
            return Some(format!(
                "{name}: {} entries, --max-bans asks for {max}",
                info.max_entries()
            ));
        }
    }
    // A generation from before the table gets one at its next open (empty: the program looks
    // BANS_V4 up until the open fills it); one of another size is this build's no more.
    if let Ok(info) = MapInfo::from_pin(dir.join(names::BAN_TABLE_V4)) {
        let want = 1u32 << table::bucket_bits(max_bans);
        if (info.value_size() as usize, info.max_entries()) != (size_of::<BanBucket>(), want) {
            return Some(format!(
                "{}: {} buckets of {} bytes, this build uses {want} of {}",
                names::BAN_TABLE_V4,
                info.max_entries(),
                info.value_size(),
                size_of::<BanBucket>()
            ));
        }
    }
    if MapInfo::from_pin(dir.join(names::BURSTS)).is_err() {
        return Some(format!("{}: not pinned", names::BURSTS));
    }
    None
}
