//! Helpers of the data-path tests: options, the kernel's view, pinned maps, traffic.

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::links::{FdLink, LinkType, PinnedLink},
};
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::{BanValue, Config, Counter};
use wsguard_tests::netns::{BpfFs, VethLab, XdpAttachment};

pub(crate) fn opts(bpffs: &BpfFs, ifaces: &[&str], max_bans: u32) -> DataPathOptions {
    DataPathOptions {
        pin_dir: bpffs.path().join("wsguard"),
        interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
        xdp_mode: XdpMode::Auto,
        max_bans,
    }
}

pub(crate) fn open_in(lab: &VethLab, o: &DataPathOptions, hooks: OpenHooks) -> Result<DataPath> {
    Ok(lab.a.run(|| DataPath::open_with(o, &hooks))??)
}

pub(crate) fn another_build() -> OpenHooks {
    OpenHooks {
        build_id: Some(0x1234),
        ..Default::default()
    }
}

pub(crate) fn ban() -> BanValue {
    BanValue {
        created_ns: wsguard::datapath::boot_ns(),
        ..Default::default()
    }
}

pub(crate) fn cidr(s: &str) -> Cidr {
    s.parse().expect("valid test CIDR")
}

pub(crate) fn pin(o: &DataPathOptions, rel: &str) -> PathBuf {
    o.pin_dir.join(rel)
}

/// What the kernel has attached to the protected interface.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Attached {
    pub xdp: Vec<XdpAttachment>,
    pub tc: Vec<u32>,
}

pub(crate) fn attached(lab: &VethLab) -> Result<Attached> {
    Ok(Attached {
        xdp: lab.a.xdp_attachments(&lab.if_a)?,
        tc: lab.a.tc_egress_programs(&lab.if_a)?,
    })
}

/// Exactly one XDP and one TC egress program on the protected interface; their ids.
pub(crate) fn one_each(lab: &VethLab) -> Result<(u32, u32)> {
    let a = attached(lab)?;
    ensure!(
        a.xdp.len() == 1 && a.tc.len() == 1,
        "expected one XDP and one TC program: {a:?}"
    );
    Ok((a.xdp[0].prog_id, a.tc[0]))
}

/// A pinned link's id, program id and type, from the kernel.
pub(crate) fn link_info(o: &DataPathOptions, rel: &str) -> Result<(u32, u32, LinkType)> {
    let link = FdLink::from(
        PinnedLink::from_pin(pin(o, rel)).with_context(|| format!("open the pinned {rel}"))?,
    );
    let info = link.info()?;
    Ok((info.id(), info.program_id(), info.link_type()?))
}

pub(crate) fn pinned_map(o: &DataPathOptions, name: &str) -> Result<Map> {
    Ok(Map::from_map_data(MapData::from_pin(
        pin(o, "maps").join(name),
    )?)?)
}

pub(crate) fn pinned_config(o: &DataPathOptions) -> Result<Config> {
    let a: Array<_, Config> = Array::try_from(pinned_map(o, "CONFIG")?)?;
    Ok(a.get(&0, 0)?)
}

pub(crate) fn pinned_drops(o: &DataPathOptions, ip: Ipv4Addr) -> Result<u64> {
    let m: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(pinned_map(o, "BANS_V4")?)?;
    let v = m.get(&ip.octets(), 0)?;
    // The table's copy counts the drops the program found it for (none before a layout had it).
    let table = pin(o, "maps").join("BAN_TABLE_V4");
    let in_table = match table.exists() {
        true => wsguard::datapath::table::BanTable::from_pin(&table)?
            .get(ip.octets())
            .map_or(0, |t| t.drops),
        false => 0,
    };
    Ok(v.drops + in_table)
}

pub(crate) fn pinned_counter(o: &DataPathOptions, c: Counter) -> Result<u64> {
    let m: PerCpuArray<_, u64> = PerCpuArray::try_from(pinned_map(o, "COUNTERS")?)?;
    Ok(m.get(&(c as u32), 0)?.iter().sum())
}

/// Poll `cond` every 10 ms, at most 1000 times.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    for _ in 0..1000 {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("gave up waiting: {what}")
}

pub(crate) fn drops_of(dp: &DataPath, c: &Cidr) -> Result<u64> {
    dp.bans()?
        .into_iter()
        .find(|(k, _)| k == c)
        .map(|(_, v)| v.drops)
        .context("ban missing")
}

/// Requests in each stream: at one per 5 ms, long enough to span a program swap on a loaded
/// machine; the test fails (does not pass vacuously) if a stream ends before the change does.
pub(crate) const STREAM: u32 = 1000;

/// Run `change` while the banned source `lab.ip_b` and the clean source `lab.ip_b2` ping the
/// protected side, and prove that the streams spanned the change, that no banned request was
/// ever answered, and that no clean one was lost.
pub(crate) fn under_traffic<T>(
    lab: &VethLab,
    o: &DataPathOptions,
    change: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let (d0, p0) = (
        pinned_drops(o, lab.ip_b)?,
        pinned_counter(o, Counter::Passed)?,
    );
    let bad = lab.ping_stream(lab.ip_b, STREAM, "0.005")?;
    let good = lab.ping_stream(lab.ip_b2, STREAM, "0.005")?;
    wait_until("both streams reach the program", || {
        Ok(pinned_drops(o, lab.ip_b)? >= d0 + 5 && pinned_counter(o, Counter::Passed)? >= p0 + 5)
    })?;
    let out = change()?;
    let (d1, p1) = (
        pinned_drops(o, lab.ip_b)?,
        pinned_counter(o, Counter::Passed)?,
    );
    let (bad, good) = (bad.finish()?, good.finish()?);
    let (d2, p2) = (
        pinned_drops(o, lab.ip_b)?,
        pinned_counter(o, Counter::Passed)?,
    );
    ensure!(
        d2 > d1 && p2 > p1,
        "the streams ended before the change did (drops {d1}->{d2}, passed {p1}->{p2}): the test proves nothing, raise STREAM"
    );
    ensure!(
        bad.received == 0,
        "{} of {} requests from the banned source were answered across the change",
        bad.received,
        bad.transmitted
    );
    ensure!(
        good.received == good.transmitted,
        "the clean source lost {} of {} requests across the change",
        good.transmitted - good.received,
        good.transmitted
    );
    Ok(out)
}
