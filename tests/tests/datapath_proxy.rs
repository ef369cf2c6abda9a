//! PROXY-protocol flows through the real XDP program (BPF_PROG_TEST_RUN): the shared corpus
//! (`ebpf/wsguard-common/corpus/proxy/`) replayed as the first payload of fresh flows from a
//! trusted sender (IPv4 and IPv6), an untrusted one, and with nothing configured; every case's
//! verdict, flow state, counters and attribution (whose rate a bad request raises) must be what
//! the host parser and classifier say. Then the header alone in its segment, TC egress
//! attribution, and the trusted proxy never charged.

use std::path::Path;
use wsguard_common::{
    BadReason, Verdict,
    http::classify,
    maps::{
        Config, Counter, FLOW_ESTABLISHED, PROXY_AWAITING, PROXY_CLIENT, PROXY_LOCAL,
        PROXY_MALFORMED, PROXY_MISSING, PROXY_NONE, PROXY_UNCONFIGURED, PROXY_UNTRUSTED,
        SENDER_UNCONFIGURED, SENDER_UNTRUSTED, SENDER_V1, SENDER_V2,
    },
    proxy::{self, Header, ProxyResult, Version},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, XDP_PASS, addr16, flow_key},
    packet::{Pkt, bad_request, ws_request},
};

const PORT: u16 = 80;
const SERVER4: &str = "198.18.1.1";
const SERVER6: &str = "fd00:1::1";
/// Trusted senders of the configured data plane.
const TRUSTED4: &str = "198.18.5.0";
const TRUSTED6: &str = "fd00:5::";

fn server(src: &str) -> &'static str {
    if src.contains(':') { SERVER6 } else { SERVER4 }
}

struct Case {
    name: String,
    payload: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/wsguard-common/corpus/proxy");
    let expected = std::fs::read_to_string(dir.join("EXPECTED")).expect("EXPECTED");
    expected
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let name = l.split_whitespace().next().expect("name").to_owned();
            let payload = std::fs::read(dir.join(&name)).expect("corpus file");
            Case { name, payload }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    Trusted,
    /// A list is configured; the sender is outside it.
    Untrusted,
    /// No list configured.
    Unconfigured,
}

/// What the kernel must do with a first payload, by the host's parser and classifier: the
/// model of `ebpf/wsguard-ebpf/src/flow.rs`.
#[derive(Debug)]
struct Want {
    /// `None`: no flow is recorded.
    flow: Option<(u8, Verdict, Option<BadReason>)>,
    real: Option<([u8; 16], u16)>,
    delta: Delta,
    /// Whose rate a bad request raises: the real client or the sender.
    charged_real: bool,
    sender_noted: Option<Version>,
}

fn verdict_counter(v: Verdict) -> Counter {
    match v {
        Verdict::Valid => Counter::HsValid,
        Verdict::Bad => Counter::HsBad,
        Verdict::Incomplete => Counter::HsIncomplete,
        Verdict::Tls => Counter::HsTls,
        Verdict::Ignored => Counter::HsIgnored,
    }
}

/// The verdict of the bytes after a header of `hlen`, counted; `None` if the header fills them.
fn judged(
    payload: &[u8],
    hlen: usize,
    state: u8,
    delta: &mut Delta,
) -> (u8, Verdict, Option<BadReason>) {
    if hlen >= payload.len() {
        return (state | PROXY_AWAITING, Verdict::Incomplete, None);
    }
    let c = classify(&payload[hlen..], &Config::new());
    *delta = std::mem::take(delta).and_at(verdict_counter(c.verdict) as u32, 1);
    if let Some(r) = c.reason {
        *delta = std::mem::take(delta).and_at(Counter::BadReason0 as u32 + r as u32, 1);
    }
    (state, c.verdict, c.reason)
}

fn trusted_addr(a: &[u8; 16]) -> bool {
    let t4 = addr16(TRUSTED4);
    let t6 = addr16(TRUSTED6);
    a[..15] == t4[..15] || a[..8] == t6[..8]
}

fn model(payload: &[u8], trust: Trust) -> Want {
    let mut delta = Delta::of(&[Counter::Passed]);
    let first = payload.first().copied().unwrap_or(0);
    let starts = first.is_ascii_uppercase() || first == 0x16 || first == 0x0d;
    let mut want = Want {
        flow: None,
        real: None,
        delta: Delta::default(),
        charged_real: false,
        sender_noted: None,
    };
    if !starts {
        want.delta = delta;
        return want;
    }
    let h = proxy::parse(payload);
    if trust == Trust::Trusted {
        let counter = |v: Version, r| Counter::proxy(v, r) as u32;
        want.flow = Some(match h {
            Header::Absent => {
                delta = delta.and_at(Counter::ProxyMissing as u32, 1);
                (PROXY_MISSING, Verdict::Ignored, None)
            }
            Header::Malformed { version } => {
                delta = delta.and_at(counter(version, ProxyResult::Malformed), 1);
                (PROXY_MALFORMED, Verdict::Ignored, None)
            }
            Header::Local { version, .. } => {
                delta = delta.and_at(counter(version, ProxyResult::Local), 1);
                (PROXY_LOCAL, Verdict::Ignored, None)
            }
            Header::Client(c) if trusted_addr(&c.addr) => {
                delta = delta.and_at(counter(c.version, ProxyResult::Local), 1);
                (PROXY_LOCAL, Verdict::Ignored, None)
            }
            Header::Client(c) => {
                delta = delta.and_at(counter(c.version, ProxyResult::Client), 1);
                want.real = Some((c.addr, c.port));
                want.charged_real = true;
                judged(payload, usize::from(c.len), PROXY_CLIENT, &mut delta)
            }
        });
        want.delta = delta;
        return want;
    }
    if let (Some(v), Some(hlen)) = (h.version(), h.header_len())
        && (first == b'P' || first == 0x0d)
    {
        delta = delta.and_at(Counter::proxy(v, ProxyResult::Untrusted) as u32, 1);
        want.sender_noted = Some(v);
        want.flow = Some(if trust == Trust::Unconfigured {
            (PROXY_UNCONFIGURED, Verdict::Ignored, None)
        } else {
            judged(payload, usize::from(hlen), PROXY_UNTRUSTED, &mut delta)
        });
        want.delta = delta;
        return want;
    }
    if first == 0x0d {
        want.delta = delta;
        return want;
    }
    want.flow = Some(judged(payload, 0, PROXY_NONE, &mut delta));
    want.delta = delta;
    want
}

fn rate_count(dp: &mut DataPlane, addr: &[u8; 16]) -> u32 {
    dp.rate(&ip_text(addr)).unwrap().map_or(0, |r| r.count)
}

fn ip_text(a: &[u8; 16]) -> String {
    let v6 = std::net::Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

fn configured() -> DataPlane {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    dp.trust_proxy(TRUSTED4, 24).unwrap();
    dp.trust_proxy(TRUSTED6, 64).unwrap();
    dp
}

/// Replay one payload from `sender` and check everything `model` says.
fn replay(dp: &mut DataPlane, c: &Case, sender: &str, sport: u16, trust: Trust) -> Want {
    let want = model(&c.payload, trust);
    let what = format!("{} from {sender} ({trust:?})", c.name);
    let before = want.real.map(|(a, _)| rate_count(dp, &a));
    let sender16 = addr16(sender);
    let sender_before = rate_count(dp, &sender16);
    let frame = Pkt::tcp(sender, sport, server(sender), PORT)
        .payload(&c.payload)
        .build();
    let (action, delta) = dp.xdp_counted(&frame).unwrap();
    assert_eq!(action, XDP_PASS, "{what}: passes");
    assert_eq!(delta, want.delta, "{what}: counters");
    let flow = dp
        .flow(&flow_key(sender, sport, server(sender), PORT))
        .unwrap();
    match (want.flow, flow) {
        (None, None) => {}
        (Some((state, verdict, reason)), Some(f)) => {
            assert_eq!(f.proxy, state, "{what}: proxy state");
            assert_eq!(
                Verdict::from_u8(f.verdict),
                Some(verdict),
                "{what}: verdict"
            );
            if let Some(r) = reason {
                assert_eq!(BadReason::from_u8(f.reason), Some(r), "{what}: reason");
            }
            let real = f.real_client().map(|a| (a, f.real_port));
            assert_eq!(real, want.real, "{what}: real client");
        }
        (w, f) => panic!("{what}: flow {f:?}, want {w:?}"),
    }
    let bad = matches!(want.flow, Some((_, Verdict::Bad, _)));
    if let (Some(before), Some((a, _))) = (before, want.real) {
        assert_eq!(
            rate_count(dp, &a),
            before + u32::from(bad),
            "{what}: the real client's rate"
        );
    }
    let sender_charged = bad && !want.charged_real;
    assert_eq!(
        rate_count(dp, &sender16),
        sender_before + u32::from(sender_charged),
        "{what}: the sender's rate"
    );
    if let Some(v) = want.sender_noted {
        let s = dp.proxy_sender(sender).unwrap().expect("sender noted");
        let bit = if v == Version::V1 {
            SENDER_V1
        } else {
            SENDER_V2
        };
        let how = if trust == Trust::Unconfigured {
            SENDER_UNCONFIGURED
        } else {
            SENDER_UNTRUSTED
        };
        assert_eq!(s.flags & (bit | how), bit | how, "{what}: sender flags");
    }
    want
}

#[test]
fn kernel_and_host_agree_on_the_corpus_for_every_sender() {
    let cases = corpus();
    assert!(cases.len() >= 50, "corpus has only {} cases", cases.len());
    let mut dp = configured();
    let mut none = DataPlane::load(&[PORT]).expect("load data plane");
    let (mut clients, mut untrusted_judged, mut unjudged) = (0, 0, 0);
    for (i, c) in cases.iter().enumerate() {
        let sport = 20_000 + i as u16;
        let host = 1 + i % 200;
        for sender in [format!("198.18.5.{host}"), format!("fd00:5::{host:x}")] {
            let w = replay(&mut dp, c, &sender, sport, Trust::Trusted);
            clients += usize::from(w.real.is_some());
        }
        for sender in [format!("198.18.6.{host}"), format!("fd00:6::{host:x}")] {
            let w = replay(&mut dp, c, &sender, sport, Trust::Untrusted);
            untrusted_judged += usize::from(matches!(w.flow, Some((PROXY_UNTRUSTED, _, _))));
            let w = replay(&mut none, c, &sender, sport, Trust::Unconfigured);
            unjudged += usize::from(matches!(w.flow, Some((PROXY_UNCONFIGURED, _, _))));
        }
    }
    println!(
        "PROXY corpus: {} cases; {clients} real clients named by trusted senders, \
         {untrusted_judged} untrusted headers judged against their sender, {unjudged} unjudged \
         with nothing configured",
        cases.len()
    );
    assert!(clients >= 30 && untrusted_judged >= 40 && unjudged >= 40);
}

/// The request comes in the segment after a header that came alone (HAProxy's send-proxy-v2):
/// judged then, against the real client, whatever the families of the proxy and the client; a
/// retransmitted header (same sequence number) is not taken for the request.
#[test]
fn a_header_alone_then_the_request() {
    let mut dp = configured();
    let cases = corpus();
    let header = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .payload
            .clone()
    };
    for (i, (name, proxy_addr, client)) in [
        ("v2_alone", "198.18.5.10", "198.19.7.9"),
        ("v2_alone", "fd00:5::10", "198.19.7.9"),
        ("v1_alone", "198.18.5.11", "198.19.7.7"),
        ("v1_alone", "fd00:5::11", "198.19.7.7"),
    ]
    .into_iter()
    .enumerate()
    {
        let hdr = header(name);
        let sport = 30_000 + i as u16;
        let seg = |seq: u32, p: &[u8]| {
            Pkt::tcp(proxy_addr, sport, server(proxy_addr), PORT)
                .seq(seq)
                .payload(p)
                .build()
        };
        let key = flow_key(proxy_addr, sport, server(proxy_addr), PORT);
        let v = if name.starts_with("v2") {
            Version::V2
        } else {
            Version::V1
        };
        let (_, d) = dp.xdp_counted(&seg(1000, &hdr)).unwrap();
        assert_eq!(
            d,
            Delta::of(&[Counter::Passed, Counter::proxy(v, ProxyResult::Client)]),
            "{name} via {proxy_addr}: the header"
        );
        let f = dp.flow(&key).unwrap().expect("flow");
        assert_eq!(
            (f.proxy, f.next_seq),
            (PROXY_CLIENT | PROXY_AWAITING, 1000 + hdr.len() as u32)
        );
        // The header again (a retransmission): still waiting, nothing judged.
        let (_, d) = dp.xdp_counted(&seg(1000, &hdr)).unwrap();
        assert_eq!(
            d,
            Delta::of(&[Counter::Passed]),
            "{name}: retransmitted header"
        );
        let before = dp.rate(client).unwrap().map_or(0, |r| r.count);
        let (_, d) = dp
            .xdp_counted(&seg(1000 + hdr.len() as u32, &bad_request("/")))
            .unwrap();
        assert_eq!(
            d,
            Delta::of(&[Counter::Passed, Counter::HsBad])
                .and_at(Counter::BadReason0 as u32 + BadReason::NoUpgrade as u32, 1),
            "{name} via {proxy_addr}: the request"
        );
        let f = dp.flow(&key).unwrap().expect("flow");
        assert_eq!(
            (f.proxy, Verdict::from_u8(f.verdict)),
            (PROXY_CLIENT, Some(Verdict::Bad))
        );
        assert_eq!(
            dp.rate(client).unwrap().map_or(0, |r| r.count),
            before + 1,
            "charged to the real client"
        );
        assert!(dp.rate(proxy_addr).unwrap().is_none(), "never to the proxy");
        // Keep-alive requests after it are not judged again.
        let (_, d) = dp.xdp_counted(&seg(5000, &bad_request("/"))).unwrap();
        assert_eq!(d, Delta::of(&[Counter::Passed]));
    }
}

/// The server's answer to a proxied request is the real client's: a 4xx to a request that
/// looked valid is charged to it, a 101 establishes the flow, a 5xx is nobody's fault; a
/// trusted sender's own connection (LOCAL) is never charged, 4xx or not.
#[test]
fn egress_verdicts_belong_to_the_real_client() {
    let mut dp = configured();
    let v1 = |client: &str, port: u16| {
        format!("PROXY TCP4 {client} 198.18.1.1 {port} 80\r\n").into_bytes()
    };
    let cases = [
        ("198.18.5.20", "198.19.8.1", 400u16, true),
        ("198.18.5.21", "198.19.8.2", 101, false),
        ("198.18.5.22", "198.19.8.3", 503, false),
    ];
    for (i, (proxy_addr, client, status, charged)) in cases.into_iter().enumerate() {
        let sport = 31_000 + i as u16;
        let mut payload = v1(client, 4000 + i as u16);
        payload.extend_from_slice(&ws_request("/"));
        let req = Pkt::tcp(proxy_addr, sport, SERVER4, PORT).payload(&payload);
        let (_, d) = dp.xdp_counted(&req.build()).unwrap();
        assert_eq!(
            d,
            Delta::of(&[Counter::Passed, Counter::ProxyV1Client, Counter::HsValid])
        );
        let answer = req
            .reply()
            .payload(format!("HTTP/1.1 {status} X\r\n\r\n").as_bytes())
            .build();
        let (rc, d) = dp.tc_counted(&answer).unwrap();
        assert_eq!(rc, TC_ACT_OK);
        let rate = dp.rate(client).unwrap();
        if charged {
            assert_eq!(
                d,
                Delta::of(&[Counter::HsBad]).and_at(
                    Counter::BadReason0 as u32 + BadReason::ServerRejected as u32,
                    1
                )
            );
            let r = rate.expect("the real client was charged");
            assert_eq!(r.reasons[BadReason::ServerRejected as usize], 1);
        } else {
            assert!(rate.is_none(), "{status}: nobody is charged");
            let want = if status >= 500 {
                Delta::of(&[Counter::UpstreamErrors])
            } else {
                Delta::default()
            };
            assert_eq!(d, want, "{status}");
        }
        assert!(dp.rate(proxy_addr).unwrap().is_none(), "the proxy: never");
        let f = dp
            .flow(&flow_key(proxy_addr, sport, SERVER4, PORT))
            .unwrap()
            .unwrap();
        assert_eq!(f.state == FLOW_ESTABLISHED, status == 101);
    }
    // LOCAL (a health check) with a request that the server rejects: nobody is charged.
    let mut local = proxy::V2_SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    local.extend_from_slice(&bad_request("/healthz"));
    let req = Pkt::tcp("198.18.5.30", 31_100, SERVER4, PORT).payload(&local);
    let (_, d) = dp.xdp_counted(&req.build()).unwrap();
    assert_eq!(d, Delta::of(&[Counter::Passed, Counter::ProxyV2Local]));
    let answer = req.reply().payload(b"HTTP/1.1 400 Bad\r\n\r\n").build();
    assert_eq!(
        dp.tc_counted(&answer).unwrap(),
        (TC_ACT_OK, Delta::default())
    );
    assert!(dp.rate("198.18.5.30").unwrap().is_none());
    assert_eq!(dp.rates_len().unwrap(), 1, "only the 4xx client has a rate");
}

/// A burst of bad requests through a trusted proxy raises the real clients' rates and emits
/// their bursts; the proxy never gets one.
#[test]
fn bursts_are_keyed_by_the_real_client() {
    let mut dp = configured();
    let mut cfg = dp.config().unwrap();
    cfg.threshold = 5;
    dp.set_config(&cfg).unwrap();
    for i in 0..12u16 {
        // Two real clients behind one proxy, IPv4 and IPv6.
        let client = if i % 2 == 0 {
            "198.19.9.1"
        } else {
            "fd00:9::1"
        };
        let fam = if i % 2 == 0 { "TCP4" } else { "TCP6" };
        let dst = if i % 2 == 0 {
            "198.18.1.1"
        } else {
            "fd00:1::1"
        };
        let mut p = format!("PROXY {fam} {client} {dst} {} 80\r\n", 5000 + i).into_bytes();
        p.extend_from_slice(&bad_request("/"));
        let f = Pkt::tcp("198.18.5.40", 32_000 + i, SERVER4, PORT)
            .payload(&p)
            .build();
        assert_eq!(dp.xdp(&f).unwrap(), XDP_PASS);
    }
    let bursts = dp.bursts().unwrap();
    let mut addrs: Vec<[u8; 16]> = bursts.iter().map(|b| b.addr).collect();
    addrs.sort();
    let mut want = vec![addr16("198.19.9.1"), addr16("fd00:9::1")];
    want.sort();
    assert_eq!(addrs, want, "one burst per real client");
    assert!(dp.rate("198.18.5.40").unwrap().is_none());
}
