//! Flows of banned clients behind a trusted proxy, cut by the real XDP program
//! (BPF_PROG_TEST_RUN, the frames it leaves checked byte for byte): the segment that carries the
//! header becomes a RST towards the server, the proxy's next packets are answered with a RST
//! turned around (bounded, never for a RST), a flow marked by the agent is cut at its next
//! packet; observe bans, observe mode and the allowlist cut nothing. The real-socket side of
//! the same (a server's socket reset, the proxy's connect failing fast) is in
//! `agent_datapath/proxy.rs`.

use wsguard_common::{
    BadReason, Verdict,
    maps::{
        BAN_OBSERVE, BanValue, CFG_CUT_PENDING, CFG_OBSERVE, Counter, PROXY_CLIENT, PROXY_CUT,
        PROXY_CUT_PENDING, RST_BURST,
    },
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, XDP_DROP, XDP_PASS, XDP_TX, boot_ns, flow_key},
    packet::{
        Pkt, Segment, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, bad_request, parse_segment, ws_request,
    },
};

const PORT: u16 = 80;
const SERVER4: &str = "198.18.1.1";
const SERVER6: &str = "fd00:1::1";
const PROXY4: &str = "198.18.5.1";
const PROXY6: &str = "fd00:5::1";
/// Timestamps and SACK-permitted, as a Linux client sends them (12 bytes).
const TCP_OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
/// A router-alert IPv4 option.
const IP_OPTS: [u8; 4] = [0x94, 0x04, 0, 0];

fn server(src: &str) -> &'static str {
    if src.contains(':') { SERVER6 } else { SERVER4 }
}

fn configured() -> DataPlane {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.trust_proxy("198.18.5.0", 24).unwrap();
    dp.trust_proxy("fd00:5::", 64).unwrap();
    dp
}

fn permanent() -> BanValue {
    BanValue {
        created_ns: boot_ns(),
        ..Default::default()
    }
}

/// A v1 header naming `client` (its family decides TCP4/TCP6), then a valid handshake.
fn header_and_request(client: &str, port: u16) -> Vec<u8> {
    let (fam, dst) = if client.contains(':') {
        ("TCP6", "fd00:1::1")
    } else {
        ("TCP4", "198.18.1.1")
    };
    let mut p = format!("PROXY {fam} {client} {dst} {port} 80\r\n").into_bytes();
    p.extend_from_slice(&ws_request("/"));
    p
}

/// The first data segment of a proxied flow: seq 1000, ack 5000, TCP options; IPv4 options
/// too over IPv4.
fn first_segment(proxy: &str, sport: u16, payload: &[u8]) -> Pkt {
    let p = Pkt::tcp(proxy, sport, server(proxy), PORT)
        .seq(1000)
        .ack(5000)
        .tcp_options(&TCP_OPTS)
        .payload(payload);
    if proxy.contains(':') {
        p
    } else {
        p.ip_options(&IP_OPTS)
    }
}

/// The RST a segment `sent` became for the server: same addresses, ports and numbers, no
/// options and no payload, checksums right, nothing after the IP length.
fn assert_rst_to_server(out: &[u8], sent: &Pkt, what: &str) {
    let s: Segment = parse_segment(out).unwrap_or_else(|| panic!("{what}: not a TCP frame"));
    assert_eq!(
        (s.src, s.dst, s.sport, s.dport),
        (sent.src, sent.dst, sent.sport, sent.dport),
        "{what}: same direction"
    );
    assert_eq!(
        (s.seq, s.ack, s.flags),
        (sent.seq, sent.ack, TCP_RST | TCP_ACK),
        "{what}: RST|ACK at the segment's own sequence number"
    );
    let ip_len = if sent.src.is_ipv4() { 20 } else { 40 };
    assert_eq!(
        (
            s.ip_header_len,
            s.tcp_header_len,
            s.payload.len(),
            s.window,
            s.trailer
        ),
        (ip_len, 20, 0, 0, 0),
        "{what}: options and payload stripped"
    );
    assert!(s.checksums_ok, "{what}: checksums");
    assert_eq!(out.len(), 14 + ip_len + 20, "{what}: frame length");
}

/// The RST that answers `sent`, back to its sender: everything turned around, `SEQ = SEG.ACK`.
fn assert_rst_to_sender(out: &[u8], sent: &Pkt, what: &str) {
    let s = parse_segment(out).unwrap_or_else(|| panic!("{what}: not a TCP frame"));
    let orig = parse_segment(&sent.build()).unwrap();
    assert_eq!(
        (s.src_mac, s.dst_mac),
        (orig.dst_mac, orig.src_mac),
        "{what}: MACs swapped"
    );
    assert_eq!(
        (s.src, s.dst, s.sport, s.dport),
        (sent.dst, sent.src, sent.dport, sent.sport),
        "{what}: turned around"
    );
    assert_eq!(
        (s.seq, s.ack, s.flags),
        (sent.ack, 0, TCP_RST),
        "{what}: numbers"
    );
    assert_eq!(
        (s.tcp_header_len, s.payload.len(), s.trailer, s.ttl),
        (20, 0, 0, 64)
    );
    assert!(s.checksums_ok, "{what}: checksums");
}

/// A banned client's new flow through the proxy is cut at its header, for IPv4 and IPv6
/// proxies and clients of either family, exact and CIDR bans; later packets get bounded RSTs.
#[test]
fn a_banned_clients_flow_is_cut_at_its_header() {
    let mut dp = configured();
    dp.ban("198.19.10.1", 32, permanent()).unwrap();
    dp.ban("fd00:10::1", 128, permanent()).unwrap();
    dp.ban("198.19.11.0", 24, permanent()).unwrap();
    let cases = [
        (PROXY4, "198.19.10.1"),
        (PROXY4, "fd00:10::1"),
        (PROXY6, "198.19.10.1"),
        (PROXY6, "fd00:10::1"),
        (PROXY4, "198.19.11.77"),
    ];
    for (i, (proxy, client)) in cases.into_iter().enumerate() {
        let what = format!("{client} via {proxy}");
        let sport = 40_000 + i as u16;
        let sent = first_segment(proxy, sport, &header_and_request(client, 7000));
        let drops_before = if client.ends_with(".77") {
            None
        } else {
            Some(dp.ban_entry(client).unwrap().drops)
        };
        let ((action, out), delta) = dp.counted(|dp| dp.xdp_out(&sent.build())).unwrap();
        assert_eq!(action, XDP_PASS, "{what}: the RST goes on to the server");
        assert_eq!(
            delta,
            Delta::of(&[Counter::Reset, Counter::ProxyV1Client]),
            "{what}: counted as a cut, never judged"
        );
        assert_rst_to_server(&out, &sent, &what);
        if let Some(before) = drops_before {
            assert_eq!(dp.ban_entry(client).unwrap().drops, before + 1, "{what}");
        }
        let key = flow_key(proxy, sport, server(proxy), PORT);
        let f = dp.flow(&key).unwrap().expect("flow");
        assert_eq!((f.proxy, f.next_seq), (PROXY_CUT, 1000), "{what}");
        assert!(
            dp.rate(client).unwrap().is_none(),
            "{what}: no verdict, no rate"
        );

        // The proxy retransmits: each gets a RST back, RST_BURST of them, then drops.
        for n in 0..RST_BURST + 2 {
            let (action, out) = dp.xdp_out(&sent.build()).unwrap();
            if n < RST_BURST {
                assert_eq!(action, XDP_TX, "{what}: retransmission {n}");
                assert_rst_to_sender(&out, &sent, &what);
            } else {
                assert_eq!(action, XDP_DROP, "{what}: past the RST budget");
            }
        }
        // Data in flight after it (a later sequence number) is part of the cut flow.
        let later = first_segment(proxy, sport, b"GET /more HTTP/1.1\r\n\r\n").seq(1000 + 200);
        assert_eq!(
            dp.xdp_counted(&later.build()).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped]))
        );
        // Its FIN ends it; never answered.
        let fin = first_segment(proxy, sport, b"").flags(TCP_FIN | TCP_ACK);
        assert_eq!(dp.xdp(&fin.build()).unwrap(), XDP_PASS);
        assert!(
            dp.flow(&key).unwrap().is_none(),
            "{what}: FIN removes the flow"
        );
    }
}

/// A RST from the proxy on a cut flow passes (never answered) and removes the flow; the
/// WebSocket frames of a cut flow cost nothing new: they are not looked up at all.
#[test]
fn a_rst_is_never_answered() {
    let mut dp = configured();
    dp.ban("198.19.12.1", 32, permanent()).unwrap();
    let sent = first_segment(PROXY4, 41_000, &header_and_request("198.19.12.1", 1));
    assert_eq!(dp.xdp(&sent.build()).unwrap(), XDP_PASS);
    let rst = first_segment(PROXY4, 41_000, b"").flags(TCP_RST);
    assert_eq!(
        dp.xdp_counted(&rst.build()).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
    assert!(
        dp.flow(&flow_key(PROXY4, 41_000, SERVER4, PORT))
            .unwrap()
            .is_none()
    );
}

/// A reused 4-tuple (the proxy picks the same source port for a new connection) is a new flow:
/// its SYN is not answered, and its first payload, at an unrelated sequence number, is judged.
#[test]
fn a_reused_four_tuple_is_a_new_flow() {
    let mut dp = configured();
    dp.ban("198.19.13.1", 32, permanent()).unwrap();
    let sent = first_segment(PROXY4, 41_100, &header_and_request("198.19.13.1", 1));
    assert_eq!(dp.xdp(&sent.build()).unwrap(), XDP_PASS);
    let syn = Pkt::tcp(PROXY4, 41_100, SERVER4, PORT).syn().seq(9_000_000);
    assert_eq!(
        dp.xdp(&syn.build()).unwrap(),
        XDP_PASS,
        "a SYN is never answered"
    );
    let mut p = b"PROXY TCP4 198.19.13.2 198.18.1.1 2 80\r\n".to_vec();
    p.extend_from_slice(&bad_request("/"));
    let next = first_segment(PROXY4, 41_100, &p).seq(9_000_001);
    let (action, delta) = dp.xdp_counted(&next.build()).unwrap();
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        delta,
        Delta::of(&[Counter::Passed, Counter::ProxyV1Client, Counter::HsBad])
            .and_at(Counter::BadReason0 as u32 + BadReason::NoUpgrade as u32, 1)
    );
    let f = dp
        .flow(&flow_key(PROXY4, 41_100, SERVER4, PORT))
        .unwrap()
        .unwrap();
    assert_eq!(f.proxy, PROXY_CLIENT);
    assert_eq!(dp.rate("198.19.13.2").unwrap().map(|r| r.count), Some(1));
}

/// Observe bans and observe mode cut nothing (counted as would-be drops, the request judged);
/// the allowlist wins over a ban; an expired ban is no ban.
#[test]
fn observe_allowlist_and_expiry_cut_nothing() {
    let mut dp = configured();
    dp.ban(
        "198.19.14.1",
        32,
        BanValue {
            flags: BAN_OBSERVE,
            ..permanent()
        },
    )
    .unwrap();
    dp.ban("198.19.14.2", 32, permanent()).unwrap();
    dp.allow("198.19.14.2", 32).unwrap();
    dp.ban(
        "198.19.14.3",
        32,
        BanValue {
            expires_ns: boot_ns() - 1,
            ..permanent()
        },
    )
    .unwrap();
    for (i, (client, counter)) in [
        ("198.19.14.1", Counter::WouldDrop),
        ("198.19.14.2", Counter::Allowlisted),
        ("198.19.14.3", Counter::Passed),
    ]
    .into_iter()
    .enumerate()
    {
        let sport = 41_200 + i as u16;
        let sent = first_segment(PROXY4, sport, &header_and_request(client, 9));
        let ((action, out), d) = dp.counted(|dp| dp.xdp_out(&sent.build())).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, sent.build(), "{client}: the segment is untouched");
        assert_eq!(
            d,
            Delta::of(&[counter, Counter::ProxyV1Client, Counter::HsValid]),
            "{client}: judged, the packet counted as {counter:?}"
        );
        let f = dp
            .flow(&flow_key(PROXY4, sport, SERVER4, PORT))
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.proxy, Verdict::from_u8(f.verdict)),
            (PROXY_CLIENT, Some(Verdict::Valid))
        );
    }
    assert_eq!(
        dp.ban_entry("198.19.14.1").unwrap().drops,
        1,
        "counted as would-be"
    );
    // Global observe mode: an enforced ban cuts nothing either.
    dp.ban("198.19.14.4", 32, permanent()).unwrap();
    let mut cfg = dp.config().unwrap();
    cfg.flags |= CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    let sent = first_segment(PROXY4, 41_400, &header_and_request("198.19.14.4", 9));
    let (d_action, d) = dp.xdp_counted(&sent.build()).unwrap();
    assert_eq!(
        (d_action, d),
        (
            XDP_PASS,
            Delta::of(&[Counter::WouldDrop, Counter::ProxyV1Client, Counter::HsValid])
        )
    );
}

/// A live proxied flow the agent marked (a hard ban of its real client) is cut at its next
/// packet, whatever it carries: a WebSocket frame, a bare ACK. Observe mode unmarks it instead.
#[test]
fn a_marked_flow_is_cut_at_its_next_packet() {
    let mut dp = configured();
    let mut cfg = dp.config().unwrap();
    cfg.flags |= CFG_CUT_PENDING;
    dp.set_config(&cfg).unwrap();
    let frame: &[u8] = &[0x81, 0x82, 1, 2, 3, 4, 0x61, 0x62];
    for (i, payload) in [frame, b"".as_slice()].into_iter().enumerate() {
        let sport = 41_500 + i as u16;
        let sent = first_segment(PROXY4, sport, &header_and_request("198.19.15.1", 9));
        assert_eq!(dp.xdp(&sent.build()).unwrap(), XDP_PASS);
        let key = flow_key(PROXY4, sport, SERVER4, PORT);
        let mut f = dp.flow(&key).unwrap().unwrap();
        assert_eq!(f.proxy, PROXY_CLIENT);
        f.proxy = PROXY_CUT_PENDING;
        dp.set_flow(&key, f).unwrap();
        let next = Pkt::tcp(PROXY4, sport, SERVER4, PORT)
            .seq(2000)
            .ack(6000)
            .flags(if payload.is_empty() {
                TCP_ACK
            } else {
                TCP_ACK | TCP_PSH
            })
            .payload(payload);
        let ((action, out), d) = dp.counted(|dp| dp.xdp_out(&next.build())).unwrap();
        assert_eq!((action, d), (XDP_PASS, Delta::of(&[Counter::Reset])), "{i}");
        assert_rst_to_server(&out, &next, "marked flow");
        let f = dp.flow(&key).unwrap().unwrap();
        assert_eq!((f.proxy, f.next_seq), (PROXY_CUT, 2000));
    }
    // Observe mode: the mark goes, nothing is cut.
    let sent = first_segment(PROXY4, 41_600, &header_and_request("198.19.15.2", 9));
    assert_eq!(dp.xdp(&sent.build()).unwrap(), XDP_PASS);
    let key = flow_key(PROXY4, 41_600, SERVER4, PORT);
    let mut f = dp.flow(&key).unwrap().unwrap();
    f.proxy = PROXY_CUT_PENDING;
    dp.set_flow(&key, f).unwrap();
    let mut cfg = dp.config().unwrap();
    cfg.flags |= CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    let next = Pkt::tcp(PROXY4, 41_600, SERVER4, PORT).payload(frame);
    let (action, out) = dp.xdp_out(&next.build()).unwrap();
    assert_eq!((action, out), (XDP_PASS, next.build()));
    assert_eq!(dp.flow(&key).unwrap().unwrap().proxy, PROXY_CLIENT);
}
