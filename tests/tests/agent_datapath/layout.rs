//! A real map-layout upgrade: the previous release's kernel object (layout 1, a fixture under
//! `tests/fixtures/layout1/`) is set up exactly as the layout-1 agent leaves a node, then this
//! build opens the pin directory, migrates the maps and swaps its programs in through the
//! pinned links while traffic runs. And the other way: a newer pinned layout is refused.

use anyhow::{Context as _, Result, ensure};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapInfo, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc::TcAttachOptions,
    },
};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _, symlink},
    path::{Path, PathBuf},
};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathOptions, OpenHooks, build_id},
};
use wsguard_common::{
    filter::{FILTER_WORDS_PER_FAMILY, slot, v4_bit},
    maps::{
        BAN_HARD, BAN_MAY_PRESERVE, BAN_NOT_ALLOWLISTED, BAN_OBSERVE, BanValue, Config,
        LAYOUT_VERSION, programs,
    },
};
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::support::*;

/// The kernel object of the release before layout 2 (commit 7bdaa05), debug info stripped.
static LAYOUT1_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/layout1/wsguard-ebpf.o"
));

/// What the layout-1 agent pinned under `maps/` (its `loader::PINNED_MAPS`).
const LAYOUT1_PINNED: [&str; 13] = [
    "CONFIG",
    "PORTS",
    "COUNTERS",
    "BANS_V4",
    "BANS_V6",
    "BAN_CIDRS_V4",
    "BAN_CIDRS_V6",
    "ALLOW_V4",
    "ALLOW_V6",
    "FLOWS",
    "RATES",
    "BURSTS",
    "BAN_FILTER",
];
const LAYOUT1_BAN_MAPS: [&str; 4] = ["BANS_V4", "BANS_V6", "BAN_CIDRS_V4", "BAN_CIDRS_V6"];

/// Runs the kill switch when the test ends, passed or failed, before the namespaces and the
/// bpffs go (declare it after them).
pub(crate) struct Detach(pub(crate) PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = DataPath::detach_all(&self.0)
        {
            eprintln!("cleanup: detach {}: {e}", self.0.display());
        }
    }
}

fn mkdir_0700(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    // The umask may have taken bits away; the agent's directories are exactly 0700.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// FNV-1a, as the agent names a build in the layout record.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The bans a layout-1 agent wrote: no `BAN_MAY_PRESERVE`, `BAN_NOT_ALLOWLISTED` where no
/// allowlist entry overlaps (none here does).
pub(crate) struct Planted {
    pub(crate) v4: (Ipv4Addr, BanValue),
    pub(crate) v6: (Ipv6Addr, BanValue),
    pub(crate) cidr_v4: (Ipv4Addr, u32, BanValue),
    pub(crate) cidr_v6: (Ipv6Addr, u32, BanValue),
    pub(crate) allow: Cidr,
}

pub(crate) fn planted(lab: &VethLab) -> Planted {
    let now = wsguard::datapath::boot_ns();
    let hour = 3_600_000_000_000;
    let v = |created_ns, expires_ns, flags| BanValue {
        expires_ns,
        created_ns,
        drops: 0,
        flags,
        _pad: 0,
    };
    Planted {
        // The source the traffic comes from: banned for good.
        v4: (lab.ip_b, v(now - 1_000, 0, BAN_NOT_ALLOWLISTED)),
        v6: (
            "fd00:5753:77::1".parse().expect("valid"),
            v(now - 2_000, now + hour, BAN_HARD | BAN_NOT_ALLOWLISTED),
        ),
        cidr_v4: (
            Ipv4Addr::new(198, 19, 77, 0),
            24,
            v(
                now - 3_000,
                now + 2 * hour,
                BAN_OBSERVE | BAN_NOT_ALLOWLISTED,
            ),
        ),
        cidr_v6: (
            "fd00:5753:bad::".parse().expect("valid"),
            48,
            v(now - 4_000, now + 3 * hour, BAN_NOT_ALLOWLISTED),
        ),
        allow: cidr("198.19.88.0/24"),
    }
}

/// Be the layout-1 agent: load the fixture with its maps pinned under `maps/`, fill them as
/// that agent did (CONFIG, ports, bans, an allow entry, the ban pre-filter), attach XDP and TC
/// egress through BPF links pinned under `links/`, and write the records. Returns the build id
/// written in the layout record.
fn layout1_agent(lab: &VethLab, o: &DataPathOptions, p: &Planted) -> Result<u64> {
    previous_agent(lab, o, p, LAYOUT1_OBJECT, 1)
}

/// [`layout1_agent`] for the release `object` with map layout `version` (1 and 2 pin the same
/// maps and fill them the same way).
pub(crate) fn previous_agent(
    lab: &VethLab,
    o: &DataPathOptions,
    p: &Planted,
    object: &[u8],
    version: u32,
) -> Result<u64> {
    let maps_dir = pin(o, "maps");
    for dir in [o.pin_dir.clone(), maps_dir.clone(), pin(o, "links")] {
        mkdir_0700(&dir)?;
    }
    let mut loader = EbpfLoader::new();
    for name in LAYOUT1_BAN_MAPS {
        loader.map_max_entries(name, o.max_bans);
    }
    for name in LAYOUT1_PINNED {
        loader.map_pin_path(name, maps_dir.join(name));
    }
    let mut ebpf = loader
        .load(object)
        .with_context(|| format!("aya loads the layout-{version} fixture"))?;
    for name in LAYOUT1_PINNED {
        ensure!(maps_dir.join(name).exists(), "{name} not pinned");
    }

    // Maps first: the program must never run on an empty CONFIG.
    let mut cfg: Array<_, Config> = Array::try_from(pinned_map(o, "CONFIG")?)?;
    cfg.set(
        0,
        Config {
            threshold: 9,
            cidr_v4: 1,
            cidr_v6: 1,
            layout_version: version,
            ..Config::new()
        },
        0,
    )?;
    let mut ports: Array<_, u8> = Array::try_from(pinned_map(o, "PORTS")?)?;
    ports.set(8080, 1, 0)?;
    let mut v4: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V4")?)?;
    v4.insert(p.v4.0.octets(), p.v4.1, 0)?;
    let mut v6: HashMap<_, [u8; 16], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V6")?)?;
    v6.insert(p.v6.0.octets(), p.v6.1, 0)?;
    let mut c4: LpmTrie<_, [u8; 4], BanValue> = LpmTrie::try_from(pinned_map(o, "BAN_CIDRS_V4")?)?;
    c4.insert(&Key::new(p.cidr_v4.1, p.cidr_v4.0.octets()), p.cidr_v4.2, 0)?;
    let mut c6: LpmTrie<_, [u8; 16], BanValue> = LpmTrie::try_from(pinned_map(o, "BAN_CIDRS_V6")?)?;
    c6.insert(&Key::new(p.cidr_v6.1, p.cidr_v6.0.octets()), p.cidr_v6.2, 0)?;
    let mut allow: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(pinned_map(o, "ALLOW_V4")?)?;
    let IpAddr::V4(allow_net) = p.allow.addr() else {
        unreachable!("an IPv4 allow entry")
    };
    allow.insert(
        &Key::new(p.allow.prefix_len().into(), allow_net.octets()),
        1,
        0,
    )?;
    // The pre-filter: every IPv4 /24 proven clean except the two the bans cover; the IPv6 half
    // stays clear (all "maybe banned") because a CIDR shorter than /64 is banned.
    let mut filter: Array<_, u64> = Array::try_from(pinned_map(o, "BAN_FILTER")?)?;
    let banned = [v4_bit(p.v4.0.octets()), v4_bit(p.cidr_v4.0.octets())].map(|b| slot(b, false));
    for word in 0..FILTER_WORDS_PER_FAMILY {
        let dirty = banned
            .iter()
            .filter(|(w, _)| *w == word)
            .fold(0, |m, (_, bit)| m | bit);
        filter.set(word, !dirty, 0)?;
    }

    let xdp: &mut Xdp = ebpf
        .program_mut(programs::XDP)
        .context("XDP program in the fixture")?
        .try_into()?;
    xdp.load()
        .with_context(|| format!("the verifier accepts the layout-{version} XDP"))?;
    let tc: &mut SchedClassifier = ebpf
        .program_mut(programs::TC_EGRESS)
        .context("TC program in the fixture")?
        .try_into()?;
    tc.load()
        .with_context(|| format!("the verifier accepts the layout-{version} TC"))?;
    let iface = lab.if_a.clone();
    lab.a.run(|| -> Result<()> {
        let xdp: &mut Xdp = ebpf.program_mut(programs::XDP).context("XDP")?.try_into()?;
        let id = xdp.attach(&iface, XdpMode::Driver)?;
        let link = FdLink::try_from(xdp.take_link(id)?).context("XDP through a BPF link")?;
        symlink("native", pin(o, "links").join(format!("{iface}_xdpmode")))?;
        link.pin(pin(o, "links").join(format!("{iface}_xdp")))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(programs::TC_EGRESS)
            .context("TC")?
            .try_into()?;
        let id = tc.attach_with_options(
            &iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?;
        let link = FdLink::try_from(tc.take_link(id)?).context("TC through a TCX link")?;
        link.pin(pin(o, "links").join(format!("{iface}_tc")))?;
        Ok(())
    })??;
    let build = fnv(object);
    symlink(
        format!("layout-v{version}-build-{build:016x}"),
        pin(o, "layout"),
    )?;
    // The agent exits: the pinned links keep the programs, the pins keep the maps.
    drop(ebpf);
    Ok(build)
}

pub(crate) fn pinned_v4(o: &DataPathOptions, a: Ipv4Addr) -> Result<BanValue> {
    let m: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V4")?)?;
    let v = m.get(&a.octets(), 0)?;
    // With the drops the program counted in the table's copy (layouts from before it have none).
    Ok(BanValue {
        drops: pinned_drops(o, a)?,
        ..v
    })
}

pub(crate) fn pinned_v6(o: &DataPathOptions, a: Ipv6Addr) -> Result<BanValue> {
    let m: HashMap<_, [u8; 16], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V6")?)?;
    Ok(m.get(&a.octets(), 0)?)
}

pub(crate) fn pinned_cidr_v4(o: &DataPathOptions, a: Ipv4Addr, len: u32) -> Result<BanValue> {
    let m: LpmTrie<_, [u8; 4], BanValue> = LpmTrie::try_from(pinned_map(o, "BAN_CIDRS_V4")?)?;
    Ok(m.get(&Key::new(len, a.octets()), 0)?)
}

pub(crate) fn pinned_cidr_v6(o: &DataPathOptions, a: Ipv6Addr, len: u32) -> Result<BanValue> {
    let m: LpmTrie<_, [u8; 16], BanValue> = LpmTrie::try_from(pinned_map(o, "BAN_CIDRS_V6")?)?;
    Ok(m.get(&Key::new(len, a.octets()), 0)?)
}

/// `old` as the migration must leave it: the same times, flags and drops (at least: the
/// programs keep counting), plus `BAN_MAY_PRESERVE`.
fn migrated(what: &str, old: &BanValue, now: &BanValue) -> Result<()> {
    ensure!(
        (now.created_ns, now.expires_ns, now.flags)
            == (old.created_ns, old.expires_ns, old.flags | BAN_MAY_PRESERVE)
            && now.drops >= old.drops,
        "{what}: layout-1 {old:?} became {now:?}"
    );
    Ok(())
}

#[test]
fn a_layout1_node_is_upgraded_with_bans_converted_and_no_gap() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let _detach = Detach(o.pin_dir.clone());
    let p = planted(&lab);
    let old_build = layout1_agent(&lab, &o, &p)?;
    ensure!(old_build != build_id(), "the fixture is this build");

    // The previous release enforces on its own.
    let old = one_each(&lab)?;
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "the layout-1 program does not drop the banned source"
    );
    ensure!(
        lab.ping_from(lab.ip_b2, 3, "0.2")? == 3,
        "the layout-1 program drops a clean source"
    );
    let links = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );
    ensure!(
        (links.0.1, links.1.1) == old,
        "the pinned links run the programs attached: {links:?} {old:?}"
    );
    let old_maps = MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id();
    let before = (
        pinned_v4(&o, p.v4.0)?,
        pinned_v6(&o, p.v6.0)?,
        pinned_cidr_v4(&o, p.cidr_v4.0, p.cidr_v4.1)?,
        pinned_cidr_v6(&o, p.cidr_v6.0, p.cidr_v6.1)?,
    );
    ensure!(before.0.drops > 0, "the layout-1 program counted no drop");

    let dp = under_traffic(&lab, &o, || open_in(&lab, &o, OpenHooks::default()))?;

    let layout = std::fs::read_link(pin(&o, "layout"))?;
    ensure!(
        layout.to_string_lossy() == format!("layout-v{LAYOUT_VERSION}-build-{:016x}", build_id()),
        "layout record {layout:?}"
    );
    let cfg = pinned_config(&o)?;
    ensure!(
        (cfg.layout_version, cfg.threshold, cfg.cidr_v4, cfg.cidr_v6) == (LAYOUT_VERSION, 9, 1, 1),
        "CONFIG after the upgrade: {cfg:?}"
    );
    ensure!(
        MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id() != old_maps,
        "the maps were not migrated into fresh ones"
    );
    ensure!(!pin(&o, "maps_new").exists(), "staging dir left behind");

    migrated("exact IPv4", &before.0, &pinned_v4(&o, p.v4.0)?)?;
    migrated("exact IPv6", &before.1, &pinned_v6(&o, p.v6.0)?)?;
    migrated(
        "CIDR IPv4",
        &before.2,
        &pinned_cidr_v4(&o, p.cidr_v4.0, p.cidr_v4.1)?,
    )?;
    migrated(
        "CIDR IPv6",
        &before.3,
        &pinned_cidr_v6(&o, p.cidr_v6.0, p.cidr_v6.1)?,
    )?;
    ensure!(
        dp.bans()?.len() == 4,
        "exactly the four bans: {:?}",
        dp.bans()?
    );
    ensure!(
        dp.allows()? == vec![p.allow],
        "allow entry: {:?}",
        dp.allows()?
    );

    // Swapped through the same links: one attachment each, new programs, old link ids.
    let new = one_each(&lab)?;
    ensure!(
        new.0 != old.0 && new.1 != old.1 && dp.interfaces()[0].xdp_prog_id == new.0,
        "programs {old:?} -> {new:?}"
    );
    let (xdp, tc) = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );
    ensure!(
        (xdp.0, xdp.1, tc.0, tc.1) == (links.0.0, new.0, links.1.0, new.1),
        "the links were recreated instead of updated: {links:?} -> {xdp:?} {tc:?}"
    );
    ensure!(dp.interfaces()[0].xdp_mode == "native");

    // The new program counts into the migrated maps.
    let drops = pinned_v4(&o, p.v4.0)?.drops;
    ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
    ensure!(pinned_v4(&o, p.v4.0)?.drops >= drops + 2);
    ensure!(lab.ping_from(lab.ip_b2, 2, "0.2")? == 2);
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    ensure!(
        attached(&lab)?
            == Attached {
                xdp: vec![],
                tc: vec![]
            },
        "{:?}",
        attached(&lab)?
    );
    Ok(())
}

#[test]
fn a_newer_pinned_layout_is_refused_and_left_enforcing() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let _detach = Detach(o.pin_dir.clone());
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let newer = LAYOUT_VERSION + 1;
    {
        let mut dp = open_in(
            &lab,
            &o,
            OpenHooks {
                layout_version: Some(newer),
                ..Default::default()
            },
        )?;
        dp.put_ban(&banned, &ban())?;
    }
    let running = one_each(&lab)?;
    let links = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );
    let maps = MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id();
    let record = std::fs::read_link(pin(&o, "layout"))?;
    let value = pinned_v4(&o, lab.ip_b)?;

    let Err(e) = open_in(&lab, &o, OpenHooks::default()) else {
        anyhow::bail!("a build with layout v{LAYOUT_VERSION} took over pinned layout v{newer}");
    };
    let msg = e.to_string();
    ensure!(
        msg.contains(&format!("layout v{newer}")) && msg.contains(&format!("v{LAYOUT_VERSION}")),
        "the refusal names both layouts: {msg}"
    );
    // Nothing changed: same programs, links, maps, record, ban; still enforcing.
    ensure!(one_each(&lab)? == running, "the programs changed");
    ensure!(
        (
            link_info(&o, "links/wsg-a_xdp")?,
            link_info(&o, "links/wsg-a_tc")?
        ) == links,
        "the links changed"
    );
    ensure!(MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id() == maps);
    ensure!(std::fs::read_link(pin(&o, "layout"))? == record);
    ensure!(!pin(&o, "maps_new").exists(), "staging dir left behind");
    let now = pinned_v4(&o, lab.ip_b)?;
    ensure!(
        (now.created_ns, now.expires_ns, now.flags)
            == (value.created_ns, value.expires_ns, value.flags),
        "the pinned ban was rewritten: {value:?} -> {now:?}"
    );
    ensure!(pinned_config(&o)?.layout_version == newer);
    ensure!(
        lab.ping_from(lab.ip_b, 2, "0.2")? == 0,
        "no longer enforcing"
    );

    // A build that knows the layout adopts it as before.
    let dp = open_in(
        &lab,
        &o,
        OpenHooks {
            layout_version: Some(newer),
            ..Default::default()
        },
    )?;
    ensure!(dp.bans()?.iter().any(|(c, _)| *c == banned));
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
