//! The real kernel programs, loaded unpinned and unattached, driven through BPF_PROG_TEST_RUN.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use std::net::IpAddr;
use wsguard::datapath::table::BanTable;
use wsguard_common::maps::{
    BanValue, BurstEvent, CFG_V4_TABLE, COUNTERS_LEN, Config, Counter, FlowKey, FlowValue,
    RateValue, names,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;

mod filters;
mod proxy;

pub struct DataPlane {
    pub ebpf: Ebpf,
}

impl DataPlane {
    /// Load the embedded object and both programs into the kernel, watching `ports`.
    pub fn load(ports: &[u16]) -> Result<Self> {
        let ebpf = wsguard::bpf::load_unpinned().context("load the embedded object")?;
        Self::with_programs(ebpf, ports)
    }

    /// [`DataPlane::load`] with the named maps created with `max_entries` each (the benchmark
    /// sizes its reference map like the ban maps). `WSGUARD_BENCH_OBJECT=PATH` loads that
    /// object instead of the embedded one: another build of the kernel crate, measured without
    /// rebuilding the bench.
    pub fn load_sized(ports: &[u16], max_entries: &[(&str, u32)]) -> Result<Self> {
        let mut loader = aya::EbpfLoader::new();
        for (name, n) in max_entries {
            loader.map_max_entries(name, *n);
        }
        let other = match std::env::var_os("WSGUARD_BENCH_OBJECT") {
            Some(path) => Some(
                std::fs::read(&path)
                    .with_context(|| format!("WSGUARD_BENCH_OBJECT={}", path.display()))?,
            ),
            None => None,
        };
        let ebpf = loader
            .load(other.as_deref().unwrap_or(wsguard::bpf::OBJECT))
            .context("load the object")?;
        Self::with_programs(ebpf, ports)
    }

    /// [`DataPlane::load`] with a `BAN_TABLE_V4` of 2^`bits` buckets (the program told so, as
    /// the agent tells it), for tests that fill buckets.
    pub fn load_table_bits(ports: &[u16], bits: u32) -> Result<Self> {
        let mut loader = aya::EbpfLoader::new();
        loader.map_max_entries(names::BAN_TABLE_V4, 1 << bits);
        loader.override_global(names::TABLE_BITS_V4, &bits, true);
        let ebpf = loader
            .load(wsguard::bpf::OBJECT)
            .context("load the object")?;
        Self::with_programs(ebpf, ports)
    }

    fn with_programs(mut ebpf: Ebpf, ports: &[u16]) -> Result<Self> {
        let xdp: &mut Xdp = program(&mut ebpf, wsguard_common::maps::programs::XDP)?;
        xdp.load().context("verifier rejected the XDP program")?;
        let tc: &mut SchedClassifier =
            program(&mut ebpf, wsguard_common::maps::programs::TC_EGRESS)?;
        tc.load().context("verifier rejected the TC program")?;
        let mut dp = Self { ebpf };
        dp.set_config(&Config::new())?;
        for p in ports {
            dp.watch(*p)?;
        }
        Ok(dp)
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        let mut a: Array<&mut MapData, Config> = Array::try_from(self.map(names::CONFIG)?)?;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    pub fn config(&mut self) -> Result<Config> {
        let a: Array<&mut MapData, Config> = Array::try_from(self.map(names::CONFIG)?)?;
        Ok(a.get(&0, 0)?)
    }

    pub fn watch(&mut self, port: u16) -> Result<()> {
        self.set_port(port, 1)
    }

    pub fn unwatch(&mut self, port: u16) -> Result<()> {
        self.set_port(port, 0)
    }

    fn set_port(&mut self, port: u16, watched: u8) -> Result<()> {
        let mut a: Array<&mut MapData, u8> = Array::try_from(self.map(names::PORTS)?)?;
        a.set(u32::from(port), watched, 0)?;
        Ok(())
    }

    /// The exact IPv4 ban map, for bulk inserts (benchmarks).
    pub fn bans_v4(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], BanValue>> {
        Ok(HashMap::try_from(self.map(names::BANS_V4)?)?)
    }

    /// `BAN_TABLE_V4`, mapped as the agent maps it.
    pub fn table(&mut self) -> Result<BanTable> {
        let id = match self.map(names::BAN_TABLE_V4)? {
            aya::maps::Map::Array(d) => d.info()?.id(),
            _ => anyhow::bail!("BAN_TABLE_V4 is not an array"),
        };
        Ok(BanTable::new(MapData::from_id(id)?)?)
    }

    /// Turn `CFG_V4_TABLE` on or off: whether the program trusts a miss in the table.
    pub fn set_table_whole(&mut self, whole: bool) -> Result<()> {
        let mut cfg = self.config()?;
        cfg.flags = if whole {
            cfg.flags | CFG_V4_TABLE
        } else {
            cfg.flags & !CFG_V4_TABLE
        };
        self.set_config(&cfg)
    }

    /// An exact IPv4 ban as the agent writes one: in `BANS_V4` and in the table, or, without
    /// a slot, with `CFG_V4_TABLE` cleared (the pre-filter and host filter are the caller's, as
    /// with [`DataPlane::ban`]).
    pub fn ban_tabled(&mut self, addr: [u8; 4], value: BanValue) -> Result<()> {
        self.bans_v4()?.insert(addr, value, 0)?;
        if self.table()?.put(addr, &value, true).is_none() {
            self.set_table_whole(false)?;
        }
        Ok(())
    }

    /// The IPv4 CIDR ban trie, for bulk inserts; the caller keeps `Config::cidr_v4` in step.
    pub fn ban_cidrs_v4(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], BanValue>> {
        Ok(LpmTrie::try_from(self.map(names::BAN_CIDRS_V4)?)?)
    }

    /// Drain the burst events the kernel emitted so far.
    pub fn bursts(&mut self) -> Result<Vec<BurstEvent>> {
        let mut ring = RingBuf::try_from(self.map(names::BURSTS)?)?;
        let mut out = Vec::new();
        // Bounded: the ring holds at most 256 KiB of events.
        while let Some(item) = ring.next() {
            assert_eq!(
                item.len(),
                std::mem::size_of::<BurstEvent>(),
                "burst record size"
            );
            // SAFETY: BurstEvent is Pod-like repr(C) and the record has exactly its size.
            out.push(unsafe { (item.as_ptr() as *const BurstEvent).read_unaligned() });
        }
        Ok(out)
    }

    /// Ban an address or CIDR (`prefix` = full length for an exact ban).
    pub fn ban(&mut self, addr: &str, prefix: u32, value: BanValue) -> Result<()> {
        let ip: IpAddr = addr.parse()?;
        self.clear_filter_for(ip, prefix)?;
        match ip {
            IpAddr::V4(v4) if prefix == 32 => {
                let mut m: HashMap<_, [u8; 4], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V4)?)?;
                m.insert(v4.octets(), value, 0)?;
            }
            IpAddr::V6(v6) if prefix == 128 => {
                let mut m: HashMap<_, [u8; 16], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V6)?)?;
                m.insert(v6.octets(), value, 0)?;
            }
            IpAddr::V4(v4) => {
                let mut m: LpmTrie<_, [u8; 4], BanValue> =
                    LpmTrie::try_from(self.map(names::BAN_CIDRS_V4)?)?;
                m.insert(&Key::new(prefix, v4.octets()), value, 0)?;
                let mut cfg = self.config()?;
                cfg.cidr_v4 += 1;
                self.set_config(&cfg)?;
            }
            IpAddr::V6(v6) => {
                let mut m: LpmTrie<_, [u8; 16], BanValue> =
                    LpmTrie::try_from(self.map(names::BAN_CIDRS_V6)?)?;
                m.insert(&Key::new(prefix, v6.octets()), value, 0)?;
                let mut cfg = self.config()?;
                cfg.cidr_v6 += 1;
                self.set_config(&cfg)?;
            }
        }
        Ok(())
    }

    /// Remove the exact ban of `addr`.
    pub fn unban(&mut self, addr: &str) -> Result<()> {
        match addr.parse::<IpAddr>()? {
            IpAddr::V4(v4) => {
                let mut m: HashMap<_, [u8; 4], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V4)?)?;
                m.remove(&v4.octets())?;
            }
            IpAddr::V6(v6) => {
                let mut m: HashMap<_, [u8; 16], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V6)?)?;
                m.remove(&v6.octets())?;
            }
        }
        Ok(())
    }

    /// The exact ban entry of an address, with its drop counter.
    pub fn ban_entry(&mut self, addr: &str) -> Result<BanValue> {
        Ok(match addr.parse::<IpAddr>()? {
            IpAddr::V4(v4) => {
                let m: HashMap<_, [u8; 4], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V4)?)?;
                m.get(&v4.octets(), 0)?
            }
            IpAddr::V6(v6) => {
                let m: HashMap<_, [u8; 16], BanValue> =
                    HashMap::try_from(self.map(names::BANS_V6)?)?;
                m.get(&v6.octets(), 0)?
            }
        })
    }

    pub fn allow(&mut self, addr: &str, prefix: u32) -> Result<()> {
        match addr.parse::<IpAddr>()? {
            IpAddr::V4(v4) => {
                let mut m: LpmTrie<_, [u8; 4], u32> =
                    LpmTrie::try_from(self.map(names::ALLOW_V4)?)?;
                m.insert(&Key::new(prefix, v4.octets()), 1, 0)?;
            }
            IpAddr::V6(v6) => {
                let mut m: LpmTrie<_, [u8; 16], u32> =
                    LpmTrie::try_from(self.map(names::ALLOW_V6)?)?;
                m.insert(&Key::new(prefix, v6.octets()), 1, 0)?;
            }
        }
        Ok(())
    }

    pub fn flow(&mut self, key: &FlowKey) -> Result<Option<FlowValue>> {
        let m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map(names::FLOWS)?)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Entries of the flow table.
    pub fn flows_len(&mut self) -> Result<usize> {
        let m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map(names::FLOWS)?)?;
        Ok(m.keys().count())
    }

    /// Entries of the bad-handshake rate table.
    pub fn rates_len(&mut self) -> Result<usize> {
        let m: HashMap<_, [u8; 16], RateValue> = HashMap::try_from(self.map(names::RATES)?)?;
        Ok(m.keys().count())
    }

    pub fn set_flow(&mut self, key: &FlowKey, value: FlowValue) -> Result<()> {
        let mut m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map(names::FLOWS)?)?;
        m.insert(key, value, 0)?;
        Ok(())
    }

    pub fn delete_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(self.map(names::FLOWS)?)?;
        m.remove(key)?;
        Ok(())
    }

    /// Every global counter, summed over CPUs, indexed by `Counter as usize`.
    pub fn counters(&mut self) -> Result<Vec<u64>> {
        (0..COUNTERS_LEN).map(|i| self.counter_at(i)).collect()
    }

    /// A global counter, summed over CPUs.
    pub fn counter(&mut self, c: Counter) -> Result<u64> {
        self.counter_at(c as u32)
    }

    pub fn counter_at(&mut self, index: u32) -> Result<u64> {
        assert!(index < COUNTERS_LEN);
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(names::COUNTERS)?)?;
        Ok(a.get(&index, 0)?.iter().sum())
    }

    /// Run the XDP program once on `frame`, returning its action.
    pub fn xdp(&mut self, frame: &[u8]) -> Result<u32> {
        Ok(self.xdp_repeat(frame, 1)?.0)
    }

    /// Run the XDP program `repeat` times; returns the action and the mean time per run.
    pub fn xdp_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
        let xdp: &mut Xdp = program(&mut self.ebpf, wsguard_common::maps::programs::XDP)?;
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (XDP)")?;
        Ok((r.return_value, r.duration))
    }

    /// Load (once) and run another XDP program of the object, e.g. the benchmark floors.
    pub fn xdp_named(
        &mut self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        if xdp.fd().is_err() {
            xdp.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN ({name})"))?;
        Ok((r.return_value, r.duration))
    }

    /// A descriptor of a program of the object, loaded on first use (the benchmark runs every
    /// program it compares, wsguard's and its peers', through one BPF_PROG_TEST_RUN call by fd).
    pub fn program_fd(&mut self, name: &str) -> Result<aya::programs::ProgramFd> {
        let xdp: &mut Xdp = program(&mut self.ebpf, name)?;
        if xdp.fd().is_err() {
            xdp.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(xdp.fd()?.try_clone()?)
    }

    /// Run the TC egress program once on `frame`.
    pub fn tc(&mut self, frame: &[u8]) -> Result<u32> {
        let tc: &mut SchedClassifier =
            program(&mut self.ebpf, wsguard_common::maps::programs::TC_EGRESS)?;
        let r = tc
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (TC)")?;
        Ok(r.return_value)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        // An object from before the settings section (`WSGUARD_BENCH_OBJECT`) names the map
        // as it is pinned.
        let name = if self.ebpf.map(names::in_object(name)).is_some() {
            names::in_object(name)
        } else {
            name
        };
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?;
    Ok(p.try_into()?)
}

/// Pin the calling thread to one CPU, so that consecutive BPF_PROG_TEST_RUN calls share the
/// per-CPU state of the programs (test threads are separate, so only the caller moves).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity(cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock the data plane's ban times use.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer for clock_gettime.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Key of the flow a client->server packet belongs to.
pub fn flow_key(client: &str, client_port: u16, server: &str, server_port: u16) -> FlowKey {
    FlowKey {
        client: addr16(client),
        server: addr16(server),
        client_port: client_port.to_be(),
        server_port: server_port.to_be(),
    }
}

pub fn addr16(a: &str) -> [u8; 16] {
    match a.parse::<IpAddr>().expect("valid address") {
        IpAddr::V4(v4) => wsguard_common::maps::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Which global counters moved, and by how much: tests assert the whole set, so a packet
/// counted twice, or under the wrong name, fails.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Delta(pub std::collections::BTreeMap<u32, u64>);

impl Delta {
    /// Each counter moved by one.
    pub fn of(counters: &[Counter]) -> Self {
        let mut d = Self::default();
        for c in counters {
            *d.0.entry(*c as u32).or_default() += 1;
        }
        d
    }

    /// Add `n` to the counter at `index` (e.g. `Counter::BadReason0 as u32 + reason`).
    pub fn and_at(mut self, index: u32, n: u64) -> Self {
        *self.0.entry(index).or_default() += n;
        self
    }
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(i, n)| (counter_name(*i), n)))
            .finish()
    }
}

pub fn counter_name(index: u32) -> String {
    const NAMES: [&str; 12] = [
        "Passed",
        "Dropped",
        "WouldDrop",
        "Allowlisted",
        "Preserved",
        "Unparsed",
        "HsValid",
        "HsBad",
        "HsIncomplete",
        "HsTls",
        "HsIgnored",
        "UpstreamErrors",
    ];
    const PROXY: [&str; 10] = [
        "ProxyV1Client",
        "ProxyV1Local",
        "ProxyV1Malformed",
        "ProxyV1Untrusted",
        "ProxyV2Client",
        "ProxyV2Local",
        "ProxyV2Malformed",
        "ProxyV2Untrusted",
        "ProxyMissing",
        "Reset",
    ];
    let reason0 = Counter::BadReason0 as u32;
    let proxy0 = Counter::ProxyV1Client as u32;
    match index {
        i if (i as usize) < NAMES.len() => NAMES[i as usize].to_owned(),
        i if i == Counter::EventsLost as u32 => "EventsLost".to_owned(),
        i if (proxy0..COUNTERS_LEN).contains(&i) => PROXY[(i - proxy0) as usize].to_owned(),
        i => match wsguard_common::BadReason::from_u8((i - reason0) as u8) {
            Some(r) => format!("bad:{}", r.as_str()),
            None => format!("counter#{i}"),
        },
    }
}

impl DataPlane {
    /// Run `f` and report which counters it moved.
    pub fn counted<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<(R, Delta)> {
        let before = self.counters()?;
        let r = f(self)?;
        let after = self.counters()?;
        let mut d = Delta::default();
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            if a != b {
                d.0.insert(i as u32, a - b);
            }
        }
        Ok((r, d))
    }

    /// Run the XDP program once and report its action and the counters it moved.
    pub fn xdp_counted(&mut self, frame: &[u8]) -> Result<(u32, Delta)> {
        self.counted(|dp| dp.xdp(frame))
    }

    pub fn tc_counted(&mut self, frame: &[u8]) -> Result<(u32, Delta)> {
        self.counted(|dp| dp.tc(frame))
    }
}
