//! The layout-2 to layout-3 upgrade for real: the release before the PROXY protocol (a fixture
//! under `tests/fixtures/layout2/`) is set up as its agent leaves a node, with an established
//! flow in its 16-byte flow layout and counters it counted; this build migrates the maps
//! (FLOWS grows, COUNTERS grows, the PROXY maps appear) and swaps its programs in through the
//! pinned links while traffic runs.

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, MapInfo, PerCpuArray, PerCpuValues};
use wsguard::datapath::{DataPath, OpenHooks, build_id};
use wsguard_common::maps::{
    BAN_MAY_PRESERVE, BanValue, CFG_PROXY_TRUST, COUNTERS_LEN, Counter, FLOW_ESTABLISHED, FlowKey,
    FlowValue, LAYOUT_VERSION, PROXY_NONE, v4_mapped,
};
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::{layout::*, support::*};

/// The kernel object of the release before layout 3 (commit 74445a5), debug info stripped.
static LAYOUT2_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/layout2/wsguard-ebpf.o"
));

/// Layout 2's 16-byte flow value, as its program wrote FLOWS.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowValueV2 {
    first_seen_ns: u64,
    verdict: u8,
    reason: u8,
    state: u8,
    _pad: [u8; 5],
}

// SAFETY: `#[repr(C)]`, `Copy`, no padding (the gap is an explicit `_pad`), no pointers.
unsafe impl aya::Pod for FlowValueV2 {}

fn flow_key(client: [u8; 4], port: u16) -> FlowKey {
    FlowKey {
        client: v4_mapped(client),
        server: v4_mapped([198, 18, 0, 1]),
        client_port: port.to_be(),
        server_port: 8080u16.to_be(),
    }
}

#[test]
fn a_layout2_node_is_upgraded_with_flows_and_counters_converted_and_no_gap() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 1000);
    let _detach = Detach(o.pin_dir.clone());
    // Layout-2 bans: some already carry BAN_MAY_PRESERVE, which layout 3 keeps as it is.
    let mut p = planted(&lab);
    p.cidr_v6.2.flags |= BAN_MAY_PRESERVE;
    let old_build = previous_agent(&lab, &o, &p, LAYOUT2_OBJECT, 2)?;
    ensure!(old_build != build_id(), "the fixture is this build");

    // What the layout-2 agent's node holds besides the bans: an established WebSocket flow
    // (preserved across the upgrade) and one still in its handshake.
    let mut flows: HashMap<_, FlowKey, FlowValueV2> = HashMap::try_from(pinned_map(&o, "FLOWS")?)?;
    let est = (
        flow_key([198, 19, 40, 1], 40001),
        FlowValueV2 {
            first_seen_ns: 1_000,
            verdict: 0,
            reason: 0,
            state: FLOW_ESTABLISHED,
            _pad: [0; 5],
        },
    );
    let bad = (
        flow_key([198, 19, 40, 2], 40002),
        FlowValueV2 {
            first_seen_ns: 2_000,
            verdict: 1,
            reason: 4,
            state: 0,
            _pad: [0; 5],
        },
    );
    for (k, v) in [est, bad] {
        flows.insert(k, v, 0)?;
    }
    drop(flows);
    let old_counters: PerCpuArray<_, u64> = PerCpuArray::try_from(pinned_map(&o, "COUNTERS")?)?;
    ensure!(
        old_counters.len() == Counter::EventsLost as u32 + 1,
        "layout 2's 19 counters"
    );
    drop(old_counters);
    // The old program counts drops into them.
    ensure!(
        lab.ping_from(lab.ip_b, 3, "0.2")? == 0,
        "the layout-2 program enforces"
    );
    let dropped = pinned_counter(&o, Counter::Dropped)?;
    ensure!(dropped >= 3, "layout 2 counted {dropped} drops");
    let before = (
        pinned_v4(&o, p.v4.0)?,
        pinned_v6(&o, p.v6.0)?,
        pinned_cidr_v4(&o, p.cidr_v4.0, p.cidr_v4.1)?,
        pinned_cidr_v6(&o, p.cidr_v6.0, p.cidr_v6.1)?,
    );
    let links = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );
    let old_flows = MapInfo::from_pin(pin(&o, "maps/FLOWS"))?;
    ensure!(old_flows.value_size() == 16);

    let dp = under_traffic(&lab, &o, || open_in(&lab, &o, OpenHooks::default()))?;

    let layout = std::fs::read_link(pin(&o, "layout"))?;
    ensure!(
        layout.to_string_lossy() == format!("layout-v{LAYOUT_VERSION}-build-{:016x}", build_id()),
        "layout record {layout:?}"
    );
    let cfg = pinned_config(&o)?;
    ensure!(
        (
            cfg.layout_version,
            cfg.threshold,
            cfg.flags & CFG_PROXY_TRUST
        ) == (3, 9, 0),
        "CONFIG after the upgrade: {cfg:?}"
    );
    // Bans: no step converts them from layout 2, every field as it was (drops go on).
    let same = |what: &str, old: &BanValue, now: &BanValue| -> Result<()> {
        ensure!(
            (now.created_ns, now.expires_ns, now.flags)
                == (old.created_ns, old.expires_ns, old.flags)
                && now.drops >= old.drops,
            "{what}: {old:?} became {now:?}"
        );
        Ok(())
    };
    same("exact IPv4", &before.0, &pinned_v4(&o, p.v4.0)?)?;
    same("exact IPv6", &before.1, &pinned_v6(&o, p.v6.0)?)?;
    same(
        "CIDR IPv4",
        &before.2,
        &pinned_cidr_v4(&o, p.cidr_v4.0, p.cidr_v4.1)?,
    )?;
    same(
        "CIDR IPv6",
        &before.3,
        &pinned_cidr_v6(&o, p.cidr_v6.0, p.cidr_v6.1)?,
    )?;

    // FLOWS: the new value size, the old flows as direct flows with every field kept.
    let info = MapInfo::from_pin(pin(&o, "maps/FLOWS"))?;
    ensure!(
        info.value_size() as usize == size_of::<FlowValue>() && info.id() != old_flows.id(),
        "FLOWS was not migrated into a 48-byte map"
    );
    let new_flows: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(pinned_map(&o, "FLOWS")?)?;
    for (k, v) in [est, bad] {
        let got = new_flows.get(&k, 0).context("a layout-2 flow was lost")?;
        ensure!(
            (
                got.first_seen_ns,
                got.verdict,
                got.reason,
                got.state,
                got.proxy
            ) == (v.first_seen_ns, v.verdict, v.reason, v.state, PROXY_NONE)
                && got.real_client == [0; 16]
                && got.real_client().is_none(),
            "flow {k:?}: {v:?} became {got:?}"
        );
    }
    ensure!(
        dp.flows()?
            .iter()
            .any(|(k, v)| *k == est.0 && v.state == FLOW_ESTABLISHED),
        "the data path lists the migrated flow"
    );

    // COUNTERS: longer, the old values carried over, the new ones from zero.
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(pinned_map(&o, "COUNTERS")?)?;
    ensure!(counters.len() == COUNTERS_LEN);
    let sum = |v: PerCpuValues<u64>| v.iter().sum::<u64>();
    ensure!(sum(counters.get(&(Counter::Dropped as u32), 0)?) >= dropped);
    for c in Counter::ProxyV1Client as u32..COUNTERS_LEN {
        ensure!(sum(counters.get(&c, 0)?) == 0, "counter {c} starts at zero");
    }
    let pc = dp.proxy_counters()?;
    ensure!(pc == Default::default(), "{pc:?}");

    // The layout-3 maps exist, pinned and empty: nothing trusted yet.
    for name in ["PROXY_FROM_V4", "PROXY_FROM_V6", "PROXY_SENDERS"] {
        ensure!(pin(&o, "maps").join(name).exists(), "{name} not pinned");
    }
    ensure!(dp.proxy_trust()?.is_empty() && dp.proxy_senders()?.is_empty());

    // Swapped through the same links; the new program enforces on the migrated maps.
    let (xdp, tc) = (
        link_info(&o, "links/wsg-a_xdp")?,
        link_info(&o, "links/wsg-a_tc")?,
    );
    ensure!(
        (xdp.0, tc.0) == (links.0.0, links.1.0) && (xdp.1, tc.1) != (links.0.1, links.1.1),
        "the links were recreated instead of updated: {links:?} -> {xdp:?} {tc:?}"
    );
    let drops = pinned_v4(&o, p.v4.0)?.drops;
    ensure!(lab.ping_from(lab.ip_b, 2, "0.2")? == 0);
    ensure!(pinned_v4(&o, p.v4.0)?.drops >= drops + 2);
    ensure!(lab.ping_from(lab.ip_b2, 2, "0.2")? == 2);
    drop(dp);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
