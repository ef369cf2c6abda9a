//! `wsguard explain FILE|-`: the data plane's own classifier (`wsguard_common::http`, the very
//! code the XDP program runs) applied to a raw request, with the reason in words. A leading
//! PROXY v1/v2 header is read by the data plane's own parser (`wsguard_common::proxy`): the
//! client it names is printed, and the request after it is judged.

use std::io::{Read, Write};

use clap::Args;
use serde::Serialize;
use wsguard_common::{
    BadReason, Verdict,
    http::classify,
    maps::{CFG_PATH_SCOPE, Config, MAX_INSPECT, MAX_PATHS, PATH_LEN},
    proxy::{self, Header},
};

use super::{CliError, Global, Output, Result};

pub const EXAMPLES: &str = "Examples:\n  \
    printf 'GET /ws HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | wsguard explain -\n  \
    printf 'PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\\r\\nGET /ws HTTP/1.1\\r\\n\\r\\n' | wsguard explain -\n  \
    wsguard explain request.txt --ws-path /socket";

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A file holding the raw request bytes, or `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: String,
    /// WebSocket path prefix in scope (repeatable), as the agent's --ws-path; default: every
    /// path.
    #[arg(long, value_name = "PREFIX")]
    pub ws_path: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Explained {
    /// A leading PROXY protocol header; `null` when the input starts with anything else.
    proxy: Option<ProxyExplained>,
    verdict: &'static str,
    reason: Option<&'static str>,
    /// Whether it counts towards a ban of the client.
    counts_against_client: bool,
    path: String,
    inspected_bytes: usize,
    total_bytes: usize,
    why: String,
}

#[derive(Debug, Serialize)]
struct ProxyExplained {
    /// `v1` or `v2`.
    version: &'static str,
    /// `client` (names one), `local` (the proxy's own connection) or `malformed`.
    header: &'static str,
    /// The client a valid header names (IPv4 unmapped), with its port.
    client: Option<String>,
    client_port: Option<u16>,
    /// Its length: the request starts right after it. `null` when malformed.
    header_bytes: Option<u16>,
    why: String,
}

pub fn run(a: ExplainArgs, g: &Global) -> Result<()> {
    let bytes = read_input(&a.file)?;
    let cfg = scope(&a.ws_path)?;
    let header = proxy::parse(&bytes);
    // What follows a valid header is the request the data plane judges; a malformed header is
    // never judged from a trusted sender, and from anyone else its bytes are the request.
    let (proxied, request) = match header.header_len() {
        Some(n) => (true, bytes.get(usize::from(n)..).unwrap_or_default()),
        None => (false, &bytes[..]),
    };
    let c = classify(request, &cfg);
    let mut probe = wsguard_common::http::Classifier::new();
    for &b in request.iter().take(MAX_INSPECT) {
        if probe.step(b) {
            break;
        }
    }
    let counted = c.verdict == Verdict::Bad
        && !matches!(header, Header::Local { .. } | Header::Malformed { .. });
    let e = Explained {
        proxy: explain_proxy(&header),
        verdict: c.verdict.as_str(),
        reason: c.reason.map(BadReason::as_str),
        counts_against_client: counted,
        path: String::from_utf8_lossy(probe.path()).into_owned(),
        inspected_bytes: request.len().min(MAX_INSPECT),
        total_bytes: request.len(),
        why: why(c.verdict, c.reason, !a.ws_path.is_empty()),
    };
    let mut out = std::io::stdout().lock();
    if g.output == Output::Json {
        return Ok(super::output::json(&mut out, &e)?);
    }
    if let Some(p) = &e.proxy {
        let what = match (&p.client, p.client_port, p.header_bytes) {
            (Some(c), Some(port), Some(n)) => {
                format!(
                    "{} header ({n} bytes) naming client {}",
                    p.version,
                    sock(c, port)
                )
            }
            (_, _, Some(n)) => format!("{} {} header ({n} bytes)", p.version, p.header),
            _ => format!("malformed {} header", p.version),
        };
        writeln!(out, "proxy      {what}")?;
        writeln!(out, "           {}", p.why)?;
        if proxied {
            writeln!(
                out,
                "request    the {} bytes after the header:",
                e.total_bytes
            )?;
        }
    }
    let verdict = match c.reason {
        Some(r) => format!("{} ({})", e.verdict, r.as_str()),
        None => e.verdict.to_owned(),
    };
    writeln!(out, "verdict    {verdict}")?;
    writeln!(out, "why        {}", e.why)?;
    if !e.path.is_empty() {
        writeln!(out, "path       {}", e.path)?;
    }
    writeln!(
        out,
        "inspected  {} of {} bytes{}",
        e.inspected_bytes,
        e.total_bytes,
        if e.total_bytes > MAX_INSPECT {
            " (the data plane reads no further)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "counts     {}",
        match (&e.proxy, e.counts_against_client) {
            (
                Some(ProxyExplained {
                    client: Some(c), ..
                }),
                true,
            ) => format!(
                "yes: this request counts towards a ban of {c} (from a trusted PROXY sender)"
            ),
            (_, true) => "yes: this request counts towards a ban of its client".into(),
            (_, false) => "no: never counted against the client".into(),
        }
    )?;
    Ok(())
}

fn explain_proxy(h: &Header) -> Option<ProxyExplained> {
    let version = h.version()?.as_str();
    Some(match h {
        Header::Client(c) => {
            let v6 = std::net::Ipv6Addr::from(c.addr);
            let ip = v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4);
            ProxyExplained {
                version,
                header: "client",
                client: Some(ip.to_string()),
                client_port: Some(c.port),
                header_bytes: Some(c.len),
                why: format!(
                    "from a sender in proxy_protocol_from, the request after it is judged and \
                     charged to {ip} (and a ban of {ip} cuts the flow); from any other sender \
                     the header is not believed and the sender is judged; with \
                     proxy_protocol_from empty the flow is never judged"
                ),
            }
        }
        Header::Local { len, .. } => ProxyExplained {
            version,
            header: "local",
            client: None,
            client_port: None,
            header_bytes: Some(*len),
            why: "the load balancer's own connection (v2 LOCAL, v1 UNKNOWN: a health check): \
                  no client, never judged or counted"
                .into(),
        },
        Header::Malformed { .. } | Header::Absent => ProxyExplained {
            version,
            header: "malformed",
            client: None,
            client_port: None,
            header_bytes: None,
            why: "breaks the PROXY protocol's rules, is truncated or longer than the inspected \
                  bytes: from a trusted sender the flow passes and is charged to nobody"
                .into(),
        },
    })
}

fn sock(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn read_input(file: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    if file == "-" {
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::runtime(format!("cannot read standard input: {e}")))?;
    } else {
        buf = std::fs::read(file).map_err(|e| {
            CliError::usage(format!(
                "cannot read {file:?}: {e}; give a file or - for stdin"
            ))
        })?;
    }
    Ok(buf)
}

/// The kernel's CONFIG scope for the given prefixes (as the agent writes it).
fn scope(paths: &[String]) -> Result<Config> {
    let mut k = Config::new();
    if paths.len() > MAX_PATHS {
        return Err(CliError::usage(format!(
            "--ws-path: {} prefixes given, the data plane holds at most {MAX_PATHS}",
            paths.len()
        )));
    }
    for (i, p) in paths.iter().enumerate() {
        if !p.starts_with('/') || p.len() > PATH_LEN {
            return Err(CliError::usage(format!(
                "--ws-path {p:?}: a prefix starts with / and is at most {PATH_LEN} bytes"
            )));
        }
        k.paths[i][..p.len()].copy_from_slice(p.as_bytes());
        k.path_lens[i] = p.len() as u8;
    }
    if !paths.is_empty() {
        k.flags |= CFG_PATH_SCOPE;
    }
    k.n_paths = paths.len() as u32;
    Ok(k)
}

fn why(v: Verdict, r: Option<BadReason>, scoped: bool) -> String {
    match (v, r) {
        (Verdict::Valid, _) => "a complete WebSocket handshake: GET, Upgrade: websocket, \
            Connection: upgrade, Sec-WebSocket-Key and Sec-WebSocket-Version: 13"
            .into(),
        (Verdict::Bad, Some(BadReason::NoUpgrade)) => "no Upgrade header holding the token \
            `websocket` (the server logs \"invalid Upgrade header: null\")"
            .into(),
        (Verdict::Bad, Some(BadReason::NoConnectionUpgrade)) => {
            "the Connection header is missing or does not hold the token `upgrade`".into()
        }
        (Verdict::Bad, Some(BadReason::NoKey)) => "no Sec-WebSocket-Key header".into(),
        (Verdict::Bad, Some(BadReason::BadVersion)) => {
            "Sec-WebSocket-Version is missing or not 13".into()
        }
        (Verdict::Bad, Some(BadReason::BadMethod)) => {
            "the method is not GET (a WebSocket handshake is always a GET)".into()
        }
        (Verdict::Bad, Some(BadReason::ServerRejected)) => {
            "the server answered the handshake with a 4xx status".into()
        }
        (Verdict::Bad, None) => "bad".into(),
        (Verdict::Incomplete, _) => format!(
            "the header block does not end (no empty line) within the first {MAX_INSPECT} \
             bytes; not judged"
        ),
        (Verdict::Tls, _) => "a TLS record: encrypted, not judged".into(),
        (Verdict::Ignored, _) if scoped => "not an HTTP/1.x request, or its path is outside \
            the --ws-path prefixes; not judged"
            .into(),
        (Verdict::Ignored, _) => "not an HTTP/1.x request line; not judged".into(),
    }
}
