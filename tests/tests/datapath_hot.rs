//! The drop path's two shortcuts, judged for correctness (their speed is `cargo xtask bench`'s):
//! the verdict a CPU holds for the hot banned source it dropped last (valid for the rest of one
//! jiffy), and `BAN_MAY_PRESERVE`, without which a ban's packets skip the flow lookup.

use std::{thread::sleep, time::Duration};
use wsguard_common::maps::{
    BAN_MAY_PRESERVE, BAN_OBSERVE, BanValue, CFG_GENERATION_ONE, Counter, FLOW_ESTABLISHED,
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, TC_ACT_OK, XDP_DROP, XDP_PASS, boot_ns, flow_key, pin_to_cpu},
    packet::{Pkt, ws_request},
};

const PORT: u16 = 80;
const SERVER: &str = "198.18.1.1";
const WS_FRAME: &[u8] = &[0x82, 0x84, 1, 2, 3, 4, 5, 6, 7, 8];
const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
/// More than the drops after which a ban is hot (1024): the verdict is held from then on.
const HOT: u32 = 5000;
/// Longer than a jiffy at any HZ (100 to 1000): a held verdict has expired after it.
const TICK: Duration = Duration::from_millis(30);

fn load() -> DataPlane {
    // One CPU, so the verdict a repeated run leaves behind is the one the next run finds.
    pin_to_cpu(0).expect("pin to CPU 0");
    DataPlane::load(&[PORT]).expect("load data plane")
}

fn enforced() -> BanValue {
    BanValue {
        created_ns: boot_ns(),
        ..Default::default()
    }
}

fn syn(src: &str, sport: u16) -> Vec<u8> {
    Pkt::tcp(src, sport, SERVER, PORT).syn().build()
}

/// Drop `HOT` SYNs of `src` in one run, leaving its verdict held on this CPU.
fn make_hot(dp: &mut DataPlane, src: &str) {
    let (rc, _) = dp.xdp_repeat(&syn(src, 40000), HOT).unwrap();
    assert_eq!(rc, XDP_DROP, "{src} is banned");
}

/// Open a WebSocket through the real path: the request on ingress, the 101 on egress.
fn establish(dp: &mut DataPlane, src: &str, sport: u16) {
    let req = Pkt::tcp(src, sport, SERVER, PORT).payload(&ws_request("/chat"));
    dp.xdp(&req.build()).unwrap();
    assert_eq!(
        dp.tc(&req.reply().payload(SWITCHING).build()).unwrap(),
        TC_ACT_OK
    );
}

#[test]
fn an_unban_reaches_a_hot_source_within_a_tick() {
    let mut dp = load();
    let src = "198.18.0.70";
    dp.fill_filter(false).unwrap();
    dp.ban(src, 32, enforced()).unwrap();
    make_hot(&mut dp, src);
    dp.unban(src).unwrap();
    sleep(TICK);
    assert_eq!(
        dp.xdp_counted(&syn(src, 40001)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed])),
        "unbanned, yet still dropped a tick later"
    );
}

#[test]
fn an_unban_the_agent_announces_reaches_a_hot_source_at_once() {
    let mut dp = load();
    let src = "198.18.0.78";
    dp.fill_filter(false).unwrap();
    dp.ban(src, 32, enforced()).unwrap();
    make_hot(&mut dp, src);
    dp.unban(src).unwrap();
    // What the agent does after a removal: move the generation in CONFIG's flags.
    let mut cfg = dp.config().unwrap();
    cfg.flags = cfg.flags.wrapping_add(CFG_GENERATION_ONE);
    dp.set_config(&cfg).unwrap();
    assert_eq!(
        dp.xdp_counted(&syn(src, 40001)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed])),
        "unbanned and announced, yet still dropped"
    );
}

#[test]
fn observe_and_global_observe_reach_a_hot_source() {
    let mut dp = load();
    let src = "198.18.0.71";
    dp.ban(src, 32, enforced()).unwrap();
    make_hot(&mut dp, src);
    // Global observe is read from CONFIG on every packet: no tick to wait for.
    let mut cfg = dp.config().unwrap();
    cfg.flags |= wsguard_common::maps::CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    assert_eq!(
        dp.xdp_counted(&syn(src, 40001)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::WouldDrop]))
    );
    cfg.flags &= !wsguard_common::maps::CFG_OBSERVE;
    dp.set_config(&cfg).unwrap();
    make_hot(&mut dp, src);
    // The ban itself turned to observe: a tick later.
    let mut ban = dp.ban_entry(src).unwrap();
    ban.flags |= BAN_OBSERVE;
    dp.ban(src, 32, ban).unwrap();
    sleep(TICK);
    assert_eq!(
        dp.xdp_counted(&syn(src, 40002)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::WouldDrop]))
    );
}

#[test]
fn a_held_verdict_is_for_its_source_only_and_still_preserves_flows() {
    let mut dp = load();
    let src = "198.18.0.72";
    establish(&mut dp, src, 41000);
    let ban = BanValue {
        flags: BAN_MAY_PRESERVE,
        ..enforced()
    };
    dp.ban(src, 32, ban).unwrap();
    make_hot(&mut dp, src);
    // Whether this run finds the held verdict or looks the ban up, the flow is preserved.
    let data = Pkt::tcp(src, 41000, SERVER, PORT).payload(WS_FRAME).build();
    assert_eq!(
        dp.xdp_counted(&data).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Preserved]))
    );
    // A neighbour in the same pre-filter bucket, not banned, right after the hot source.
    make_hot(&mut dp, src);
    assert_eq!(
        dp.xdp_counted(&syn("198.18.0.73", 40000)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
    // Every drop is counted against the ban once this CPU moves on to another banned source.
    let other = "198.18.0.74";
    dp.ban(other, 32, enforced()).unwrap();
    assert_eq!(dp.xdp(&syn(other, 40000)).unwrap(), XDP_DROP);
    assert_eq!(
        dp.ban_entry(src).unwrap().drops,
        2 * u64::from(HOT),
        "held-back drops of the hot source were lost"
    );
}

#[test]
fn without_may_preserve_an_old_flow_is_dropped_without_a_lookup() {
    let mut dp = load();
    let src = "198.18.0.75";
    establish(&mut dp, src, 41000);
    // The writer saw no flow of the source (none when it looked): the flag is its promise.
    dp.ban(src, 32, enforced()).unwrap();
    let data = Pkt::tcp(src, 41000, SERVER, PORT).payload(WS_FRAME).build();
    assert_eq!(
        dp.xdp_counted(&data).unwrap(),
        (XDP_DROP, Delta::of(&[Counter::Dropped]))
    );
}

#[test]
fn a_handshake_in_flight_at_the_ban_sets_may_preserve_when_it_completes() {
    let mut dp = load();
    for src in ["198.18.0.76", "fd00::76"] {
        let server = if src.contains(':') {
            "fd00:1::1"
        } else {
            SERVER
        };
        let req = Pkt::tcp(src, 41000, server, PORT).payload(&ws_request("/chat"));
        dp.xdp(&req.build()).unwrap();
        // Banned while the server has not answered yet; the writer saw no established flow.
        let prefix = if src.contains(':') { 128 } else { 32 };
        dp.ban(src, prefix, enforced()).unwrap();
        assert_eq!(dp.ban_entry(src).unwrap().flags & BAN_MAY_PRESERVE, 0);
        assert_eq!(
            dp.tc(&req.reply().payload(SWITCHING).build()).unwrap(),
            TC_ACT_OK
        );
        let key = flow_key(src, 41000, server, PORT);
        assert_eq!(dp.flow(&key).unwrap().unwrap().state, FLOW_ESTABLISHED);
        assert_ne!(
            dp.ban_entry(src).unwrap().flags & BAN_MAY_PRESERVE,
            0,
            "{src}: the egress program did not mark the ban"
        );
        let data = Pkt::tcp(src, 41000, server, PORT).payload(WS_FRAME).build();
        assert_eq!(
            dp.xdp_counted(&data).unwrap(),
            (XDP_PASS, Delta::of(&[Counter::Preserved])),
            "{src}"
        );
    }
}

#[test]
fn a_flow_that_started_after_the_ban_does_not_mark_it() {
    let mut dp = load();
    let src = "198.18.0.77";
    // An observe ban lets the flow through; it is older than the flow.
    let ban = BanValue {
        created_ns: boot_ns() - 1_000_000,
        flags: BAN_OBSERVE,
        ..Default::default()
    };
    dp.ban(src, 32, ban).unwrap();
    establish(&mut dp, src, 41000);
    assert_eq!(dp.ban_entry(src).unwrap().flags, BAN_OBSERVE);
}
