//! `cargo xtask bench`: ns per packet of wsguard's data-plane paths through BPF_PROG_TEST_RUN,
//! side by side in one run with what it is compared to: the bare XDP_PASS/XDP_DROP floors (what
//! test_run costs on this machine), the reference (parse Ethernet + IP, one hash lookup, drop
//! on a hit: the least any blocklist must do) and xdp-filter from xdp-tools (the standard XDP
//! blocklist, loaded by its own CLI). Every row is measured in the same rounds, interleaved, so
//! the machine's drift hits all of them alike. Prints tables with targets marked MET/MISSED;
//! asserts nothing about time (it does check every verdict). How to read it: README, "Bench".
//!
//! The set-up is the agent's: bans carry a TTL, the allowlist holds the built-in entries
//! (loopback, link-local, a node address), the ban pre-filter is filled, and one PROXY-protocol
//! sender is trusted (`proxy_protocol_from`), for the proxied rows (proxied.rs): an established
//! proxied WebSocket's data in the comparison table (the clean-path target of direct flows), the
//! header + request and the cut at a banned client's header in the handshake table, a later
//! packet of a cut flow in wsguard's own paths.
//!
//! Banned rows come in pairs. "held verdict" is `wsguard_xdp` itself on a repeated packet: a
//! CPU that keeps dropping one hot banned source judges it from the verdict it holds for the
//! rest of the jiffy, without the ban lookup (a steady flood from a banned source). "lookup" is
//! the same drop path judging every packet through the ban lookup (`wsguard_bench_lookup`): what
//! the first packet of a source in each jiffy on each CPU costs, and every packet when many
//! banned sources interleave on one CPU.

mod bans;
mod cases;
mod handshake;
mod proxied;
mod run;
mod table;
mod xdp_filter;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Map, MapInfo},
    programs::ProgramFd,
};
use std::collections::BTreeMap;
use wsguard_common::maps::names;
use wsguard_tests::dataplane::{DataPlane, pin_to_cpu};

use crate::{
    bans::{REF_BANS_V4, REF_BANS_V6},
    cases::Case,
    run::{Prog, Run, current_cpu, test_run},
    table::{OwnRow, Row, Stat},
    xdp_filter::XdpFilter,
};

pub use proxied::{PORT, SERVER};
/// Runs per BPF_PROG_TEST_RUN call.
const REPEAT: u32 = 1_000_000;
/// Rounds; each measures every row of a phase once, in an order that rotates between rounds.
pub const ROUNDS: usize = 11;
/// The ban maps' size, and the reference's: the agent's default `--max-bans`.
const MAX_BANS: u32 = 1_000_000;
const LEVELS: [(u32, &str); 3] = [(10_000, "10k"), (100_000, "100k"), (1_000_000, "1M")];

pub struct Bench {
    pub dp: DataPlane,
    pub xdp_filter: XdpFilter,
    fds: BTreeMap<Prog, ProgramFd>,
    /// Exact IPv4 bans written that found no slot in `BAN_TABLE_V4`.
    pub no_slot: u32,
}

/// One case's samples, one per round: its floor and each of its programs.
struct Samples {
    floor: Vec<f64>,
    /// The kernel's own whole-ns duration of the same floor runs, to show the two clocks agree.
    floor_kernel: Vec<f64>,
    progs: BTreeMap<Prog, Vec<f64>>,
}

impl Samples {
    fn stat(&self, p: Prog) -> Stat {
        Stat::of(&self.progs[&p], &self.floor)
    }
}

impl Bench {
    fn new(mut dp: DataPlane, xdp_filter: XdpFilter) -> Result<Self> {
        let mut fds = BTreeMap::new();
        for (p, name) in [
            (Prog::FloorPass, "wsguard_bench_pass"),
            (Prog::FloorDrop, "wsguard_bench_drop"),
            (Prog::Reference, "wsguard_bench_ref"),
            (Prog::ReferenceParsed, "wsguard_bench_parsed"),
            (Prog::Wsguard, wsguard_common::maps::programs::XDP),
            (Prog::WsguardLookup, "wsguard_bench_lookup"),
            (Prog::Probe, "wsguard_bench_probe"),
            (Prog::Screened, "wsguard_bench_screened"),
            (Prog::Judged, "wsguard_bench_judged"),
        ] {
            fds.insert(p, dp.program_fd(name)?);
        }
        fds.insert(Prog::XdpFilter, xdp_filter.prog.try_clone()?);
        Ok(Self {
            dp,
            xdp_filter,
            fds,
            no_slot: 0,
        })
    }

    pub fn fd(&self, p: Prog) -> &ProgramFd {
        &self.fds[&p]
    }

    fn call(&mut self, p: Prog, case: &Case, repeat: u32) -> Result<Run> {
        if let Some(before) = case.before_call {
            before(self).with_context(|| format!("before a call on \"{}\"", case.path))?;
        }
        let repeat = case.max_repeat.map_or(repeat, |m| repeat.min(m));
        let run = test_run(self.fd(p), &case.frame, repeat)?;
        ensure!(
            run.action == case.verdict,
            "{p:?} on \"{}\": action {}, expected {}",
            case.path,
            run.action,
            case.verdict
        );
        Ok(run)
    }

    /// Every case's floor and programs, once per round for `ROUNDS` rounds.
    fn measure(&mut self, cases: &[Case]) -> Result<Vec<Samples>> {
        for c in cases {
            if let Some(setup) = c.setup {
                setup(self).with_context(|| format!("set up \"{}\"", c.path))?;
            }
        }
        let mut order: Vec<(usize, Prog)> = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            order.push((i, Prog::floor(c.verdict)));
            order.extend(c.progs.iter().map(|p| (i, *p)));
        }
        // Warm-up: caches, and the ban counters past the point where a ban turns hot.
        for &(i, p) in &order {
            self.call(p, &cases[i], REPEAT / 10)?;
        }
        let mut samples: Vec<Samples> = cases
            .iter()
            .map(|_| Samples {
                floor: Vec::new(),
                floor_kernel: Vec::new(),
                progs: BTreeMap::new(),
            })
            .collect();
        for round in 0..ROUNDS {
            for &(i, p) in &order {
                let run = self.call(p, &cases[i], REPEAT)?;
                if p == Prog::floor(cases[i].verdict) {
                    samples[i].floor.push(run.cpu_ns);
                    samples[i].floor_kernel.push(f64::from(run.kernel_ns));
                } else {
                    samples[i].progs.entry(p).or_default().push(run.cpu_ns);
                }
            }
            order.rotate_left(1);
            eprint!("\r  round {}/{ROUNDS}", round + 1);
        }
        eprintln!();
        Ok(samples)
    }
}

/// The comparison rows of one ban count: one per case, two for banned ones (held verdict and
/// lookup).
fn comparison_rows(bans: &str, cases: &[Case], s: &[Samples], xdp_filter_held: u32) -> Vec<Row> {
    let n = LEVELS.iter().find(|l| l.1 == bans).map_or(0, |l| l.0);
    let mut rows = Vec::new();
    for (c, s) in cases.iter().zip(s) {
        let target = c.target.expect("comparison cases carry a target");
        let variants: &[(Prog, &str)] = if c.progs.contains(&Prog::WsguardLookup) {
            &[
                (Prog::Wsguard, ", held verdict"),
                (Prog::WsguardLookup, ", lookup"),
            ]
        } else {
            &[(Prog::Wsguard, "")]
        };
        for (p, suffix) in variants {
            rows.push(Row {
                bans: bans.into(),
                path: format!("{}{suffix}", c.path),
                floor: Stat::of(&s.floor, &s.floor),
                reference: s.stat(Prog::Reference),
                wsguard: s.stat(*p),
                xdp_filter: s.stat(Prog::XdpFilter),
                target,
                xdp_filter_entries: (xdp_filter_held < n).then_some(xdp_filter_held),
            });
        }
    }
    rows
}

/// Rows of one program each (wsguard's own paths, and the decomposition).
fn own_rows(cases: &[Case], s: &[Samples], context: &str) -> Vec<OwnRow> {
    let mut rows = Vec::new();
    for (c, s) in cases.iter().zip(s) {
        for p in c.progs {
            rows.push(OwnRow {
                path: format!("{} ({context})", c.path),
                // A drop measured without its lookup twin is no held verdict (the cut flow).
                program: if *p == Prog::Wsguard && !c.progs.contains(&Prog::WsguardLookup) {
                    "wsguard"
                } else {
                    p.label(c.verdict)
                },
                floor: Stat::of(&s.floor, &s.floor),
                stat: s.stat(*p),
            });
        }
    }
    rows
}

/// The reference's map is of the same kind as wsguard's exact ban map: type, flags, sizes.
fn check_reference_map(dp: &DataPlane) -> Result<String> {
    let info = |name: &str| -> Result<MapInfo> {
        match dp.ebpf.map(name) {
            Some(Map::HashMap(m)) => Ok(m.info()?),
            _ => bail!("{name}: not a hash map of the object"),
        }
    };
    let (ours, reference) = (info(names::BANS_V4)?, info(REF_BANS_V4)?);
    let shape = |m: &MapInfo| {
        (
            m.map_type().ok(),
            m.map_flags(),
            m.key_size(),
            m.value_size(),
            m.max_entries(),
        )
    };
    ensure!(
        shape(&ours) == shape(&reference),
        "the reference map differs from BANS_V4: {:?} vs {:?}",
        shape(&reference),
        shape(&ours)
    );
    Ok(format!(
        "{:?}, flags {:#x} (BPF_F_NO_PREALLOC), key {} B, value {} B, {} entries max, like BANS_V4",
        reference.map_type()?,
        reference.map_flags(),
        reference.key_size(),
        reference.value_size(),
        reference.max_entries()
    ))
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    format!("Linux {}, {cpu}", kernel.trim())
}

fn main() -> Result<()> {
    run::stop_on_signals();
    let cpu = current_cpu();
    pin_to_cpu(cpu)?;
    let mut dp = DataPlane::load_sized(
        &[PORT],
        &[
            (names::BANS_V4, MAX_BANS),
            (names::BANS_V6, MAX_BANS),
            (REF_BANS_V4, MAX_BANS),
            (REF_BANS_V6, MAX_BANS),
        ],
    )?;
    let reference_map = check_reference_map(&dp)?;
    // The agent's built-in allowlist: loopback, link-local, the node's own address.
    for (addr, prefix) in [
        ("127.0.0.0", 8),
        ("169.254.0.0", 16),
        (SERVER, 32),
        ("::1", 128),
        ("fe80::", 10),
        ("fd00:1::1", 128),
    ] {
        dp.allow(addr, prefix)?;
    }
    dp.fill_filter(false)?;
    dp.fill_filter(true)?;
    // `proxy_protocol_from` configured: one trusted PROXY sender, for the proxied rows.
    proxied::trust(&mut dp)?;
    eprintln!("loading xdp-filter (xdp-tools) on a veth of the bench's own namespace");
    let xdp_filter = XdpFilter::load(bans::BANNED)?;
    let mut b = Bench::new(dp, xdp_filter)?;

    let cases = cases::comparison();
    let mut rows = Vec::new();
    let mut clocks = (Vec::new(), Vec::new());
    let mut filled = 0;
    for (n, label) in LEVELS {
        eprintln!("{label} bans");
        let held = b.fill_bans(filled, n)?;
        filled = n;
        ensure!(
            b.xdp_filter.len() == held as usize,
            "xdp-filter's filter_ipv4 holds {} entries, expected {held}",
            b.xdp_filter.len()
        );
        let s = b.measure(&cases)?;
        for x in &s {
            clocks.0.extend_from_slice(&x.floor);
            clocks.1.extend_from_slice(&x.floor_kernel);
        }
        rows.extend(comparison_rows(label, &cases, &s, held));
    }
    eprintln!("where the cost goes, 1M exact bans");
    let c = cases::decomposition();
    let parts = own_rows(&c, &b.measure(&c)?, "1M exact bans");

    // A quicker loop while tuning the kernel crate: the comparison and the split only.
    let quick = std::env::var_os("WSGUARD_BENCH_QUICK").is_some();
    let (own, handshakes) = if quick {
        (Vec::new(), Vec::new())
    } else {
        own_and_handshakes(&mut b)?
    };

    println!(
        "\n{}; pinned to CPU {cpu}; {REPEAT} runs per BPF_PROG_TEST_RUN call, {ROUNDS} \
         interleaved rounds; ns per packet: median (min–max) over the rounds, from the thread's \
         CPU time",
        machine()
    );
    println!(
        "floors, every round of the table: {:.1} ns median from the thread's CPU time, {:.1} ns \
         from the kernel's own (whole-ns) duration",
        table::median(&clocks.0),
        table::median(&clocks.1)
    );
    println!("reference map REF_BANS_V4: {reference_map}");
    println!(
        "xdp-filter: program {} loaded by `xdp-filter load IFACE -m skb -f tcp,udp,ipv4,ipv6,ethernet` \
         + `xdp-filter ip -m src {}`; its maps: {}",
        b.xdp_filter.name,
        bans::BANNED,
        b.xdp_filter.maps.join("; ")
    );
    table::print_comparison(&rows);
    println!(
        "\nTargets, in work over the floor: wsguard ≤ {}× the reference on banned rows, ≤ {}× \
         on clean ones; xdp-filter ≥ {}× wsguard everywhere. \"held verdict\": a CPU judging the \
         hot banned source it dropped last, the steady state of a flood from one banned source. \
         \"lookup\": the first packet of a banned source per jiffy per CPU, and every packet when \
         many banned sources interleave on one CPU. \"proxied\": the flow of a real client \
         behind a trusted PROXY sender, whose source (the proxy) is all the reference and \
         xdp-filter look up; its data packet has the clean target, the budget of direct flows.",
        cases::BANNED_TARGET,
        cases::CLEAN_TARGET,
        table::PEER_TARGET
    );
    table::print_own(
        "Where wsguard's cost over the reference goes (informational): the reference's one \
         lookup behind wsguard's parser, next to the reference and wsguard; for the banned \
         source, the lookup path built up in steps (1) to (3), each with the duties of the one \
         above and more, then \"wsguard, lookup\", which is (3) + the drop accounting (the \
         ban's count, the CPU's hot source); the difference of two steps' work is what the added \
         duties cost",
        &parts,
    );
    table::print_own(
        "wsguard's own paths (no peer has them; informational):",
        &own,
    );
    table::print_own(
        "handshake path, one run per call, a fresh flow each (kernel ns; the floor also one run per call):",
        &handshakes,
    );
    Ok(())
}

/// wsguard's own paths (no peer has them) and the handshake path.
fn own_and_handshakes(b: &mut Bench) -> Result<(Vec<OwnRow>, Vec<OwnRow>)> {
    eprintln!("wsguard's own paths, 1M exact bans");
    let mut own = Vec::new();
    let mut c = cases::own_exact();
    c.push(cases::own_proxied_cut());
    own.extend(own_rows(&c, &b.measure(&c)?, "1M exact bans"));
    eprintln!("filling the CIDR trie with 10k prefixes");
    b.fill_cidrs(10_000)?;
    let c = cases::own_cidr();
    own.extend(own_rows(&c, &b.measure(&c)?, "1M exact + 10k CIDR bans"));
    // Last, as it empties the pre-filter.
    b.dp.clear_filter()?;
    let c = cases::own_no_filter();
    own.extend(own_rows(&c, &b.measure(&c)?, "1M exact + 10k CIDR bans"));
    eprintln!("handshake path");
    let handshakes = b.handshakes()?;
    Ok((own, handshakes))
}
