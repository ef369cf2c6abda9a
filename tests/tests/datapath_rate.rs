//! Kernel-side rate tracking of bad handshakes, and the runtime config the agent writes: ports,
//! path scope, threshold, window and mode all take effect without reloading the programs.

use std::time::Duration;
use wsguard_common::{
    BadReason, Verdict,
    maps::{CFG_PATH_SCOPE, Config, Counter},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, XDP_PASS, addr16, flow_key},
    packet::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, bad_request, ws_request},
};

const PORT: u16 = 80;
const SERVER: &str = "198.18.1.1";

fn load(threshold: u32, window: Duration) -> DataPlane {
    let mut dp = DataPlane::load(&[PORT]).expect("load data plane");
    let mut cfg = dp.config().unwrap();
    cfg.threshold = threshold;
    cfg.window_ns = window.as_nanos() as u64;
    dp.set_config(&cfg).unwrap();
    dp
}

/// A bad handshake as the first request of a new flow (new client port each time).
fn send(dp: &mut DataPlane, client: &str, sport: u16, request: &[u8]) {
    let server = if client.contains(':') {
        "fd00:1::1"
    } else {
        SERVER
    };
    let f = Pkt::tcp(client, sport, server, PORT)
        .payload(request)
        .build();
    assert_eq!(dp.xdp(&f).unwrap(), XDP_PASS, "inspection never drops");
}

fn post(path: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

#[test]
fn one_burst_event_per_source_per_window() {
    const N: u32 = 5;
    let mut dp = load(N, Duration::from_secs(60));
    for client in ["198.18.3.1", "fd00::3:1"] {
        // N-1 bad handshakes, of two reasons: no event yet.
        for i in 0..N - 1 {
            let req = if i % 2 == 0 {
                bad_request("/")
            } else {
                post("/")
            };
            send(&mut dp, client, 40000 + i as u16, &req);
        }
        assert!(
            dp.bursts().unwrap().is_empty(),
            "{client}: N-1 raise nothing"
        );
        send(&mut dp, client, 40100, &bad_request("/"));
        let bursts = dp.bursts().unwrap();
        assert_eq!(bursts.len(), 1, "{client}: N raise exactly one: {bursts:?}");
        let b = bursts[0];
        assert_eq!(b.addr, addr16(client));
        assert_eq!(b.count, N);
        assert_eq!(b.port, PORT);
        let mut reasons = [0; wsguard_common::http::BAD_REASONS];
        reasons[BadReason::NoUpgrade as usize] = 3;
        reasons[BadReason::BadMethod as usize] = 2;
        assert_eq!(b.reasons, reasons, "{client}: reason histogram");
        // N+5: the same window, no second event.
        for i in 0..5 {
            send(&mut dp, client, 40200 + i, &bad_request("/"));
        }
        assert!(
            dp.bursts().unwrap().is_empty(),
            "{client}: still one event this window"
        );
    }
}

#[test]
fn a_new_window_raises_a_new_event() {
    let window = Duration::from_millis(200);
    let mut dp = load(3, window);
    let client = "198.18.3.2";
    for i in 0..3 {
        send(&mut dp, client, 40000 + i, &bad_request("/"));
    }
    let first = dp.bursts().unwrap();
    assert_eq!(first.len(), 1);
    std::thread::sleep(window + Duration::from_millis(50));
    for i in 0..2 {
        send(&mut dp, client, 41000 + i, &bad_request("/"));
    }
    assert!(
        dp.bursts().unwrap().is_empty(),
        "the count restarted with the window"
    );
    send(&mut dp, client, 41002, &bad_request("/"));
    let second = dp.bursts().unwrap();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].count, 3);
    assert!(second[0].window_start_ns >= first[0].window_start_ns + window.as_nanos() as u64);
}

#[test]
fn sources_are_counted_apart() {
    let mut dp = load(3, Duration::from_secs(60));
    for i in 0..2 {
        send(&mut dp, "198.18.3.3", 40000 + i, &bad_request("/"));
        send(&mut dp, "198.18.3.4", 40000 + i, &bad_request("/"));
        send(&mut dp, "fd00::3:3", 40000 + i, &bad_request("/"));
    }
    assert!(dp.bursts().unwrap().is_empty(), "2 each, not 6 together");
}

#[test]
fn only_bad_handshakes_count() {
    let mut dp = load(1, Duration::from_secs(60));
    let client = "198.18.3.5";
    let tls = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    let not_judged: [&[u8]; 5] = [
        &ws_request("/"),
        b"GET / HTTP/1.1\r\nHost",
        &tls,
        b"SSH-2.0-OpenSSH\r\n",
        b"G",
    ];
    for (i, req) in not_judged.iter().enumerate() {
        send(&mut dp, client, 40000 + i as u16, req);
    }
    assert!(
        dp.bursts().unwrap().is_empty(),
        "valid, incomplete, tls and ignored never count"
    );
    // The same 4-tuple again (keep-alive, retransmission): judged once.
    let (_, d) = dp
        .counted(|dp| {
            send(dp, client, 40000, &bad_request("/"));
            Ok(())
        })
        .unwrap();
    assert_eq!(d, Delta::of(&[Counter::Passed]));
    assert!(dp.bursts().unwrap().is_empty());
}

#[test]
fn fin_and_rst_end_the_flow() {
    let mut dp = load(100, Duration::from_secs(60));
    for (i, flag) in [TCP_FIN, TCP_RST].into_iter().enumerate() {
        let sport = 40000 + i as u16;
        send(&mut dp, "198.18.3.6", sport, &ws_request("/"));
        let key = flow_key("198.18.3.6", sport, SERVER, PORT);
        assert!(dp.flow(&key).unwrap().is_some());
        let end = Pkt::tcp("198.18.3.6", sport, SERVER, PORT)
            .flags(flag | TCP_ACK)
            .build();
        assert_eq!(dp.xdp(&end).unwrap(), XDP_PASS);
        assert!(
            dp.flow(&key).unwrap().is_none(),
            "flag {flag:#x} removes the flow"
        );
    }
}

#[test]
fn watched_ports_change_at_run_time() {
    let mut dp = load(1, Duration::from_secs(60));
    let client = "198.18.3.7";
    let f = |dport: u16, sport: u16| {
        Pkt::tcp(client, sport, SERVER, dport)
            .payload(&bad_request("/"))
            .build()
    };
    let judged =
        Delta::of(&[Counter::Passed, Counter::HsBad]).and_at(Counter::BadReason0 as u32, 1);
    let unjudged = Delta::of(&[Counter::Passed]);

    assert_eq!(
        dp.xdp_counted(&f(8443, 40000)).unwrap().1,
        unjudged,
        "8443 not watched yet"
    );
    dp.watch(8443).unwrap();
    assert_eq!(
        dp.xdp_counted(&f(8443, 40001)).unwrap().1,
        judged,
        "8443 watched"
    );
    assert!(
        dp.flow(&flow_key(client, 40001, SERVER, 8443))
            .unwrap()
            .is_some()
    );
    dp.unwatch(PORT).unwrap();
    assert_eq!(
        dp.xdp_counted(&f(PORT, 40002)).unwrap().1,
        unjudged,
        "80 no longer watched"
    );
    assert!(
        dp.flow(&flow_key(client, 40002, SERVER, PORT))
            .unwrap()
            .is_none()
    );
    // Many ports at once.
    for p in 9000..9100 {
        dp.watch(p).unwrap();
    }
    assert_eq!(dp.xdp_counted(&f(9099, 40003)).unwrap().1, judged);
    let bursts = dp.bursts().unwrap();
    assert_eq!(
        bursts.len(),
        1,
        "threshold 1: one event per window: {bursts:?}"
    );
    assert_eq!(bursts[0].port, 8443, "the port of the first bad handshake");
}

#[test]
fn path_scope_changes_at_run_time() {
    let mut dp = load(100, Duration::from_secs(60));
    let client = "198.18.3.8";
    let verdict = |dp: &mut DataPlane, sport: u16, path: &str| {
        send(dp, client, sport, &bad_request(path));
        let flow = dp
            .flow(&flow_key(client, sport, SERVER, PORT))
            .unwrap()
            .expect("flow");
        Verdict::from_u8(flow.verdict).unwrap()
    };
    assert_eq!(
        verdict(&mut dp, 40000, "/api/items"),
        Verdict::Bad,
        "every path by default"
    );

    let mut cfg: Config = dp.config().unwrap();
    cfg.flags |= CFG_PATH_SCOPE;
    for (i, prefix) in ["/ws", "/socket.io/"].iter().enumerate() {
        cfg.paths[i][..prefix.len()].copy_from_slice(prefix.as_bytes());
        cfg.path_lens[i] = prefix.len() as u8;
    }
    cfg.n_paths = 2;
    dp.set_config(&cfg).unwrap();
    assert_eq!(
        verdict(&mut dp, 40001, "/api/items"),
        Verdict::Ignored,
        "out of scope"
    );
    assert_eq!(verdict(&mut dp, 40002, "/ws/chat"), Verdict::Bad);
    assert_eq!(verdict(&mut dp, 40003, "/socket.io/?EIO=4"), Verdict::Bad);
    assert_eq!(verdict(&mut dp, 40004, "/socket"), Verdict::Ignored);

    cfg.flags &= !CFG_PATH_SCOPE;
    dp.set_config(&cfg).unwrap();
    assert_eq!(
        verdict(&mut dp, 40005, "/api/items"),
        Verdict::Bad,
        "scope lifted again"
    );
}

#[test]
fn threshold_changes_at_run_time() {
    let mut dp = load(100, Duration::from_secs(60));
    send(&mut dp, "198.18.3.9", 40000, &bad_request("/"));
    assert!(dp.bursts().unwrap().is_empty());
    let mut cfg = dp.config().unwrap();
    cfg.threshold = 2;
    dp.set_config(&cfg).unwrap();
    send(&mut dp, "198.18.3.9", 40001, &bad_request("/"));
    assert_eq!(
        dp.bursts().unwrap().len(),
        1,
        "the lowered threshold applies at once"
    );
}

#[test]
fn window_changes_at_run_time() {
    let mut dp = load(3, Duration::from_secs(60));
    let client = "198.18.3.10";
    for i in 0..2 {
        send(&mut dp, client, 40000 + i, &bad_request("/"));
    }
    // A 1 ns window: the next bad handshake opens a new one, so the count restarts at 1 and
    // the threshold of 3 is not reached, where the old window would have reached it.
    let mut cfg = dp.config().unwrap();
    cfg.window_ns = 1;
    dp.set_config(&cfg).unwrap();
    send(&mut dp, client, 40002, &bad_request("/"));
    assert!(dp.bursts().unwrap().is_empty(), "the short window applied");
    cfg.window_ns = Duration::from_secs(60).as_nanos() as u64;
    dp.set_config(&cfg).unwrap();
    for i in 0..2 {
        send(&mut dp, client, 40003 + i, &bad_request("/"));
    }
    let bursts = dp.bursts().unwrap();
    assert_eq!(bursts.len(), 1, "{bursts:?}");
    assert_eq!(bursts[0].count, 3);
}

#[test]
fn global_observe_mode_changes_at_run_time_for_inspection_too() {
    // Observe mode passes a banned source's handshakes, which are then judged like any other.
    let mut dp = load(2, Duration::from_secs(60));
    let client = "198.18.3.11";
    dp.ban(client, 32, wsguard_common::maps::BanValue::default())
        .unwrap();
    let mut cfg = dp.config().unwrap();
    cfg.flags |= wsguard_common::maps::CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    let f = Pkt::tcp(client, 40000, SERVER, PORT)
        .payload(&bad_request("/"))
        .build();
    let judged =
        Delta::of(&[Counter::WouldDrop, Counter::HsBad]).and_at(Counter::BadReason0 as u32, 1);
    assert_eq!(dp.xdp_counted(&f).unwrap(), (XDP_PASS, judged));
    cfg.flags &= !wsguard_common::maps::CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    let f = Pkt::tcp(client, 40001, SERVER, PORT)
        .payload(&bad_request("/"))
        .build();
    assert_eq!(
        dp.xdp_counted(&f).unwrap(),
        (
            wsguard_tests::dataplane::XDP_DROP,
            Delta::of(&[Counter::Dropped])
        )
    );
    assert!(
        dp.flow(&flow_key(client, 40001, SERVER, PORT))
            .unwrap()
            .is_none(),
        "enforced again: dropped before inspection"
    );
}
