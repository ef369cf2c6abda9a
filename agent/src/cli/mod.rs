//! The operator CLI: one module per verb, talking to the agent's API over its Unix socket
//! (`client`). Exit codes are PRODUCT.md's: 0 ok, 1 runtime failure, 2 invalid usage or input,
//! 3 refused by policy. Anything invalid is caught before the agent is asked, so a bad request
//! never changes anything.

mod allow;
mod ban;
mod client;
mod detach;
mod explain;
mod export;
mod flows;
mod import;
mod output;
mod pages;
mod proxy_status;
mod stats;
mod status;
mod term;
mod top;

use std::{fmt, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};

use crate::{api::ApiError, paths};

pub use client::Client;

/// Options every operator verb takes.
#[derive(Clone, Debug, Args)]
pub struct Global {
    /// The agent's API socket.
    #[arg(long, global = true, value_name = "PATH", env = paths::SOCKET_ENV, default_value = paths::SOCKET)]
    pub socket: PathBuf,
    /// Output format of lists: aligned table, JSON (PRODUCT.md's shapes), or a wider table.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Wide,
}

/// The operator verbs (everything but `wsguard agent`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add, remove and list bans.
    #[command(subcommand)]
    Ban(ban::BanCmd),
    /// Add, remove and list allowlist entries (the allowlist always wins over bans).
    #[command(subcommand)]
    Allow(allow::AllowCmd),
    /// Packet, handshake and ban counters.
    #[command(after_help = "Example:\n  wsguard stats --watch")]
    Stats(stats::StatsArgs),
    /// Sources with the most bad handshakes and drops.
    #[command(after_help = "Example:\n  wsguard top -n 20 --watch")]
    Top(top::TopArgs),
    /// Tracked TCP flows; flows preserved through a ban of their client are marked.
    #[command(after_help = "Example:\n  wsguard flows --addr 198.51.100.7")]
    Flows(flows::FlowsArgs),
    /// Version, mode, interfaces, attach modes, program ids, pinning and map fill.
    #[command(after_help = "Example:\n  wsguard status -o json")]
    Status(status::StatusArgs),
    /// Ban every address of a file: plain lines, CSV (addr,ttl,reason), JSON (the `ban list`
    /// shape) or nginx `deny` lines. Nothing is applied if any line is bad.
    #[command(after_help = import::EXAMPLES)]
    Import(import::ImportArgs),
    /// Write every ban in a format `wsguard import` reads back.
    #[command(
        after_help = "Examples:\n  wsguard export > bans.json\n  wsguard export --format csv > bans.csv"
    )]
    Export(export::ExportArgs),
    /// Show how the data plane classifies a raw HTTP request (the kernel's own classifier).
    #[command(after_help = explain::EXAMPLES)]
    Explain(explain::ExplainArgs),
    /// Kill switch: remove wsguard's programs, links and pins from every interface; the agent
    /// exits.
    #[command(after_help = "Example:\n  wsguard detach --yes")]
    Detach(detach::DetachArgs),
}

/// A failure with its exit code; the message names the bad value and the fix.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn runtime(m: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: m.into(),
        }
    }
    pub fn usage(m: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: m.into(),
        }
    }
    pub fn refused(m: impl Into<String>) -> Self {
        Self {
            code: 3,
            message: m.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        Self {
            code: e.kind.exit_code(),
            message: e.message,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // `wsguard ban list | head`: the reader is gone, nothing went wrong.
            return Self {
                code: 0,
                message: String::new(),
            };
        }
        Self::runtime(format!("cannot write the output: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, CliError>;

/// Run one verb; errors are printed here so the exit code is the only thing `main` handles.
pub fn run(cmd: Command, g: Global) -> ExitCode {
    let r = match cmd {
        Command::Ban(c) => ban::run(c, &g),
        Command::Allow(c) => allow::run(c, &g),
        Command::Stats(a) => stats::run(a, &g),
        Command::Top(a) => top::run(a, &g),
        Command::Flows(a) => flows::run(a, &g),
        Command::Status(a) => status::run(a, &g),
        Command::Import(a) => import::run(a, &g),
        Command::Export(a) => export::run(a, &g),
        Command::Explain(a) => explain::run(a, &g),
        Command::Detach(a) => detach::run(a, &g),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.code == 0 => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", term::paint_stderr("error", term::RED));
            ExitCode::from(e.code)
        }
    }
}
