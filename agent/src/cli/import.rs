//! `wsguard import FILE|-`: validate everything, then apply in batches.

mod formats;
mod wire;

use std::{
    io::{Read, Write},
    sync::mpsc,
};

use clap::Args;

pub use formats::{Format, csv_quote};

use super::{
    CliError, Client, Global, Output, Result, ban::parse_ttl, output::thousands,
    pages::for_each_page, term,
};
use crate::{
    addr::Cidr,
    api::{AllowJson, ImportResponse, StatusJson},
};

pub const EXAMPLES: &str = "Examples:\n  \
    wsguard import blocklist.txt --ttl 1d --reason 'WAF migration'\n  \
    wsguard import bans.csv                # addr,ttl,reason per line\n  \
    wsguard import /etc/nginx/conf.d/deny.conf\n  \
    wsguard export --format json | ssh other-node wsguard import -";

/// Entries per API request: each is one batch of kernel map updates in the agent.
const BATCH: usize = 10_000;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to read, or `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: String,
    /// Input format; default: detected (a JSON array, CSV with commas, else lines).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// TTL of entries that carry none (default: the agent's ban_ttl).
    #[arg(long, value_name = "DUR")]
    pub ttl: Option<String>,
    /// Reason of entries that carry none.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

pub fn run(a: ImportArgs, g: &Global) -> Result<()> {
    let defaults = formats::Defaults {
        ttl_s: a
            .ttl
            .as_deref()
            .map(|t| parse_ttl("--ttl", t))
            .transpose()?,
        reason: a.reason.clone(),
    };
    let text = read_input(&a.file)?;
    let format = a.format.unwrap_or_else(|| formats::detect(&text));
    let parsed = formats::parse(&text, format, &defaults);
    drop(text);
    let parsed = parsed.map_err(|bad| {
        CliError::usage(format!(
            "{}: {} bad {}, nothing imported:\n  {}",
            a.file,
            bad.len(),
            if bad.len() == 1 { "entry" } else { "entries" },
            bad.join("\n  ")
        ))
    })?;
    let refused: Vec<String> = parsed
        .entries
        .iter()
        .filter(|p| p.cidr.is_everything())
        .map(|p| format!("{}: {} is every address", p.at, p.cidr))
        .collect();
    refuse(&a.file, refused)?;
    let c = Client::new(&g.socket);
    // The agent refuses allowlisted entries batch by batch; checking the whole file first keeps
    // a refusal in a late batch from leaving the early ones applied.
    let allow: Vec<AllowJson> = c.get("/v1/allow")?;
    let allow: Vec<(Cidr, &AllowJson)> = allow
        .iter()
        .filter_map(|e| {
            format!("{}/{}", e.addr, e.prefix_len)
                .parse::<Cidr>()
                .ok()
                .map(|c| (c, e))
        })
        .collect();
    let refused: Vec<String> = parsed
        .entries
        .iter()
        .filter_map(|p| {
            allow
                .iter()
                .find(|(c, _)| c.overlaps(&p.cidr))
                .map(|(c, e)| {
                    format!(
                        "{}: {} overlaps allowlisted {c} ({}: {})",
                        p.at,
                        p.cidr,
                        e.source.as_str(),
                        e.reason
                    )
                })
        })
        .collect();
    refuse(&a.file, refused)?;
    check_room(&c, &a.file, &parsed.entries)?;

    let done = send(&c, &parsed)?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        let v = serde_json::json!({"imported": done, "skipped": parsed.skipped.len()});
        return Ok(super::output::json(&mut out, &v)?);
    }
    writeln!(out, "imported {} bans from {}", thousands(done), a.file)?;
    if !parsed.skipped.is_empty() {
        writeln!(
            out,
            "skipped {} lines: {}",
            thousands(parsed.skipped.len() as u64),
            summary(&parsed.skipped)
        )?;
    }
    Ok(())
}

/// A full ban map refuses new bans; find out before the first batch rather than halfway.
fn check_room(c: &Client, file: &str, entries: &[formats::Parsed]) -> Result<()> {
    let st: StatusJson = c.get("/v1/status")?;
    let room = st.ban_map.capacity.saturating_sub(st.ban_map.entries);
    if entries.len() as u64 <= room {
        return Ok(());
    }
    // Sorted rather than hashed: 20 bytes an address, gone when this returns.
    let mut unique: Vec<Cidr> = entries.iter().map(|p| p.cidr).collect();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() as u64 <= room {
        return Ok(());
    }
    // Re-banning what is banned takes no room: count only the new ones.
    let mut banned = vec![false; unique.len()];
    for_each_page(c, None, |page| {
        for b in page {
            if let Ok(cidr) = format!("{}/{}", b.addr, b.prefix_len).parse::<Cidr>()
                && let Ok(i) = unique.binary_search(&cidr)
            {
                banned[i] = true;
            }
        }
        Ok(())
    })?;
    let new = banned.iter().filter(|b| !**b).count() as u64;
    if new <= room {
        return Ok(());
    }
    Err(CliError::refused(format!(
        "{file}: {} new bans do not fit: the ban map holds {} of {}; nothing imported (raise the \
         agent's --max-bans, or lift bans first)",
        thousands(new),
        thousands(st.ban_map.entries),
        thousands(st.ban_map.capacity)
    )))
}

/// Post the entries in batches of [`BATCH`], in file order. The next batch is encoded while
/// the agent applies the last one; returns how many the agent imported.
fn send(c: &Client, parsed: &formats::Outcome) -> Result<u64> {
    let total = parsed.entries.len() as u64;
    let progress = term::stderr_is_tty() && total > BATCH as u64;
    let done = std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(1);
        let poster = s.spawn(move || -> Result<u64> {
            let mut done = 0u64;
            for body in rx {
                let r: ImportResponse = c.post_json("/v1/import", body).map_err(|e| {
                    if done == 0 {
                        return e;
                    }
                    CliError {
                        code: e.code,
                        message: format!(
                            "{} (the first {} entries were already imported)",
                            e.message,
                            thousands(done)
                        ),
                    }
                })?;
                done += r.imported;
                if progress {
                    eprint!("\rimporting: {} / {}", thousands(done), thousands(total));
                }
            }
            Ok(done)
        });
        for batch in parsed.entries.chunks(BATCH) {
            let body = wire::body(parsed, batch, time::OffsetDateTime::now_utc())
                .map_err(|e| CliError::runtime(format!("cannot encode the request: {e}")))?;
            // Closed: the poster failed, and says why below.
            if tx.send(body).is_err() {
                break;
            }
        }
        drop(tx);
        poster
            .join()
            .unwrap_or_else(|_| Err(CliError::runtime("the import sender panicked")))
    });
    if progress {
        eprintln!();
    }
    done
}

fn refuse(file: &str, refused: Vec<String>) -> Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    Err(CliError::refused(format!(
        "{file}: {} entries refused by policy, nothing imported:\n  {}",
        refused.len(),
        refused.join("\n  ")
    )))
}

fn summary(items: &[String]) -> String {
    const SHOW: usize = 5;
    let mut s = items
        .iter()
        .take(SHOW)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOW {
        s.push_str(&format!("; and {} more", items.len() - SHOW));
    }
    s
}

fn read_input(file: &str) -> Result<String> {
    let mut buf = Vec::new();
    if file == "-" {
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::runtime(format!("cannot read standard input: {e}")))?;
    } else {
        buf = std::fs::read(file)
            .map_err(|e| CliError::usage(format!("cannot read {file:?}: {e}")))?;
    }
    String::from_utf8(buf).map_err(|e| {
        CliError::usage(format!(
            "{file}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}
