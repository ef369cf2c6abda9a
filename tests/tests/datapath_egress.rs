//! The TC egress program: the server's first answer decides the flow's fate. 101 establishes
//! it, 4xx to a valid-looking request is a `server_rejected` bad handshake against the client,
//! 5xx is the server's own fault and never the client's. TC never drops.

use wsguard_common::{
    BadReason, Verdict,
    maps::{Counter, FLOW_ANSWERED, FLOW_ESTABLISHED, FLOW_HANDSHAKE},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, flow_key},
    packet::{Pkt, bad_request, ws_request},
};

const PORT: u16 = 80;
const SERVER: &str = "198.18.1.1";
const REJECTED: u32 = Counter::BadReason0 as u32 + BadReason::ServerRejected as u32;

fn load(threshold: u32) -> DataPlane {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    let mut cfg = dp.config().unwrap();
    cfg.threshold = threshold;
    dp.set_config(&cfg).unwrap();
    dp
}

/// Send `request` as the first payload of a flow, then `answer` back; return the flow state
/// and the counters the answer moved.
fn exchange(
    dp: &mut DataPlane,
    client: &str,
    sport: u16,
    request: &[u8],
    answer: &[u8],
) -> (u8, Delta) {
    let req = Pkt::tcp(client, sport, SERVER, PORT).payload(request);
    dp.xdp(&req.build()).unwrap();
    let (rc, delta) = dp.tc_counted(&req.reply().payload(answer).build()).unwrap();
    assert_eq!(rc, TC_ACT_OK, "TC never drops");
    let flow = dp
        .flow(&flow_key(client, sport, SERVER, PORT))
        .unwrap()
        .expect("flow recorded");
    (flow.state, delta)
}

#[test]
fn switching_protocols_establishes_the_flow() {
    let mut dp = load(1);
    for (client, server) in [("198.18.0.1", SERVER), ("fd00::1", "fd00:1::1")] {
        let req = Pkt::tcp(client, 40000, server, PORT).payload(&ws_request("/"));
        dp.xdp(&req.build()).unwrap();
        let answer = req
            .reply()
            .payload(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .build();
        assert_eq!(
            dp.tc_counted(&answer).unwrap(),
            (TC_ACT_OK, Delta::default()),
            "{client}"
        );
        let flow = dp
            .flow(&flow_key(client, 40000, server, PORT))
            .unwrap()
            .unwrap();
        assert_eq!(
            (flow.state, Verdict::from_u8(flow.verdict)),
            (FLOW_ESTABLISHED, Some(Verdict::Valid))
        );
    }
    assert!(dp.bursts().unwrap().is_empty());
}

#[test]
fn rejecting_a_valid_request_counts_against_the_client() {
    let mut dp = load(2);
    let forbidden = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
    let (state, delta) = exchange(&mut dp, "198.18.0.2", 40000, &ws_request("/"), forbidden);
    assert_eq!(state, FLOW_ANSWERED);
    assert_eq!(delta, Delta::of(&[Counter::HsBad]).and_at(REJECTED, 1));
    assert!(
        dp.bursts().unwrap().is_empty(),
        "one rejection is below the threshold of 2"
    );
    // The second rejection of the same client reaches the threshold: the same rate tracking.
    let (_, delta) = exchange(
        &mut dp,
        "198.18.0.2",
        40001,
        &ws_request("/"),
        b"HTTP/1.0 400 Bad Request\r\n\r\n",
    );
    assert_eq!(delta, Delta::of(&[Counter::HsBad]).and_at(REJECTED, 1));
    let bursts = dp.bursts().unwrap();
    assert_eq!(bursts.len(), 1, "{bursts:?}");
    assert_eq!(
        bursts[0].addr,
        wsguard_tests::dataplane::addr16("198.18.0.2")
    );
    assert_eq!(bursts[0].count, 2);
    assert_eq!(bursts[0].reasons[BadReason::ServerRejected as usize], 2);
    assert_eq!(bursts[0].port, PORT);
}

#[test]
fn rejecting_a_bad_request_is_not_counted_twice() {
    let mut dp = load(2);
    let (state, delta) = exchange(
        &mut dp,
        "198.18.0.3",
        40000,
        &bad_request("/"),
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    );
    assert_eq!(state, FLOW_ANSWERED);
    assert_eq!(
        delta,
        Delta::default(),
        "already counted as no_upgrade on ingress"
    );
    assert!(
        dp.bursts().unwrap().is_empty(),
        "one bad handshake, not two"
    );
}

#[test]
fn server_errors_are_never_held_against_clients() {
    let mut dp = load(1);
    for (i, status) in [
        "500 Internal Server Error",
        "502 Bad Gateway",
        "503 Service Unavailable",
    ]
    .iter()
    .enumerate()
    {
        let answer = format!("HTTP/1.1 {status}\r\n\r\n");
        let (state, delta) = exchange(
            &mut dp,
            "198.18.0.4",
            40000 + i as u16,
            &ws_request("/"),
            answer.as_bytes(),
        );
        assert_eq!(state, FLOW_ANSWERED);
        assert_eq!(delta, Delta::of(&[Counter::UpstreamErrors]), "{status}");
    }
    assert!(
        dp.bursts().unwrap().is_empty(),
        "threshold 1, yet no burst from 5xx"
    );
}

#[test]
fn only_the_first_answer_counts() {
    let mut dp = load(1);
    let (_, delta) = exchange(
        &mut dp,
        "198.18.0.5",
        40000,
        &ws_request("/"),
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    );
    assert_eq!(delta, Delta::default());
    // A WebSocket frame that happens to read like a status line later in the flow.
    let later = Pkt::tcp(SERVER, PORT, "198.18.0.5", 40000)
        .payload(b"HTTP/1.1 403 Forbidden\r\n")
        .build();
    assert_eq!(
        dp.tc_counted(&later).unwrap(),
        (TC_ACT_OK, Delta::default())
    );
    let flow = dp
        .flow(&flow_key("198.18.0.5", 40000, SERVER, PORT))
        .unwrap()
        .unwrap();
    assert_eq!(flow.state, FLOW_ESTABLISHED);
}

#[test]
fn tls_flows_are_established_by_server_payload() {
    let mut dp = load(1);
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    let server_hello = [
        0x16, 0x03, 0x03, 0x00, 0x0a, 0x02, 0, 0, 6, 3, 3, 1, 2, 3, 4,
    ];
    let (state, delta) = exchange(&mut dp, "198.18.0.6", 40000, &hello, &server_hello);
    assert_eq!((state, delta), (FLOW_ESTABLISHED, Delta::default()));
}

#[test]
fn answers_of_unknown_or_unwatched_flows_are_ignored() {
    let mut dp = load(1);
    // No request was seen for this flow (e.g. the agent started mid-connection).
    let orphan = Pkt::tcp(SERVER, PORT, "198.18.0.7", 40000)
        .payload(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        .build();
    assert_eq!(
        dp.tc_counted(&orphan).unwrap(),
        (TC_ACT_OK, Delta::default())
    );
    // An unwatched source port: not even looked up.
    let other = Pkt::tcp(SERVER, 8443, "198.18.0.7", 40000)
        .payload(b"HTTP/1.1 500 Oops\r\n\r\n")
        .build();
    assert_eq!(
        dp.tc_counted(&other).unwrap(),
        (TC_ACT_OK, Delta::default())
    );
    // An answer to an incomplete request is no verdict on the client.
    let req = Pkt::tcp("198.18.0.8", 40000, SERVER, PORT).payload(b"GET / HTTP/1.1\r\nHost: x\r\n");
    dp.xdp(&req.build()).unwrap();
    let answer = req
        .reply()
        .payload(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        .build();
    assert_eq!(
        dp.tc_counted(&answer).unwrap(),
        (TC_ACT_OK, Delta::default())
    );
    let flow = dp
        .flow(&flow_key("198.18.0.8", 40000, SERVER, PORT))
        .unwrap()
        .unwrap();
    assert_ne!(flow.state, FLOW_HANDSHAKE);
    assert!(dp.bursts().unwrap().is_empty());
}
