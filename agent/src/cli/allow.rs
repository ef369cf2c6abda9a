//! `wsguard allow add|rm|list`.

use std::io::Write;

use clap::{Args, Subcommand};

use super::{
    Client, Global, Output, Result,
    ban::{parse_addrs, report_removed},
    output::{JsonArray, Table, cidr_text},
};
use crate::api::{AllowAddRequest, AllowJson, RemoveRequest, RemoveResponse};

#[derive(Debug, Subcommand)]
pub enum AllowCmd {
    /// Never drop or ban this address or network; bans it overlaps are lifted.
    #[command(after_help = "Example:\n  wsguard allow add 192.0.2.0/24 --reason 'office NAT'")]
    Add(AddArgs),
    /// Remove allowlist entries added with `allow add` (built-in and config entries stay).
    #[command(after_help = "Example:\n  wsguard allow rm 192.0.2.0/24")]
    Rm(RmArgs),
    /// List the allowlist: built-in, config and manual entries.
    #[command(after_help = "Example:\n  wsguard allow list -o json")]
    List,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    #[arg(value_name = "CIDR")]
    pub cidr: String,
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[arg(required = true, value_name = "CIDR")]
    pub cidrs: Vec<String>,
    /// Exit 0 even if some of them were not on the allowlist.
    #[arg(long)]
    pub ignore_missing: bool,
}

pub fn run(cmd: AllowCmd, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    match cmd {
        AllowCmd::Add(a) => {
            let cidr = parse_addrs(std::slice::from_ref(&a.cidr))?[0];
            let req = AllowAddRequest {
                addr: cidr.to_string(),
                reason: a.reason,
            };
            let e: AllowJson = c.post("/v1/allow", &req)?;
            let mut out = std::io::stdout().lock();
            if g.output == Output::Json {
                return Ok(super::output::json(&mut out, &e)?);
            }
            writeln!(
                out,
                "allowlisted {}: {}",
                cidr_text(&e.addr, e.prefix_len),
                e.reason
            )?;
            Ok(())
        }
        AllowCmd::Rm(a) => {
            let cidrs = parse_addrs(&a.cidrs)?;
            let req = RemoveRequest {
                addrs: cidrs.iter().map(ToString::to_string).collect(),
                local: false,
            };
            let r: RemoveResponse = c.delete("/v1/allow", &req)?;
            report_removed(&r, g, "on the allowlist", a.ignore_missing)
        }
        AllowCmd::List => {
            let list: Vec<AllowJson> = c.get("/v1/allow")?;
            let mut out = std::io::stdout().lock();
            if g.output == Output::Json {
                let mut arr = JsonArray::start(&mut out)?;
                for e in &list {
                    arr.push(&mut out, e)?;
                }
                return Ok(arr.end(&mut out)?);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|e| {
                    vec![
                        cidr_text(&e.addr, e.prefix_len),
                        e.source.as_str().to_owned(),
                        e.reason.clone(),
                    ]
                })
                .collect();
            let mut t = Table::new(&["CIDR", "SOURCE", "REASON"], &[]);
            t.page(&mut out, &rows)?;
            Ok(())
        }
    }
}
