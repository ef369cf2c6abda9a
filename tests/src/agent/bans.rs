//! Many distinct bans for the scale tests (`agent_scale`, `agent_cgroup`): the import text and
//! the set the kernel must then hold, and that set read back from the pinned maps.

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData};
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};
use wsguard_common::maps::{BanValue, names};

/// Every entry of the four pinned ban maps, as `addr/prefix` text.
pub fn kernel_ban_set(pin_dir: &Path) -> Result<BTreeSet<String>> {
    let open = |name: &str| -> Result<MapData> {
        let p = pin_dir.join("maps").join(name);
        MapData::from_pin(&p).with_context(|| format!("open pinned {}", p.display()))
    };
    let mut out = BTreeSet::new();
    let v4: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(Map::HashMap(open(names::BANS_V4)?))?;
    for k in v4.keys() {
        out.insert(format!("{}/32", Ipv4Addr::from(k?)));
    }
    let v6: HashMap<_, [u8; 16], BanValue> =
        HashMap::try_from(Map::HashMap(open(names::BANS_V6)?))?;
    for k in v6.keys() {
        out.insert(format!("{}/128", Ipv6Addr::from(k?)));
    }
    let c4: LpmTrie<_, [u8; 4], BanValue> =
        LpmTrie::try_from(Map::LpmTrie(open(names::BAN_CIDRS_V4)?))?;
    for k in c4.keys() {
        let k = k?;
        out.insert(format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()));
    }
    let c6: LpmTrie<_, [u8; 16], BanValue> =
        LpmTrie::try_from(Map::LpmTrie(open(names::BAN_CIDRS_V6)?))?;
    for k in c6.keys() {
        let k = k?;
        out.insert(format!("{}/{}", Ipv6Addr::from(k.data()), k.prefix_len()));
    }
    Ok(out)
}

/// `n` distinct bans: mostly IPv4 and IPv6 hosts, and a few networks (which take the per-entry
/// path: LPM tries have no batch operations). Returns the import text and the expected set.
pub fn ban_list_text(n: u32) -> (String, BTreeSet<String>) {
    let mut text = String::from("# scale test\n");
    let mut want = BTreeSet::new();
    for i in 0..n {
        let (line, key) = match i % 10 {
            // 198.18.0.0/15 has 131072 addresses (the lab uses 198.18.0.0/24): a 1M test needs
            // IPv6 for most hosts.
            0 if i / 10 < 100_000 => {
                let a = Ipv4Addr::from(0xc612_0100 + i / 10);
                (a.to_string(), format!("{a}/32"))
            }
            1 if i % 1000 == 1 => {
                let a = Ipv6Addr::new(0xfd00, 0x5c, (i >> 16) as u16, i as u16, 0, 0, 0, 0);
                (format!("{a}/64"), format!("{a}/64"))
            }
            _ => {
                let a = Ipv6Addr::new(0xfd00, 0x5a, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
                (a.to_string(), format!("{a}/128"))
            }
        };
        text.push_str(&line);
        text.push('\n');
        want.insert(key);
    }
    (text, want)
}
