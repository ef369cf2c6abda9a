//! The exact IPv4 ban table (`BAN_TABLE_V4`, see `wsguard_common::table`) in the real kernel:
//! the program finds a ban in any slot of either bucket, counts its drops there, trusts a miss
//! only while `CFG_V4_TABLE` says the table holds every exact IPv4 ban, and stops dropping a
//! source the moment its slot is released.

use wsguard_common::{
    maps::{BAN_NOT_ALLOWLISTED, BanValue, CFG_V4_TABLE, Counter},
    table::{self, SLOTS},
};
use wsguard_tests::{
    dataplane::{DataPlane, Delta, XDP_DROP, XDP_PASS, boot_ns},
    packet::Pkt,
};

const PORT: u16 = 80;
const SERVER: &str = "198.18.1.1";

fn ban() -> BanValue {
    BanValue {
        created_ns: boot_ns(),
        flags: BAN_NOT_ALLOWLISTED,
        ..Default::default()
    }
}

fn syn(src: [u8; 4]) -> Vec<u8> {
    let src = std::net::Ipv4Addr::from(src).to_string();
    Pkt::tcp(&src, 40000, SERVER, PORT).syn().build()
}

fn verdict(dp: &mut DataPlane, src: [u8; 4]) -> u32 {
    dp.xdp(&syn(src)).unwrap()
}

#[test]
fn a_ban_in_the_table_alone_drops_and_counts_there() {
    let mut dp = DataPlane::load(&[PORT]).unwrap();
    let table = dp.table().unwrap();
    let (a, b) = ([198, 18, 9, 1], [198, 18, 9, 2]);
    // Only in the table: found whatever the bit says.
    table.put(a, &ban(), true).expect("a slot");
    for whole in [false, true] {
        dp.set_table_whole(whole).unwrap();
        assert_eq!(
            dp.xdp_counted(&syn(a)).unwrap(),
            (XDP_DROP, Delta::of(&[Counter::Dropped])),
            "whole {whole}"
        );
    }
    assert_eq!(table.get(a).unwrap().drops, 2, "drops counted in the slot");
    // Only in BANS_V4: looked up there after a table miss, unless the bit says the table
    // holds every exact IPv4 ban.
    dp.bans_v4().unwrap().insert(b, ban(), 0).unwrap();
    dp.set_table_whole(false).unwrap();
    assert_eq!(verdict(&mut dp, b), XDP_DROP);
    assert_eq!(dp.ban_entry("198.18.9.2").unwrap().drops, 1);
    dp.set_table_whole(true).unwrap();
    assert_eq!(dp.config().unwrap().flags & CFG_V4_TABLE, CFG_V4_TABLE);
    assert_eq!(verdict(&mut dp, b), XDP_PASS, "a miss is trusted");
    // Released: passes at once, even though the value is still in the slot's memory.
    assert_eq!(table.remove(a), Some(2));
    assert_eq!(
        dp.xdp_counted(&syn(a)).unwrap(),
        (XDP_PASS, Delta::of(&[Counter::Passed]))
    );
}

#[test]
fn every_slot_of_both_buckets_is_probed_and_a_full_pair_overflows() {
    // Two buckets: every address has both as its choices or one twice.
    let bits = 1;
    let mut dp = DataPlane::load_table_bits(&[PORT], bits).unwrap();
    let table = dp.table().unwrap();
    assert_eq!((table.bits(), table.slots()), (bits, 2 * SLOTS));
    dp.set_table_whole(true).unwrap();
    let addrs: Vec<[u8; 4]> = (1..=2 * SLOTS as u8 + 1)
        .map(|i| [198, 18, 10, i])
        .collect();
    let mut placed = Vec::new();
    for a in &addrs {
        if let Some(s) = table.put(*a, &ban(), true) {
            placed.push((*a, s));
        }
    }
    // Both buckets of some address are full before the last one: it found no slot.
    assert!(placed.len() < addrs.len(), "{placed:?}");
    assert!(placed.len() > SLOTS, "{placed:?}");
    let slots: std::collections::HashSet<_> = placed.iter().map(|(_, s)| s.index()).collect();
    assert_eq!(slots.len(), placed.len(), "one slot each");
    for (a, s) in &placed {
        assert_eq!(verdict(&mut dp, *a), XDP_DROP, "{a:?} in {s:?}");
        assert!(s.bucket < 2 && s.slot < SLOTS);
        let k = table::key(*a);
        assert!(s.bucket == table::bucket(k, bits, 0) || s.bucket == table::bucket(k, bits, 1));
    }
    // Releasing the first slots leaves gaps before the others: no early stop at a free slot.
    for (a, _) in placed.iter().filter(|(_, s)| s.slot == 0) {
        table.remove(*a).unwrap();
        assert_eq!(verdict(&mut dp, *a), XDP_PASS, "{a:?} released");
    }
    for (a, s) in placed.iter().filter(|(_, s)| s.slot != 0) {
        assert_eq!(
            verdict(&mut dp, *a),
            XDP_DROP,
            "{a:?} in {s:?} after the gap"
        );
    }
    // 0.0.0.0 is the free key: never in the table.
    assert!(table.put([0, 0, 0, 0], &ban(), true).is_none());
}

#[test]
fn an_expired_ban_in_the_table_passes() {
    let mut dp = DataPlane::load(&[PORT]).unwrap();
    dp.set_table_whole(true).unwrap();
    let table = dp.table().unwrap();
    let now = boot_ns();
    let (gone, live) = ([198, 18, 11, 1], [198, 18, 11, 2]);
    let expired = BanValue {
        expires_ns: now - 1,
        ..ban()
    };
    table.put(gone, &expired, true).unwrap();
    let lasting = BanValue {
        expires_ns: now + 3_600_000_000_000,
        ..ban()
    };
    table.put(live, &lasting, true).unwrap();
    assert_eq!(verdict(&mut dp, gone), XDP_PASS);
    assert_eq!(verdict(&mut dp, live), XDP_DROP);
    // Rewritten in place with a carried count: the slot's count restarts.
    table.put(live, &lasting, true).unwrap();
    assert_eq!(table.get(live).unwrap().drops, 0);
    assert_eq!(verdict(&mut dp, live), XDP_DROP);
    table.put(live, &lasting, false).unwrap();
    assert_eq!(
        table.get(live).unwrap().drops,
        1,
        "a repair keeps the count"
    );
}

/// The bench's split of the lookup path (`wsguard_bench_probe`, `_screened`, `_judged`, then
/// `wsguard_bench_lookup`) measures what each step says it does: the probe drops whatever the
/// table holds, the screen first believes the filters and counts the drop, the judgement adds
/// expiry but no drop accounting, and the lookup adds the ban's count. A step that skipped its
/// duties would be cheap and its row would prove nothing.
#[test]
fn the_bench_split_steps_do_what_they_say() {
    let mut dp = DataPlane::load(&[PORT]).unwrap();
    dp.fill_filter(false).unwrap();
    let (live, expired, clean) = ([198, 18, 52, 1], [198, 18, 52, 3], [198, 18, 99, 1]);
    let expired_ban = BanValue {
        expires_ns: boot_ns() - 1,
        ..ban()
    };
    for (addr, value) in [(live, ban()), (expired, expired_ban)] {
        let a = std::net::Ipv4Addr::from(addr).to_string();
        dp.ban(&a, 32, value).unwrap();
        dp.table().unwrap().put(addr, &value, true).expect("a slot");
    }
    dp.set_table_whole(true).unwrap();
    let run =
        |dp: &mut DataPlane, prog: &str, src: [u8; 4]| dp.xdp_named(prog, &syn(src), 1).unwrap().0;
    let steps = [
        "wsguard_bench_probe",
        "wsguard_bench_screened",
        "wsguard_bench_judged",
        "wsguard_bench_lookup",
    ];
    for prog in steps {
        assert_eq!(run(&mut dp, prog, live), XDP_DROP, "{prog}: the live ban");
        assert_eq!(
            run(&mut dp, prog, clean),
            XDP_PASS,
            "{prog}: a clean source"
        );
    }
    // Expiry is the judgement's: the probe and the screen still drop an expired ban's source.
    for (prog, want) in [
        ("wsguard_bench_probe", XDP_DROP),
        ("wsguard_bench_screened", XDP_DROP),
        ("wsguard_bench_judged", XDP_PASS),
        ("wsguard_bench_lookup", XDP_PASS),
    ] {
        assert_eq!(run(&mut dp, prog, expired), want, "{prog}: the expired ban");
    }
    // The screen believes the pre-filter: with the live ban's bucket marked clean, it passes.
    let bucket = u32::from_be_bytes(live) >> 8;
    dp.set_filter_bit(bucket, false, true).unwrap();
    assert_eq!(run(&mut dp, "wsguard_bench_probe", live), XDP_DROP);
    assert_eq!(run(&mut dp, "wsguard_bench_screened", live), XDP_PASS);
    dp.set_filter_bit(bucket, false, false).unwrap();
    // Only the lookup counts the ban's drop; the screen counts the packet.
    let drops = |dp: &mut DataPlane| dp.table().unwrap().get(live).unwrap().drops;
    let before = drops(&mut dp);
    for prog in [
        "wsguard_bench_probe",
        "wsguard_bench_screened",
        "wsguard_bench_judged",
    ] {
        run(&mut dp, prog, live);
    }
    assert_eq!(
        drops(&mut dp),
        before,
        "only the lookup step accounts the drop"
    );
    run(&mut dp, "wsguard_bench_lookup", live);
    assert_eq!(drops(&mut dp), before + 1);
}
