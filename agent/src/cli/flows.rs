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
    /// Only flows of this client address (behind a load balancer: the client a PROXY header
    /// named, or the load balancer itself).
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
    // Behind a load balancer the flow's judged client is the one its PROXY header named; the
    // load balancer end goes in VIA (only shown when some flow is proxied).
    let proxied = flows.iter().any(|f| f.proxy_state.is_some());
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            let (client, via) = match (&f.proxy_client, &f.proxy_state) {
                (Some(c), _) => (
                    sock(c, f.proxy_client_port.unwrap_or(0)),
                    sock(&f.client, f.client_port),
                ),
                (None, Some(state)) => (sock(&f.client, f.client_port), format!("({state})")),
                (None, None) => (sock(&f.client, f.client_port), "-".into()),
            };
            let mut row = vec![client];
            if proxied {
                row.push(via);
            }
            row.extend([
                sock(&f.server, f.server_port),
                f.verdict.clone(),
                f.reason.clone().unwrap_or_else(|| "-".into()),
                f.state.clone(),
                duration::human(Duration::from_secs(f.age_s)),
                if f.preserved { "* preserved" } else { "" }.into(),
            ]);
            row
        })
        .collect();
    let mut headers = vec!["CLIENT"];
    if proxied {
        headers.push("VIA");
    }
    headers.extend(["SERVER", "VERDICT", "REASON", "STATE", "AGE", "BAN"]);
    Table::new(&headers, &[]).page(&mut out, &rows)?;
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
