//! `wsguard flows [--addr IP]`.

use std::{io::Write, net::IpAddr, time::Duration};

use clap::Args;

use super::{
    CliError, Client, Global, Output, Result,
    client::query_value,
    output::{JsonArray, Table},
};
use crate::{api::FlowJson, duration};

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Only flows of this client address.
    #[arg(long, value_name = "IP")]
    pub addr: Option<String>,
}

pub fn run(a: FlowsArgs, g: &Global) -> Result<()> {
    let mut path = "/v1/flows".to_owned();
    if let Some(s) = &a.addr {
        let ip: IpAddr = s.trim().parse().map_err(|_| {
            CliError::usage(format!(
                "invalid address {s:?}: expected an IPv4 or IPv6 address, e.g. 198.51.100.7"
            ))
        })?;
        path.push_str(&format!("?addr={}", query_value(&ip.to_string())));
    }
    let flows: Vec<FlowJson> = Client::new(&g.socket).get(&path)?;
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        let mut arr = JsonArray::start(&mut out)?;
        for f in &flows {
            arr.push(&mut out, f)?;
        }
        return Ok(arr.end(&mut out)?);
    }
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            vec![
                sock(&f.client, f.client_port),
                sock(&f.server, f.server_port),
                f.verdict.clone(),
                f.reason.clone().unwrap_or_else(|| "-".into()),
                f.state.clone(),
                duration::human(Duration::from_secs(f.age_s)),
                if f.preserved { "* preserved" } else { "" }.into(),
            ]
        })
        .collect();
    let headers = &[
        "CLIENT", "SERVER", "VERDICT", "REASON", "STATE", "AGE", "BAN",
    ];
    Table::new(headers, &[]).page(&mut out, &rows)?;
    if flows.is_empty() {
        writeln!(out, "(no tracked flows)")?;
    }
    Ok(())
}

fn sock(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}
