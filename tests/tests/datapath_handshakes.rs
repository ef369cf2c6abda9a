//! The classifier corpus replayed through the kernel: each case is the first payload of a fresh
//! flow on a watched port, and the verdict the XDP program stores in FLOWS must equal both the
//! corpus's EXPECTED line and the host `classify()` on the same bytes: one classifier, two
//! places, same answers.

use std::path::Path;
use wsguard_common::{
    BadReason, Verdict,
    http::classify,
    maps::{Config, Counter, MAX_INSPECT, PROXY_UNCONFIGURED},
    proxy::{self, Header, ProxyResult},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, XDP_PASS, flow_key},
    packet::Pkt,
};

/// BPF_PROG_TEST_RUN gives XDP one page minus head- and tailroom; stay well inside it.
const MAX_FRAME: usize = 3000;

struct Case {
    name: String,
    verdict: Verdict,
    reason: Option<BadReason>,
    payload: Vec<u8>,
}

fn corpus() -> Vec<Case> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/wsguard-common/corpus/handshakes");
    let expected = std::fs::read_to_string(dir.join("EXPECTED")).expect("EXPECTED");
    expected
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let verdict = (0..5)
                .filter_map(Verdict::from_u8)
                .find(|v| v.as_str() == w[1])
                .unwrap_or_else(|| panic!("EXPECTED: unknown verdict in {l:?}"));
            let reason = w.get(2).map(|r| {
                BadReason::ALL
                    .into_iter()
                    .find(|b| b.as_str() == *r)
                    .unwrap_or_else(|| panic!("reason in {l:?}"))
            });
            let payload =
                std::fs::read(dir.join(w[0])).unwrap_or_else(|e| panic!("case {}: {e}", w[0]));
            Case {
                name: w[0].to_owned(),
                verdict,
                reason,
                payload,
            }
        })
        .collect()
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

/// The kernel only judges payloads whose first byte may start a request (see inspect.rs); the
/// rest pass uninspected, which must agree with the classifier calling them `ignored`.
fn kernel_inspects(payload: &[u8]) -> bool {
    !payload.is_empty() && (payload[0].is_ascii_uppercase() || payload[0] == 0x16)
}

/// A payload that begins with a valid PROXY header, while no trusted sender is configured (as
/// here), is never judged (issue 12): the flow is recorded unjudged and counted `untrusted`.
/// The counter it moves, if it does.
fn unconfigured_proxy(payload: &[u8]) -> Option<Counter> {
    match proxy::parse(payload) {
        Header::Client(c) => Some(Counter::proxy(c.version, ProxyResult::Untrusted)),
        Header::Local { version, .. } => Some(Counter::proxy(version, ProxyResult::Untrusted)),
        _ => None,
    }
}

/// Check a flow `unconfigured_proxy` says is not judged.
fn assert_unjudged(
    flow: Option<wsguard_common::maps::FlowValue>,
    delta: &Delta,
    c: Counter,
    what: &str,
) {
    let flow = flow.unwrap_or_else(|| panic!("{what}: no flow recorded"));
    assert_eq!(
        (Verdict::from_u8(flow.verdict), flow.proxy),
        (Some(Verdict::Ignored), PROXY_UNCONFIGURED),
        "{what}: a PROXY header is not judged"
    );
    assert_eq!(*delta, Delta::of(&[Counter::Passed, c]), "{what}: counters");
}

#[test]
fn kernel_and_host_classify_the_corpus_alike() {
    let cases = corpus();
    assert!(cases.len() >= 80, "corpus has only {} cases", cases.len());
    let mut dp = DataPlane::load(&[8080]).expect("load data plane");
    let host_cfg = Config::new();
    let (mut replayed, mut skipped, mut uninspected) = (0, Vec::new(), 0);
    for (i, c) in cases.iter().enumerate() {
        let host = classify(&c.payload, &host_cfg);
        assert_eq!(
            (host.verdict, host.reason),
            (c.verdict, c.reason),
            "{}: host vs EXPECTED",
            c.name
        );

        let client = format!("198.18.{}.{}", 2 + i / 250, 1 + i % 250);
        let sport = 30000 + i as u16;
        let frame = Pkt::tcp(&client, sport, "198.18.1.1", 8080)
            .payload(&c.payload)
            .build();
        if frame.len() > MAX_FRAME {
            skipped.push(c.name.clone());
            continue;
        }
        let (action, delta) = dp.xdp_counted(&frame).unwrap();
        assert_eq!(action, XDP_PASS, "{}: inspection never drops", c.name);
        let flow = dp
            .flow(&flow_key(&client, sport, "198.18.1.1", 8080))
            .unwrap();
        if let Some(counter) = unconfigured_proxy(&c.payload) {
            assert_unjudged(flow, &delta, counter, &c.name);
            replayed += 1;
            continue;
        }
        if !kernel_inspects(&c.payload) {
            assert_eq!(
                c.verdict,
                Verdict::Ignored,
                "{}: skipped by the kernel but judged by the host",
                c.name
            );
            assert!(
                flow.is_none(),
                "{}: uninspected payloads record no flow",
                c.name
            );
            assert_eq!(delta, Delta::of(&[Counter::Passed]), "{}", c.name);
            uninspected += 1;
            continue;
        }
        let flow = flow.unwrap_or_else(|| panic!("{}: no flow recorded", c.name));
        let kernel = (
            Verdict::from_u8(flow.verdict),
            c.reason.and_then(|_| BadReason::from_u8(flow.reason)),
        );
        assert_eq!(
            kernel,
            (Some(c.verdict), c.reason),
            "{}: kernel vs EXPECTED",
            c.name
        );
        let mut want = Delta::of(&[Counter::Passed, verdict_counter(c.verdict)]);
        if let Some(r) = c.reason {
            want = want.and_at(Counter::BadReason0 as u32 + r as u32, 1);
        }
        assert_eq!(delta, want, "{}: counters", c.name);
        replayed += 1;
    }
    println!(
        "classifier corpus: {replayed} judged in the kernel, {uninspected} waved through uninspected, \
         {} skipped (frame > {MAX_FRAME} bytes): {skipped:?}",
        skipped.len()
    );
    assert!(skipped.is_empty(), "every case fits one test frame");
    assert!(
        replayed >= 60,
        "only {replayed} cases reached the classifier"
    );
}

/// Past MAX_INSPECT bytes the kernel stops reading: a header block that ends later is
/// incomplete there and on the host alike.
#[test]
fn requests_longer_than_the_inspected_bytes_are_incomplete() {
    let mut dp = DataPlane::load(&[8080]).expect("load data plane");
    let filler = "a".repeat(MAX_INSPECT);
    let req = format!(
        "GET / HTTP/1.1\r\nX-Filler: {filler}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    assert_eq!(
        classify(req.as_bytes(), &Config::new()).verdict,
        Verdict::Incomplete
    );
    let frame = Pkt::tcp("198.18.0.5", 40000, "198.18.1.1", 8080)
        .payload(req.as_bytes())
        .build();
    assert_eq!(dp.xdp(&frame).unwrap(), XDP_PASS);
    let flow = dp
        .flow(&flow_key("198.18.0.5", 40000, "198.18.1.1", 8080))
        .unwrap()
        .expect("flow");
    assert_eq!(Verdict::from_u8(flow.verdict), Some(Verdict::Incomplete));
}

/// A request split after its first byte is judged once, as incomplete: the rest of it must not
/// be taken for a new request (`ET / ...` would be a bad method against a healthy client).
#[test]
fn a_request_split_after_one_byte_is_judged_once() {
    let mut dp = DataPlane::load(&[8080]).expect("load data plane");
    let req = wsguard_tests::packet::ws_request("/");
    let pkt = |p: &[u8]| {
        Pkt::tcp("198.18.0.6", 40000, "198.18.1.1", 8080)
            .payload(p)
            .build()
    };
    let (_, first) = dp.xdp_counted(&pkt(&req[..1])).unwrap();
    assert_eq!(first, Delta::of(&[Counter::Passed, Counter::HsIncomplete]));
    let (_, rest) = dp.xdp_counted(&pkt(&req[1..])).unwrap();
    assert_eq!(
        rest,
        Delta::of(&[Counter::Passed]),
        "the rest is not a first request"
    );
}

/// Every corpus request split into two segments at several points: the kernel judges the first
/// segment as the host does (incomplete, mostly; ignored or tls where the bytes already say
/// so), and the second segment is never taken for a new request.
#[test]
fn split_requests_are_judged_on_their_first_segment_alike() {
    let cases = corpus();
    let mut dp = DataPlane::load(&[8080]).expect("load data plane");
    let host_cfg = Config::new();
    let mut judged = 0;
    for (i, c) in cases.iter().enumerate() {
        let n = c.payload.len();
        if n < 2 || !kernel_inspects(&c.payload) {
            continue;
        }
        let mut cuts = vec![1, 2, n / 2, n.saturating_sub(2), n - 1];
        // Just before the blank line that ends the header block, where it has one.
        if let Some(end) = c.payload.windows(4).position(|w| w == b"\r\n\r\n") {
            cuts.push(end + 2);
        }
        cuts.retain(|k| (1..n).contains(k));
        cuts.sort_unstable();
        cuts.dedup();
        let client = format!("198.18.{}.{}", 20 + i / 250, 1 + i % 250);
        for (j, &cut) in cuts.iter().enumerate() {
            let (head, rest) = c.payload.split_at(cut);
            let host = classify(head, &host_cfg);
            let sport = 20000 + j as u16;
            let pkt = |p: &[u8]| {
                Pkt::tcp(&client, sport, "198.18.1.1", 8080)
                    .payload(p)
                    .build()
            };
            let (action, delta) = dp.xdp_counted(&pkt(head)).unwrap();
            assert_eq!(action, XDP_PASS);
            let flow = dp
                .flow(&flow_key(&client, sport, "198.18.1.1", 8080))
                .unwrap();
            if let Some(counter) = unconfigured_proxy(head) {
                let what = format!("{} cut at {cut}", c.name);
                assert_unjudged(flow, &delta, counter, &what);
                let (_, delta) = dp.xdp_counted(&pkt(rest)).unwrap();
                assert_eq!(delta, Delta::of(&[Counter::Passed]), "{what}: the rest");
                continue;
            }
            let flow = flow.unwrap_or_else(|| panic!("{} cut at {cut}: no flow", c.name));
            let kernel = (
                Verdict::from_u8(flow.verdict),
                host.reason.and_then(|_| BadReason::from_u8(flow.reason)),
            );
            assert_eq!(
                kernel,
                (Some(host.verdict), host.reason),
                "{} cut at {cut}: kernel vs host",
                c.name
            );
            let mut want = Delta::of(&[Counter::Passed, verdict_counter(host.verdict)]);
            if let Some(r) = host.reason {
                want = want.and_at(Counter::BadReason0 as u32 + r as u32, 1);
            }
            assert_eq!(delta, want, "{} cut at {cut}: counters", c.name);
            let (_, delta) = dp.xdp_counted(&pkt(rest)).unwrap();
            assert_eq!(
                delta,
                Delta::of(&[Counter::Passed]),
                "{} cut at {cut}: the rest is no new request",
                c.name
            );
            judged += 1;
        }
    }
    assert!(judged >= 300, "only {judged} split requests judged");
}
