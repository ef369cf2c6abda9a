//! `wsguard stats [--watch]`.

use std::io::Write;

use clap::Args;

use super::{
    Client, Global, Output, Result,
    output::{Table, thousands},
    term,
};
use crate::api::StatsJson;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Refresh every second until Ctrl-C.
    #[arg(long, short = 'w')]
    pub watch: bool,
}

pub fn run(a: StatsArgs, g: &Global) -> Result<()> {
    let c = Client::new(&g.socket);
    let frame = |out: &mut Vec<u8>| -> Result<()> {
        let s: StatsJson = c.get("/v1/stats")?;
        render(out, &s, g.output)
    };
    if a.watch {
        return term::watch(frame);
    }
    let mut buf = Vec::new();
    frame(&mut buf)?;
    Ok(std::io::stdout().lock().write_all(&buf)?)
}

fn render(out: &mut Vec<u8>, s: &StatsJson, o: Output) -> Result<()> {
    if o == Output::Json {
        if term::stdout_is_tty() {
            super::output::json(out, s)?;
        } else {
            // One document per line, so `--watch -o json` is a stream a program can read.
            serde_json::to_writer(&mut *out, s).map_err(std::io::Error::from)?;
            out.push(b'\n');
        }
        return Ok(());
    }
    let (p, h, r, b) = (&s.packets, &s.handshakes, &s.bad_reasons, &s.bans);
    let groups: [(&str, Vec<(&str, u64)>); 4] = [
        ("packets", p.items().to_vec()),
        ("handshakes", h.items().to_vec()),
        ("bad_reasons", r.items().to_vec()),
        (
            "bans",
            vec![
                ("active", b.active),
                ("created", b.created),
                ("expired", b.expired),
                ("refused", b.refused),
                ("capacity", b.capacity),
            ],
        ),
    ];
    let mut rows = Vec::new();
    let proxy = s
        .proxy_headers
        .versions()
        .map(|(v, r)| (format!("proxy_headers.{v}"), r.items().to_vec()));
    let groups = groups
        .into_iter()
        .map(|(g, i)| (g.to_owned(), i))
        .chain(proxy);
    for (group, items) in groups {
        for (name, n) in items {
            rows.push(vec![group.to_owned(), name.to_owned(), thousands(n)]);
        }
    }
    rows.push(vec![
        "events".into(),
        "lost".into(),
        thousands(s.events_lost),
    ]);
    let mut t = Table::new(&["GROUP", "COUNTER", "VALUE"], &[2]);
    t.page(out, &rows)?;
    if s.events_lost > 0 {
        writeln!(
            out,
            "{}",
            term::paint_stdout(
                "warning: burst events were lost (ring buffer full); some bursts were not banned",
                term::YELLOW
            )
        )?;
    }
    Ok(())
}
