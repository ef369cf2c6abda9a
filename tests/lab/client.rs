//! The lab's clients: legitimate WebSocket users, attackers sending bad handshakes of one kind,
//! a generator of every valid spelling of a handshake, and a SYN flood. Every run is bounded
//! in time and count, every socket has a timeout, and the last line on stdout is a JSON summary
//! (`wsguard_tests::lab::summary`). SIGTERM or SIGINT end a run early, summary included.

#[path = "client/attack.rs"]
mod attack;
#[path = "client/legit.rs"]
mod legit;
#[path = "client/net.rs"]
mod net;
#[path = "client/spellings.rs"]
mod spellings;
#[path = "client/synflood.rs"]
mod synflood;

use clap::{Parser, Subcommand, ValueEnum};
use std::{net::IpAddr, net::SocketAddr, time::Duration};
use wsguard_tests::lab::http::parse_duration;

#[derive(Parser)]
#[command(about = "Legitimate WebSocket clients and attackers for the wsguard lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N WebSockets held open, each exchanging a message every interval.
    Legit(LegitArgs),
    /// Raw handshakes of one kind at a rate.
    Attack(AttackArgs),
    /// Valid handshakes in every allowed spelling; all must get 101.
    Spellings(SpellingsArgs),
    /// SYNs from non-blocking connects that are never completed by the client.
    Synflood(SynfloodArgs),
}

#[derive(clap::Args, Clone)]
pub struct LegitArgs {
    /// ws://HOST[:PORT]/PATH
    #[arg(long)]
    pub target: String,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub interval: Duration,
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// Source address of every connection.
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// How long an echo, a connect or a handshake may take before it counts as failed.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Pause before reconnecting after a refused handshake or a disconnect.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub backoff: Duration,
    /// Also print a progress summary (`"final": false`) this often.
    #[arg(long, value_parser = parse_duration)]
    pub report_every: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
#[value(rename_all = "snake_case")]
pub enum Reason {
    NoUpgrade,
    NoConnectionUpgrade,
    NoKey,
    BadVersion,
    BadMethod,
    Valid,
}

#[derive(clap::Args, Clone)]
pub struct AttackArgs {
    /// HOST:PORT
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, value_enum)]
    pub reason: Reason,
    /// Connections per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many connections even if time is left.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, default_value = "/ws")]
    pub path: String,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Connect and answer timeout.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long, value_parser = parse_duration)]
    pub report_every: Option<Duration>,
    /// Begin every connection with a PROXY protocol header of this version, as a load
    /// balancer would (to play an untrusted "proxy").
    #[arg(long, value_enum)]
    pub proxy_header: Option<ProxyVersion>,
    /// The client the PROXY header names; default: the --bind address.
    #[arg(long)]
    pub proxy_claim: Option<IpAddr>,
    /// Send the PROXY header in a TCP segment of its own, before the request.
    #[arg(long)]
    pub proxy_split: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(clap::Args, Clone)]
pub struct SpellingsArgs {
    /// HOST:PORT
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 2000)]
    pub count: u64,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value = "/ws")]
    pub path: String,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Pause between the segments of a split request.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub split_delay: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Upper bound of the whole run.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub duration: Duration,
}

#[derive(clap::Args, Clone)]
pub struct SynfloodArgs {
    /// HOST:PORT
    #[arg(long)]
    pub target: SocketAddr,
    /// SYNs per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long)]
    pub bind: Option<IpAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stop = net::stop_on_signal();
    let json = match Cli::parse().cmd {
        Cmd::Legit(a) => serde_json::to_string(&legit::run(a, stop).await?)?,
        Cmd::Attack(a) => serde_json::to_string(&attack::run(a, stop).await?)?,
        Cmd::Spellings(a) => serde_json::to_string(&spellings::run(a, stop).await?)?,
        Cmd::Synflood(a) => serde_json::to_string(&synflood::run(a, stop).await?)?,
    };
    println!("{json}");
    Ok(())
}
