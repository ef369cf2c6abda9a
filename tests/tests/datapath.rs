//! Issue 3's verdict table: what the XDP program decides for clean, banned, expired, observed,
//! allowlisted and preserved sources, through VLAN tags, IPv4 options and IPv6 extension
//! headers. Every case asserts the full set of counters it moved, not only the verdict.

use wsguard_common::maps::{
    BAN_HARD, BAN_MAY_PRESERVE, BAN_OBSERVE, BanValue, CFG_OBSERVE, Counter, FLOW_ESTABLISHED,
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, XDP_DROP, XDP_PASS, boot_ns, flow_key},
    packet::{Pkt, TCP_ACK, TPID_8021AD, TPID_8021Q, ws_request},
};

const PORT: u16 = 80;
const SERVER4: &str = "198.18.1.1";
const SERVER6: &str = "fd00:1::1";
/// A masked WebSocket text frame: what an established client sends.
const WS_FRAME: &[u8] = &[
    0x81,
    0x85,
    1,
    2,
    3,
    4,
    b'h' ^ 1,
    b'e' ^ 2,
    b'l' ^ 3,
    b'l' ^ 4,
    b'o' ^ 1,
];

fn server(src: &str) -> &'static str {
    if src.contains(':') { SERVER6 } else { SERVER4 }
}

fn to_port(src: &str, sport: u16) -> Pkt {
    Pkt::tcp(src, sport, server(src), PORT)
}

fn permanent() -> BanValue {
    BanValue {
        created_ns: boot_ns(),
        ..Default::default()
    }
}

fn full_prefix(addr: &str) -> u32 {
    if addr.contains(':') { 128 } else { 32 }
}

fn load() -> DataPlane {
    DataPlane::load(&[PORT]).expect("load data plane")
}

#[test]
fn clean_sources_pass_counted_passed() {
    let mut dp = load();
    for src in ["198.18.0.10", "fd00::10"] {
        let data = to_port(src, 40000).payload(WS_FRAME).build();
        let other_port = Pkt::tcp(src, 40000, server(src), 22)
            .payload(b"SSH-2.0-x\r\n")
            .build();
        let syn = to_port(src, 40001).syn().build();
        let udp = Pkt::udp(src, 5353, server(src), 53).payload(b"q").build();
        for f in [data, other_port, syn, udp] {
            assert_eq!(
                dp.xdp_counted(&f).unwrap(),
                (XDP_PASS, Delta::of(&[Counter::Passed])),
                "{src}"
            );
        }
    }
}

#[test]
fn exact_bans_drop_and_count_per_ban() {
    let mut dp = load();
    for src in ["198.18.0.66", "fd00::66"] {
        dp.ban(src, full_prefix(src), permanent()).unwrap();
        let syn = to_port(src, 40000).syn().build();
        let data = Pkt::tcp(src, 40001, server(src), 22).payload(b"x").build();
        let udp = Pkt::udp(src, 5353, server(src), 53).payload(b"q").build();
        for f in [syn, data, udp] {
            assert_eq!(
                dp.xdp_counted(&f).unwrap(),
                (XDP_DROP, Delta::of(&[Counter::Dropped])),
                "{src}"
            );
        }
        assert_eq!(
            dp.ban_entry(src).unwrap().drops,
            3,
            "per-ban drop counter of {src}"
        );
    }
    // A neighbour of a banned address is not banned.
    for src in ["198.18.0.67", "fd00::67"] {
        assert_eq!(
            dp.xdp(&to_port(src, 40000).syn().build()).unwrap(),
            XDP_PASS,
            "{src}"
        );
    }
}

#[test]
fn cidr_bans_drop_the_whole_prefix() {
    let mut dp = load();
    dp.ban("198.18.7.0", 24, permanent()).unwrap();
    dp.ban("fd00:7::", 64, permanent()).unwrap();
    for src in ["198.18.7.1", "198.18.7.254", "fd00:7::1", "fd00:7::ffff:1"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped])),
            "{src}"
        );
    }
    for src in ["198.18.8.1", "198.18.6.255", "fd00:7:0:1::1", "fd00:8::1"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Passed])),
            "{src}"
        );
    }
}

#[test]
fn expired_bans_are_ignored() {
    let mut dp = load();
    let now = boot_ns();
    let expired = BanValue {
        expires_ns: now - 1,
        created_ns: now - 10_000_000_000,
        ..Default::default()
    };
    let live = BanValue {
        expires_ns: now + 3_600_000_000_000,
        ..permanent()
    };
    dp.ban("198.18.0.70", 32, expired).unwrap();
    dp.ban("fd00::70", 128, expired).unwrap();
    dp.ban("198.18.9.0", 24, expired).unwrap();
    dp.ban("198.18.0.71", 32, live).unwrap();
    for src in ["198.18.0.70", "fd00::70", "198.18.9.9"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Passed])),
            "{src}"
        );
    }
    assert_eq!(dp.ban_entry("198.18.0.70").unwrap().drops, 0);
    assert_eq!(
        dp.xdp(&to_port("198.18.0.71", 40000).syn().build())
            .unwrap(),
        XDP_DROP,
        "TTL not reached yet"
    );
}

/// The drop path reads a per-CPU clock cached once per tick: a ban must still lapse at its TTL
/// while packets keep arriving (a cache that never refreshed would keep dropping).
#[test]
fn bans_lapse_while_packets_keep_arriving() {
    std::thread::spawn(|| {
        wsguard_tests::dataplane::pin_to_cpu(0).unwrap();
        let mut dp = load();
        let ttl = std::time::Duration::from_millis(300);
        for (src, prefix) in [("198.18.0.75", 32), ("fd00:75::", 64), ("198.18.76.0", 24)] {
            let value = BanValue {
                expires_ns: boot_ns() + ttl.as_nanos() as u64,
                ..permanent()
            };
            dp.ban(src, prefix, value).unwrap();
        }
        let frames: Vec<Vec<u8>> = ["198.18.0.75", "fd00:75::1", "198.18.76.9"]
            .iter()
            .map(|src| to_port(src, 40000).syn().build())
            .collect();
        for f in &frames {
            assert_eq!(
                dp.xdp_repeat(f, 1000).unwrap().0,
                XDP_DROP,
                "before the TTL"
            );
        }
        std::thread::sleep(ttl + std::time::Duration::from_millis(100));
        for f in &frames {
            assert_eq!(
                dp.xdp_counted(f).unwrap(),
                (XDP_PASS, Delta::of(&[Counter::Passed])),
                "after the TTL"
            );
        }
    })
    .join()
    .expect("test thread");
}

#[test]
fn expired_exact_ban_does_not_hide_a_live_cidr_ban() {
    let mut dp = load();
    let expired = BanValue {
        expires_ns: boot_ns() - 1,
        ..Default::default()
    };
    dp.ban("198.18.10.5", 32, expired).unwrap();
    dp.ban("198.18.10.0", 24, permanent()).unwrap();
    dp.ban("fd00:10::5", 128, expired).unwrap();
    dp.ban("fd00:10::", 64, permanent()).unwrap();
    for src in ["198.18.10.5", "fd00:10::5"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped])),
            "{src}"
        );
    }
}

#[test]
fn observe_bans_pass_and_count_would_drop() {
    let mut dp = load();
    let observe = BanValue {
        flags: BAN_OBSERVE,
        ..permanent()
    };
    for src in ["198.18.0.80", "fd00::80"] {
        dp.ban(src, full_prefix(src), observe).unwrap();
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::WouldDrop])),
            "{src}"
        );
        assert_eq!(
            dp.ban_entry(src).unwrap().drops,
            1,
            "observe bans count would-be drops"
        );
    }
}

#[test]
fn global_observe_mode_passes_enforced_bans() {
    let mut dp = load();
    dp.ban("198.18.0.81", 32, permanent()).unwrap();
    dp.ban("fd00:81::", 64, permanent()).unwrap();
    let mut cfg = dp.config().unwrap();
    cfg.flags |= CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    for src in ["198.18.0.81", "fd00:81::1"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::WouldDrop])),
            "{src}"
        );
    }
    cfg.flags &= !CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    let f = to_port("198.18.0.81", 40000).syn().build();
    assert_eq!(
        dp.xdp(&f).unwrap(),
        XDP_DROP,
        "enforcing again without a reload"
    );
}

#[test]
fn allowlist_wins_over_every_ban() {
    let mut dp = load();
    dp.allow("198.18.20.0", 24).unwrap();
    dp.allow("fd00:20::", 48).unwrap();
    dp.ban("198.18.20.5", 32, permanent()).unwrap();
    dp.ban(
        "198.18.20.0",
        25,
        BanValue {
            flags: BAN_HARD,
            ..permanent()
        },
    )
    .unwrap();
    dp.ban("fd00:20::5", 128, permanent()).unwrap();
    for src in ["198.18.20.5", "198.18.20.6", "fd00:20::5"] {
        let f = to_port(src, 40000).syn().build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Allowlisted])),
            "{src}"
        );
    }
    assert_eq!(
        dp.ban_entry("198.18.20.5").unwrap().drops,
        0,
        "allowlisted packets are no drops"
    );
    // Allowlisted but not banned: the plain clean path.
    let f = to_port("198.18.20.200", 40000).syn().build();
    assert_eq!(
        dp.xdp_counted(&f).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
}

/// Open a WebSocket through the real path: the first request on ingress, the server's 101 on
/// egress.
fn establish(dp: &mut DataPlane, src: &str, sport: u16, first: &[u8], answer: &[u8]) {
    let req = to_port(src, sport).payload(first);
    dp.xdp(&req.build()).unwrap();
    assert_eq!(
        dp.tc(&req.reply().payload(answer).build()).unwrap(),
        TC_ACT_OK
    );
    let flow = dp
        .flow(&flow_key(src, sport, server(src), PORT))
        .unwrap()
        .expect("flow recorded");
    assert_eq!(flow.state, FLOW_ESTABLISHED, "{src}:{sport} established");
}

const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";

#[test]
fn flows_established_before_a_ban_are_preserved() {
    let mut dp = load();
    for src in ["198.18.0.90", "fd00::90"] {
        establish(&mut dp, src, 41000, &ws_request("/chat"), SWITCHING);
        // A handshake still waiting for its answer is not established.
        dp.xdp(&to_port(src, 41001).payload(&ws_request("/chat")).build())
            .unwrap();
        // The ban is created after the flows: its created_ns is later than their first sight.
        // The writer saw flows of the source, so it lets the data plane look them up.
        let ban = BanValue {
            flags: BAN_MAY_PRESERVE,
            ..permanent()
        };
        dp.ban(src, full_prefix(src), ban).unwrap();

        let data = to_port(src, 41000).payload(WS_FRAME).build();
        assert_eq!(
            dp.xdp_counted(&data).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Preserved])),
            "{src}"
        );
        let ack = to_port(src, 41000).flags(TCP_ACK).build();
        assert_eq!(
            dp.xdp_counted(&ack).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Preserved])),
            "{src}"
        );
        assert_eq!(
            dp.ban_entry(src).unwrap().drops,
            0,
            "preserved packets are no drops"
        );

        let drop = (XDP_DROP, Delta::of(&[Counter::Dropped]));
        let syn_same_tuple = to_port(src, 41000).syn().build();
        assert_eq!(
            dp.xdp_counted(&syn_same_tuple).unwrap(),
            drop,
            "{src}: a SYN starts a new flow"
        );
        let new_flow = to_port(src, 41002).syn().build();
        assert_eq!(dp.xdp_counted(&new_flow).unwrap(), drop, "{src}: new flow");
        let unanswered = to_port(src, 41001).payload(WS_FRAME).build();
        assert_eq!(
            dp.xdp_counted(&unanswered).unwrap(),
            drop,
            "{src}: never upgraded"
        );
        assert_eq!(dp.ban_entry(src).unwrap().drops, 3);
    }
}

#[test]
fn flows_established_after_the_ban_are_not_preserved() {
    let mut dp = load();
    let src = "198.18.0.91";
    // The ban is older than the flow (say, observe mode let it through).
    let ban = BanValue {
        created_ns: boot_ns() - 1_000_000,
        ..Default::default()
    };
    dp.ban(
        src,
        32,
        BanValue {
            flags: BAN_OBSERVE,
            ..ban
        },
    )
    .unwrap();
    establish(&mut dp, src, 41000, &ws_request("/chat"), SWITCHING);
    dp.ban(src, 32, ban).unwrap();
    let data = to_port(src, 41000).payload(WS_FRAME).build();
    assert_eq!(
        dp.xdp_counted(&data).unwrap(),
        (XDP_DROP, Delta::of(&[Counter::Dropped]))
    );
}

#[test]
fn tls_flows_with_payload_both_ways_are_preserved() {
    let mut dp = load();
    let src = "198.18.0.92";
    let client_hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    let server_hello = [
        0x16, 0x03, 0x03, 0x00, 0x0a, 0x02, 0, 0, 6, 3, 3, 1, 2, 3, 4,
    ];
    establish(&mut dp, src, 42000, &client_hello, &server_hello);
    let ban = BanValue {
        flags: BAN_MAY_PRESERVE,
        ..permanent()
    };
    dp.ban(src, 32, ban).unwrap();
    let app_data = to_port(src, 42000)
        .payload(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xaa])
        .build();
    assert_eq!(
        dp.xdp_counted(&app_data).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Preserved]))
    );
}

#[test]
fn hard_bans_cut_preserved_flows() {
    let mut dp = load();
    for src in ["198.18.0.93", "fd00::93"] {
        establish(&mut dp, src, 43000, &ws_request("/chat"), SWITCHING);
        dp.ban(
            src,
            full_prefix(src),
            BanValue {
                flags: BAN_HARD,
                ..permanent()
            },
        )
        .unwrap();
        let data = to_port(src, 43000).payload(WS_FRAME).build();
        assert_eq!(
            dp.xdp_counted(&data).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped])),
            "{src}"
        );
        assert_eq!(dp.ban_entry(src).unwrap().drops, 1);
    }
}

#[test]
fn vlan_and_qinq_are_looked_through() {
    let mut dp = load();
    dp.ban("198.18.0.100", 32, permanent()).unwrap();
    dp.ban("fd00::100", 128, permanent()).unwrap();
    let tags: [&[u16]; 3] = [
        &[TPID_8021Q],
        &[TPID_8021AD, TPID_8021Q],
        &[TPID_8021Q, TPID_8021Q],
    ];
    for (i, tags) in tags.iter().enumerate() {
        let tagged = |p: Pkt| tags.iter().fold(p, |p, t| p.vlan(*t));
        for (banned, clean) in [("198.18.0.100", "198.18.0.101"), ("fd00::100", "fd00::101")] {
            let f = tagged(to_port(banned, 40000).syn()).build();
            assert_eq!(
                dp.xdp_counted(&f).unwrap(),
                (XDP_DROP, Delta::of(&[Counter::Dropped])),
                "{tags:?}"
            );
            // The handshake behind the tags is inspected and its flow keyed by the real addresses.
            let sport = 44000 + i as u16;
            let f = tagged(to_port(clean, sport).payload(&ws_request("/"))).build();
            let want = Delta::of(&[Counter::Passed, Counter::HsValid]);
            assert_eq!(
                dp.xdp_counted(&f).unwrap(),
                (XDP_PASS, want),
                "{tags:?} {clean}"
            );
            assert!(
                dp.flow(&flow_key(clean, sport, server(clean), PORT))
                    .unwrap()
                    .is_some()
            );
        }
    }
}

#[test]
fn ipv4_options_are_skipped() {
    let mut dp = load();
    dp.ban("198.18.0.110", 32, permanent()).unwrap();
    // Record route (7), padded by the builder; and the longest header: 40 bytes of options.
    let options: [&[u8]; 2] = [&[7, 7, 4, 0, 0, 0, 0], &[1; 40]];
    for (i, opts) in options.iter().enumerate() {
        let f = to_port("198.18.0.110", 40000)
            .syn()
            .ip_options(opts)
            .build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped]))
        );
        let sport = 45000 + i as u16;
        let f = to_port("198.18.0.111", sport)
            .ip_options(opts)
            .payload(&ws_request("/"))
            .build();
        let want = Delta::of(&[Counter::Passed, Counter::HsValid]);
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, want),
            "options {opts:?}"
        );
        assert!(
            dp.flow(&flow_key("198.18.0.111", sport, SERVER4, PORT))
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut dp = load();
    dp.ban("fd00::120", 128, permanent()).unwrap();
    // (hop-by-hop, routing, destination options, fragment, AH, ...) up to the walk budget.
    let chains: [&[u8]; 4] = [
        &[0],
        &[0, 43, 60],
        &[0, 44, 51, 60],
        &[0, 60, 43, 60, 51, 60],
    ];
    for (i, chain) in chains.iter().enumerate() {
        let with = |p: Pkt| chain.iter().fold(p, |p, k| p.ext_header(*k, &[0; 6]));
        let f = with(to_port("fd00::120", 40000).syn()).build();
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped])),
            "{chain:?}"
        );
        let sport = 46000 + i as u16;
        let f = with(to_port("fd00::121", sport).payload(&ws_request("/"))).build();
        let want = Delta::of(&[Counter::Passed, Counter::HsValid]);
        assert_eq!(
            dp.xdp_counted(&f).unwrap(),
            (XDP_PASS, want),
            "chain {chain:?}"
        );
        assert!(
            dp.flow(&flow_key("fd00::121", sport, SERVER6, PORT))
                .unwrap()
                .is_some(),
            "{chain:?}"
        );
    }
}
