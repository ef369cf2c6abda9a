//! The agent at scale: a large import goes through batched map writes and the kernel holds
//! exactly the imported set; `ban list` streams every ban; the state file holds them and a
//! restart (pins kept) and a reboot (pins gone) bring them all back.
//!
//! Stage times are printed (`--nocapture`) for the record, never asserted.

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};
use wsguard::{
    addr::Cidr,
    datapath::{DataPath, DataPathError, DataPathOptions, OpenHooks, XdpMode},
};
use wsguard_common::maps::{BanValue, names};
use wsguard_tests::{
    agent::{
        Agent,
        bans::{ban_list_text, kernel_ban_set},
    },
    netns::BpfFs,
};

mod cli_support;
use cli_support::*;

/// The `kernel_writes=` of the agent's last "import applied" log line.
fn last_import_writes(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("import applied"))?;
    // Drop the colour escapes (`ESC [ … m`) around field names.
    let mut plain = String::with_capacity(line.len());
    let mut esc = false;
    for ch in line.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    let line = plain.as_str();
    let field = |name: &str| -> Option<u64> {
        let v = line.split(&format!("{name}=")).nth(1)?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some((field("bans")?, field("kernel_writes")?))
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f()?;
    eprintln!("[scale] {what}: {:.2?}", t.elapsed());
    Ok(r)
}

fn host(i: u32) -> Cidr {
    Cidr::host(Ipv4Addr::from(0xc613_0000 + i).into())
}

fn host6(i: u32) -> Cidr {
    Cidr::host(Ipv6Addr::new(0xfd00, 0x5d, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into())
}

/// The data path alone: a batch of host bans takes a few syscalls, replaces existing entries
/// keeping their drop counters, counts networks in CONFIG, and the cap is exact (a batch that
/// does not fit writes nothing).
#[test]
fn put_bans_is_batched_exact_and_keeps_drop_counters() -> Result<()> {
    const CAP: u32 = 20_000;
    let bpffs = BpfFs::new()?;
    let o = DataPathOptions {
        pin_dir: bpffs.path().join("wsguard"),
        interfaces: Vec::new(),
        xdp_mode: XdpMode::Auto,
        max_bans: CAP,
    };
    let mut dp = DataPath::open_with(&o, &OpenHooks::default())?;
    let v = |flags| BanValue {
        created_ns: wsguard::datapath::boot_ns(),
        flags,
        ..Default::default()
    };
    // An existing ban that has dropped packets.
    dp.put_ban(&host(5), &v(0))?;
    let mut m: HashMap<_, [u8; 4], BanValue> = HashMap::try_from(Map::HashMap(MapData::from_pin(
        o.pin_dir.join("maps").join(names::BANS_V4),
    )?))?;
    let key = match host(5).addr() {
        std::net::IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    };
    m.insert(key, BanValue { drops: 7, ..v(0) }, 0)?;
    let net4: Cidr = "198.51.100.0/24".parse()?;
    dp.put_ban(&net4, &v(0))?;

    let mut batch: Vec<(Cidr, BanValue)> = (0..10_000).map(|i| (host(i), v(1))).collect();
    batch.extend((0..5_000).map(|i| (host6(i), v(1))));
    batch.push((host(7), v(2))); // a duplicate: the last one wins
    batch.push((net4, v(1)));
    batch.push(("198.51.101.0/24".parse()?, v(1)));
    batch.push(("fd00:5e::/48".parse()?, v(1)));
    let stats = dp.put_bans(&batch)?;
    // 10k IPv4 hosts in two halves written side by side (one syscall each), 5k IPv6 likewise,
    // 3 networks one by one.
    ensure!(stats.writes == 7 && stats.entries == 15_003, "{stats:?}");
    let distinct = 10_000 + 5_000 + 3;
    ensure!(dp.ban_entries() == distinct, "{}", dp.ban_entries());
    let bans: std::collections::HashMap<Cidr, BanValue> = dp.bans()?.into_iter().collect();
    ensure!(bans.len() as u64 == distinct);
    ensure!(
        bans[&host(5)].drops == 7 && bans[&host(5)].flags == 1,
        "drops kept"
    );
    ensure!(bans[&host(7)].flags == 2 && bans[&host6(4_999)].flags == 1);
    let cfg = dp.config()?;
    ensure!((cfg.cidr_v4, cfg.cidr_v6) == (2, 1), "{cfg:?}");

    // The cap: one entry too many refuses the whole batch and writes nothing.
    let room = CAP - distinct as u32;
    let more: Vec<(Cidr, BanValue)> = (0..=room).map(|i| (host6(10_000 + i), v(0))).collect();
    match dp.put_bans(&more) {
        Err(e) if matches!(e.err, DataPathError::Full { capacity: CAP }) => {
            ensure!(
                e.unwritten.len() == more.len() && e.stats.entries == 0,
                "{e:?}"
            );
        }
        other => anyhow::bail!("expected Full, got {other:?}"),
    }
    ensure!(dp.bans()?.len() as u64 == distinct, "nothing written");
    dp.put_bans(&more[..room as usize])?;
    ensure!(dp.ban_entries() == u64::from(CAP));
    drop(dp);
    // A fresh open counts the same from the maps.
    let dp = DataPath::open_with(&o, &OpenHooks::default())?;
    ensure!(dp.ban_entries() == u64::from(CAP) && dp.bans()?.len() == CAP as usize);
    DataPath::detach_all(&o.pin_dir)?;
    Ok(())
}

/// `s.start("a", …)` with its own log file and a wait for "ready" long enough for 1M bans to
/// be adopted or restored (Setup::start counts "ready" lines in a log shared by restarts and
/// allows 10 s for the API).
fn start_again(s: &Setup, run: &str, max: &str) -> Result<Agent> {
    let pin = s.pin_dir("a");
    let state = s.dir.path().join("state-a");
    let sock = s.socket();
    let args = [
        "--iface",
        &s.lab.if_a,
        "--pin-dir",
        pin.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--metrics-addr",
        "off",
        "--xdp-mode",
        "generic",
        "--max-bans",
        max,
    ];
    let log = s.dir.path().join(format!("agent-a-{run}.log"));
    let mut a = Agent::start(&s.lab.a, &log, &args)?;
    wait_full_start(&mut a, || Ok(s.cli(&["status"])?.code == 0))?;
    Ok(a)
}

/// Import `n` bans (a few of them already banned), prove the import took the batched path
/// and the kernel holds exactly the set, fill the cap exactly, list every ban, check the
/// state file, then restart with the pins and start again after a reboot (pins gone).
fn end_to_end(n: u32) -> Result<()> {
    const ROOM: u32 = 5;
    let s = Setup::new()?;
    let max = (n + ROOM).to_string();
    let mut agent = s.start("a", &["--max-bans", &max])?;
    let (text, want) = ban_list_text(n);
    // Already banned before the import: replaced in place, not counted twice.
    let before: Vec<&str> = text.lines().skip(1).step_by(997).take(3).collect();
    let mut args = vec!["ban", "add", "--ttl", "1d"];
    args.extend(&before);
    let r = s.cli(&args)?;
    ensure!(r.code == 0, "{r:?}");
    let f = s.write("big.txt", &text)?;
    let r = timed(&format!("import {n}"), || {
        s.cli(&["import", f.to_str().unwrap(), "--ttl", "1d"])
    })?;
    ensure!(r.code == 0, "{r:?}");

    // Batched: the CLI sends 10k entries per request; the agent writes them in at most 4
    // pipelined chunks, each chunk's host bans in a few syscalls (per family, two halves side
    // by side), its network bans (1 in 1000) one each. One write per ban would be 10k.
    let (bans, writes) = last_import_writes(&agent.log_text()).context("no import log line")?;
    eprintln!("[scale] last request: {bans} bans in {writes} kernel writes");
    ensure!(
        bans >= 1000 && writes <= 4 * 2 * 2 + bans / 1000 + 1,
        "{writes} writes for {bans} bans"
    );
    let kernel = timed("read the pinned maps", || kernel_ban_set(&s.pin_dir("a")))?;
    ensure!(kernel.len() == want.len(), "{} in the kernel", kernel.len());
    ensure!(kernel == want, "the kernel holds exactly the imported set");

    // The count is exact: exactly ROOM more fit, then the cap refuses (exit 3).
    let more: Vec<String> = (0..=ROOM).map(|i| format!("fd00:5b::{i:x}")).collect();
    let mut args = vec!["ban", "add"];
    args.extend(more[..ROOM as usize].iter().map(String::as_str));
    ensure!(s.cli(&args)?.code == 0, "room for {ROOM}");
    let r = s.cli(&["ban", "add", &more[ROOM as usize]])?;
    expect(&r, 3, &["full"])?;
    let mut args = vec!["ban", "rm"];
    args.extend(more[..ROOM as usize].iter().map(String::as_str));
    ensure!(s.cli(&args)?.code == 0, "removed");

    let listed = timed("ban list (table)", || s.cli(&["ban", "list"]))?;
    ensure!(
        listed.code == 0 && listed.stdout.lines().count() == n as usize + 1,
        "{} lines, {}",
        listed.stdout.lines().count(),
        listed.stderr
    );
    drop(listed);
    let state = s.dir.path().join("state-a/state.json");
    timed("state.json holds every ban", || {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let bytes = std::fs::read(&state).unwrap_or_default();
            if wsguard::state::parse(&bytes).is_ok_and(|s| s.bans.len() == n as usize) {
                return Ok(());
            }
            ensure!(Instant::now() < end, "state never held {n} bans");
            std::thread::sleep(Duration::from_millis(200));
        }
    })?;
    if n <= 100_000 {
        timed("stop", || {
            ensure!(agent.stop()?.success(), "clean exit");
            Ok(())
        })?;
    } else {
        // The exit path writes the state once more; with 1M bans a debug build needs longer
        // than the harness gives SIGTERM (10 s). The state file already holds every ban.
        agent.kill9()?;
    }
    let agent = timed("restart with pins", || start_again(&s, "restart", &max))?;
    let st = s.cli(&["status", "-o", "json"])?.json()?;
    ensure!(
        st["ban_map"]["entries"] == u64::from(n),
        "restart kept them: {st}"
    );
    drop(agent);
    wsguard::datapath::DataPath::detach_all(&s.pin_dir("a"))?;
    let _agent = timed("start after a reboot (from state.json)", || {
        start_again(&s, "reboot", &max)
    })?;
    let kernel = kernel_ban_set(&s.pin_dir("a"))?;
    ensure!(
        kernel == want,
        "restored exactly: {} in the kernel",
        kernel.len()
    );
    let st = s.cli(&["status", "-o", "json"])?.json()?;
    ensure!(st["ban_map"]["entries"] == u64::from(n), "{st}");
    Ok(())
}

#[test]
fn import_of_100k_bans_is_batched_exact_listed_saved_and_restored() -> Result<()> {
    end_to_end(100_000)
}

/// The same with 1M bans: a manual check (several minutes with the debug build), run with
/// `cargo test -p wsguard-tests --test agent_scale -- --ignored --nocapture`.
#[test]
#[ignore = "1M bans take minutes; run by hand, see the doc comment"]
fn one_million_bans_end_to_end() -> Result<()> {
    end_to_end(1_000_000)
}

/// Kernel write cost alone, one by one against batched, for the record (no assertion on
/// time): `cargo test -p wsguard-tests --test agent_scale kernel_write_cost -- --ignored
/// --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn kernel_write_cost_one_by_one_and_batched() -> Result<()> {
    for n in [100_000u32, 1_000_000] {
        for batched in [false, true] {
            let bpffs = BpfFs::new()?;
            let o = DataPathOptions {
                pin_dir: bpffs.path().join("wsguard"),
                interfaces: Vec::new(),
                xdp_mode: XdpMode::Auto,
                max_bans: n,
            };
            let mut dp = DataPath::open_with(&o, &OpenHooks::default())?;
            let v = BanValue::default();
            let bans: Vec<(Cidr, BanValue)> = (0..n).map(|i| (host6(i), v)).collect();
            let t = Instant::now();
            if batched {
                dp.put_bans(&bans)?;
            } else {
                for (c, v) in &bans {
                    dp.put_ban(c, v)?;
                }
            }
            let write = t.elapsed();
            let t = Instant::now();
            let read = dp.bans()?.len();
            eprintln!(
                "[scale] {n} bans {}: write {write:.2?}, read back {read} in {:.2?}",
                if batched { "batched" } else { "one by one" },
                t.elapsed()
            );
            ensure!(read == n as usize && dp.ban_entries() == u64::from(n));
            drop(dp);
            DataPath::detach_all(&o.pin_dir)?;
        }
    }
    Ok(())
}
