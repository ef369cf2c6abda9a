//! Typed handles on every map the agent reads or writes, and the operations on them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::os::fd::AsFd as _;

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf,
    lpm_trie::Key,
};
use wsguard_common::maps::{
    BanValue, BurstEvent, CFG_GENERATION_ONE, CFG_V4_TABLE, COUNTERS_LEN, Config, FlowKey,
    FlowValue, ProxySenderValue, RateValue, names,
};

use super::{
    DataPathError, sys,
    table::{self, BanTable},
};
use crate::addr::Cidr;

/// Upper bound on entries visited in one walk of an LRU map: a hash map that changes under
/// `get_next_key` can restart from its first key, so an unbounded walk could spin.
/// Larger than any LRU map the kernel crate declares (FLOWS: 262144).
pub const LRU_WALK: usize = 1 << 20;

pub struct Maps {
    pub config: Array<MapData, Config>,
    pub ports: Array<MapData, u8>,
    pub counters: PerCpuArray<MapData, u64>,
    pub bans_v4: HashMap<MapData, [u8; 4], BanValue>,
    /// The exact IPv4 bans again, probed inline by the program (see `table`). Absent from a
    /// generation older than it, which a migration reads.
    pub table_v4: Option<BanTable>,
    /// Some exact IPv4 ban found no slot since this generation was opened, so `CFG_V4_TABLE`
    /// stays clear until the next open's walk finds them all in place.
    pub table_short: bool,
    pub bans_v6: HashMap<MapData, [u8; 16], BanValue>,
    pub cidrs_v4: LpmTrie<MapData, [u8; 4], BanValue>,
    pub cidrs_v6: LpmTrie<MapData, [u8; 16], BanValue>,
    pub allow_v4: LpmTrie<MapData, [u8; 4], u32>,
    pub allow_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub flows: Flows,
    pub rates: HashMap<MapData, [u8; 16], RateValue>,
    pub bursts: RingBuf<MapData>,
    pub ban_filter: Array<MapData, u64>,
    /// Absent from a generation older than the host filter, which a migration reads and an
    /// open replaces; this build's always has it.
    pub host_filter: Option<Array<MapData, u64>>,
    /// Layout 3's maps: always there in this build's generation, absent from a layout-2 one a
    /// migration reads.
    pub proxy: Option<ProxyMaps>,
}

/// The PROXY-protocol maps (layout 3).
pub struct ProxyMaps {
    pub from_v4: LpmTrie<MapData, [u8; 4], u32>,
    pub from_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub senders: HashMap<MapData, [u8; 16], ProxySenderValue>,
}

/// `FLOWS` as this build writes it, or (read by a migration) as layout 2 did.
pub enum Flows {
    Current(HashMap<MapData, FlowKey, FlowValue>),
    Layout2(HashMap<MapData, FlowKey, FlowValueV2>),
}

/// Layout 2's flow value (16 bytes): what layout 3's `FlowValue` starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValueV2 {
    pub first_seen_ns: u64,
    pub verdict: u8,
    pub reason: u8,
    pub state: u8,
    pub _pad: [u8; 5],
}

// SAFETY: `#[repr(C)]`, `Copy`, no padding (the gap is an explicit `_pad`), no pointers.
unsafe impl aya::Pod for FlowValueV2 {}

impl FlowValueV2 {
    /// A layout-2 flow in layout 3: a direct flow (no PROXY header was ever read for it).
    pub fn upgrade(&self) -> FlowValue {
        FlowValue {
            first_seen_ns: self.first_seen_ns,
            verdict: self.verdict,
            reason: self.reason,
            state: self.state,
            ..FlowValue::default()
        }
    }
}

impl Flows {
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Flows::Current(m) => m.map().fd().as_fd(),
            Flows::Layout2(m) => m.map().fd().as_fd(),
        }
    }

    /// Every entry (at most `limit`), in this build's layout.
    pub fn entries(&self, limit: usize) -> Vec<(FlowKey, FlowValue)> {
        match self {
            Flows::Current(m) => m.iter().take(limit).filter_map(Result::ok).collect(),
            Flows::Layout2(m) => m
                .iter()
                .take(limit)
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.upgrade()))
                .collect(),
        }
    }

    pub fn current(&mut self) -> Result<&mut HashMap<MapData, FlowKey, FlowValue>, DataPathError> {
        match self {
            Flows::Current(m) => Ok(m),
            Flows::Layout2(_) => Err(DataPathError::Other(
                "FLOWS has the layout-2 value size here; only a migration reads it".into(),
            )),
        }
    }
}

/// A source of exactly one map (whatever name is asked).
fn one(m: Map) -> impl FnMut(&str) -> Result<Map, DataPathError> {
    let mut m = Some(m);
    move |name| {
        m.take()
            .ok_or_else(|| DataPathError::Other(format!("map {name} taken twice")))
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    take: &mut impl FnMut(&str) -> Result<Map, DataPathError>,
    name: &str,
) -> Result<T, DataPathError> {
    T::try_from(take(name)?).map_err(|e| DataPathError::Other(format!("map {name}: {e}")))
}

impl Maps {
    /// Build the handles from a source of maps by name (a loaded object, or pins).
    pub fn take(
        mut take: impl FnMut(&str) -> Result<Map, DataPathError>,
    ) -> Result<Self, DataPathError> {
        let t = &mut take;
        Ok(Self {
            config: typed(t, names::CONFIG)?,
            ports: typed(t, names::PORTS)?,
            counters: typed(t, names::COUNTERS)?,
            bans_v4: typed(t, names::BANS_V4)?,
            table_v4: Some(ban_table(t(names::BAN_TABLE_V4)?)?),
            table_short: false,
            bans_v6: typed(t, names::BANS_V6)?,
            cidrs_v4: typed(t, names::BAN_CIDRS_V4)?,
            cidrs_v6: typed(t, names::BAN_CIDRS_V6)?,
            allow_v4: typed(t, names::ALLOW_V4)?,
            allow_v6: typed(t, names::ALLOW_V6)?,
            flows: Flows::Current(typed(t, names::FLOWS)?),
            rates: typed(t, names::RATES)?,
            bursts: typed(t, names::BURSTS)?,
            ban_filter: typed(t, names::BAN_FILTER)?,
            host_filter: Some(typed(t, names::HOST_FILTER)?),
            proxy: Some(ProxyMaps {
                from_v4: typed(t, names::PROXY_FROM_V4)?,
                from_v6: typed(t, names::PROXY_FROM_V6)?,
                senders: typed(t, names::PROXY_SENDERS)?,
            }),
        })
    }

    /// The handles on a previous generation's maps, for a migration: FLOWS in the layout its
    /// value size says, the layout-3 maps only if it has them.
    pub fn take_previous(
        mut take: impl FnMut(&str) -> Result<Map, DataPathError>,
    ) -> Result<Self, DataPathError> {
        let t = &mut take;
        let flows = t(names::FLOWS)?;
        let flow_size = match &flows {
            Map::HashMap(d) | Map::LruHashMap(d) => {
                d.info().map(|i| i.value_size()).unwrap_or_default() as usize
            }
            _ => 0,
        };
        let flows = if flow_size == size_of::<FlowValueV2>() {
            Flows::Layout2(
                HashMap::try_from(flows)
                    .map_err(|e| DataPathError::Other(format!("FLOWS: {e}")))?,
            )
        } else {
            Flows::Current(
                HashMap::try_from(flows)
                    .map_err(|e| DataPathError::Other(format!("FLOWS: {e}")))?,
            )
        };
        let proxy = match (
            t(names::PROXY_FROM_V4),
            t(names::PROXY_FROM_V6),
            t(names::PROXY_SENDERS),
        ) {
            (Ok(a), Ok(b), Ok(c)) => Some(ProxyMaps {
                from_v4: typed(&mut one(a), names::PROXY_FROM_V4)?,
                from_v6: typed(&mut one(b), names::PROXY_FROM_V6)?,
                senders: typed(&mut one(c), names::PROXY_SENDERS)?,
            }),
            _ => None,
        };
        Ok(Self {
            config: typed(t, names::CONFIG)?,
            ports: typed(t, names::PORTS)?,
            counters: typed(t, names::COUNTERS)?,
            bans_v4: typed(t, names::BANS_V4)?,
            table_v4: match t(names::BAN_TABLE_V4) {
                Ok(m) => Some(ban_table(m)?),
                Err(_) => None,
            },
            table_short: false,
            bans_v6: typed(t, names::BANS_V6)?,
            cidrs_v4: typed(t, names::BAN_CIDRS_V4)?,
            cidrs_v6: typed(t, names::BAN_CIDRS_V6)?,
            allow_v4: typed(t, names::ALLOW_V4)?,
            allow_v6: typed(t, names::ALLOW_V6)?,
            flows,
            rates: typed(t, names::RATES)?,
            bursts: typed(t, names::BURSTS)?,
            ban_filter: typed(t, names::BAN_FILTER)?,
            host_filter: match t(names::HOST_FILTER) {
                Ok(m) => Some(typed(&mut one(m), names::HOST_FILTER)?),
                Err(_) => None,
            },
            proxy,
        })
    }

    /// The host filter (this build's generation always has it).
    pub fn host_filter(&self) -> Result<&Array<MapData, u64>, DataPathError> {
        self.host_filter
            .as_ref()
            .ok_or_else(|| DataPathError::Other("HOST_FILTER missing from the maps".into()))
    }

    /// The layout-3 maps (this build's generation always has them).
    pub fn proxy(&self) -> Result<&ProxyMaps, DataPathError> {
        self.proxy
            .as_ref()
            .ok_or_else(|| DataPathError::Other("no PROXY-protocol maps in this generation".into()))
    }

    pub fn proxy_mut(&mut self) -> Result<&mut ProxyMaps, DataPathError> {
        self.proxy
            .as_mut()
            .ok_or_else(|| DataPathError::Other("no PROXY-protocol maps in this generation".into()))
    }

    pub fn config(&self) -> Result<Config, DataPathError> {
        self.config.get(&0, 0).map_err(err("read CONFIG"))
    }

    pub fn write_config(&mut self, cfg: &Config) -> Result<(), DataPathError> {
        self.config.set(0, cfg, 0).map_err(err("write CONFIG"))
    }

    /// Make every CPU drop the verdict it holds for a hot banned source at its next packet
    /// (`CFG_GENERATION`): the data path calls it after it removes a ban or adds an allowlist
    /// entry (a migration filling fresh maps has nothing to announce).
    pub fn bump_generation(&mut self) -> Result<(), DataPathError> {
        let mut cfg = self.config()?;
        cfg.flags = cfg.flags.wrapping_add(CFG_GENERATION_ONE);
        self.write_config(&cfg)
    }

    /// Apply `f` to the CIDR counts in CONFIG (read-modify-write; the agent is the only writer).
    pub fn adjust_cidr_count(
        &mut self,
        v4: bool,
        f: impl Fn(u32) -> u32,
    ) -> Result<(), DataPathError> {
        let mut cfg = self.config()?;
        if v4 {
            cfg.cidr_v4 = f(cfg.cidr_v4);
        } else {
            cfg.cidr_v6 = f(cfg.cidr_v6);
        }
        self.write_config(&cfg)
    }

    pub fn get_ban(&self, cidr: &Cidr) -> Result<Option<BanValue>, DataPathError> {
        let r = match (cidr.addr(), cidr.is_host()) {
            (IpAddr::V4(a), true) => self
                .bans_v4
                .get(&a.octets(), 0)
                .map(|v| table::merged(v, self.in_table(a.octets()))),
            (IpAddr::V6(a), true) => self.bans_v6.get(&a.octets(), 0),
            (IpAddr::V4(a), false) => self
                .cidrs_v4
                .get(&Key::new(cidr.prefix_len().into(), a.octets()), 0),
            (IpAddr::V6(a), false) => self
                .cidrs_v6
                .get(&Key::new(cidr.prefix_len().into(), a.octets()), 0),
        };
        optional(r).map_err(err("read a ban"))
    }

    /// Insert or replace a ban; `v.drops` is its whole count (what [`Maps::get_ban`] read).
    pub fn insert_ban(&mut self, cidr: &Cidr, v: &BanValue) -> Result<(), MapError> {
        match (cidr.addr(), cidr.is_host()) {
            (IpAddr::V4(a), true) => {
                self.bans_v4.insert(a.octets(), v, 0)?;
                self.mirror_v4(std::iter::once((a.octets(), *v)))
            }
            (IpAddr::V6(a), true) => self.bans_v6.insert(a.octets(), v, 0),
            (IpAddr::V4(a), false) => {
                self.cidrs_v4
                    .insert(&Key::new(cidr.prefix_len().into(), a.octets()), v, 0)
            }
            (IpAddr::V6(a), false) => {
                self.cidrs_v6
                    .insert(&Key::new(cidr.prefix_len().into(), a.octets()), v, 0)
            }
        }
    }

    /// Whether an entry was removed.
    pub fn remove_ban(&mut self, cidr: &Cidr) -> Result<bool, DataPathError> {
        let r = match (cidr.addr(), cidr.is_host()) {
            (IpAddr::V4(a), true) => {
                // Out of the table first: a crash before the hash delete leaves the ban in
                // BANS_V4, which the next open puts back, never a table slot without a ban.
                if let Some(t) = &self.table_v4 {
                    t.remove(a.octets());
                }
                self.bans_v4.remove(&a.octets())
            }
            (IpAddr::V6(a), true) => self.bans_v6.remove(&a.octets()),
            (IpAddr::V4(a), false) => self
                .cidrs_v4
                .remove(&Key::new(cidr.prefix_len().into(), a.octets())),
            (IpAddr::V6(a), false) => self
                .cidrs_v6
                .remove(&Key::new(cidr.prefix_len().into(), a.octets())),
        };
        optional(r)
            .map(|o| o.is_some())
            .map_err(err("delete a ban"))
    }

    /// Every ban, at most `limit` per map, handed to `f` a chunk at a time: a walk of a
    /// million bans holds one chunk, not a copy of the maps.
    pub fn each_ban(&self, limit: usize, f: &mut BanChunks<'_>) -> Result<(), DataPathError> {
        let mut merged = Vec::new();
        host_chunks(
            &self.bans_v4,
            limit,
            "BANS_V4",
            &mut |k| Cidr::host(Ipv4Addr::from(k).into()),
            &mut |chunk| match &self.table_v4 {
                None => f(chunk),
                Some(t) => {
                    merged.clear();
                    merged.extend(chunk.iter().map(|(c, v)| match c.addr() {
                        IpAddr::V4(a) => (*c, table::merged(*v, t.get(a.octets()))),
                        IpAddr::V6(_) => (*c, *v),
                    }));
                    f(&merged)
                }
            },
        )?;
        host_chunks(
            &self.bans_v6,
            limit,
            "BANS_V6",
            &mut |k| Cidr::host(Ipv6Addr::from(k).into()),
            f,
        )?;
        let mut nets = Vec::new();
        for r in self.cidrs_v4.iter().take(limit) {
            let (k, v) = r.map_err(err("walk BAN_CIDRS_V4"))?;
            nets.extend(net(Ipv4Addr::from(k.data()).into(), k.prefix_len()).map(|c| (c, v)));
        }
        for r in self.cidrs_v6.iter().take(limit) {
            let (k, v) = r.map_err(err("walk BAN_CIDRS_V6"))?;
            nets.extend(net(Ipv6Addr::from(k.data()).into(), k.prefix_len()).map(|c| (c, v)));
        }
        for c in nets.chunks(READ_CHUNK) {
            f(c)?;
        }
        Ok(())
    }

    /// The table's copy of the exact IPv4 ban of `addr`.
    pub fn in_table(&self, addr: [u8; 4]) -> Option<BanValue> {
        self.table_v4.as_ref()?.get(addr)
    }

    /// Put exact IPv4 bans just written to `BANS_V4` (each value's drops its whole count, now
    /// in `BANS_V4`) in the table. A ban that finds no slot makes the program look `BANS_V4`
    /// up again after a table miss, from now until the next open.
    pub fn mirror_v4(
        &mut self,
        bans: impl IntoIterator<Item = ([u8; 4], BanValue)>,
    ) -> Result<(), MapError> {
        let Some(t) = &self.table_v4 else {
            return Ok(());
        };
        let mut short = false;
        for (a, v) in bans {
            short |= t.put(a, &v, true).is_none();
        }
        if short {
            self.table_is_short()?;
        }
        Ok(())
    }

    /// Some exact IPv4 ban is not in the table: clear `CFG_V4_TABLE`.
    pub fn table_is_short(&mut self) -> Result<(), MapError> {
        self.table_short = true;
        let mut cfg = self.config.get(&0, 0)?;
        if cfg.flags & CFG_V4_TABLE != 0 {
            tracing::warn!(
                "an exact IPv4 ban found no slot in BAN_TABLE_V4: the data plane also looks BANS_V4 up from now on"
            );
            cfg.flags &= !CFG_V4_TABLE;
            self.config.set(0, cfg, 0)?;
        }
        Ok(())
    }

    /// Release every slot whose ban `BANS_V4` no longer holds, and refresh the fields of the
    /// others (their drops stay): one lookup per slot. Also clears `CFG_V4_TABLE`, since the
    /// bans of another writer may be missing from the table.
    pub fn sweep_table(&mut self) -> Result<(), DataPathError> {
        let Some(t) = &self.table_v4 else {
            return Ok(());
        };
        let (mut gone, mut kept) = (0u64, 0u64);
        for (s, a) in t.occupied() {
            match optional(self.bans_v4.get(&a, 0)).map_err(err("read a ban"))? {
                None => {
                    t.release(s);
                    gone += 1;
                }
                Some(v) => {
                    t.put(a, &table::merged(v, t.get(a)), false);
                    kept += 1;
                }
            }
        }
        if gone + kept > 0 {
            tracing::info!(gone, kept, "checked BAN_TABLE_V4 against BANS_V4");
        }
        self.table_is_short().map_err(err("write CONFIG"))?;
        self.table_short = false;
        Ok(())
    }

    /// Every exact IPv4 ban is in the table: set `CFG_V4_TABLE`.
    pub fn table_is_whole(&mut self) -> Result<(), DataPathError> {
        let mut cfg = self.config()?;
        if cfg.flags & CFG_V4_TABLE == 0 {
            cfg.flags |= CFG_V4_TABLE;
            self.write_config(&cfg)?;
        }
        Ok(())
    }

    /// Every ban, at most `limit` per map.
    pub fn bans(&self, limit: usize) -> Result<Vec<(Cidr, BanValue)>, DataPathError> {
        let mut out = Vec::new();
        self.each_ban(limit, &mut |c| {
            out.extend_from_slice(c);
            Ok(())
        })?;
        Ok(out)
    }

    pub fn put_allow(&mut self, cidr: &Cidr) -> Result<(), DataPathError> {
        let p = cidr.prefix_len().into();
        match cidr.addr() {
            IpAddr::V4(a) => self.allow_v4.insert(&Key::new(p, a.octets()), 1, 0),
            IpAddr::V6(a) => self.allow_v6.insert(&Key::new(p, a.octets()), 1, 0),
        }
        .map_err(|e| match full(&e) {
            true => DataPathError::Other(format!("the allowlist map is full; {cidr} not added")),
            false => DataPathError::Other(format!("add {cidr} to the allowlist: {e}")),
        })
    }

    pub fn del_allow(&mut self, cidr: &Cidr) -> Result<(), DataPathError> {
        let p = cidr.prefix_len().into();
        let r = match cidr.addr() {
            IpAddr::V4(a) => self.allow_v4.remove(&Key::new(p, a.octets())),
            IpAddr::V6(a) => self.allow_v6.remove(&Key::new(p, a.octets())),
        };
        optional(r)
            .map(drop)
            .map_err(err("delete an allowlist entry"))
    }

    pub fn allows(&self, limit: usize) -> Result<Vec<Cidr>, DataPathError> {
        let mut out = Vec::new();
        for r in self.allow_v4.keys().take(limit) {
            let k = r.map_err(err("walk ALLOW_V4"))?;
            out.extend(net(Ipv4Addr::from(k.data()).into(), k.prefix_len()));
        }
        for r in self.allow_v6.keys().take(limit) {
            let k = r.map_err(err("walk ALLOW_V6"))?;
            out.extend(net(Ipv6Addr::from(k.data()).into(), k.prefix_len()));
        }
        Ok(out)
    }

    pub fn counters(&self) -> Result<[u64; COUNTERS_LEN as usize], DataPathError> {
        let mut out = [0u64; COUNTERS_LEN as usize];
        // A previous generation's array may be shorter (counters are appended).
        let len = (self.counters.len() as usize).min(out.len());
        for (i, slot) in out.iter_mut().enumerate().take(len) {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .map_err(err("read COUNTERS"))?;
            *slot = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(out)
    }

    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), DataPathError> {
        let mut want = vec![0u8; 65_536];
        for p in ports {
            want[usize::from(*p)] = 1;
        }
        // Write only what changes: most of the 65536 slots stay zero.
        for (port, w) in want.iter().enumerate() {
            let have = self
                .ports
                .get(&(port as u32), 0)
                .map_err(err("read PORTS"))?;
            if have != *w {
                self.ports
                    .set(port as u32, w, 0)
                    .map_err(err("write PORTS"))?;
            }
        }
        Ok(())
    }

    pub fn flows(&self, limit: usize) -> Vec<(FlowKey, FlowValue)> {
        self.flows.entries(limit)
    }

    pub fn rates(&self, limit: usize) -> Vec<([u8; 16], RateValue)> {
        self.rates
            .iter()
            .take(limit)
            .filter_map(Result::ok)
            .collect()
    }

    pub fn drain_bursts(&mut self, out: &mut Vec<BurstEvent>, limit: usize) {
        for _ in 0..limit {
            let Some(item) = self.bursts.next() else {
                break;
            };
            if item.len() >= size_of::<BurstEvent>() {
                // SAFETY: at least size_of::<BurstEvent>() bytes; BurstEvent is Pod, read
                // unaligned since the ring gives 8-byte alignment only.
                out.push(unsafe { item.as_ptr().cast::<BurstEvent>().read_unaligned() });
            }
        }
    }

    /// Copy every entry the data plane depends on into `dst` (a migration), converted from
    /// the layout these maps were written in to `layout_version` (see `migrate`).
    pub fn copy_into(&self, dst: &mut Maps, layout_version: u32) -> Result<(), DataPathError> {
        super::migrate::copy(self, dst, layout_version)
    }
}

fn ban_table(m: Map) -> Result<BanTable, DataPathError> {
    match m {
        Map::Array(d) => BanTable::new(d),
        _ => Err(DataPathError::Other(
            "BAN_TABLE_V4 is not an array map".into(),
        )),
    }
}

/// What a walk of the ban maps hands each chunk to.
pub type BanChunks<'a> = dyn FnMut(&[(Cidr, BanValue)]) -> Result<(), DataPathError> + 'a;

/// Entries per `BPF_MAP_LOOKUP_BATCH` when reading a whole ban map.
const READ_CHUNK: usize = 8192;

/// Every entry of an exact ban map, at most `limit`, a chunk at a time: batched reads (a
/// 1M-entry map in about a hundred syscalls instead of two million), key by key where the
/// kernel has no batch lookup; keys turned into addresses by `cidr`.
fn host_chunks<const N: usize>(
    map: &HashMap<MapData, [u8; N], BanValue>,
    limit: usize,
    name: &str,
    cidr: &mut dyn FnMut([u8; N]) -> Cidr,
    f: &mut BanChunks<'_>,
) -> Result<(), DataPathError> {
    let fd = map.map().fd().as_fd();
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut failed = None;
    let batched = sys::lookup_chunks(fd, READ_CHUNK, limit, &mut |c: &[([u8; N], BanValue)]| {
        buf.clear();
        buf.extend(c.iter().map(|(k, v)| (cidr(*k), *v)));
        f(&buf).map_err(|e| {
            failed = Some(e);
            std::io::Error::other("stopped")
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    match batched {
        Ok(true) => Ok(()),
        Ok(false) => {
            for r in map.iter().take(limit) {
                let (k, v) = r.map_err(|e| DataPathError::Other(format!("walk {name}: {e}")))?;
                buf.push((cidr(k), v));
                if buf.len() == READ_CHUNK {
                    f(&buf)?;
                    buf.clear();
                }
            }
            if buf.is_empty() { Ok(()) } else { f(&buf) }
        }
        Err(e) => Err(DataPathError::Other(format!("read {name}: {e}"))),
    }
}

fn net(addr: IpAddr, prefix: u32) -> Option<Cidr> {
    Cidr::new(addr, u8::try_from(prefix).ok()?).ok()
}

/// A full ban map answers E2BIG (hash) or ENOSPC (LPM trie).
pub fn full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

pub fn ban_err(e: &MapError, cidr: Cidr, capacity: u32) -> DataPathError {
    if full(e) {
        DataPathError::Full { capacity }
    } else {
        DataPathError::Other(format!("write the ban of {cidr}: {e}"))
    }
}

/// A lookup or delete of a key that is not there.
pub fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn optional<T>(r: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn err(what: &'static str) -> impl Fn(MapError) -> DataPathError {
    move |e| DataPathError::Other(format!("{what}: {e}"))
}

/// The client address as a map key holds it (IPv4-mapped for IPv4) back to an address.
pub fn unmap_key(k: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(k);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}
