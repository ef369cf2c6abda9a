//! `wsguard-lab demo`: the incident, live, in about a minute. Builds the lab (nginx and the echo
//! backend on a node, legitimate WebSocket users and an attacker in namespaces of their own),
//! starts wsguard on its embedded defaults, runs the attack and narrates what happens, then
//! prints the operator's view and tears everything down. `cargo xtask demo` runs it.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use std::time::{Duration, Instant};
use wsguard_tests::lab::{
    Bins, Lab,
    expect::{legit_peers, start_legit},
    proc::Proc,
    summary::{AttackSummary, LegitSummary, SynfloodSummary},
    topology::PeerSpec,
};

#[derive(Parser)]
#[command(about = "The wsguard lab: namespaces, nginx, WebSocket clients and attackers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the incident scenario with wsguard and narrate it (as root).
    Demo {
        /// Seconds of attack before the banned attacker switches to a SYN flood.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=600))]
        attack_secs: u64,
    },
}

const LEGIT_PEERS: usize = 5;
const PER_PEER: u32 = 2;
const CALM: Duration = Duration::from_secs(5);
const FLOOD: Duration = Duration::from_secs(6);

fn main() -> Result<()> {
    let Cmd::Demo { attack_secs } = Cli::parse().cmd;
    anyhow::ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the demo creates network namespaces and loads eBPF programs: run it as root"
    );
    let bins = Bins::siblings()?;
    say("building the lab");
    let mut specs = legit_peers(LEGIT_PEERS);
    specs.push(PeerSpec::new("attacker"));
    let mut lab = Lab::start(bins, &specs)?;
    let r = run(&mut lab, Duration::from_secs(attack_secs));
    if r.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    say("tearing down: agent, nginx, backend, clients, namespaces, pins");
    drop(lab);
    r?;
    say("done: nothing is left running");
    Ok(())
}

fn say(s: &str) {
    println!("\n== {s}");
}

fn run(lab: &mut Lab, attack_for: Duration) -> Result<()> {
    let node = lab.topo.node_ip4;
    let attacker = lab.peer("attacker").ip4;
    println!("   node {node}: nginx (like ingress-nginx) -> WebSocket echo backend");
    for p in &lab.topo.peers {
        println!("   {:<9} {}  ({})", p.name, p.ip4, p.ip6);
    }
    say(
        "starting wsguard on the node's NIC (embedded defaults: 20 bad handshakes in 10s ban for 10m)",
    );
    lab.start_agent(&[])?;
    show(lab, &["status"])?;

    let total = CALM + attack_for + FLOOD + Duration::from_secs(3);
    let users = LEGIT_PEERS as u32 * PER_PEER;
    say(&format!(
        "{users} legitimate users open WebSockets and send a message every 100ms"
    ));
    let legit = start_legit(lab, false, PER_PEER, &format!("{}s", total.as_secs()))?;
    watch(lab, &legit, None, CALM)?;

    say(&format!(
        "attack: {attacker} sends WebSocket handshakes without an Upgrade header, 50 per second \
         (the backend logs \"invalid Upgrade header: null\" and answers 400)"
    ));
    let secs = format!("{}s", attack_for.as_secs());
    let attack = lab.attack("attacker", false, "no_upgrade", 50, &secs, "/ws")?;
    watch(lab, &legit, Some(&attack), attack_for)?;
    let a: AttackSummary = attack.finish(Duration::from_secs(30))?;
    println!(
        "   attacker: {} attempts, {} answered by nginx, {} never got past the NIC",
        a.attempts,
        a.statuses.values().sum::<u64>(),
        a.timed_out
    );

    say(&format!(
        "the banned attacker switches to a SYN flood, 2000 per second, for {}s",
        FLOOD.as_secs()
    ));
    let before = stat(lab, "packets", "dropped");
    let flood = lab.synflood("attacker", false, 2000, &format!("{}s", FLOOD.as_secs()))?;
    watch(lab, &legit, None, FLOOD)?;
    let f: SynfloodSummary = flood.finish(Duration::from_secs(30))?;
    println!(
        "   {} SYNs sent, {} answered; wsguard dropped {} packets in XDP meanwhile",
        f.syns,
        f.established,
        stat(lab, "packets", "dropped").saturating_sub(before)
    );

    say("legitimate users, final count");
    for p in legit {
        let name = p.name.trim_end_matches("-legit").to_owned();
        let s: LegitSummary = p.stop(Duration::from_secs(30))?;
        println!(
            "   {name:<9} {} WebSockets, {} messages echoed, {} failed, {} disconnects",
            s.connections, s.messages_ok, s.failures, s.disconnects
        );
    }
    say("what an operator sees");
    for args in [&["status"][..], &["ban", "list"], &["stats"]] {
        show(lab, args)?;
    }
    Ok(())
}

/// Print one line a second for `d`: legitimate traffic, the attacker, the kernel's counters,
/// and the ban the moment it appears.
fn watch(lab: &mut Lab, legit: &[Proc], attack: Option<&Proc>, d: Duration) -> Result<()> {
    let start = Instant::now();
    let mut banned = false;
    while start.elapsed() < d {
        std::thread::sleep(Duration::from_secs(1));
        let mut l = LegitSummary::default();
        for p in legit {
            let s: LegitSummary = p.last_json().unwrap_or_default();
            l.messages_ok += s.messages_ok;
            l.failures += s.failures;
            l.disconnects += s.disconnects;
        }
        let mut line = format!(
            "   legit: {:>6} echoes, {} failures, {} disconnects",
            l.messages_ok, l.failures, l.disconnects
        );
        if let Some(a) = attack {
            let s: AttackSummary = a.last_json().unwrap_or_default();
            let answered: u64 = s.statuses.values().sum();
            line.push_str(&format!(
                " | attacker: {answered:>4} answered, {:>4} blocked",
                s.timed_out
            ));
        }
        line.push_str(&format!(
            " | kernel: {} bad handshakes, {} dropped",
            stat(lab, "handshakes", "bad"),
            stat(lab, "packets", "dropped")
        ));
        println!("{line}");
        if attack.is_some() && !banned {
            let addr = lab.peer("attacker").ip4.to_string();
            if let Some(b) = lab.agent().ban_of(&addr).ok().flatten() {
                banned = true;
                println!(
                    "   >>> BANNED {addr} by the {} detector: {} (until {})",
                    b["source"].as_str().unwrap_or("?"),
                    b["reason"].as_str().unwrap_or("?"),
                    b["expires_at"].as_str().unwrap_or("never")
                );
            }
        }
    }
    Ok(())
}

fn stat(lab: &mut Lab, group: &str, name: &str) -> u64 {
    lab.agent().stat(group, name).unwrap_or(0)
}

/// `wsguard ARGS…` as an operator would type it, with its table output.
fn show(lab: &mut Lab, args: &[&str]) -> Result<()> {
    println!("\n$ wsguard {}", args.join(" "));
    let out = lab.agent().cli(args)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(anyhow::anyhow!(
            "wsguard {} failed ({})",
            args.join(" "),
            out.status
        ))
        .context("the wsguard CLI");
    }
    Ok(())
}
