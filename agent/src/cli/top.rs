//! `wsguard top [-n N] [--watch]`.

use std::io::Write;

use clap::Args;

use super::{
    Client, Global, Output, Result,
    output::{JsonArray, Table, thousands},
    term,
};
use crate::api::TopJson;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How many sources to show.
    #[arg(short = 'n', default_value_t = 10, value_name = "N")]
    pub n: usize,
    /// Refresh every second until Ctrl-C.
    #[arg(long, short = 'w')]
    pub watch: bool,
}

pub fn run(a: TopArgs, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    let frame = |out: &mut Vec<u8>| -> Result<()> {
        let rows: Vec<TopJson> = c.get(&format!("/v1/top?n={}", a.n))?;
        render(out, &rows, g.output)
    };
    if a.watch {
        return term::watch(frame);
    }
    let mut buf = Vec::new();
    frame(&mut buf)?;
    Ok(std::io::stdout().lock().write_all(&buf)?)
}

fn render(out: &mut Vec<u8>, rows: &[TopJson], o: Output) -> Result<()> {
    if o == Output::Json {
        let mut arr = JsonArray::start(out)?;
        for r in rows {
            arr.push(out, r)?;
        }
        return Ok(arr.end(out)?);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.addr.clone(),
                thousands(r.bad_handshakes),
                thousands(r.dropped_packets),
                if r.banned { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    let mut t = Table::new(&["ADDR", "BAD HANDSHAKES", "DROPPED", "BANNED"], &[1, 2]);
    t.page(out, &cells)?;
    if rows.is_empty() {
        writeln!(out, "(no bad handshakes or drops in the current window)")?;
    }
    Ok(())
}
