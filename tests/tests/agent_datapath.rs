//! The agent's data path against the real kernel: attach, pin, enforce, adopt, upgrade,
//! migrate, detach — on veth pairs in namespaces the tests create, with pins on a private bpffs.

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapInfo;
use std::{net::IpAddr, path::PathBuf, time::Duration};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathError, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::{BanValue, Counter, LAYOUT_VERSION};
use wsguard_tests::netns::{BpfFs, VethLab};

fn opts(bpffs: &BpfFs, ifaces: &[&str], max_bans: u32) -> DataPathOptions {
    DataPathOptions {
        pin_dir: bpffs.path().join("wsguard"),
        interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
        xdp_mode: XdpMode::Auto,
        max_bans,
    }
}

fn open_in(lab: &VethLab, o: &DataPathOptions, hooks: OpenHooks) -> Result<DataPath> {
    Ok(lab.a.run(|| DataPath::open_with(o, &hooks))??)
}

fn ban() -> BanValue {
    BanValue {
        created_ns: wsguard::datapath::boot_ns(),
        ..Default::default()
    }
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("valid test CIDR")
}

/// The XDP program ids attached to the lab's protected interface, from the kernel's view
/// (`ip -j link`): one id per attachment.
fn xdp_prog_ids(lab: &VethLab) -> Result<Vec<u32>> {
    let json = lab.a.ip(&["-j", "link", "show", "dev", &lab.if_a])?;
    let Some(xdp) = json.split("\"xdp\":").nth(1) else {
        return Ok(Vec::new());
    };
    Ok(xdp
        .split("\"prog\":{")
        .skip(1)
        .filter_map(|p| p.split("\"id\":").nth(1))
        .filter_map(|id| id.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect())
}

/// TC programs on the protected interface (TCX and clsact), from bpftool.
fn tc_attachments(lab: &VethLab) -> Result<usize> {
    let out = lab.a.exec(
        &["bpftool", "-j", "net", "show", "dev", &lab.if_a],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.matches("wsguard_tc_egress").count())
}

fn pin(o: &DataPathOptions, rel: &str) -> PathBuf {
    o.pin_dir.join(rel)
}

fn drops_of(dp: &DataPath, c: &Cidr) -> Result<u64> {
    dp.bans()?
        .into_iter()
        .find(|(k, _)| k == c)
        .map(|(_, v)| v.drops)
        .context("ban missing")
}

#[test]
fn open_attaches_pins_and_enforces_bans() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;

    let ifs = dp.interfaces();
    ensure!(ifs.len() == 1 && ifs[0].name == lab.if_a, "{ifs:?}");
    ensure!(
        ["native", "generic"].contains(&ifs[0].xdp_mode.as_str()),
        "{ifs:?}"
    );
    ensure!(
        ifs[0].tc_egress == "tcx" || ifs[0].tc_egress == "clsact",
        "{ifs:?}"
    );
    ensure!(
        xdp_prog_ids(&lab)? == vec![ifs[0].xdp_prog_id],
        "kernel view {:?} vs {ifs:?}",
        xdp_prog_ids(&lab)?
    );
    ensure!(tc_attachments(&lab)? == 1, "one TC egress program expected");
    ensure!(dp.pinned() && dp.netlink_fallbacks() == 0);
    for p in [
        "maps/BANS_V4",
        "maps/CONFIG",
        "maps/BURSTS",
        "links/wsg-a.xdp",
        "links/wsg-a.tc",
        "layout",
    ] {
        ensure!(
            std::fs::symlink_metadata(pin(&o, p)).is_ok(),
            "{p} not pinned"
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    ensure!(
        std::fs::metadata(&o.pin_dir)?.permissions().mode() & 0o777 == 0o700,
        "pin dir must be 0700"
    );

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
fn dropping_the_handle_keeps_enforcing_and_reopen_adopts() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let first_id = {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
        dp.put_allow(&cidr("192.0.2.0/24"))?;
        dp.interfaces()[0].xdp_prog_id
    }; // dropped: fail-static, nothing detaches
    ensure!(
        xdp_prog_ids(&lab)? == vec![first_id],
        "program gone after drop"
    );
    ensure!(tc_attachments(&lab)? == 1);
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "not enforcing after the handle was dropped"
    );

    // Same build: adopt as is.
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(
        dp.interfaces()[0].xdp_prog_id == first_id,
        "same build must keep the program"
    );
    ensure!(
        xdp_prog_ids(&lab)? == vec![first_id] && tc_attachments(&lab)? == 1,
        "a second program was attached"
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

    // Another build: swapped through the pinned link while the banned source keeps sending.
    let pinger = std::thread::scope(|s| -> Result<u32> {
        let h = s.spawn(|| lab.ping_from(lab.ip_b, 150, "0.01"));
        std::thread::sleep(Duration::from_millis(300));
        let dp = open_in(
            &lab,
            &o,
            OpenHooks {
                build_id: Some(0x1234),
                ..Default::default()
            },
        )?;
        let id = dp.interfaces()[0].xdp_prog_id;
        ensure!(id != first_id, "another build must be swapped in");
        ensure!(
            xdp_prog_ids(&lab)? == vec![id],
            "not exactly one XDP program: {:?}",
            xdp_prog_ids(&lab)?
        );
        ensure!(tc_attachments(&lab)? == 1, "not exactly one TC program");
        ensure!(
            dp.bans()?.iter().any(|(c, _)| *c == banned),
            "ban lost in the upgrade"
        );
        h.join().map_err(|_| anyhow::anyhow!("pinger panicked"))?
    })?;
    ensure!(
        pinger == 0,
        "{pinger} pings from the banned source were answered during the swap"
    );
    DataPath::detach_all(&o.pin_dir)?;
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
    ensure!(
        xdp_prog_ids(&lab)?.is_empty(),
        "XDP still attached: {:?}",
        xdp_prog_ids(&lab)?
    );
    ensure!(tc_attachments(&lab)? == 0, "TC still attached");
    ensure!(!o.pin_dir.exists(), "pin dir left behind");
    ensure!(
        lab.ping_from(lab.ip_b, 2, "0.2")? == 2,
        "still dropping after the kill switch"
    );
    DataPath::detach_all(&o.pin_dir)?; // idempotent
    drop(dp);
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
    dp.set_config(&wsguard_common::maps::Config {
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
        other => anyhow::bail!("expected Full, got {other:?}"),
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
    let mut arr: aya::maps::Array<_, wsguard_common::maps::Config> = aya::maps::Array::try_from(
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(pin(&o, "maps/CONFIG"))?)?,
    )?;
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
fn layout_migration_copies_entries_then_swaps_without_a_gap() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    let (old_prog, old_map) = {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
        dp.put_ban(&cidr("2001:db8::/32"), &ban())?;
        dp.put_allow(&cidr("192.0.2.0/24"))?;
        dp.set_ports(&[80, 8080])?;
        ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
        (
            dp.interfaces()[0].xdp_prog_id,
            MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id(),
        )
    };
    let drops_before = {
        let dp = DataPath::open_with(&o, &OpenHooks::default())?;
        drops_of(&dp, &banned)?
    };

    let (dp, pinger) = std::thread::scope(|s| -> Result<(DataPath, u32)> {
        let h = s.spawn(|| lab.ping_from(lab.ip_b, 150, "0.01"));
        std::thread::sleep(Duration::from_millis(300));
        let dp = open_in(
            &lab,
            &o,
            OpenHooks {
                layout_version: Some(LAYOUT_VERSION + 1),
                ..Default::default()
            },
        )?;
        Ok((
            dp,
            h.join().map_err(|_| anyhow::anyhow!("pinger panicked"))??,
        ))
    })?;
    ensure!(
        pinger == 0,
        "{pinger} pings from the banned source were answered during the migration"
    );
    let new_map = MapInfo::from_pin(pin(&o, "maps/BANS_V4"))?.id();
    ensure!(new_map != old_map, "the ban map was not replaced");
    ensure!(!pin(&o, "maps.new").exists(), "staging dir left behind");
    let layout = std::fs::read_link(pin(&o, "layout"))?;
    ensure!(
        layout
            .to_string_lossy()
            .starts_with(&format!("layout-v{}-", LAYOUT_VERSION + 1)),
        "{layout:?}"
    );
    let ids = xdp_prog_ids(&lab)?;
    ensure!(
        ids.len() == 1 && ids[0] != old_prog && ids[0] == dp.interfaces()[0].xdp_prog_id,
        "{ids:?}"
    );
    ensure!(tc_attachments(&lab)? == 1);
    ensure!(dp.config()?.layout_version == LAYOUT_VERSION + 1 && dp.config()?.cidr_v6 == 1);
    ensure!(dp.bans()?.len() == 2 && dp.allows()?.contains(&cidr("192.0.2.0/24")));
    // The drops counted by the old program came along, and the new program counts into the
    // new map (the one now pinned).
    let after = drops_of(&dp, &banned)?;
    ensure!(
        after >= drops_before + 150,
        "drops {drops_before} -> {after}"
    );
    ensure!(
        lab.ping_from(lab.ip_b2, 2, "0.2")? == 2,
        "clean source dropped after migration"
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
    let _ = std::fs::remove_dir_all(&busy);
    match r {
        Err(e @ DataPathError::NotBpffs { .. }) => {
            ensure!(e.to_string().contains("enforce mode needs bpffs"), "{e}")
        }
        Err(e) => anyhow::bail!("expected NotBpffs, got {e}"),
        Ok(_) => anyhow::bail!("opened a pin dir that is not on bpffs"),
    }
    Ok(())
}
