//! `BAN_MAY_PRESERVE` as the agent writes it: a ban written on its own gets it at once and
//! loses it when the sweeper's read of the flow table finds no established flow of its
//! clients; a batch reads the table first and flags only bans covering a live flow.

use anyhow::{Result, ensure};
use aya::maps::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, OpenHooks},
};
use wsguard_common::maps::{
    BAN_MAY_PRESERVE, BanValue, FLOW_ANSWERED, FLOW_ESTABLISHED, FLOW_HANDSHAKE, FlowKey,
    FlowValue, v4_mapped,
};
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::support::*;

fn add_flow(o: &wsguard::datapath::DataPathOptions, client: Ipv4Addr, state: u8) -> Result<()> {
    let mut flows: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(pinned_map(o, "FLOWS")?)?;
    let key = FlowKey {
        client: v4_mapped(client.octets()),
        server: v4_mapped([198, 18, 1, 1]),
        client_port: 40000u16.to_be(),
        server_port: 80u16.to_be(),
    };
    let value = FlowValue {
        first_seen_ns: 1,
        state,
        ..Default::default()
    };
    flows.insert(key, value, 0)?;
    Ok(())
}

fn value(o: &wsguard::datapath::DataPathOptions, a: Ipv4Addr) -> Result<BanValue> {
    let bans: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V4")?)?;
    Ok(bans.get(&a.octets(), 0)?)
}

fn flags(o: &wsguard::datapath::DataPathOptions, a: Ipv4Addr) -> Result<u32> {
    Ok(value(o, a)?.flags)
}

fn host(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 77, last)
}

#[test]
fn single_bans_are_flagged_at_once_and_settled_by_the_flow_table() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let (est, hs, answered, none) = (host(1), host(2), host(3), host(4));
    add_flow(&o, est, FLOW_ESTABLISHED)?;
    add_flow(&o, hs, FLOW_HANDSHAKE)?;
    add_flow(&o, answered, FLOW_ANSWERED)?;
    for a in [est, hs, answered, none] {
        dp.put_ban(&Cidr::host(IpAddr::V4(a)), &ban())?;
        ensure!(
            flags(&o, a)? & BAN_MAY_PRESERVE != 0,
            "{a}: not flagged at once"
        );
    }
    let before = value(&o, none)?;
    // Only the established flow can be preserved; a handshake that completes later finds the
    // ban and is marked by the TC program.
    ensure!(dp.settle_preserve()? == 3, "three bans settled");
    let after = value(&o, none)?;
    ensure!(
        after
            == BanValue {
                flags: before.flags & !BAN_MAY_PRESERVE,
                ..before
            },
        "settling changed more than the flag: {before:?} -> {after:?}"
    );
    ensure!(
        flags(&o, est)? & BAN_MAY_PRESERVE != 0,
        "established flow lost"
    );
    for a in [hs, answered, none] {
        ensure!(flags(&o, a)? & BAN_MAY_PRESERVE == 0, "{a}: still flagged");
    }
    ensure!(dp.settle_preserve()? == 0, "nothing left to settle");
    ensure!(dp.bans()?.len() == 4, "settling added or removed bans");
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn batches_read_the_flow_table_before_writing() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let (est, hs, answered, none) = (host(11), host(12), host(13), host(14));
    add_flow(&o, est, FLOW_ESTABLISHED)?;
    add_flow(&o, hs, FLOW_HANDSHAKE)?;
    add_flow(&o, answered, FLOW_ANSWERED)?;
    let bans: Vec<(Cidr, BanValue)> = [est, hs, answered, none]
        .iter()
        .map(|a| (Cidr::host(IpAddr::V4(*a)), ban()))
        .collect();
    dp.put_bans(&bans)?;
    for (a, want) in [(est, true), (hs, true), (answered, false), (none, false)] {
        ensure!(
            (flags(&o, a)? & BAN_MAY_PRESERVE != 0) == want,
            "{a}: flagged should be {want}"
        );
    }
    ensure!(
        dp.settle_preserve()? == 0,
        "batches leave nothing to settle"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
