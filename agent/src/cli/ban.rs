//! `wsguard ban add|rm|list`.

use std::io::Write;

use clap::{Args, Subcommand};
use time::OffsetDateTime;

use super::{
    CliError, Client, Global, Output, Result,
    output::{Table, age, cidr_text, thousands, ttl_left},
    pages::{for_each_page, json_pages},
};
use crate::{
    addr::Cidr,
    api::{BanAddRequest, BanJson, RemoveRequest, RemoveResponse},
    duration,
    model::{BanSource, Mode},
};

#[derive(Debug, Subcommand)]
pub enum BanCmd {
    /// Ban one or more addresses or CIDRs (allowlisted addresses and /0 are refused).
    #[command(
        after_help = "Examples:\n  wsguard ban add 198.51.100.7 --ttl 1h --reason 'handshake flood'\n  \
                            wsguard ban add 203.0.113.0/24 2001:db8::/64 --permanent --hard"
    )]
    Add(AddArgs),
    /// Lift bans.
    #[command(
        after_help = "Example:\n  wsguard ban rm 198.51.100.7 203.0.113.0/24 --ignore-missing"
    )]
    Rm(RmArgs),
    /// List bans, with TTLs left and packets dropped.
    #[command(
        after_help = "Examples:\n  wsguard ban list --source kernel\n  wsguard ban list -o json"
    )]
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Addresses or CIDRs, e.g. 198.51.100.7 203.0.113.0/24 2001:db8::/64.
    #[arg(required = true, value_name = "ADDR")]
    pub addrs: Vec<String>,
    /// How long the ban lasts (500ms, 30s, 10m, 1h, 1d); default: the agent's ban_ttl.
    #[arg(long, value_name = "DUR", conflicts_with = "permanent")]
    pub ttl: Option<String>,
    /// Never expires.
    #[arg(long)]
    pub permanent: bool,
    /// Why (shown in `ban list` and the audit log).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Count would-be drops but drop nothing.
    #[arg(long)]
    pub observe: bool,
    /// Also drop flows established before the ban (otherwise they are preserved).
    #[arg(long)]
    pub hard: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[arg(required = true, value_name = "ADDR")]
    pub addrs: Vec<String>,
    /// Exit 0 even if some of the addresses were not banned.
    #[arg(long)]
    pub ignore_missing: bool,
    /// With CrowdSec LAPI: lift the ban on this node only; LAPI's decision stays (and so do
    /// the other nodes' bans). Without it the decision is deleted in LAPI too.
    #[arg(long)]
    pub local: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only bans from this source.
    #[arg(long, value_enum, value_name = "SOURCE")]
    pub source: Option<BanSource>,
}

pub fn run(cmd: BanCmd, g: &Global) -> Result<()> {
    match cmd {
        BanCmd::Add(a) => add(a, g),
        BanCmd::Rm(a) => rm(a, g),
        BanCmd::List(a) => list(a, g),
    }
}

/// Parse every address up front; the error lists every bad one. `/0` is refused (exit 3).
pub fn parse_addrs(addrs: &[String]) -> Result<Vec<Cidr>> {
    let mut bad = Vec::new();
    let mut out = Vec::new();
    for a in addrs {
        match a.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => bad.push(e.to_string()),
        }
    }
    if !bad.is_empty() {
        return Err(CliError::usage(bad.join("\n  ")));
    }
    Ok(out)
}

/// A TTL flag: a duration of at least one second.
pub fn parse_ttl(flag: &str, s: &str) -> Result<u64> {
    let d = duration::parse(s).map_err(|e| CliError::usage(format!("{flag}: {e}")))?;
    if d.as_secs() == 0 {
        return Err(CliError::usage(format!(
            "{flag}: {s:?} is shorter than a second; give at least 1s, or --permanent"
        )));
    }
    Ok(d.as_secs())
}

fn refuse_everything(cidrs: &[Cidr]) -> Result<()> {
    if let Some(c) = cidrs.iter().find(|c| c.is_everything()) {
        return Err(CliError::refused(format!(
            "refusing to ban {c}: that is every address; ban a narrower prefix"
        )));
    }
    Ok(())
}

fn add(a: AddArgs, g: &Global) -> Result<()> {
    let cidrs = parse_addrs(&a.addrs)?;
    refuse_everything(&cidrs)?;
    let ttl_s = a
        .ttl
        .as_deref()
        .map(|t| parse_ttl("--ttl", t))
        .transpose()?;
    let req = BanAddRequest {
        addrs: cidrs.iter().map(ToString::to_string).collect(),
        ttl_s,
        permanent: a.permanent,
        reason: a.reason,
        observe: a.observe,
        hard: a.hard,
    };
    let bans: Vec<BanJson> = Client::new(&g.socket).post("/v1/bans", &req)?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        return Ok(super::output::json(&mut out, &bans)?);
    }
    let now = OffsetDateTime::now_utc();
    for b in &bans {
        let mode = if b.mode == Mode::Observe {
            ", observe only"
        } else {
            ""
        };
        let hard = if b.hard { ", hard" } else { "" };
        writeln!(
            out,
            "banned {} ({}{mode}{hard}): {}",
            cidr_text(&b.addr, b.prefix_len),
            ttl_left(b.expires_at.as_deref(), now),
            b.reason
        )?;
    }
    Ok(())
}

fn rm(a: RmArgs, g: &Global) -> Result<()> {
    let cidrs = parse_addrs(&a.addrs)?;
    let req = RemoveRequest {
        addrs: cidrs.iter().map(ToString::to_string).collect(),
        local: a.local,
    };
    let r: RemoveResponse = Client::new(&g.socket).delete("/v1/bans", &req)?;
    let res = report_removed(&r, g, "banned", a.ignore_missing);
    if g.output != Output::Json {
        let mut out = std::io::stdout().lock();
        for (addr, n) in &r.lapi_deleted {
            writeln!(
                out,
                "deleted {addr} in CrowdSec LAPI ({n} decision{}): lifted on every node",
                if *n == 1 { "" } else { "s" }
            )?;
        }
        for addr in &r.lapi_queued {
            writeln!(
                out,
                "CrowdSec LAPI unreachable: deleting {addr} there is queued and retried"
            )?;
        }
        for addr in &r.lapi_kept {
            let why = if a.local {
                "--local"
            } else {
                "no machine credentials in [crowdsec]"
            };
            writeln!(
                out,
                "{addr} lifted on this node only ({why}): CrowdSec LAPI still holds its decision"
            )?;
        }
    }
    res
}

/// Print what was removed and what was not there; missing entries fail unless ignored.
pub fn report_removed(r: &RemoveResponse, g: &Global, what: &str, ignore: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        super::output::json(&mut out, r)?;
    } else {
        for a in &r.removed {
            writeln!(out, "removed {a}")?;
        }
    }
    if r.missing.is_empty() {
        return Ok(());
    }
    let list = r.missing.join(", ");
    if ignore {
        if g.output != Output::Json {
            writeln!(out, "not {what} (ignored): {list}")?;
        }
        return Ok(());
    }
    Err(CliError::runtime(format!(
        "not {what}: {list} (pass --ignore-missing to accept that)"
    )))
}

fn list(a: ListArgs, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match g.output {
        Output::Json => json_pages(&c, a.source, &mut out)?,
        o => {
            let wide = o == Output::Wide;
            let (headers, right): (&[&str], &[usize]) = if wide {
                (
                    &[
                        "ADDR", "SOURCE", "MODE", "HARD", "TTL", "DROPPED", "OFFENSES", "CREATED",
                        "EXPIRES", "REASON",
                    ],
                    &[5, 6],
                )
            } else {
                (
                    &["ADDR", "SOURCE", "MODE", "TTL", "DROPPED", "REASON"],
                    &[4],
                )
            };
            let mut t = Table::new(headers, right);
            let mut n = 0u64;
            for_each_page(&c, a.source, |page| {
                let now = OffsetDateTime::now_utc();
                let rows: Vec<Vec<String>> = page.iter().map(|b| row(b, wide, now)).collect();
                n += rows.len() as u64;
                t.page(&mut out, &rows)?;
                out.flush()?;
                Ok(())
            })?;
            t.finish(&mut out)?;
            if n == 0 {
                writeln!(out, "(no bans)")?;
            }
        }
    }
    Ok(out.flush()?)
}

fn row(b: &BanJson, wide: bool, now: OffsetDateTime) -> Vec<String> {
    let addr = cidr_text(&b.addr, b.prefix_len);
    let ttl = ttl_left(b.expires_at.as_deref(), now);
    let drops = thousands(b.dropped_packets);
    let (source, mode) = (b.source.as_str().to_owned(), b.mode.as_str().to_owned());
    if wide {
        vec![
            addr,
            source,
            mode,
            if b.hard { "yes" } else { "no" }.into(),
            ttl,
            drops,
            thousands(u64::from(b.offenses)),
            age(&b.created_at, now),
            b.expires_at.clone().unwrap_or_else(|| "never".into()),
            b.reason.clone(),
        ]
    } else {
        vec![addr, source, mode, ttl, drops, b.reason.clone()]
    }
}
