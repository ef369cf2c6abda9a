//! `wsguard export`: every ban in a format `import` reads back. JSON (the `ban list` shape, the
//! default) keeps everything, so export then import is lossless; CSV keeps address, TTL left and
//! reason; lines keep addresses only.

use std::io::Write;

use clap::Args;
use time::OffsetDateTime;

use super::{
    Client, Global, Result,
    import::{Format, csv_quote},
    output::{cidr_text, secs_left},
    pages::{for_each_page, json_pages},
};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format (json, the default, is the lossless one).
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
}

pub fn run(a: ExportArgs, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match a.format {
        Format::Json => json_pages(&c, None, &mut out)?,
        Format::Csv => {
            let mut header = true;
            for_each_page(&c, None, |page| {
                if std::mem::take(&mut header) {
                    writeln!(out, "addr,ttl,reason")?;
                }
                let now = OffsetDateTime::now_utc();
                for b in page {
                    let ttl = match (&b.expires_at, secs_left(b.expires_at.as_deref(), now)) {
                        (None, _) => "permanent".to_owned(),
                        // Expiring as we speak: keep it for the shortest TTL rather than drop it.
                        (Some(_), s) => format!("{}s", s.unwrap_or(1).max(1)),
                    };
                    writeln!(
                        out,
                        "{},{ttl},{}",
                        cidr_text(&b.addr, b.prefix_len),
                        csv_quote(&b.reason)
                    )?;
                }
                Ok(())
            })?;
        }
        Format::Lines => {
            for_each_page(&c, None, |page| {
                for b in page {
                    writeln!(out, "{}", cidr_text(&b.addr, b.prefix_len))?;
                }
                Ok(())
            })?;
        }
    }
    Ok(out.flush()?)
}
