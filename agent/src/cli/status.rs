//! `wsguard status`: what is attached where, and loud warnings when protection is degraded.

use std::{io::Write, time::Duration};

use clap::Args;

use super::{
    Client, Global, Output, Result,
    output::{Table, thousands},
    term,
};
use crate::{
    api::{LogsStatusJson, MetricsSnapshot, StatusJson},
    duration,
    model::Mode,
};

/// Warn when the ban map is fuller than this (percent): new bans are refused at 100 %.
const FILL_WARN: u64 = 90;

#[derive(Debug, Args)]
pub struct StatusArgs {}

pub fn run(_a: StatusArgs, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    let s: StatusJson = c.get("/v1/status")?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        return Ok(super::output::json(&mut out, &s)?);
    }
    // The breaker state lives in the metrics snapshot; an older agent without it still gets a
    // status, just without that warning.
    let m: Option<MetricsSnapshot> = c.get("/v1/metrics").ok();
    let fill = s.ban_map.entries * 100 / s.ban_map.capacity.max(1);
    writeln!(out, "version   {}", s.version)?;
    let mode = match s.mode {
        Mode::Enforce => term::paint_stdout("enforce", term::GREEN),
        Mode::Observe => term::paint_stdout("observe (nothing is dropped)", term::YELLOW),
    };
    writeln!(out, "mode      {mode}")?;
    writeln!(
        out,
        "uptime    {}",
        duration::human(Duration::from_secs(s.uptime_s))
    )?;
    writeln!(
        out,
        "pinned    {}",
        if s.pinned {
            "yes (links survive agent restarts)"
        } else {
            "no"
        }
    )?;
    writeln!(
        out,
        "ban map   {} / {} ({fill}%)",
        thousands(s.ban_map.entries),
        thousands(s.ban_map.capacity)
    )?;
    if let Some(cs) = &s.crowdsec {
        let state = if cs.up {
            term::paint_stdout("up", term::GREEN)
        } else {
            term::paint_stdout("DOWN", term::RED)
        };
        writeln!(out, "crowdsec  {} {state}", cs.url)?;
        writeln!(
            out,
            "          {} bans from LAPI ({} decisions tracked); last pull {}",
            thousands(cs.decisions_enforced),
            thousands(cs.decisions_tracked),
            cs.last_pull.as_deref().unwrap_or("never")
        )?;
        if cs.push {
            writeln!(
                out,
                "          publishing this node's bans: last push {}, {} queued",
                cs.last_push.as_deref().unwrap_or("never"),
                thousands(cs.push_queue)
            )?;
        }
        if let Some(e) = &cs.last_error {
            writeln!(out, "          last error: {e}")?;
        }
    }
    if let Some(l) = super::proxy_status::trusted_line(&s.proxy_protocol) {
        writeln!(out, "{l}")?;
    }
    writeln!(out)?;
    let rows: Vec<Vec<String>> = s
        .interfaces
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.xdp_mode.clone(),
                i.xdp_prog_id.to_string(),
                i.tc_egress.clone(),
            ]
        })
        .collect();
    Table::new(&["INTERFACE", "XDP MODE", "XDP PROG ID", "TC EGRESS"], &[2])
        .page(&mut out, &rows)?;

    let mut warnings = Vec::new();
    for i in &s.interfaces {
        if i.xdp_mode.starts_with("netlink") {
            warnings.push(format!(
                "{}: XDP fell back to a netlink attachment ({}): this kernel has no XDP links \
                 (Linux 5.9+), so nothing is pinned; restarts find the program through netlink \
                 and swap it atomically only on Linux 5.7+",
                i.name, i.xdp_mode
            ));
        }
        if i.tc_egress == "none" {
            warnings.push(format!(
                "{}: no TC egress program: server answers (4xx, 101) are not seen",
                i.name
            ));
        }
    }
    if !s.pinned {
        warnings.push("links are not pinned: programs go away when the agent exits".into());
    }
    if m.as_ref().is_some_and(|m| m.breaker_open) {
        warnings.push(
            "circuit breaker open: a storm of distinct sources forced automatic bans into observe \
             mode"
                .into(),
        );
    }
    if fill >= FILL_WARN {
        warnings.push(format!(
            "ban map {fill}% full: at 100% new bans are refused (raise --max-bans or lift bans)"
        ));
    }
    if s.interfaces.is_empty() {
        warnings.push("no interface is protected".into());
    }
    if let Some(logs) = &s.logs {
        warnings.extend(log_warnings(logs));
    }
    if let Some(cs) = s.crowdsec.as_ref().filter(|c| !c.up) {
        warnings.push(format!(
            "CrowdSec LAPI {} is down{}: every ban stays enforced; retrying, then a full resync",
            cs.url,
            cs.down_since
                .as_deref()
                .map(|t| format!(" since {t}"))
                .unwrap_or_default()
        ));
    }
    warnings.extend(super::proxy_status::warnings(&s.proxy_protocol));
    if !warnings.is_empty() {
        writeln!(out)?;
    }
    for w in warnings {
        writeln!(
            out,
            "{}",
            term::paint_stdout(&format!("warning: {w}"), term::RED)
        )?;
    }
    Ok(())
}

/// Log sources that cannot be read, and log bans XDP has never matched (the logged address is
/// not the packet source the node sees, e.g. a client behind a load balancer).
fn log_warnings(logs: &LogsStatusJson) -> Vec<String> {
    let mut out = Vec::new();
    for src in &logs.sources {
        for f in &src.files {
            if let Some(e) = &f.error {
                out.push(format!(
                    "log source {}: {}: {e} (retried)",
                    src.name, f.path
                ));
            }
        }
    }
    if logs.bans_unmatched > 0 {
        out.push(format!(
            "{} of {} log bans never matched a packet: XDP cannot see those addresses as \
             packet sources (a load balancer in front?), so it cannot enforce them",
            logs.bans_unmatched, logs.bans
        ));
    }
    out
}
