//! `kill -9` in the middle of a batch of ban writes, from a real child process.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Stdio},
};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::BanValue;
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::support::*;

/// Environment of [`ban_writer_child`]: `<pin dir>\t<interface>\t<max bans>`.
const BAN_WRITER: &str = "WSGUARD_TEST_BAN_WRITER";
/// Marks the child's bans, to tell them from the parent's.
const CHILD_MARK: u64 = 42;

/// The child process of `kill_9_mid_batch_of_ban_writes_leaves_an_adoptable_state`: adopts the
/// pinned data path, then writes host and CIDR bans in a tight loop until it is killed. Run
/// by that test only (it re-executes this binary); on its own it does nothing.
#[test]
#[ignore = "child process of kill_9_mid_batch_of_ban_writes_leaves_an_adoptable_state"]
fn ban_writer_child() -> Result<()> {
    let Ok(spec) = std::env::var(BAN_WRITER) else {
        eprintln!("{BAN_WRITER} unset: nothing to do (this runs as a child of another test)");
        return Ok(());
    };
    let [dir, iface, max] = spec.split('\t').collect::<Vec<_>>()[..] else {
        bail!("bad {BAN_WRITER}: {spec:?}");
    };
    let mut dp = DataPath::open_with(
        &DataPathOptions {
            pin_dir: dir.into(),
            interfaces: vec![iface.into()],
            xdp_mode: XdpMode::Auto,
            max_bans: max.parse()?,
        },
        &OpenHooks::default(),
    )?;
    let v = BanValue {
        created_ns: CHILD_MARK,
        ..Default::default()
    };
    for i in 0..60_000u32 {
        let host = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
        dp.put_ban(&Cidr::host(host.into()), &v)?;
        let net = Ipv6Addr::new(0xfd00, 0x5754, 0, i as u16, 0, 0, 0, 0);
        dp.put_ban(&Cidr::new(net.into(), 64)?, &v)?;
    }
    bail!("wrote every ban before being killed")
}

/// The libtest name of [`ban_writer_child`]: its module path without the crate.
fn child_test_name() -> String {
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    format!("{module}::ban_writer_child")
}

/// Kills its process on drop, so a failing test leaves none behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_9_mid_batch_of_ban_writes_leaves_an_adoptable_state() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 131_072);
    let banned = Cidr::host(IpAddr::V4(lab.ip_b));
    {
        let mut dp = open_in(&lab, &o, OpenHooks::default())?;
        dp.put_ban(&banned, &ban())?;
    }
    let progs = one_each(&lab)?;
    let links = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );

    // nsenter, not `ip netns exec`: the child must see this mount namespace's bpffs.
    let mut child = KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.a.name()))
            .arg(std::env::current_exe()?)
            .arg(child_test_name())
            .args(["--exact", "--ignored", "--nocapture"])
            .env(
                BAN_WRITER,
                format!("{}\t{}\t{}", o.pin_dir.display(), lab.if_a, o.max_bans),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn the ban writer")?,
    );
    let mut exited = None;
    wait_until("the child writes CIDR bans", || {
        if let Some(st) = child.0.try_wait()? {
            exited = Some(st);
            return Ok(true);
        }
        Ok(pinned_config(&o)?.cidr_v6 >= 500)
    })?;
    if let Some(st) = exited {
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        bail!("the ban writer exited by itself ({st}): {err}");
    }
    child.0.kill()?; // SIGKILL, mid-batch
    child.0.wait()?;

    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(one_each(&lab)? == progs, "adoption attached new programs");
    ensure!(
        (
            link_info(&o, "links/wsg-a_xdp")?,
            link_info(&o, "links/wsg-a_tc")?
        ) == links,
        "adoption replaced the links"
    );
    let bans = dp.bans()?;
    let hosts = bans
        .iter()
        .filter(|(c, v)| c.is_host() && v.created_ns == CHILD_MARK)
        .count();
    let nets = bans.iter().filter(|(c, _)| !c.is_host()).count();
    ensure!(
        nets >= 500 && hosts < 60_000,
        "not killed mid-batch: {hosts} hosts, {nets} networks"
    );
    // Writes alternate host, network: whatever the kill interrupted, nothing is half there.
    ensure!(
        hosts == nets || hosts == nets + 1,
        "{hosts} hosts, {nets} networks"
    );
    ensure!(
        bans.iter()
            .all(|(c, v)| *c == banned || (v.created_ns == CHILD_MARK && v.drops == 0)),
        "a ban value is not what was written"
    );
    let cfg = dp.config()?;
    ensure!(
        (cfg.cidr_v4, cfg.cidr_v6) == (0, nets as u32),
        "CIDR counts {cfg:?} vs {nets} networks"
    );
    ensure!(dp.ban_entries() == bans.len() as u64);
    ensure!(
        lab.ping_from(lab.ip_b, 2, "0.2")? == 0 && lab.ping_from(lab.ip_b2, 2, "0.2")? == 2,
        "enforcement changed across the kill"
    );
    // The adopted handle writes on normally.
    dp.put_ban(&cidr("198.18.200.0/24"), &ban())?;
    ensure!(dp.config()?.cidr_v4 == 1 && dp.ban_entries() == bans.len() as u64 + 1);
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
