//! What the hot paths of the XDP program may and may not do (issue 3, "keep the clean path
//! cheap"): no map write for established WebSocket data, no flow or rate insert for dropped
//! packets, per-ban drop counters that a hot attacker does not turn into one contended cache
//! line, and the ban pre-filter that lets clean sources skip the ban lookups. Behaviour, not
//! time: `cargo xtask bench` measures the time.

use wsguard_common::{
    filter,
    maps::{BAN_MAY_PRESERVE, BAN_NOT_ALLOWLISTED, BanValue, Counter, FLOW_ESTABLISHED},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, XDP_DROP, XDP_PASS, boot_ns, flow_key, pin_to_cpu},
    packet::{Pkt, TCP_ACK, bad_request, ws_request},
};

const PORT: u16 = 80;
const SERVER4: &str = "198.18.1.1";
const SERVER6: &str = "fd00:1::1";

fn server(src: &str) -> &'static str {
    if src.contains(':') { SERVER6 } else { SERVER4 }
}

fn ban_now() -> BanValue {
    BanValue {
        created_ns: boot_ns(),
        ..Default::default()
    }
}

#[test]
fn established_websocket_data_writes_no_map() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    for src in ["198.18.40.1", "fd00:40::1"] {
        let req = Pkt::tcp(src, 41000, server(src), PORT).payload(&ws_request("/"));
        dp.xdp(&req.build()).unwrap();
        let answer = req
            .reply()
            .payload(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .build();
        assert_eq!(dp.tc(&answer).unwrap(), TC_ACT_OK);
        let key = flow_key(src, 41000, server(src), PORT);
        let before = dp.flow(&key).unwrap().expect("flow");
        assert_eq!(before.state, FLOW_ESTABLISHED);
        let (flows, rates) = (dp.flows_len().unwrap(), dp.rates_len().unwrap());

        // Client frames: masked text and binary, close, a compressed fragment (0x41 = 'A',
        // which looks like the start of a method), a bare ACK, and one frame that spells a
        // whole bad request.
        let frames: [&[u8]; 5] = [
            &[0x81, 0x82, 1, 2, 3, 4, 0x61, 0x62],
            &[0x82, 0x81, 1, 2, 3, 4, 0x00],
            &[0x88, 0x80, 1, 2, 3, 4],
            &[0x41, 0x81, 1, 2, 3, 4, 0x20],
            &bad_request("/"),
        ];
        for payload in frames {
            let f = Pkt::tcp(src, 41000, server(src), PORT)
                .payload(payload)
                .build();
            let (rc, delta) = dp.xdp_counted(&f).unwrap();
            assert_eq!((rc, delta), (XDP_PASS, Delta::of(&[Counter::Passed])));
        }
        let ack = Pkt::tcp(src, 41000, server(src), PORT)
            .flags(TCP_ACK)
            .build();
        assert_eq!(
            dp.xdp_counted(&ack).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Passed]))
        );
        let (rc, _) = dp
            .xdp_repeat(
                &Pkt::tcp(src, 41000, server(src), PORT)
                    .payload(&[0x81, 0x80, 1, 2, 3, 4])
                    .build(),
                1000,
            )
            .unwrap();
        assert_eq!(rc, XDP_PASS);
        assert_eq!(
            dp.flow(&key).unwrap(),
            Some(before),
            "{src}: flow untouched"
        );
        assert_eq!(dp.flows_len().unwrap(), flows, "{src}: no flow inserted");
        assert_eq!(dp.rates_len().unwrap(), rates, "{src}: no rate inserted");
    }
    // Frames of a WebSocket the table does not know (agent started mid-connection, or the
    // entry was evicted) are not taken for requests either.
    let flows = dp.flows_len().unwrap();
    let f = Pkt::tcp("198.18.40.2", 41000, SERVER4, PORT)
        .payload(&[0x82, 0x81, 1, 2, 3, 4, 0])
        .build();
    assert_eq!(
        dp.xdp_counted(&f).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
    assert_eq!(dp.flows_len().unwrap(), flows);
}

#[test]
fn a_flood_from_banned_sources_inserts_nothing() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.ban("198.18.41.0", 24, ban_now()).unwrap();
    dp.ban("fd00:41::", 64, ban_now()).unwrap();
    let drop = (XDP_DROP, Delta::of(&[Counter::Dropped]));
    for i in 0..200u16 {
        let v4 = format!("198.18.41.{}", 1 + i % 250);
        let v6 = format!("fd00:41::{:x}", 1 + i);
        for src in [v4.as_str(), v6.as_str()] {
            let syn = Pkt::tcp(src, 40000 + i, server(src), PORT).syn().build();
            let req = Pkt::tcp(src, 40000 + i, server(src), PORT)
                .payload(&bad_request("/"))
                .build();
            let fin = Pkt::tcp(src, 40000 + i, server(src), PORT)
                .flags(wsguard_tests::packet::TCP_FIN | TCP_ACK)
                .build();
            for f in [syn, req, fin] {
                assert_eq!(dp.xdp_counted(&f).unwrap(), drop, "{src}");
            }
        }
    }
    assert_eq!(dp.flows_len().unwrap(), 0, "no flow of a dropped packet");
    assert_eq!(dp.rates_len().unwrap(), 0, "no rate of a dropped packet");
    assert!(dp.bursts().unwrap().is_empty());
}

/// Past 1024 drops a ban is hot: each CPU holds back up to 63 drops of a run of one source,
/// adds them in one go of 64, and hands them over as soon as it drops another source. The first
/// drop of a run is added at once, so hot sources that interleave on one CPU hold nothing back
/// (and never pay a second lookup to hand drops over).
#[test]
fn hot_bans_count_drops_in_per_cpu_batches() {
    // One CPU, so that consecutive runs share the per-CPU batch.
    std::thread::spawn(|| {
        pin_to_cpu(0).unwrap();
        let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
        for (hot, cold, other) in [
            ("198.18.42.1", "198.18.42.2", "198.18.42.3"),
            ("fd00:42::1", "fd00:42::2", "fd00:42::3"),
        ] {
            let prefix = if hot.contains(':') { 128 } else { 32 };
            let hot_ban = BanValue {
                drops: 5000,
                ..ban_now()
            };
            dp.ban(hot, prefix, hot_ban).unwrap();
            dp.ban(other, prefix, hot_ban).unwrap();
            dp.ban(cold, prefix, ban_now()).unwrap();
            let f = Pkt::tcp(hot, 40000, server(hot), 443).syn().build();
            let (rc, _) = dp.xdp_repeat(&f, 100).unwrap();
            assert_eq!(rc, XDP_DROP);
            // The run's first drop is added at once, the next 64 as one batch; 35 are held back.
            assert_eq!(dp.ban_entry(hot).unwrap().drops, 5000 + 1 + 64, "{hot}");
            // Dropping another source hands the held-back drops over.
            let f = Pkt::tcp(cold, 40000, server(cold), 443).syn().build();
            assert_eq!(dp.xdp(&f).unwrap(), XDP_DROP);
            assert_eq!(dp.ban_entry(hot).unwrap().drops, 5100, "{hot}");
            assert_eq!(dp.ban_entry(cold).unwrap().drops, 1, "{cold}: still exact");
            // Two hot sources taking turns: every drop is counted at once, none held back.
            for i in 1..=20u64 {
                for (src, before) in [(hot, 5100), (other, 5000)] {
                    let f = Pkt::tcp(src, 40000, server(src), 443).syn().build();
                    assert_eq!(dp.xdp(&f).unwrap(), XDP_DROP);
                    assert_eq!(
                        dp.ban_entry(src).unwrap().drops,
                        before + i,
                        "{src}, turn {i}"
                    );
                }
            }
        }
    })
    .join()
    .expect("test thread");
}

#[test]
fn the_pre_filter_skips_lookups_but_never_hides_a_ban() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.fill_filter(false).unwrap();
    dp.fill_filter(true).unwrap();
    // Bans clear the buckets they cover, as the agent does.
    dp.ban("198.18.43.5", 32, ban_now()).unwrap();
    dp.ban("198.18.44.0", 24, ban_now()).unwrap();
    dp.ban("198.19.0.0", 16, ban_now()).unwrap();
    dp.ban("fd00:43::5", 128, ban_now()).unwrap();
    dp.ban("fd00:44::", 64, ban_now()).unwrap();
    let drop = (XDP_DROP, Delta::of(&[Counter::Dropped]));
    let pass = (XDP_PASS, Delta::of(&[Counter::Passed]));
    for src in [
        "198.18.43.5",
        "198.18.44.77",
        "198.19.200.1",
        "fd00:43::5",
        "fd00:44::1:2",
    ] {
        let f = Pkt::tcp(src, 40000, server(src), 443).syn().build();
        assert_eq!(dp.xdp_counted(&f).unwrap(), drop, "{src}");
    }
    // Clean neighbours, in the same bucket as a ban (full lookups, nothing found) and in
    // buckets the filter proves clean.
    for src in [
        "198.18.43.6",
        "198.18.45.1",
        "198.20.0.1",
        "fd00:43::6",
        "fd00:45::1",
    ] {
        let f = Pkt::tcp(src, 40000, server(src), 443).syn().build();
        assert_eq!(dp.xdp_counted(&f).unwrap(), pass, "{src}");
    }
    // The program trusts the filter: a bucket wrongly marked clean hides its ban. (This is
    // what makes the agent's ordering rule matter: clear the bucket before inserting a ban.)
    dp.set_filter_bit(filter::v4_bit([198, 18, 43, 5]), false, true)
        .unwrap();
    let f = Pkt::tcp("198.18.43.5", 40000, SERVER4, 443).syn().build();
    assert_eq!(dp.xdp_counted(&f).unwrap(), pass, "trusted the filter");
    let v6: std::net::Ipv6Addr = "fd00:43::5".parse().unwrap();
    dp.set_filter_bit(filter::v6_bit(&v6.octets()), true, true)
        .unwrap();
    let f = Pkt::tcp("fd00:43::5", 40000, SERVER6, 443).syn().build();
    assert_eq!(dp.xdp_counted(&f).unwrap(), pass, "trusted the filter");
    // An IPv6 ban wider than a /64 cannot be bucketed: it turns the IPv6 filter off.
    dp.ban("fd00:46::", 48, ban_now()).unwrap();
    let f = Pkt::tcp("fd00:46:0:9::1", 40000, SERVER6, 443)
        .syn()
        .build();
    assert_eq!(dp.xdp_counted(&f).unwrap(), drop);
    let f = Pkt::tcp("fd00:43::5", 40000, SERVER6, 443).syn().build();
    assert_eq!(
        dp.xdp_counted(&f).unwrap(),
        drop,
        "filter off: full lookups"
    );
}

/// The host filter answers for the clean neighbours of exact IPv4 bans, whose /24 the
/// pre-filter cannot prove clean: the program trusts its bit, but only while no IPv4 CIDR ban
/// exists, which it does not speak for.
#[test]
fn the_host_filter_answers_for_neighbours_only_while_no_v4_cidr_ban_exists() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.fill_filter(false).unwrap();
    dp.ban("198.18.43.5", 32, ban_now()).unwrap();
    let drop = (XDP_DROP, Delta::of(&[Counter::Dropped]));
    let pass = (XDP_PASS, Delta::of(&[Counter::Passed]));
    let syn = |src: &str| Pkt::tcp(src, 40000, SERVER4, 443).syn().build();
    assert_eq!(dp.xdp_counted(&syn("198.18.43.5")).unwrap(), drop);
    // The neighbour shares the banned /24, not the ban's low 24 bits.
    assert_eq!(dp.xdp_counted(&syn("198.18.43.6")).unwrap(), pass);
    // A wrongly set bit hides the ban: the bit is what the program went by. (Hence the agent's
    // rule: clear the bit before the ban is written.)
    dp.set_host_bit(filter::host_bit([198, 18, 43, 5]), true)
        .unwrap();
    assert_eq!(
        dp.xdp_counted(&syn("198.18.43.5")).unwrap(),
        pass,
        "trusted the host filter"
    );
    dp.ban("198.20.0.0", 16, ban_now()).unwrap();
    assert_eq!(
        dp.xdp_counted(&syn("198.18.43.5")).unwrap(),
        drop,
        "the host filter believed while a CIDR ban exists"
    );
    assert_eq!(dp.xdp_counted(&syn("198.20.7.7")).unwrap(), drop);
}

/// `BAN_NOT_ALLOWLISTED` is the writer's promise that no allowlist entry covers the ban; the
/// drop path then skips the allowlist lookup. Without it the allowlist is looked up and wins.
#[test]
fn bans_promised_not_allowlisted_skip_the_allowlist_lookup() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.allow("198.18.47.0", 24).unwrap();
    dp.allow("fd00:47::", 64).unwrap();
    let promised = BanValue {
        flags: BAN_NOT_ALLOWLISTED,
        ..ban_now()
    };
    dp.ban("198.18.47.1", 32, ban_now()).unwrap();
    dp.ban("fd00:47::1", 128, ban_now()).unwrap();
    dp.ban("198.18.47.2", 32, promised).unwrap();
    dp.ban("fd00:47::2", 128, promised).unwrap();
    for (src, want) in [
        ("198.18.47.1", (XDP_PASS, Counter::Allowlisted)),
        ("fd00:47::1", (XDP_PASS, Counter::Allowlisted)),
        ("198.18.47.2", (XDP_DROP, Counter::Dropped)),
        ("fd00:47::2", (XDP_DROP, Counter::Dropped)),
    ] {
        let f = Pkt::tcp(src, 40000, server(src), 443).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (want.0, Delta::of(&[want.1])),
            "{src}"
        );
    }
}

/// Flows are only tracked on watched ports, so a banned source's packets elsewhere never pay
/// for the flow lookup; an established flow on a watched port is still preserved.
#[test]
fn preservation_looks_at_watched_ports_only() {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    let src = "198.18.48.1";
    let req = Pkt::tcp(src, 41000, SERVER4, PORT).payload(&ws_request("/"));
    dp.xdp(&req.build()).unwrap();
    let answer = req
        .reply()
        .payload(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        .build();
    dp.tc(&answer).unwrap();
    // The writer saw the flow, so the ban lets the data plane look flows up.
    let ban = BanValue {
        flags: BAN_MAY_PRESERVE,
        ..ban_now()
    };
    dp.ban(src, 32, ban).unwrap();
    let frame = [0x81, 0x80, 1, 2, 3, 4];
    let data = Pkt::tcp(src, 41000, SERVER4, PORT).payload(&frame).build();
    assert_eq!(
        dp.xdp_counted(&data).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Preserved]))
    );
    let elsewhere = Pkt::tcp(src, 41000, SERVER4, 8443).payload(&frame).build();
    assert_eq!(
        dp.xdp_counted(&elsewhere).unwrap(),
        (XDP_DROP, Delta::of(&[Counter::Dropped]))
    );
}

/// The bench's reference program (`wsguard_bench_ref`) lives in the data plane's object, whose
/// every map an agent load creates: its maps must cost nothing there. The agent resizes only
/// the ban maps, so they stay at the object's one entry, without preallocation (one hash
/// bucket), while being of the same kind as the ban maps the bench compares them with.
#[test]
fn the_bench_reference_maps_cost_nothing_in_a_plain_load() {
    use aya::maps::Map;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    use wsguard_common::maps::names;

    let dp = DataPlane::load(&[PORT]).expect("load data plane");
    for (reference, ours) in [
        ("REF_BANS_V4", names::BANS_V4),
        ("REF_BANS_V6", names::BANS_V6),
    ] {
        let info = |name: &str| match dp.ebpf.map(name) {
            Some(Map::HashMap(m)) => (m.info().unwrap(), m.fd().as_fd().as_raw_fd()),
            _ => panic!("{name}: not a hash map of the object"),
        };
        let ((r, fd), (o, _)) = (info(reference), info(ours));
        assert_eq!(r.max_entries(), 1, "{reference}");
        assert_eq!(
            (
                r.map_type().unwrap(),
                r.map_flags(),
                r.key_size(),
                r.value_size()
            ),
            (
                o.map_type().unwrap(),
                o.map_flags(),
                o.key_size(),
                o.value_size()
            ),
            "{reference} is not of {ours}'s kind"
        );
        const BPF_F_NO_PREALLOC: u32 = 1;
        assert_eq!(r.map_flags() & BPF_F_NO_PREALLOC, BPF_F_NO_PREALLOC);
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let memlock: u64 = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .expect("memlock in fdinfo")
            .trim()
            .parse()
            .unwrap();
        assert!(memlock < 4096, "{reference}: {memlock} bytes locked");
    }
}

/// The reference drops exactly the sources its map holds, IPv4 and IPv6: a reference that
/// passed everything would be cheap and prove nothing.
#[test]
fn the_bench_reference_drops_what_its_map_holds() {
    use aya::maps::{HashMap, MapData};

    let mut dp = DataPlane::load_sized(&[PORT], &[("REF_BANS_V4", 16), ("REF_BANS_V6", 16)])
        .expect("load data plane");
    {
        let mut v4: HashMap<&mut MapData, [u8; 4], BanValue> =
            HashMap::try_from(dp.ebpf.map_mut("REF_BANS_V4").unwrap()).unwrap();
        v4.insert([198, 18, 50, 1], ban_now(), 0).unwrap();
    }
    {
        let mut v6: HashMap<&mut MapData, [u8; 16], BanValue> =
            HashMap::try_from(dp.ebpf.map_mut("REF_BANS_V6").unwrap()).unwrap();
        let a: std::net::Ipv6Addr = "fd00:50::1".parse().unwrap();
        v6.insert(a.octets(), ban_now(), 0).unwrap();
    }
    for (src, want) in [
        ("198.18.50.1", XDP_DROP),
        ("198.18.50.2", XDP_PASS),
        ("fd00:50::1", XDP_DROP),
        ("fd00:50::2", XDP_PASS),
    ] {
        let f = Pkt::tcp(src, 40000, server(src), PORT).syn().build();
        let (rc, _) = dp.xdp_named("wsguard_bench_ref", &f, 1).unwrap();
        assert_eq!(rc, want, "{src}");
    }
    // Not IP (ARP): passes.
    let mut arp = [0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (rc, _) = dp.xdp_named("wsguard_bench_ref", &arp, 1).unwrap();
    assert_eq!(rc, XDP_PASS);
}
