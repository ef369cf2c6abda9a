//! The ban sets: the same exact IPv4 bans in wsguard's `BANS_V4`, the reference's map and (as
//! far as it holds them) xdp-filter's `filter_ipv4`; CIDR bans for wsguard's own rows.

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, lpm_trie::Key};
use std::{net::Ipv4Addr, time::Instant};
use wsguard_common::{
    filter,
    maps::{BAN_NOT_ALLOWLISTED, BanValue, names},
};
use wsguard_tests::dataplane::boot_ns;

use crate::{Bench, run::check_stop};

/// Exact bans take every other address from 10.0.0.0 up, so each banned address has clean
/// neighbours in its own /24 at every ban count.
const EXACT_BASE: u32 = 0x0a00_0000;
pub const BANNED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);
pub const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);
/// Banned addresses whose bans wsguard's own rows rewrite with other flags.
pub const PRESERVING: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 8);
pub const UNCHECKED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// CIDR bans are /24s from 172.16.0.0 up.
const CIDR_BASE: u32 = 0xac10_0000;
pub const CIDR_BANNED: Ipv4Addr = Ipv4Addr::new(172, 16, 20, 7);

/// The reference program's maps (ebpf/wsguard-ebpf/src/bench.rs).
pub const REF_BANS_V4: &str = "REF_BANS_V4";
pub const REF_BANS_V6: &str = "REF_BANS_V6";

/// The `i`th exact ban.
pub fn exact(i: u32) -> [u8; 4] {
    (EXACT_BASE + 2 * i).to_be_bytes()
}

/// A ban as the agent writes it: created now, expiring in ten minutes, checked against the
/// allowlist.
pub fn ttl_ban() -> BanValue {
    let now = boot_ns();
    BanValue {
        created_ns: now,
        expires_ns: now + 600_000_000_000,
        flags: BAN_NOT_ALLOWLISTED,
        ..Default::default()
    }
}

impl Bench {
    /// Grow every program's exact IPv4 bans from `from` to `n` entries; xdp-filter stops at its
    /// map's size. Returns how many xdp-filter holds.
    pub fn fill_bans(&mut self, from: u32, n: u32) -> Result<u32> {
        let started = Instant::now();
        // The agent clears a ban's pre-filter bucket and host bit before it writes the ban.
        for bucket in u32::from_be_bytes(exact(from)) >> 8..=u32::from_be_bytes(exact(n - 1)) >> 8 {
            self.dp.set_filter_bit(bucket, false, false)?;
        }
        self.clear_host_bits(from, n)?;
        let value = ttl_ban();
        let mut bans = self.dp.bans_v4()?;
        for i in from..n {
            if i % 65_536 == 0 {
                check_stop()?;
            }
            bans.insert(exact(i), value, 0)?;
        }
        // As the agent writes them: in the table too, and a ban without a slot in BANS_V4
        // only, which makes the program look BANS_V4 up after every table miss.
        let table = self.dp.table()?;
        for i in from..n {
            if table.put(exact(i), &value, true).is_none() {
                self.no_slot += 1;
            }
        }
        drop(table);
        self.dp.set_table_whole(self.no_slot == 0)?;
        let mut reference: HashMap<&mut MapData, [u8; 4], BanValue> = HashMap::try_from(
            self.dp
                .ebpf
                .map_mut(REF_BANS_V4)
                .context("the object has no reference map")?,
        )?;
        for i in from..n {
            reference.insert(exact(i), value, 0)?;
        }
        let held = n.min(self.xdp_filter.capacity);
        for i in from.min(held)..held {
            self.xdp_filter.block(exact(i))?;
        }
        eprintln!(
            "  {n} bans written ({:.1}s; xdp-filter holds {held}; {} without a slot in BAN_TABLE_V4)",
            started.elapsed().as_secs_f64(),
            self.no_slot
        );
        Ok(held)
    }

    /// Clear the host-filter bits of exact bans `from..n`, a word at a time.
    fn clear_host_bits(&mut self, from: u32, n: u32) -> Result<()> {
        let mut words = std::collections::BTreeMap::<u32, u64>::new();
        for i in from..n {
            let (word, mask) = filter::host_slot(filter::host_bit(exact(i)));
            *words.entry(word).or_default() |= mask;
        }
        let mut a: Array<&mut MapData, u64> = Array::try_from(
            self.dp
                .ebpf
                .map_mut(names::HOST_FILTER)
                .context("the object has no host filter")?,
        )?;
        for (word, mask) in words {
            let w = a.get(&word, 0)?;
            a.set(word, w & !mask, 0)?;
        }
        Ok(())
    }

    pub fn fill_cidrs(&mut self, n: u32) -> Result<()> {
        for i in 0..n {
            let bucket = (CIDR_BASE + (i << 8)) >> 8;
            self.dp.set_filter_bit(bucket, false, false)?;
        }
        let value = ttl_ban();
        let mut trie = self.dp.ban_cidrs_v4()?;
        for i in 0..n {
            trie.insert(
                &Key::new(24, (CIDR_BASE + (i << 8)).to_be_bytes()),
                value,
                0,
            )?;
        }
        let mut cfg = self.dp.config()?;
        cfg.cidr_v4 = n;
        self.dp.set_config(&cfg)?;
        Ok(())
    }
}
