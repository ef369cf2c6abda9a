//! The peer: xdp-filter from Debian's xdp-tools, loaded by its own CLI as its users load it, on
//! a veth inside a namespace of the bench's own, then found by program id and run through
//! BPF_PROG_TEST_RUN like every other program. Deleting the namespace deletes the veth, which
//! detaches the program; the bench's descriptors are its last references.

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Map, MapData, MapInfo, PerCpuHashMap, PerCpuValues},
    programs::{ProgramFd, loaded_programs},
};
use std::{net::Ipv4Addr, time::Duration};
use wsguard_tests::netns::NetNs;

/// What its users type (xdp-filter(8)): every feature, generic mode.
const FEATURES: &str = "tcp,udp,ipv4,ipv6,ethernet";
const IFACE: &str = "xf0";
const PEER: &str = "xf1";

pub struct XdpFilter {
    pub prog: ProgramFd,
    /// The kernel's name of the program libxdp chose for these features (`xdpfilt_alw_all`).
    pub name: String,
    v4: PerCpuHashMap<MapData, [u8; 4], u64>,
    /// The per-CPU value `xdp-filter ip -m src` wrote: every filled entry gets the same.
    src_value: Vec<u64>,
    /// `filter_ipv4`'s fixed size (xdp-filter's maps are sized at build time).
    pub capacity: u32,
    /// Every map of the program, as `name: type, max entries`, for the table's header.
    pub maps: Vec<String>,
    // Last: its drop deletes the veth and with it the attachment.
    _ns: NetNs,
}

impl XdpFilter {
    /// Load xdp-filter on a fresh veth and block `banned` with its CLI.
    pub fn load(banned: Ipv4Addr) -> Result<Self> {
        let ns = NetNs::new()?;
        // Both ends inside the bench's namespace: nothing touches the host's interfaces.
        ns.ip(&["link", "add", IFACE, "type", "veth", "peer", "name", PEER])?;
        for i in [IFACE, PEER] {
            ns.ip(&["link", "set", i, "up"])?;
        }
        // `ip netns exec` gives the command a private mount namespace with a fresh /sys: libxdp's
        // bpffs must be mounted in the same invocation, and its pins vanish when it exits (the
        // attachment and the bench's descriptors keep program and maps alive).
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf && xdp-filter load {IFACE} -m skb -f {FEATURES} && \
             xdp-filter ip -m src {banned}"
        );
        let out = ns
            .exec(&["sh", "-c", &script], Duration::from_secs(60))
            .context(
                "run xdp-filter (Debian package xdp-tools; `cargo xtask bench` installs it)",
            )?;
        ensure!(
            out.status.success(),
            "`{script}` in {}: {}{}",
            ns.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let attached = ns.xdp_attachments(IFACE)?;
        let [att] = attached.as_slice() else {
            bail!("xdp-filter left {attached:?} on {IFACE}, expected one program");
        };
        ensure!(
            att.mode == "generic",
            "xdp-filter attached in {} mode, asked for skb",
            att.mode
        );
        let info = loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == att.prog_id)
            .with_context(|| format!("program {} not among the loaded programs", att.prog_id))?;
        let name = info.name_as_str().unwrap_or("?").to_owned();
        ensure!(
            name.starts_with("xdpfilt_"),
            "program {} on {IFACE} is {name}, not xdp-filter's",
            att.prog_id
        );
        let prog = info.fd()?;
        let mut v4 = None;
        let mut maps = Vec::new();
        for id in info.map_ids()?.context("the kernel lists no map ids")? {
            let m = MapInfo::from_id(id)?;
            let map_name = m.name_as_str().unwrap_or("?").to_owned();
            maps.push(format!(
                "{map_name}: {:?}, {} entries",
                m.map_type()?,
                m.max_entries()
            ));
            if map_name == "filter_ipv4" {
                v4 = Some((MapData::from_id(id)?, m.max_entries()));
            }
        }
        maps.sort();
        let (data, capacity) = v4.context("xdp-filter's program has no filter_ipv4 map")?;
        let v4: PerCpuHashMap<MapData, [u8; 4], u64> =
            PerCpuHashMap::try_from(Map::from_map_data(data)?)?;
        let src_value: Vec<u64> = v4
            .get(&banned.octets(), 0)
            .with_context(|| format!("`xdp-filter ip -m src {banned}` wrote no entry"))?
            .iter()
            .copied()
            .collect();
        Ok(Self {
            prog,
            name,
            v4,
            src_value,
            capacity,
            maps,
            _ns: ns,
        })
    }

    /// Block `addr` as `xdp-filter ip -m src` does (same value), without a process per address.
    pub fn block(&mut self, addr: [u8; 4]) -> Result<()> {
        let values = PerCpuValues::try_from(self.src_value.clone())?;
        self.v4
            .insert(addr, values, 0)
            .with_context(|| format!("xdp-filter's filter_ipv4: insert {}", Ipv4Addr::from(addr)))
    }

    pub fn len(&self) -> usize {
        self.v4.keys().count()
    }
}
