//! The agent's handle on the kernel side: load or adopt the pinned programs and maps, attach
//! them to interfaces, and read and write the maps.
//!
//! Pin directory layout (`--pin-dir`, default `/sys/fs/bpf/wsguard`, every directory 0700):
//!
//! ```text
//! <pin_dir>/layout                 symlink -> "layout-v<LAYOUT_VERSION>-build-<fnv64 of OBJECT>"
//! <pin_dir>/maps/<NAME>            every map of wsguard_common::maps::names except SCRATCH
//! <pin_dir>/maps_new/<NAME>        only during a migration: the fresh maps, before the swap
//! <pin_dir>/links/<iface>_xdp      pinned XDP bpf_link (or symlink "netlink:<mode>" if aya fell
//!                                  back to a netlink attachment, which cannot be pinned)
//! <pin_dir>/links/<iface>_xdpmode  symlink -> "native" | "generic"
//! <pin_dir>/links/<iface>_tc       pinned TCX bpf_link (or symlink "clsact:<prio>:<handle>")
//! ```
//!
//! bpffs holds no regular files, hence the symlinks as records; it refuses dots in names, hence
//! `_` separators and `%2e` for a dot in an interface name.
//!
//! Lifecycle: [`DataPath::open`] adopts the pinned generation when it is this build and its
//! programs run on the pinned maps (same program and link ids, nothing touched), swaps a
//! different build in through each pinned link (`bpf_link_update`, reusing the pinned maps)
//! and, when the pinned layout differs, first copies every entry into fresh maps
//! (`maps_new/`), converted from the pinned layout (the one CONFIG records) to this build's
//! (`migrate`: layout 1 to 2 sets `BAN_MAY_PRESERVE` on every ban), swaps, then renames them
//! over `maps/`. A pinned layout newer than this build's is refused, leaving that generation
//! enforcing untouched: an older build cannot know what the newer one's entries mean. A program
//! found running on maps other than the pinned ones (a migration interrupted between its swap
//! and its renames) is swapped too, and leftover `maps_new/` pins are removed. Dropping a
//! `DataPath`, or the process dying, detaches nothing (fail-static); [`DataPath::detach_all`] is
//! the kill switch.
//!
//! Test hooks ([`OpenHooks`], or the environment for a separate process):
//! `WSGUARD_TEST_LAYOUT_VERSION=N` makes this build claim layout version N (a pinned
//! generation with another version is migrated), `WSGUARD_TEST_BUILD_ID=<hex>` makes it claim
//! another build (forcing the atomic swap), `WSGUARD_TEST_TC_CLSACT=1` skips TCX.

mod allowflag;
mod attach;
mod batch;
mod loader;
mod maps;
mod migrate;
mod open;
mod pins;
mod prefilter;
mod preserve;
mod proxy;
mod sys;
pub mod table;

use std::{net::IpAddr, os::fd::AsRawFd as _, path::PathBuf};

use wsguard_common::maps::{BanValue, BurstEvent, COUNTERS_LEN, Config, FlowKey, FlowValue};

use crate::{addr::Cidr, api::InterfaceJson};

pub use batch::{LiveFlows, PutBansError, WriteStats};
pub use loader::{BAN_MAPS, build_id};
pub use pins::Layout;
pub use proxy::{ProxyCounters, ProxyHeaderCounts, ProxySender, real_client};

/// How to attach XDP (PRODUCT.md `--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode if the driver supports it, else generic.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug)]
pub struct DataPathOptions {
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Capacity of each ban map (`--max-bans`).
    pub max_bans: u32,
}

/// Overrides for tests of the upgrade paths (one build cannot otherwise test meeting another).
#[derive(Clone, Debug, Default)]
pub struct OpenHooks {
    /// Pretend this build's map layout version is this one.
    pub layout_version: Option<u32>,
    /// Pretend this build's object hash is this one.
    pub build_id: Option<u64>,
    /// Attach TC egress through clsact even where TCX exists.
    pub force_clsact: bool,
}

impl OpenHooks {
    /// The hooks set in the environment (`WSGUARD_TEST_*`), for tests that run the binary.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            layout_version: var("WSGUARD_TEST_LAYOUT_VERSION").and_then(|v| v.parse().ok()),
            build_id: var("WSGUARD_TEST_BUILD_ID").and_then(|v| u64::from_str_radix(&v, 16).ok()),
            force_clsact: var("WSGUARD_TEST_TC_CLSACT").is_some_and(|v| v != "0"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("the ban map is full ({capacity} entries): new bans are refused, old ones stay")]
    Full { capacity: u32 },
    /// Pinning is impossible: enforce mode cannot survive restarts, so it refuses to start.
    #[error("enforce mode needs bpffs at the pin directory {path}: {detail}")]
    NotBpffs { path: PathBuf, detail: String },
    #[error("{0}")]
    Other(String),
}

/// Global counters summed over CPUs, indexed by `wsguard_common::maps::Counter`.
pub type Counters = [u64; COUNTERS_LEN as usize];

pub struct DataPath {
    maps: maps::Maps,
    pins: Option<pins::PinDir>,
    max_bans: u32,
    /// Entries across the four ban maps; kept by put/del so the cap needs no map walk.
    ban_entries: u64,
    interfaces: Vec<InterfaceJson>,
    netlink_fallbacks: u64,
    /// Bursts read from an old generation's ring during a migration.
    pending: Vec<BurstEvent>,
    /// The ban pre-filter as written to the kernel, with what each bucket is covered by.
    prefilter: prefilter::Prefilter,
    /// The allowlist, to decide each ban's `BAN_NOT_ALLOWLISTED` flag.
    allows: allowflag::AllowIndex,
    /// Bans written by `put_ban` whose `BAN_MAY_PRESERVE` `settle_preserve` has to decide.
    preserve_pending: std::collections::HashSet<Cidr>,
}

impl DataPath {
    /// Load the embedded object, or adopt what is pinned under `pin_dir` (replacing an older
    /// program atomically through its pinned link and migrating changed maps), attach to every
    /// interface, pin maps and links. Honors the `WSGUARD_TEST_*` hooks of the environment.
    pub fn open(opts: &DataPathOptions) -> Result<Self, DataPathError> {
        Self::open_with(opts, &OpenHooks::from_env())
    }

    pub fn open_with(opts: &DataPathOptions, hooks: &OpenHooks) -> Result<Self, DataPathError> {
        open::open(opts, hooks)
    }

    /// Load and attach without pinning (when `open` said bpffs is unavailable and the daemon
    /// runs in observe mode): nothing survives the process.
    pub fn open_unpinned(opts: &DataPathOptions) -> Result<Self, DataPathError> {
        open::open_unpinned(opts)
    }

    fn assemble(
        mut maps: maps::Maps,
        pins: Option<pins::PinDir>,
        opts: &DataPathOptions,
        interfaces: Vec<InterfaceJson>,
        netlink_fallbacks: u64,
        pending: Vec<BurstEvent>,
    ) -> Result<Self, DataPathError> {
        let allows = allowflag::AllowIndex::new(&maps.allows(1 << 16)?);
        // One walk of the maps, a chunk at a time: a million bans are never all in memory.
        let (mut v4, mut v6, mut entries) = (0, 0, 0u64);
        let mut prefilter = prefilter::Prefilter::empty();
        let mut reflag = Vec::new();
        // The table gets every exact IPv4 ban the walk meets (a crash between a BANS_V4 write
        // and its table write left it out, or stale); slots the walk does not meet hold no ban.
        let table = maps.table_v4.as_ref();
        let mut met = vec![0u64; table.map_or(0, |t| t.slots().div_ceil(64))];
        let mut short = false;
        maps.each_ban(opts.max_bans as usize + 1, &mut |chunk| {
            for (c, v) in chunk {
                entries += 1;
                if let (Some(t), IpAddr::V4(a), true) = (table, c.addr(), c.is_host()) {
                    // The walk's value already counts the slot's drops: the slot keeps them.
                    match t.put(a.octets(), v, false) {
                        Some(s) => met[s.index() / 64] |= 1 << (s.index() % 64),
                        None => short = true,
                    }
                }
                if !c.is_host() {
                    if c.is_v4() {
                        v4 += 1;
                    } else {
                        v6 += 1;
                    }
                }
                prefilter.add_unsealed(c);
                let flagged = allows.flagged(c, v);
                if flagged.flags != v.flags {
                    reflag.push((*c, flagged));
                }
            }
            Ok(())
        })?;
        if let Some(t) = table {
            for (s, _) in t
                .occupied()
                .filter(|(s, _)| met[s.index() / 64] & (1 << (s.index() % 64)) == 0)
                .collect::<Vec<_>>()
            {
                t.release(s);
            }
        }
        drop(met);
        if short {
            maps.table_is_short().map_err(maps::err("write CONFIG"))?;
        } else if maps.table_v4.is_some() {
            maps.table_is_whole()?;
        }
        // A crash between a count update and the trie write leaves the count high; make it
        // exact again now that nobody else writes.
        let mut cfg = maps.config()?;
        if (cfg.cidr_v4, cfg.cidr_v6) != (v4, v6) {
            (cfg.cidr_v4, cfg.cidr_v6) = (v4, v6);
            maps.write_config(&cfg)?;
        }
        // Whatever the map holds (fresh zeros, a migration's empty one, an older agent's) is
        // replaced by the bitmap of the bans now in the maps; nobody else writes bans.
        prefilter.seal();
        prefilter.write_all(&maps.ban_filter, maps.host_filter()?)?;
        let mut dp = Self {
            maps,
            pins,
            max_bans: opts.max_bans,
            ban_entries: entries,
            interfaces,
            netlink_fallbacks,
            pending,
            prefilter,
            allows,
            preserve_pending: std::collections::HashSet::new(),
        };
        dp.reconcile_flags(&reflag)?;
        Ok(dp)
    }

    /// The kill switch: detach every program and remove every pin under `pin_dir`. BPF links
    /// are found through their pins from any namespace; clsact filters (kernels without TCX)
    /// are found by interface name, so call this in the interfaces' network namespace.
    pub fn detach_all(pin_dir: &std::path::Path) -> Result<(), DataPathError> {
        pins::detach_all(pin_dir)
    }

    /// Write the runtime settings. The CIDR counts, the layout version, the generation counter
    /// and the PROXY bits (`CFG_DATAPATH_BITS`) belong to the data path and are kept as they
    /// are, whatever `cfg` holds; the counter moves on, as settings may change what a held
    /// verdict said.
    pub fn set_config(&mut self, cfg: &Config) -> Result<(), DataPathError> {
        use wsguard_common::maps::{CFG_DATAPATH_BITS, CFG_GENERATION, CFG_GENERATION_ONE};
        let cur = self.maps.config()?;
        let generation = (cur.flags & CFG_GENERATION).wrapping_add(CFG_GENERATION_ONE);
        // The PROXY trust and cut-mark bits belong to the data path too (`set_proxy_trust`,
        // `cut_flows`): kept as they are.
        let owned = cur.flags & CFG_DATAPATH_BITS & !CFG_GENERATION;
        let next = Config {
            cidr_v4: cur.cidr_v4,
            cidr_v6: cur.cidr_v6,
            layout_version: cur.layout_version,
            flags: (cfg.flags & !CFG_DATAPATH_BITS) | owned | generation,
            ..*cfg
        };
        self.maps.write_config(&next)
    }

    pub fn config(&self) -> Result<Config, DataPathError> {
        self.maps.config()
    }

    /// Watch exactly `ports`.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), DataPathError> {
        self.maps.set_ports(ports)
    }

    /// Insert or replace a ban (exact map for a host, CIDR trie otherwise; keeps `cidr_v4/v6`
    /// counts in CONFIG right). Preserves the existing drop counter when replacing.
    pub fn put_ban(&mut self, cidr: &Cidr, value: &BanValue) -> Result<(), DataPathError> {
        let existing = self.maps.get_ban(cidr)?;
        if existing.is_none() && self.ban_entries >= u64::from(self.max_bans) {
            return Err(DataPathError::Full {
                capacity: self.max_bans,
            });
        }
        let mut v = self.allows.flagged(cidr, value);
        // At once; `settle_preserve` clears it unless a flow may be preserved.
        v.flags |= wsguard_common::maps::BAN_MAY_PRESERVE;
        if let Some(old) = existing {
            // Drops the kernel counts between this read and the write are lost: a handful.
            v.drops = old.drops;
        }
        let counted = existing.is_none() && !cidr.is_host();
        if counted {
            // Count first: a crash before the insert leaves the count high, which only costs
            // the data plane a trie walk; low would skip a live CIDR ban.
            self.maps
                .adjust_cidr_count(cidr.is_v4(), |n| n.saturating_add(1))?;
        }
        let mut dirty = Vec::new();
        if existing.is_none() {
            // The kernel must look this bucket up before the ban exists.
            self.prefilter.add(cidr, &mut dirty);
            self.prefilter
                .write(&self.maps.ban_filter, self.maps.host_filter()?, &mut dirty)?;
        }
        if let Err(e) = self.maps.insert_ban(cidr, &v) {
            if counted {
                self.maps
                    .adjust_cidr_count(cidr.is_v4(), |n| n.saturating_sub(1))?;
            }
            if existing.is_none() {
                self.prefilter.remove(cidr, &mut dirty);
                self.prefilter.write(
                    &self.maps.ban_filter,
                    self.maps.host_filter()?,
                    &mut dirty,
                )?;
            }
            return Err(maps::ban_err(&e, *cidr, self.max_bans));
        }
        if existing.is_none() {
            self.ban_entries += 1;
        }
        self.preserve_pending.insert(*cidr);
        batch::wrote(1);
        Ok(())
    }

    pub fn del_ban(&mut self, cidr: &Cidr) -> Result<(), DataPathError> {
        if self.maps.remove_ban(cidr)? {
            self.maps.bump_generation()?;
            self.ban_entries = self.ban_entries.saturating_sub(1);
            // Only after the delete: the bucket is clean once no ban covers it.
            let mut dirty = Vec::new();
            self.prefilter.remove(cidr, &mut dirty);
            self.prefilter
                .write(&self.maps.ban_filter, self.maps.host_filter()?, &mut dirty)?;
            if !cidr.is_host() {
                // After the delete, for the same reason as in put_ban.
                self.maps
                    .adjust_cidr_count(cidr.is_v4(), |n| n.saturating_sub(1))?;
            }
        }
        Ok(())
    }

    /// Every ban entry in the maps (for adoption and reconciliation), with the flags callers
    /// set: `BAN_NOT_ALLOWLISTED` and `BAN_MAY_PRESERVE` belong to the data path, which sets
    /// them on every write.
    pub fn bans(&self) -> Result<Vec<(Cidr, BanValue)>, DataPathError> {
        use wsguard_common::maps::{BAN_MAY_PRESERVE, BAN_NOT_ALLOWLISTED};
        let mut bans = self.maps.bans(self.max_bans as usize + 1)?;
        for (_, v) in &mut bans {
            v.flags &= !(BAN_NOT_ALLOWLISTED | BAN_MAY_PRESERVE);
        }
        Ok(bans)
    }

    /// Every ban entry in the maps as [`DataPath::bans`] gives them, a chunk at a time.
    pub fn each_ban(&self, f: &mut maps::BanChunks<'_>) -> Result<(), DataPathError> {
        use wsguard_common::maps::{BAN_MAY_PRESERVE, BAN_NOT_ALLOWLISTED};
        let mut buf = Vec::new();
        self.maps
            .each_ban(self.max_bans as usize + 1, &mut |chunk| {
                buf.clear();
                buf.extend(chunk.iter().map(|(c, v)| {
                    let mut v = *v;
                    v.flags &= !(BAN_NOT_ALLOWLISTED | BAN_MAY_PRESERVE);
                    (*c, v)
                }));
                f(&buf)
            })
    }

    /// The drop counter of each of `cidrs` (0 where absent), one lookup each: the answer to a
    /// `ban add` of a few bans costs their own lookups, not a walk of every map.
    pub fn drops_of(&self, cidrs: &[Cidr]) -> Result<Vec<u64>, DataPathError> {
        cidrs
            .iter()
            .map(|c| Ok(self.maps.get_ban(c)?.map_or(0, |v| v.drops)))
            .collect()
    }

    /// Entries in the ban maps (expired ones included until deleted).
    pub fn ban_entries(&self) -> u64 {
        self.ban_entries
    }

    /// Add an allowlist entry, then clear `BAN_NOT_ALLOWLISTED` on every ban it overlaps (in
    /// that order: the kernel must never skip the lookup of an entry that exists).
    pub fn put_allow(&mut self, cidr: &Cidr) -> Result<(), DataPathError> {
        self.maps.put_allow(cidr)?;
        self.maps.bump_generation()?;
        self.allows.add(cidr);
        self.unflag_overlapping(cidr)
    }

    /// Remove an allowlist entry. Bans it unflagged stay unflagged (only slower) until the
    /// next open recomputes every flag.
    pub fn del_allow(&mut self, cidr: &Cidr) -> Result<(), DataPathError> {
        self.maps.del_allow(cidr)?;
        self.allows.remove(cidr);
        Ok(())
    }

    /// Whether the pre-filter bit of `ip`'s bucket is set in the agent's copy (the kernel's
    /// map holds the same once a write returned).
    pub fn prefilter_clean(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self
                .prefilter
                .is_clean(wsguard_common::filter::v4_bit(a.octets()), false),
            IpAddr::V6(a) => self
                .prefilter
                .is_clean(wsguard_common::filter::v6_bit(&a.octets()), true),
        }
    }

    pub fn allows(&self) -> Result<Vec<Cidr>, DataPathError> {
        self.maps.allows(1 << 16)
    }

    pub fn counters(&self) -> Result<Counters, DataPathError> {
        self.maps.counters()
    }

    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, DataPathError> {
        Ok(self.maps.flows(maps::LRU_WALK))
    }

    /// Bad-handshake counts in the current window per source (for `top`).
    pub fn rates(&self) -> Result<Vec<(IpAddr, u32)>, DataPathError> {
        let window = self.maps.config()?.window_ns;
        let now = boot_ns();
        Ok(self
            .maps
            .rates(maps::LRU_WALK)
            .into_iter()
            .filter(|(_, r)| now.wrapping_sub(r.window_start_ns) < window)
            .map(|(k, r)| (maps::unmap_key(k), r.count))
            .collect())
    }

    /// Burst events from the ring buffer, without blocking.
    pub fn poll_bursts(&mut self) -> Vec<BurstEvent> {
        let mut out = std::mem::take(&mut self.pending);
        self.maps.drain_bursts(&mut out, 1 << 16);
        out
    }

    /// A file descriptor that becomes readable when bursts are waiting (for tokio's AsyncFd).
    pub fn bursts_fd(&self) -> std::os::fd::RawFd {
        self.maps.bursts.as_raw_fd()
    }

    pub fn interfaces(&self) -> Vec<InterfaceJson> {
        let mut out = self.interfaces.clone();
        if let Some(pins) = &self.pins {
            // Another agent generation may have swapped the program since open.
            for i in &mut out {
                if let Ok(info) =
                    sys::obj_get(&pins.xdp_link(&i.name)).and_then(|fd| sys::link_info(&fd))
                {
                    i.xdp_prog_id = info.prog_id;
                }
            }
        }
        out
    }

    /// XDP attachments that fell back to netlink (unpinnable) in this open; expose as a metric.
    pub fn netlink_fallbacks(&self) -> u64 {
        self.netlink_fallbacks
    }

    /// Whether maps and links are pinned (false only when pinning was impossible).
    pub fn pinned(&self) -> bool {
        self.pins.is_some()
    }

    pub fn ban_capacity(&self) -> u32 {
        self.max_bans
    }
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock of `BanValue` times.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer for clock_gettime.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) cannot fail on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
