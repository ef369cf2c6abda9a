//! The build chain end to end: the object embedded in the `wsguard` binary loads into the real
//! kernel, passes the verifier, and decides real verdicts through BPF_PROG_TEST_RUN.

use wsguard_common::maps::{BanValue, Counter};
use wsguard_tests::{
    dataplane::{DataPlane, XDP_DROP, XDP_PASS},
    packet::Pkt,
};

#[test]
fn embedded_xdp_program_loads_and_decides() {
    let mut dp = DataPlane::load(&[80]).expect("load data plane");
    let clean = Pkt::tcp("198.18.0.10", 40000, "198.18.1.1", 80).build();
    let banned = Pkt::tcp("198.18.0.66", 40000, "198.18.1.1", 80).build();

    assert_eq!(dp.xdp(&clean).unwrap(), XDP_PASS);
    dp.ban("198.18.0.66", 32, BanValue::default()).unwrap();
    assert_eq!(dp.xdp(&banned).unwrap(), XDP_DROP);
    assert_eq!(
        dp.xdp(&clean).unwrap(),
        XDP_PASS,
        "other sources unaffected"
    );
    assert_eq!(dp.counter(Counter::Dropped).unwrap(), 1);
    assert_eq!(dp.counter(Counter::Passed).unwrap(), 2);
}
