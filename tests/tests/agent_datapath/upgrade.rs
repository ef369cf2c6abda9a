//! Adoption, atomic swaps of another build, layout migrations, interrupted migrations.

use anyhow::{Result, ensure};
use aya::{
    maps::{MapData, MapInfo},
    programs::links::LinkType,
};
use std::net::IpAddr;
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, OpenHooks},
};
use wsguard_common::maps::{Config, LAYOUT_VERSION};
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::support::*;

#[test]
fn dropping_the_handle_keeps_enforcing_and_reopen_adopts() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let first = {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
        dp.put_allow(&cidr("192.0.2.0/24"))?;
        one_each(&lab)?
    }; // dropped: fail-static, nothing detaches
    ensure!(one_each(&lab)? == first, "programs changed after the drop");
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "not enforcing after the handle was dropped"
    );
    let links = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );

    // Same build: adopt as is, attach nothing.
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(
        dp.interfaces()[0].xdp_prog_id == first.0 && dp.interfaces()[0].xdp_mode == "native",
        "same build must keep the program: {:?}",
        dp.interfaces()
    );
    ensure!(one_each(&lab)? == first, "a second program was attached");
    ensure!(
        (
            link_info(&o, "links/wsg-a_xdp")?,
            link_info(&o, "links/wsg-a_tc")?
        ) == links,
        "the links were replaced"
    );
    ensure!(
        dp.bans()?.iter().any(|(c, _)| *c == banned),
        "ban lost on adoption"
    );
    ensure!(
        dp.allows()?.contains(&cidr("192.0.2.0/24")),
        "allow entry lost on adoption"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn another_build_is_swapped_through_the_pinned_links_without_a_gap() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let settings = Config {
        threshold: 9,
        window_ns: 7_000_000_000,
        ..Config::new()
    };
    {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
        dp.set_config(&settings)?;
    }
    let before = pinned_config(&o)?;
    let old = one_each(&lab)?;
    let (xdp_link, tc_link) = (
        link_info(&o, "links/wsg-a_xdp")?.0,
        link_info(&o, "links/wsg-a_tc")?.0,
    );
    let maps_before = MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id();

    let dp = under_traffic(&lab, &o, || open_in(&lab, &o, another_build()))?;
    let new = one_each(&lab)?;
    ensure!(
        new.0 != old.0 && new.1 != old.1,
        "another build must be swapped in: {old:?} -> {new:?}"
    );
    ensure!(dp.interfaces()[0].xdp_prog_id == new.0);
    // The same links, updated in place (bpf_link_update), and the same maps.
    ensure!(
        link_info(&o, "links/wsg-a_xdp")? == (xdp_link, new.0, LinkType::Xdp)
            && link_info(&o, "links/wsg-a_tc")? == (tc_link, new.1, LinkType::Tcx),
        "the links were recreated instead of updated"
    );
    ensure!(MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id() == maps_before);
    let layout = std::fs::read_link(pin(&o, "layout"))?;
    ensure!(
        layout
            .to_string_lossy()
            .ends_with("-build-0000000000001234"),
        "{layout:?}"
    );
    ensure!(
        dp.bans()?.iter().any(|(c, _)| *c == banned),
        "ban lost in the upgrade"
    );
    // The load writes the settings section's bytes into the pinned map the old program reads:
    // they must be the pinned settings, not the object's zeros.
    let after = pinned_config(&o)?;
    ensure!(
        (after.threshold, after.window_ns) == (9, settings.window_ns),
        "the swap reset the pinned settings: threshold {} -> {}, window {} -> {} ns",
        before.threshold,
        after.threshold,
        before.window_ns,
        after.window_ns
    );
    drop(dp);

    // And back: this build replaces the other one the same way.
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    let back = one_each(&lab)?;
    ensure!(back.0 != new.0 && back.0 == dp.interfaces()[0].xdp_prog_id);
    ensure!(link_info(&o, "links/wsg-a_xdp")?.0 == xdp_link);
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn layout_migration_copies_entries_then_swaps_without_a_gap() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let (old_map, settings) = {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
        dp.put_ban(&cidr("2001:db8::/32"), &ban())?;
        dp.put_allow(&cidr("192.0.2.0/24"))?;
        dp.set_ports(&[80, 8080])?;
        dp.set_config(&Config {
            threshold: 9,
            ..Config::new()
        })?;
        ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
        (
            MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id(),
            dp.config()?,
        )
    };
    let old = one_each(&lab)?;
    let xdp_link = link_info(&o, "links/wsg-a_xdp")?.0;
    let drops_before = pinned_drops(&o, lab.ip_b)?;

    let dp = under_traffic(&lab, &o, || {
        open_in(
            &lab,
            &o,
            OpenHooks {
                layout_version: Some(LAYOUT_VERSION + 1),
                ..Default::default()
            },
        )
    })?;
    let new_map = MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id();
    ensure!(new_map != old_map, "the ban map was not replaced");
    ensure!(!pin(&o, "maps_new").exists(), "staging dir left behind");
    let layout = std::fs::read_link(pin(&o, "layout"))?;
    ensure!(
        layout
            .to_string_lossy()
            .starts_with(&format!("layout-v{}-", LAYOUT_VERSION + 1)),
        "{layout:?}"
    );
    let new = one_each(&lab)?;
    ensure!(
        new.0 != old.0 && new.1 != old.1 && new.0 == dp.interfaces()[0].xdp_prog_id,
        "{old:?} -> {new:?}"
    );
    ensure!(
        link_info(&o, "links/wsg-a_xdp")?.0 == xdp_link,
        "migration must swap through the pinned link"
    );
    let cfg = dp.config()?;
    ensure!(
        cfg.layout_version == LAYOUT_VERSION + 1
            && (cfg.threshold, cfg.window_ns, cfg.cidr_v6) == (9, settings.window_ns, 1),
        "{cfg:?}"
    );
    ensure!(dp.bans()?.len() == 2 && dp.allows()?.contains(&cidr("192.0.2.0/24")));
    // The drops counted before came along, and the new program counts into the map now pinned.
    let after = drops_of(&dp, &banned)?;
    ensure!(after > drops_before, "drops {drops_before} -> {after}");
    ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
    ensure!(drops_of(&dp, &banned)? >= after + 2);
    ensure!(
        lab.ping_from(lab.ip_b2, 2, "0.2")? == 2,
        "clean source dropped after migration"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn a_start_after_an_interrupted_migration_runs_on_the_pinned_maps() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    const NAMES: [&str; 12] = [
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
    ];
    {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&Cidr::host(IpAddr::V4(lab.ip_b)), &ban())?;
    }
    // Keep the first generation's maps, migrate, then put the pins back the way a crash after
    // the swap and before the renames leaves them: the program runs on maps_new/, maps/ holds
    // the old maps, and the layout record still names the old generation.
    let saved = bpffs.path().join("saved");
    std::fs::create_dir(&saved)?;
    for n in NAMES {
        MapData::from_pin(pin(&o, "maps").join(n))?.pin(saved.join(n))?;
    }
    let record = std::fs::read_link(pin(&o, "layout"))?;
    drop(open_in(
        &lab,
        &o,
        OpenHooks {
            layout_version: Some(LAYOUT_VERSION + 1),
            ..Default::default()
        },
    )?);
    let migrated = one_each(&lab)?;
    std::fs::create_dir(pin(&o, "maps_new"))?;
    for n in NAMES {
        std::fs::rename(pin(&o, "maps").join(n), pin(&o, "maps_new").join(n))?;
        std::fs::rename(saved.join(n), pin(&o, "maps").join(n))?;
    }
    std::fs::remove_file(pin(&o, "layout"))?;
    std::os::unix::fs::symlink(&record, pin(&o, "layout"))?;

    // The older build starts: its record matches, but the attached programs read other maps.
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let now = one_each(&lab)?;
    ensure!(
        now.0 != migrated.0 && now.1 != migrated.1,
        "programs on the unpinned maps were adopted: {now:?}"
    );
    ensure!(
        !pin(&o, "maps_new").exists(),
        "the interrupted migration's maps stay pinned"
    );
    dp.put_ban(&Cidr::host(IpAddr::V4(lab.ip_b2)), &ban())?;
    ensure!(
        lab.ping_from(lab.ip_b2, 2, "0.2")? == 0 && lab.ping_from(lab.ip_b, 2, "0.2")? == 0,
        "a ban written after the start is not enforced"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn clsact_fallback_is_recorded_adopted_swapped_and_detached() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 100);
    let clsact = OpenHooks {
        force_clsact: true,
        ..Default::default()
    };
    let first = {
        let mut dp = open_in(&lab, &o, clsact.clone())?;
        ensure!(dp.interfaces()[0].tc_egress == "clsact");
        dp.put_ban(&Cidr::host(IpAddr::V4(lab.ip_b)), &ban())?;
        one_each(&lab)?
    };
    let record = std::fs::read_link(pin(&o, "links/wsg-a_tc"))?;
    ensure!(
        record.to_string_lossy().starts_with("clsact:"),
        "{record:?}"
    );
    let dp = open_in(&lab, &o, clsact.clone())?;
    ensure!(dp.interfaces()[0].tc_egress == "clsact");
    ensure!(one_each(&lab)? == first, "adoption attached again");
    drop(dp);
    let dp = under_traffic(&lab, &o, || {
        open_in(
            &lab,
            &o,
            OpenHooks {
                force_clsact: true,
                ..another_build()
            },
        )
    })?;
    let new = one_each(&lab)?;
    ensure!(new.1 != first.1, "the clsact filter was not replaced");
    // The same filter (priority, handle), replaced in place rather than deleted and re-added.
    ensure!(std::fs::read_link(pin(&o, "links/wsg-a_tc"))? == record);
    drop(dp);
    // A clsact filter is named by interface, so the kill switch runs in the node's namespace.
    lab.a.run(|| DataPath::detach_all(&o.pin_dir))??;
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
