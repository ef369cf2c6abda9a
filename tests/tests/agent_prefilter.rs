//! The agent's side of the kernel's fast paths, against the real kernel: the ban pre-filter
//! (`BAN_FILTER`) and the host filter (`HOST_FILTER`) it fills and keeps in step with the bans,
//! and the `BAN_NOT_ALLOWLISTED`
//! flag it sets on bans no allowlist entry overlaps. What the kernel holds is read from the
//! pinned maps, and traffic from the client namespace proves the verdicts.

use anyhow::{Result, ensure};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::{
    filter::{self, FILTER_WORDS_PER_FAMILY},
    maps::{BAN_NOT_ALLOWLISTED, BanValue},
};
use wsguard_tests::netns::{BpfFs, VethLab};

/// A source in another /24 than the lab's, so another pre-filter bucket.
const FAR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

fn lab() -> Result<VethLab> {
    let lab = VethLab::new()?;
    lab.b
        .ip(&["addr", "add", &format!("{FAR}/24"), "dev", &lab.if_b])?;
    lab.a
        .ip(&["addr", "add", "198.18.1.1/24", "dev", &lab.if_a])?;
    Ok(lab)
}

fn opts(bpffs: &BpfFs, lab: &VethLab) -> DataPathOptions {
    DataPathOptions {
        pin_dir: bpffs.path().join("wsguard"),
        interfaces: vec![lab.if_a.clone()],
        xdp_mode: XdpMode::Auto,
        max_bans: 10_000,
    }
}

fn open(lab: &VethLab, o: &DataPathOptions, hooks: OpenHooks) -> Result<DataPath> {
    Ok(lab.a.run(|| DataPath::open_with(o, &hooks))??)
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("valid test CIDR")
}

fn host(ip: Ipv4Addr) -> Cidr {
    Cidr::host(IpAddr::V4(ip))
}

fn ban() -> BanValue {
    BanValue {
        created_ns: wsguard::datapath::boot_ns(),
        ..Default::default()
    }
}

fn pinned(o: &DataPathOptions, name: &str) -> Result<Map> {
    Ok(Map::from_map_data(MapData::from_pin(
        o.pin_dir.join("maps").join(name),
    )?)?)
}

fn filter_map(o: &DataPathOptions) -> Result<Array<MapData, u64>> {
    Ok(Array::try_from(pinned(o, "BAN_FILTER")?)?)
}

/// The kernel's pre-filter bit of `ip`'s bucket: set = "no ban here, skip the lookups".
fn clean_in_kernel(o: &DataPathOptions, ip: IpAddr) -> Result<bool> {
    let (bit, v6) = match ip {
        IpAddr::V4(a) => (filter::v4_bit(a.octets()), false),
        IpAddr::V6(a) => (filter::v6_bit(&a.octets()), true),
    };
    let (word, mask) = filter::slot(bit, v6);
    Ok(filter_map(o)?.get(&word, 0)? & mask != 0)
}

/// Clear bits of one family in the kernel's pre-filter.
fn zero_bits(o: &DataPathOptions, v6: bool) -> Result<u64> {
    let a = filter_map(o)?;
    let base = if v6 { FILTER_WORDS_PER_FAMILY } else { 0 };
    let mut zeros = 0;
    for i in 0..FILTER_WORDS_PER_FAMILY {
        zeros += u64::from(a.get(&(base + i), 0)?.count_zeros());
    }
    Ok(zeros)
}

fn host_map(o: &DataPathOptions) -> Result<Array<MapData, u64>> {
    Ok(Array::try_from(pinned(o, "HOST_FILTER")?)?)
}

/// The kernel's host-filter bit of `ip`: set = "no exact ban has its low 24 bits".
fn host_clean_in_kernel(o: &DataPathOptions, ip: Ipv4Addr) -> Result<bool> {
    let (word, mask) = filter::host_slot(filter::host_bit(ip.octets()));
    Ok(host_map(o)?.get(&word, 0)? & mask != 0)
}

/// Clear bits of the kernel's host filter.
fn zero_host_bits(o: &DataPathOptions) -> Result<u64> {
    let a = host_map(o)?;
    let mut zeros = 0;
    for i in 0..filter::HOST_FILTER_WORDS {
        zeros += u64::from(a.get(&i, 0)?.count_zeros());
    }
    Ok(zeros)
}

fn v4_flags(o: &DataPathOptions, ip: Ipv4Addr) -> Result<u32> {
    let m: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(pinned(o, "BANS_V4")?)?;
    Ok(m.get(&ip.octets(), 0)?.flags)
}

fn v4_net_flags(o: &DataPathOptions, c: &Cidr) -> Result<u32> {
    let IpAddr::V4(a) = c.addr() else {
        anyhow::bail!("{c} is not IPv4")
    };
    let m: LpmTrie<_, [u8; 4], BanValue> = LpmTrie::try_from(pinned(o, "BAN_CIDRS_V4")?)?;
    Ok(m.get(&Key::new(c.prefix_len().into(), a.octets()), 0)?
        .flags)
}

#[test]
fn filled_filter_keeps_bans_dropping_and_clean_buckets_passing() -> Result<()> {
    let lab = lab()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &lab);
    let mut dp = open(&lab, &o, OpenHooks::default())?;
    // Filled at open: with no ban, every bucket of both families is proven clean.
    ensure!(zero_bits(&o, false)? == 0, "IPv4 buckets left unfilled");
    ensure!(zero_bits(&o, true)? == 0, "IPv6 buckets left unfilled");
    ensure!(zero_host_bits(&o)? == 0, "host filter left unfilled");

    let other = Ipv4Addr::new(198, 18, 0, 77);
    dp.put_ban(&host(lab.ip_b), &ban())?;
    dp.put_ban(&host(other), &ban())?;
    ensure!(
        zero_host_bits(&o)? == 2
            && !host_clean_in_kernel(&o, lab.ip_b)?
            && host_clean_in_kernel(&o, lab.ip_b2)?,
        "the host filter does not have exactly the two bans' bits clear"
    );
    ensure!(
        !clean_in_kernel(&o, lab.ip_b.into())?,
        "the banned bucket is marked clean"
    );
    ensure!(
        clean_in_kernel(&o, FAR.into())?,
        "the far bucket is not marked clean"
    );
    ensure!(
        zero_bits(&o, false)? == 1,
        "exactly one IPv4 bucket should be looked up"
    );
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "the banned source got answers"
    );
    ensure!(
        lab.ping_from(lab.ip_b2, 3, "0.2")? == 3,
        "a clean source in the banned bucket was dropped"
    );
    ensure!(
        lab.ping_from(FAR, 3, "0.2")? == 3,
        "a clean source in a clean bucket was dropped"
    );

    dp.del_ban(&host(lab.ip_b))?;
    ensure!(
        !clean_in_kernel(&o, lab.ip_b.into())?,
        "set while {other} still covers the bucket"
    );
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 3,
        "unbanned source still dropped"
    );
    dp.del_ban(&host(other))?;
    ensure!(
        clean_in_kernel(&o, lab.ip_b.into())?,
        "not set again after the last ban in the bucket went"
    );
    ensure!(zero_bits(&o, false)? == 0);
    ensure!(zero_host_bits(&o)? == 0, "host bits not set again");

    // A wide IPv4 ban clears every /24 it covers, and its removal sets them all again.
    dp.put_ban(&cidr("198.18.0.0/23"), &ban())?;
    ensure!(zero_bits(&o, false)? == 2, "a /23 covers two buckets");
    ensure!(
        lab.ping_from(FAR, 3, "0.2")? == 0,
        "the /23 does not drop its source"
    );
    dp.del_ban(&cidr("198.18.0.0/23"))?;
    ensure!(zero_bits(&o, false)? == 0);
    ensure!(lab.ping_from(FAR, 3, "0.2")? == 3);
    Ok(())
}

#[test]
fn short_ipv6_ban_clears_every_ipv6_bit() -> Result<()> {
    let lab = lab()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &lab);
    let mut dp = open(&lab, &o, OpenHooks::default())?;
    let one: Ipv6Addr = "fd00:5753::2".parse()?;
    dp.put_ban(&Cidr::host(one.into()), &ban())?;
    ensure!(zero_bits(&o, true)? == 1, "one IPv6 host ban, one bucket");
    dp.put_ban(&cidr("fd00:99::/48"), &ban())?;
    ensure!(
        zero_bits(&o, true)? == u64::from(filter::FILTER_BITS_PER_FAMILY),
        "a /48 must leave every IPv6 bucket looked up"
    );
    ensure!(zero_bits(&o, false)? == 0, "IPv4 buckets were touched");
    dp.del_ban(&cidr("fd00:99::/48"))?;
    ensure!(
        zero_bits(&o, true)? == 1,
        "the /48 went, the host ban stays"
    );
    ensure!(!clean_in_kernel(&o, one.into())?);
    Ok(())
}

#[test]
fn allowlist_after_a_ban_clears_its_flag_and_the_source_passes() -> Result<()> {
    let lab = lab()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &lab);
    let mut dp = open(&lab, &o, OpenHooks::default())?;
    let bystander = Ipv4Addr::new(198, 18, 5, 9);
    let net = cidr("198.18.1.0/24");
    dp.put_ban(&host(lab.ip_b), &ban())?;
    dp.put_ban(&host(bystander), &ban())?;
    dp.put_ban(&net, &ban())?;
    ensure!(
        v4_flags(&o, lab.ip_b)? & BAN_NOT_ALLOWLISTED != 0,
        "flag not set"
    );
    ensure!(
        v4_net_flags(&o, &net)? & BAN_NOT_ALLOWLISTED != 0,
        "flag not set on a network"
    );
    ensure!(lab.ping_from(lab.ip_b, 3, "0.2")? == 0);
    ensure!(lab.ping_from(FAR, 3, "0.2")? == 0);

    dp.put_allow(&host(lab.ip_b))?;
    ensure!(
        v4_flags(&o, lab.ip_b)? & BAN_NOT_ALLOWLISTED == 0,
        "flag kept on an allowlisted ban"
    );
    ensure!(
        v4_flags(&o, bystander)? & BAN_NOT_ALLOWLISTED != 0,
        "an unrelated ban lost its flag"
    );
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 3,
        "the allowlisted source is still dropped"
    );

    // An entry inside a network ban unflags the network; an address of it passes.
    dp.put_allow(&host(FAR))?;
    ensure!(
        v4_net_flags(&o, &net)? & BAN_NOT_ALLOWLISTED == 0,
        "flag kept on the network"
    );
    ensure!(
        lab.ping_from(FAR, 3, "0.2")? == 3,
        "the allowlisted source is still dropped"
    );

    // A ban written while an entry overlaps it never gets the flag.
    dp.del_ban(&host(lab.ip_b))?;
    dp.put_bans(&[(host(lab.ip_b), ban())])?;
    ensure!(
        v4_flags(&o, lab.ip_b)? & BAN_NOT_ALLOWLISTED == 0,
        "flag set under an allow entry"
    );
    Ok(())
}

#[test]
fn open_repairs_flags_and_refills_the_filter_across_adopt_and_migration() -> Result<()> {
    let lab = lab()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &lab);
    let mut dp = open(&lab, &o, OpenHooks::default())?;
    let hosts: Vec<(Cidr, BanValue)> = (0..1000u32)
        .map(|i| {
            (
                host(Ipv4Addr::new(198, 19, (i / 200) as u8, (i % 200) as u8 + 1)),
                ban(),
            )
        })
        .chain([(host(lab.ip_b), ban())])
        .collect();
    dp.put_bans(&hosts)?;
    ensure!(
        zero_bits(&o, false)? == 6,
        "five /24s of the batch and the lab's"
    );
    ensure!(zero_host_bits(&o)? == 1001, "one host bit per exact ban");
    ensure!(v4_flags(&o, Ipv4Addr::new(198, 19, 4, 200))? & BAN_NOT_ALLOWLISTED != 0);
    drop(dp);

    // A crash between an allowlist insert and the unflagging, and a bitmap gone wrong.
    let mut allow: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(pinned(&o, "ALLOW_V4")?)?;
    allow.insert(&Key::new(32, lab.ip_b.octets()), 1, 0)?;
    let mut f = filter_map(&o)?;
    f.set(0, 0, 0)?;
    let banned = Ipv4Addr::new(198, 19, 2, 7);
    let mut h = host_map(&o)?;
    h.set(
        filter::host_slot(filter::host_bit(banned.octets())).0,
        u64::MAX,
        0,
    )?;
    let dp = open(&lab, &o, OpenHooks::default())?;
    ensure!(
        zero_host_bits(&o)? == 1001 && !host_clean_in_kernel(&o, banned)?,
        "host filter not rebuilt at open"
    );
    ensure!(
        v4_flags(&o, lab.ip_b)? & BAN_NOT_ALLOWLISTED == 0,
        "flag not repaired at open"
    );
    ensure!(zero_bits(&o, false)? == 6, "bitmap not rebuilt at open");
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 3,
        "the allowlisted source is dropped"
    );
    drop(dp);

    // A migration starts from an empty pre-filter in fresh maps; the open refills it.
    let dp = open(
        &lab,
        &o,
        OpenHooks {
            layout_version: Some(wsguard_common::maps::LAYOUT_VERSION + 1),
            ..Default::default()
        },
    )?;
    ensure!(
        zero_bits(&o, false)? == 6 && zero_bits(&o, true)? == 0 && zero_host_bits(&o)? == 1001,
        "not refilled after migration"
    );
    ensure!(!clean_in_kernel(&o, Ipv4Addr::new(198, 19, 3, 1).into())?);
    ensure!(clean_in_kernel(&o, FAR.into())?);
    ensure!(lab.ping_from(FAR, 3, "0.2")? == 3);
    ensure!(dp.prefilter_clean(FAR.into()) && !dp.prefilter_clean(lab.ip_b.into()));
    Ok(())
}
