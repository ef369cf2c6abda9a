//! `BAN_TABLE_V4` as the agent keeps it: every exact IPv4 ban written (alone or batched) is in
//! the table with `CFG_V4_TABLE` set, an unban takes it out, drops counted in the table show in
//! the agent's counts, an open repairs a table a crash left behind, and a ban with no free slot
//! clears the bit so the program looks `BANS_V4` up again.

use anyhow::{Result, ensure};
use std::net::Ipv4Addr;
use wsguard::datapath::{OpenHooks, table::BanTable};
use wsguard_common::{
    maps::{BanValue, CFG_V4_TABLE, Counter},
    table,
};
use wsguard_tests::netns::{BpfFs, VethLab};

use crate::support::*;

fn table(o: &wsguard::datapath::DataPathOptions) -> Result<BanTable> {
    Ok(BanTable::from_pin(&pin(o, "maps/BAN_TABLE_V4"))?)
}

fn whole(o: &wsguard::datapath::DataPathOptions) -> Result<bool> {
    Ok(pinned_config(o)?.flags & CFG_V4_TABLE != 0)
}

fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 100, 0)) + i)
}

#[test]
fn bans_are_mirrored_counted_and_repaired_by_the_next_open() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let o = opts(&bpffs, &[&lab.if_a], 10_000);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(whole(&o)?, "a fresh data path holds every ban in its table");
    let one = BanValue {
        expires_ns: wsguard::datapath::boot_ns() + 3_600_000_000_000,
        ..ban()
    };
    dp.put_ban(&cidr(&format!("{}/32", lab.ip_b)), &one)?;
    let batch: Vec<_> = (0..3000)
        .map(|i| (cidr(&format!("{}/32", host(i))), ban()))
        .collect();
    dp.put_bans(&batch)?;
    let t = table(&o)?;
    let got = t
        .get(lab.ip_b.octets())
        .expect("the single ban is in the table");
    ensure!(got.expires_ns == one.expires_ns, "{got:?}");
    ensure!(
        (0..3000).all(|i| t.get(host(i).octets()).is_some()),
        "batch"
    );
    ensure!(whole(&o)?);

    // The program counts in the table; the agent's count and list see it.
    let stream = lab.ping_stream(lab.ip_b, 20, "0.01")?;
    wait_until("drops reach the table", || {
        Ok(t.get(lab.ip_b.octets()).is_some_and(|v| v.drops >= 5))
    })?;
    drop(stream);
    let c = cidr(&format!("{}/32", lab.ip_b));
    let listed = dp.drops_of(&[c])?[0];
    ensure!(
        listed == pinned_drops(&o, lab.ip_b)? && listed >= 5,
        "{listed}"
    );
    ensure!(pinned_counter(&o, Counter::Dropped)? >= listed);
    // A rewrite carries the table's count into BANS_V4: nothing lost, nothing twice.
    dp.put_ban(&c, &one)?;
    let after = dp.drops_of(&[c])?[0];
    ensure!(
        after >= listed && after <= listed + 2,
        "{listed} -> {after}"
    );
    ensure!(t.get(lab.ip_b.octets()).is_some_and(|v| v.drops <= 2));

    // An unban takes the slot out.
    dp.del_ban(&cidr(&format!("{}/32", host(7))))?;
    ensure!(t.get(host(7).octets()).is_none());

    // A crash left a ban out of the table and a slot of no ban in it: the open repairs both.
    t.remove(host(8).octets()).expect("in the table");
    let stale = Ipv4Addr::new(198, 18, 200, 1);
    t.put(stale.octets(), &ban(), true).expect("a slot");
    drop(dp);
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(t.get(host(8).octets()).is_some(), "restored");
    ensure!(t.get(stale.octets()).is_none(), "released");
    ensure!(whole(&o)?);
    drop(dp);
    // Another build (one that may not know the table) ran: its changes are found as well.
    t.put(stale.octets(), &ban(), true).expect("a slot");
    let dp = open_in(&lab, &o, another_build())?;
    ensure!(
        t.get(stale.octets()).is_none(),
        "released after another build"
    );
    ensure!(whole(&o)?);
    drop(dp);
    wsguard::datapath::DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

#[test]
fn a_ban_without_a_slot_turns_the_table_bit_off() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    // 8 bans: two buckets of four slots. Five hosts whose two choices are both bucket 0
    // cannot all have a slot.
    let o = opts(&bpffs, &[&lab.if_a], 8);
    let mut dp = open_in(&lab, &o, OpenHooks::default())?;
    let bits = table(&o)?.bits();
    ensure!(table(&o)?.slots() == 8 && bits == table::bucket_bits(8));
    let crowded: Vec<Ipv4Addr> = (0..1 << 16)
        .map(host)
        .filter(|a| {
            let k = table::key(a.octets());
            table::bucket(k, bits, 0) == 0 && table::bucket(k, bits, 1) == 0
        })
        .take(5)
        .collect();
    ensure!(crowded.len() == 5, "{crowded:?}");
    for (i, a) in crowded.iter().enumerate() {
        dp.put_ban(&cidr(&format!("{a}/32")), &ban())?;
        ensure!(whole(&o)? == (i < 4), "after {} bans", i + 1);
    }
    ensure!(table(&o)?.get(crowded[4].octets()).is_none());
    ensure!(dp.bans()?.len() == 5, "every ban is in BANS_V4");
    drop(dp);
    let dp = open_in(&lab, &o, OpenHooks::default())?;
    ensure!(!whole(&o)?, "still short after the open");
    drop(dp);
    wsguard::datapath::DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}
