//! What the PROXY-protocol paths cost, beside the release before them (the layout-2 fixture,
//! loaded next to this build in the same run) and the bare `XDP_PASS` floor: a clean direct
//! packet, the data packet of an established proxied WebSocket, the header + request path, and
//! a packet of a cut flow. Printed, never asserted on time (the machine is noisy; `cargo xtask
//! bench` is where ratios live); what is asserted is what each measured packet does, so that
//! every row measures the path it names, here and in the bench's proxied rows (last test).

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use std::time::Duration;
use wsguard_common::{
    Verdict,
    filter::{FILTER_WORDS_PER_FAMILY, slot, v4_bit},
    maps::{
        BanValue, Config, Counter, FlowKey, LAYOUT_VERSION, PROXY_CLIENT, PROXY_CUT, RST_BURST,
        names,
    },
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, XDP_DROP, XDP_PASS, XDP_TX, boot_ns, flow_key, pin_to_cpu},
    packet::{Pkt, TCP_RST, parse_segment, ws_request},
};

/// The proxied packets of `cargo xtask bench`, the same file: their verdicts are checked below.
#[path = "../src/bin/wsguard-bench/proxied.rs"]
#[allow(dead_code)]
mod proxied;

static LAYOUT2_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/layout2/wsguard-ebpf.o"
));

const PORT: u16 = 80;
const SERVER: &str = "198.18.1.1";
const PROXY: &str = "198.18.5.1";
const REPEAT: u32 = 200_000;
const SINGLES: u32 = 2_000;

/// The previous release's XDP program on maps of its own (layout 2), set up as its agent would.
struct Old {
    ebpf: Ebpf,
}

impl Old {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(LAYOUT2_OBJECT)?;
        let xdp: &mut Xdp = ebpf.program_mut("wsguard_xdp").context("xdp")?.try_into()?;
        xdp.load()?;
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(ebpf.map_mut(names::CONFIG).context("CONFIG")?)?;
        cfg.set(
            0,
            Config {
                layout_version: 2,
                ..Config::new()
            },
            0,
        )?;
        let mut ports: Array<&mut MapData, u8> =
            Array::try_from(ebpf.map_mut(names::PORTS).context("PORTS")?)?;
        ports.set(u32::from(PORT), 1, 0)?;
        let mut filter: Array<&mut MapData, u64> =
            Array::try_from(ebpf.map_mut(names::BAN_FILTER).context("BAN_FILTER")?)?;
        for i in 0..FILTER_WORDS_PER_FAMILY {
            filter.set(i, u64::MAX, 0)?;
        }
        Ok(Self { ebpf })
    }

    fn run(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut("wsguard_xdp")
            .context("xdp")?
            .try_into()?;
        let r = xdp.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((r.return_value, r.duration))
    }

    /// An exact IPv4 ban, its pre-filter bucket cleared first.
    fn ban(&mut self, a: [u8; 4], v: BanValue) -> Result<()> {
        let (word, mask) = slot(v4_bit(a), false);
        let mut filter: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(names::BAN_FILTER).context("BAN_FILTER")?)?;
        let w = filter.get(&word, 0)?;
        filter.set(word, w & !mask, 0)?;
        let mut bans: HashMap<&mut MapData, [u8; 4], BanValue> =
            HashMap::try_from(self.ebpf.map_mut(names::BANS_V4).context("BANS_V4")?)?;
        bans.insert(a, v, 0)?;
        Ok(())
    }

    fn forget(&mut self, key: &FlowKey) -> Result<()> {
        // The layout-2 value is 16 bytes; only the key matters to delete it.
        let mut flows: HashMap<&mut MapData, FlowKey, [u8; 16]> =
            HashMap::try_from(self.ebpf.map_mut(names::FLOWS).context("FLOWS")?)?;
        let _ = flows.remove(key);
        Ok(())
    }
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn row(path: &str, old: Option<f64>, new: f64, floor: f64) {
    let old = old.map_or("-".to_owned(), |o| format!("{o:7.1}"));
    println!("{path:<52} {old:>8} {new:>8.1} {:>6.2}x floor", new / floor);
}

#[test]
fn proxy_path_costs_beside_the_previous_release() -> Result<()> {
    pin_to_cpu(0)?;
    let mut dp = DataPlane::load(&[PORT])?;
    dp.fill_filter(false)?;
    dp.trust_proxy("198.18.5.0", 24)?;
    let mut old = Old::load()?;
    ensure!(LAYOUT_VERSION == 3);

    let data = |src: &str, sport: u16| {
        Pkt::tcp(src, sport, SERVER, PORT)
            .payload(&[0x81, 0x85, 1, 2, 3, 4, 0x69, 0x67, 0x6f, 0x68, 0x6e])
            .build()
    };
    let floor = ns(dp
        .xdp_named("wsguard_bench_pass", &data("198.18.0.9", 1), REPEAT)?
        .1);
    println!(
        "{:<52} {:>8} {:>8} (ns per packet, BPF_PROG_TEST_RUN, floor {floor:.1} ns)",
        "path", "layout 2", "now"
    );

    // A clean direct packet: WebSocket data of an established flow from a clean source.
    let clean = data("198.18.0.9", 40_000);
    let (rc, t) = dp.xdp_repeat(&clean, REPEAT)?;
    let (orc, ot) = old.run(&clean, REPEAT)?;
    ensure!(rc == XDP_PASS && orc == XDP_PASS);
    row(
        "clean direct packet (WebSocket data)",
        Some(ns(ot)),
        ns(t),
        floor,
    );

    // A banned direct source: the drop path (past HOT_DROPS drops, the held verdict).
    let ban = BanValue {
        created_ns: boot_ns(),
        flags: wsguard_common::maps::BAN_NOT_ALLOWLISTED,
        ..Default::default()
    };
    dp.ban("198.18.0.66", 32, ban)?;
    old.ban([198, 18, 0, 66], ban)?;
    let dropped = data("198.18.0.66", 40_010);
    let (rc, t) = dp.xdp_repeat(&dropped, REPEAT)?;
    let (orc, ot) = old.run(&dropped, REPEAT)?;
    ensure!(rc == XDP_DROP && orc == XDP_DROP);
    row(
        "banned direct source (dropped, held verdict)",
        Some(ns(ot)),
        ns(t),
        floor,
    );

    // The established proxied WebSocket's data packet, from the trusted proxy.
    let mut hdr = b"PROXY TCP4 198.19.50.1 198.18.1.1 4000 80\r\n".to_vec();
    hdr.extend_from_slice(&ws_request("/"));
    let first = Pkt::tcp(PROXY, 40_001, SERVER, PORT).payload(&hdr).build();
    ensure!(dp.xdp(&first)? == XDP_PASS);
    let proxied = data(PROXY, 40_001);
    let (counted, delta) = dp.counted(|dp| dp.xdp_repeat(&proxied, 1000))?;
    ensure!(counted.0 == XDP_PASS);
    ensure!(
        delta.0.len() == 1 && delta.0.get(&(Counter::Passed as u32)) == Some(&1000),
        "the data packet only counts as passed: {delta:?}"
    );
    let (rc, t) = dp.xdp_repeat(&proxied, REPEAT)?;
    let (orc, ot) = old.run(&proxied, REPEAT)?;
    ensure!(rc == XDP_PASS && orc == XDP_PASS);
    row(
        "established proxied WebSocket data packet",
        Some(ns(ot)),
        ns(t),
        floor,
    );

    // The header + request path (v1; the previous release classified it as a request).
    let key = flow_key(PROXY, 40_002, SERVER, PORT);
    let frame = Pkt::tcp(PROXY, 40_002, SERVER, PORT).payload(&hdr).build();
    // One run per syscall, the flow forgotten between runs (a repeated run would find it).
    let mut total = Duration::ZERO;
    for _ in 0..SINGLES {
        let (rc, d) = dp.xdp_repeat(&frame, 1)?;
        ensure!(rc == XDP_PASS && dp.flow(&key)?.is_some());
        dp.delete_flow(&key)?;
        total += d;
    }
    let new_t = ns(total) / f64::from(SINGLES);
    let old_t = {
        let mut total = Duration::ZERO;
        for _ in 0..SINGLES {
            let (rc, d) = old.run(&frame, 1)?;
            ensure!(rc == XDP_PASS);
            old.forget(&key)?;
            total += d;
        }
        ns(total) / f64::from(SINGLES)
    };
    row(
        "PROXY v1 header + handshake (first payload)",
        Some(old_t),
        new_t,
        floor,
    );
    let direct = Pkt::tcp("198.18.0.10", 40_003, SERVER, PORT)
        .payload(&ws_request("/"))
        .build();
    let dkey = flow_key("198.18.0.10", 40_003, SERVER, PORT);
    let mut totals = (Duration::ZERO, Duration::ZERO);
    for _ in 0..SINGLES {
        let (rc, d) = dp.xdp_repeat(&direct, 1)?;
        ensure!(rc == XDP_PASS && dp.flow(&dkey)?.is_some());
        dp.delete_flow(&dkey)?;
        totals.0 += d;
        let (rc, d) = old.run(&direct, 1)?;
        ensure!(rc == XDP_PASS);
        old.forget(&dkey)?;
        totals.1 += d;
    }
    row(
        "direct handshake (first payload), for comparison",
        Some(ns(totals.1) / f64::from(SINGLES)),
        ns(totals.0) / f64::from(SINGLES),
        floor,
    );

    // A packet of a cut flow: answered with a RST while the budget lasts, then dropped.
    dp.ban(
        "198.19.50.9",
        32,
        BanValue {
            created_ns: boot_ns(),
            ..Default::default()
        },
    )?;
    let mut banned = b"PROXY TCP4 198.19.50.9 198.18.1.1 4000 80\r\n".to_vec();
    banned.extend_from_slice(&ws_request("/"));
    let mut cut_total = Duration::ZERO;
    let mut answer_total = Duration::ZERO;
    for i in 0..SINGLES {
        let sport = 41_000 + (i % 20_000) as u16;
        let f = Pkt::tcp(PROXY, sport, SERVER, PORT)
            .payload(&banned)
            .build();
        let k = flow_key(PROXY, sport, SERVER, PORT);
        let (rc, d) = dp.xdp_repeat(&f, 1)?;
        ensure!(rc == XDP_PASS && dp.flow(&k)?.map(|v| v.proxy) == Some(PROXY_CUT));
        cut_total += d;
        let (rc, d) = dp.xdp_repeat(&f, 1)?;
        ensure!(rc == XDP_TX, "a retransmission is answered");
        answer_total += d;
        dp.delete_flow(&k)?;
    }
    row(
        "banned client's header: cut (RST towards the server)",
        None,
        ns(cut_total) / f64::from(SINGLES),
        floor,
    );
    row(
        "cut flow's next packet: RST back to the proxy",
        None,
        ns(answer_total) / f64::from(SINGLES),
        floor,
    );
    let f = Pkt::tcp(PROXY, 60_000, SERVER, PORT)
        .payload(&banned)
        .build();
    ensure!(dp.xdp(&f)? == XDP_PASS);
    // Spend the budget one run at a time: a repeated run reuses the frame it rewrote (a RST,
    // which would end the flow). The drop leaves the frame as it is, so it repeats.
    for _ in 0..wsguard_common::maps::RST_BURST {
        ensure!(dp.xdp(&f)? == XDP_TX);
    }
    let (rc, t) = dp.xdp_repeat(&f, REPEAT)?;
    ensure!(rc == XDP_DROP, "past the RST budget: dropped, not {rc}");
    row(
        "cut flow's packet past the RST budget: dropped",
        None,
        ns(t),
        floor,
    );
    Ok(())
}

/// The packets of the bench's proxied rows (`tests/src/bin/wsguard-bench/proxied.rs`) take the
/// paths their rows name, set up as the bench sets them up.
#[test]
fn the_bench_proxied_packets_take_the_paths_their_rows_name() -> Result<()> {
    let mut dp = DataPlane::load(&[proxied::PORT])?;
    dp.fill_filter(false)?;
    proxied::trust(&mut dp)?;

    // Established proxied WebSocket data: passed, counted as passed only, the flow untouched,
    // over repeated runs too (the comparison row runs a million per call).
    proxied::establish(&mut dp)?;
    let est = proxied::key(proxied::ESTABLISHED_PORT);
    let before = dp.flow(&est)?;
    let data = proxied::ws_data();
    assert_eq!(
        dp.xdp_counted(&data)?,
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
    assert_eq!(dp.xdp_repeat(&data, 10_000)?.0, XDP_PASS);
    assert_eq!(dp.flow(&est)?, before, "the data packet changed its flow");

    // Header + request, v2 and v1: passed, the flow recorded for the real client, valid.
    let request = ws_request("/chat");
    for v2 in [true, false] {
        let f = proxied::first_segment(proxied::CLIENT, proxied::FRESH_PORT, v2, &request);
        assert_eq!(dp.xdp(&f.build())?, XDP_PASS, "v2: {v2}");
        let k = proxied::key(proxied::FRESH_PORT);
        let flow = dp.flow(&k)?;
        assert!(
            proxied::of_client(flow, proxied::CLIENT, PROXY_CLIENT),
            "v2: {v2}: {flow:?}"
        );
        assert_eq!(flow.map(|f| f.verdict), Some(Verdict::Valid as u8));
        dp.delete_flow(&k)?;
    }

    // A banned real client's header segment: cut, the segment a RST towards the server.
    proxied::ban_client(&mut dp)?;
    let seg = proxied::first_segment(proxied::BANNED_CLIENT, proxied::FRESH_PORT, true, &request);
    let (rc, out) = dp.xdp_out(&seg.build())?;
    assert_eq!(rc, XDP_PASS);
    let rst = parse_segment(&out).expect("a TCP frame");
    assert!(
        rst.flags & TCP_RST != 0 && rst.dst == seg.dst && rst.payload.is_empty(),
        "not a RST to the server: {rst:?}"
    );
    let k = proxied::key(proxied::FRESH_PORT);
    assert!(proxied::of_client(
        dp.flow(&k)?,
        proxied::BANNED_CLIENT,
        PROXY_CUT
    ));
    dp.delete_flow(&k)?;

    // A later packet of a cut flow past its RST budget: dropped on every run of a call, as
    // `rearm_cut` checks before the next call; without it, the interval would end the drops.
    proxied::cut_flow(&mut dp)?;
    let cut = proxied::cut_segment();
    for _ in 0..3 {
        proxied::rearm_cut(&mut dp)?;
        let (counted, delta) = dp.counted(|dp| dp.xdp_repeat(&cut, 100_000))?;
        assert_eq!(counted.0, XDP_DROP);
        assert_eq!(
            delta,
            Delta::default().and_at(Counter::Dropped as u32, 100_000)
        );
    }
    proxied::rearm_cut(&mut dp)?;
    let mut flow = dp
        .flow(&proxied::key(proxied::CUT_PORT))?
        .expect("cut flow");
    assert_eq!(flow.rsts, RST_BURST);
    // Once the interval is over, the next packet is answered again: what the re-arming avoids.
    flow.rst_ns = boot_ns() - wsguard_common::maps::RST_INTERVAL_NS;
    dp.set_flow(&proxied::key(proxied::CUT_PORT), flow)?;
    assert_eq!(dp.xdp(&cut)?, XDP_TX);
    Ok(())
}
