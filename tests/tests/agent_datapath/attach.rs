//! Attach, pin, enforce, report, refuse, detach.

use anyhow::{Result, bail, ensure};
use aya::{maps::Array, programs::links::LinkType};
use std::{net::IpAddr, os::unix::fs::PermissionsExt as _};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathError, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::{BanValue, Config, Counter, LAYOUT_VERSION};
use wsguard_tests::netns::{BpfFs, VethLab, XdpAttachment};

use crate::support::*;

#[test]
fn open_attaches_pins_and_enforces_bans() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;

    let ifs = dp.interfaces();
    ensure!(ifs.len() == 1 && ifs[0].name == lab.if_a, "{ifs:?}");
    // veth has a native XDP driver, so auto picks it.
    ensure!(
        ifs[0].xdp_mode == "native" && ifs[0].tc_egress == "tcx",
        "{ifs:?}"
    );
    let (xdp_prog, _) = one_each(&lab)?;
    ensure!(
        attached(&lab)?.xdp[0].mode == "native" && xdp_prog == ifs[0].xdp_prog_id,
        "kernel view {:?} vs {ifs:?}",
        attached(&lab)?
    );
    ensure!(dp.pinned() && dp.netlink_fallbacks() == 0);
    for p in [
        "maps/BANS_V4",
        "maps/BANS_V6",
        "maps/BAN_CIDRS_V4",
        "maps/BAN_CIDRS_V6",
        "maps/ALLOW_V4",
        "maps/CONFIG",
        "maps/PORTS",
        "maps/COUNTERS",
        "maps/FLOWS",
        "maps/RATES",
        "maps/BURSTS",
        "links/wsg-a_xdpmode",
        "layout",
    ] {
        ensure!(
            std::fs::symlink_metadata(pin(&o, p)).is_ok(),
            "{p} not pinned"
        );
    }
    // The links are real BPF links (pinnable, replaceable), not netlink attachments.
    let (_, prog, kind) = link_info(&o, "links/wsg-a_xdp")?;
    ensure!(kind == LinkType::Xdp && prog == xdp_prog, "{kind:?} {prog}");
    let (_, _, kind) = link_info(&o, "links/wsg-a_tc")?;
    ensure!(kind == LinkType::Tcx, "{kind:?}");
    for d in ["", "maps", "links"] {
        let mode = std::fs::metadata(pin(&o, d))?.permissions().mode() & 0o777;
        ensure!(
            mode == 0o700,
            "{}/{d} has mode {mode:o}",
            o.pin_dir.display()
        );
    }

    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    dp.put_ban(&banned, &ban())?;
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "the banned source got answers"
    );
    ensure!(
        lab.ping_from(lab.ip_b2, 3, "0.2")? == 3,
        "the clean source was dropped"
    );
    let drops = drops_of(&dp, &banned)?;
    ensure!(drops >= 3, "ban counted {drops} drops");
    let c = dp.counters()?;
    ensure!(
        c[Counter::Dropped as usize] >= 3 && c[Counter::Passed as usize] >= 3,
        "{c:?}"
    );

    // Re-putting a ban (e.g. an extension) keeps its drop counter.
    dp.put_ban(
        &banned,
        &BanValue {
            expires_ns: u64::MAX,
            ..ban()
        },
    )?;
    ensure!(
        drops_of(&dp, &banned)? >= drops,
        "replacing a ban reset its drops"
    );
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn xdp_mode_falls_back_to_generic_and_says_so() -> Result<()> {
    let lab = VethLab::new()?;
    // A bridge has no native XDP driver: auto must land on generic.
    lab.a.ip(&["link", "add", "wsg-d", "type", "bridge"])?;
    lab.a.ip(&["link", "set", "wsg-d", "up"])?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a, "wsg-d"], 100);
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    let ifs = dp.interfaces();
    ensure!(
        ifs.iter().map(|i| i.xdp_mode.as_str()).collect::<Vec<_>>() == ["native", "generic"],
        "{ifs:?}"
    );
    let kernel = lab.a.xdp_attachments("wsg-d")?;
    ensure!(
        kernel
            == [XdpAttachment {
                prog_id: ifs[1].xdp_prog_id,
                mode: "generic"
            }],
        "{kernel:?}"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;

    // Asking for generic gets generic even where native exists, and native where it does not
    // is an error naming the interface.
    let o = DataPathOptions {
        xdp_mode: XdpMode::Generic,
        ..opts(&bpffs, &[&lab.if_a], 100)
    };
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(dp.interfaces()[0].xdp_mode == "generic");
    ensure!(attached(&lab)?.xdp[0].mode == "generic");
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    let o = DataPathOptions {
        xdp_mode: XdpMode::Native,
        ..opts(&bpffs, &["wsg-d"], 100)
    };
    match open_in(&lab, &o, OpenHooks::default()) {
        Err(e) => ensure!(e.to_string().contains("wsg-d"), "{e}"),
        Ok(_) => bail!("native XDP on a bridge cannot work"),
    }
    DataPath::detach_all(&o.pin_dir)?;
    ensure!(lab.a.xdp_attachments("wsg-d")?.is_empty());
    Ok(())
}

#[test]
fn detach_all_removes_programs_and_pins() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    dp.put_ban(&Cidr::host(IpAddr::V4(lab.ip_b)), &ban())?;
    ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
    // The handle is still open, as in a running agent: detach must not depend on it closing.
    DataPath::detach_all(&o.pin_dir)?;
    let now = attached(&lab)?;
    ensure!(
        now.xdp.is_empty() && now.tc.is_empty(),
        "still attached: {now:?}"
    );
    ensure!(!o.pin_dir.exists(), "pin dir left behind");
    ensure!(
        lab.ping_from(lab.ip_b, 2, "0.2")? == 2,
        "still dropping after the kill switch"
    );
    DataPath::detach_all(&o.pin_dir)?; // idempotent
    drop(dp);
    // A fresh start after the kill switch attaches again from scratch.
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    one_each(&lab)?;
    ensure!(dp.bans()?.is_empty(), "bans survived the kill switch");
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn cidr_counts_in_config_and_full_map() -> Result<()> {
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[], 3);
    let mut dp = DataPath::open_with(&o, &OpenHooks::default())?;
    let (n4, n6) = (cidr("198.51.100.0/24"), cidr("2001:db8::/32"));
    dp.put_ban(&n4, &ban())?;
    ensure!((dp.config()?.cidr_v4, dp.config()?.cidr_v6) == (1, 0));
    dp.put_ban(&n4, &ban())?; // a replacement is not a new entry
    dp.put_ban(&n6, &ban())?;
    ensure!((dp.config()?.cidr_v4, dp.config()?.cidr_v6) == (1, 1));
    // The daemon's config writes keep the counts.
    dp.set_config(&Config {
        threshold: 7,
        ..Default::default()
    })?;
    let cfg = dp.config()?;
    ensure!(
        (cfg.threshold, cfg.cidr_v4, cfg.cidr_v6, cfg.layout_version) == (7, 1, 1, LAYOUT_VERSION),
        "{cfg:?}"
    );

    dp.put_ban(&cidr("203.0.113.9"), &ban())?;
    match dp.put_ban(&cidr("203.0.113.10"), &ban()) {
        Err(DataPathError::Full { capacity: 3 }) => {}
        other => bail!("expected Full, got {other:?}"),
    }
    dp.put_ban(&cidr("203.0.113.9"), &ban())?; // replacing still works when full
    ensure!(dp.bans()?.len() == 3 && dp.ban_capacity() == 3);

    dp.del_ban(&n4)?;
    dp.del_ban(&n4)?; // idempotent, no double decrement
    ensure!((dp.config()?.cidr_v4, dp.config()?.cidr_v6) == (0, 1));
    dp.put_ban(&cidr("203.0.113.10"), &ban())?; // room again

    // A count left high by a crash is made exact at the next open.
    let mut cfg = dp.config()?;
    cfg.cidr_v4 = 9;
    // Bypass set_config's protection, as a crash between count and insert would.
    let mut arr: Array<_, Config> = Array::try_from(pinned_map(&o, "CONFIG")?)?;
    arr.set(0, cfg, 0)?;
    drop(dp);
    let dp = DataPath::open_with(&o, &OpenHooks::default())?;
    ensure!(
        (dp.config()?.cidr_v4, dp.config()?.cidr_v6) == (0, 1),
        "counts not repaired"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn pin_dir_needs_bpffs() -> Result<()> {
    // An empty parent gets bpffs mounted on it, as /sys/fs/bpf on a host that never did.
    let empty = BpfFs::empty_dir()?;
    let o = opts(&empty, &[], 10);
    let dp = DataPath::open_with(&o, &OpenHooks::default())?;
    ensure!(
        empty.is_mounted() && dp.pinned(),
        "bpffs not mounted on the empty parent"
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;

    // Missing directories below a bpffs are created, 0700.
    let bpffs = BpfFs::new()?;
    let nested = DataPathOptions {
        pin_dir: bpffs.path().join("a/b/wsguard"),
        ..o.clone()
    };
    let dp = DataPath::open_with(&nested, &OpenHooks::default())?;
    let mode = std::fs::metadata(bpffs.path().join("a"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(dp.pinned() && mode == 0o700, "mode {mode:o}");
    drop(dp);
    DataPath::detach_all(&nested.pin_dir)?;

    // A parent with files in it is never mounted over.
    let busy = std::env::temp_dir().join(format!("wsg-notbpf-{}", wsguard_tests::netns::unique()));
    std::fs::create_dir(&busy)?;
    std::fs::write(busy.join("keep"), b"x")?;
    let r = DataPath::open_with(
        &DataPathOptions {
            pin_dir: busy.join("wsguard"),
            ..o
        },
        &OpenHooks::default(),
    );
    let left = std::fs::read_dir(&busy)?.count();
    let _ = std::fs::remove_dir_all(&busy);
    match r {
        Err(e @ DataPathError::NotBpffs { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains("enforce mode needs bpffs")
                    && text.contains(&busy.display().to_string()),
                "{text}"
            )
        }
        Err(e) => bail!("expected NotBpffs, got {e}"),
        Ok(_) => bail!("opened a pin dir that is not on bpffs"),
    }
    ensure!(left == 1, "the refused open changed the directory");
    Ok(())
}

/// What ends the verdict a CPU holds for a hot banned source at its next packet: removing a ban,
/// adding an allowlist entry, new settings. Writing a ban does not need to (a held verdict is
/// only ever for a source that is banned), nor does a failed removal.
#[test]
fn unbans_allow_entries_and_settings_move_the_generation() -> Result<()> {
    use wsguard_common::maps::{CFG_GENERATION, CFG_GENERATION_ONE, CFG_OBSERVE, CFG_V4_TABLE};
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let generation = |dp: &DataPath| -> Result<u32> { Ok(dp.config()?.flags & CFG_GENERATION) };
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let g0 = generation(&dp)?;
    dp.put_ban(&banned, &ban())?;
    ensure!(generation(&dp)? == g0, "a new ban moved the generation");
    dp.del_ban(&banned)?;
    let g1 = generation(&dp)?;
    ensure!(
        g1 == g0.wrapping_add(CFG_GENERATION_ONE),
        "unban: {g0:#x} -> {g1:#x}"
    );
    dp.del_ban(&banned)?;
    ensure!(
        generation(&dp)? == g1,
        "removing nothing moved the generation"
    );
    dp.put_allow(&cidr("192.0.2.0/24"))?;
    let g2 = generation(&dp)?;
    ensure!(
        g2 == g1.wrapping_add(CFG_GENERATION_ONE),
        "allow: {g1:#x} -> {g2:#x}"
    );
    // Settings carry their own flags; the generation is the data path's and moves on.
    dp.set_config(&Config {
        flags: CFG_OBSERVE | CFG_GENERATION,
        ..Config::new()
    })?;
    let cfg = dp.config()?;
    ensure!(
        cfg.flags & !(CFG_GENERATION | CFG_V4_TABLE) == CFG_OBSERVE
            && cfg.flags & CFG_GENERATION == g2.wrapping_add(CFG_GENERATION_ONE)
            && cfg.flags & CFG_V4_TABLE != 0,
        "settings: {:#x} after {g2:#x}",
        cfg.flags
    );
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

/// Two agents on one pin directory would race each other's swaps and writes: the second open
/// is refused, naming the directory, and changes nothing; once the first is gone it opens.
#[test]
fn a_second_open_of_the_same_pins_is_refused_while_the_first_lives() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let first = open_in(&lab, &o, OpenHooks::default())?;
    let before = one_each(&lab)?;
    let Err(e) = open_in(&lab, &o, OpenHooks::default()) else {
        bail!("a second open of the same pins succeeded");
    };
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("in use by another wsguard agent")
            && msg.contains(&o.pin_dir.display().to_string()),
        "{msg}"
    );
    ensure!(
        one_each(&lab)? == before,
        "the refused open changed the attachments"
    );
    drop(first);
    let again = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(
        one_each(&lab)? == before,
        "reopen after the first was dropped"
    );
    drop(again);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
