//! The agent's Prometheus endpoint, scraped over TCP inside the lab namespace: every metric
//! name of PRODUCT.md, in text exposition format that a strict parser accepts, values that
//! follow the ban list, and `/healthz` / `/readyz`.

use anyhow::{Context as _, Result, bail, ensure};
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use wsguard_tests::{
    agent::{Agent, wsguard_bin},
    netns::{BpfFs, VethLab, run_with_timeout},
};

const PORT: u16 = 9477;

/// `GET path` to the agent's metrics address from inside namespace `a`.
fn http_get(lab: &VethLab, path: &str) -> Result<(u16, String, String)> {
    let addr = (lab.ip_a, PORT);
    let path = path.to_owned();
    lab.a.run(move || -> Result<(u16, String, String)> {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let (head, body) = buf.split_once("\r\n\r\n").context("no header end")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("status")?;
        let ctype = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        Ok((status, ctype, body.to_owned()))
    })?
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    /// label set (sorted `k=v` pairs) → value
    samples: BTreeMap<String, f64>,
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// `{a="x",b="y"}` → sorted `a=x,b=y`, checking the syntax strictly.
fn labels(s: &str) -> Result<String> {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .context("braces")?;
    let mut out = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").context("label =\"")?;
        ensure!(is_name(name), "label name {name:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let (_, e) = chars.next().context("escape")?;
                    ensure!(matches!(e, '\\' | '"' | 'n'), "escape \\{e}");
                    value.push(e);
                }
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        out.push(format!("{name}={value}"));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out.sort();
    Ok(out.join(","))
}

/// Parse the text exposition format (Prometheus 0.0.4 / OpenMetrics 1.0 text); every sample
/// must belong to a family declared by `# TYPE` before it.
fn parse(text: &str) -> Result<BTreeMap<String, Family>> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    let mut eof = false;
    for (n, l) in text.lines().enumerate() {
        let n = n + 1;
        ensure!(!eof, "line {n} after # EOF");
        if l == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(c) = l.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            let (kw, name) = (parts.next(), parts.next().context("comment name")?);
            ensure!(is_name(name), "line {n}: metric name {name:?}");
            match kw {
                Some("TYPE") => {
                    let kind = parts.next().context("type")?;
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "unknown"
                        ]
                        .contains(&kind),
                        "line {n}: type {kind}"
                    );
                    let f = fams.entry(name.to_owned()).or_default();
                    ensure!(f.kind.is_empty(), "line {n}: {name} typed twice");
                    f.kind = kind.to_owned();
                }
                Some("HELP") | Some("UNIT") => {}
                other => bail!("line {n}: unknown comment {other:?}"),
            }
            continue;
        }
        ensure!(!l.trim().is_empty(), "line {n}: blank line");
        let (series, value) = l.rsplit_once(' ').context("no value")?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("line {n}: value {value:?}"))?;
        let (name, lbl) = match series.find('{') {
            Some(i) => (&series[..i], labels(&series[i..])?),
            None => (series, String::new()),
        };
        ensure!(is_name(name), "line {n}: sample name {name:?}");
        // Counter samples carry `_total` on a family declared without it (OpenMetrics) or
        // with it (Prometheus 0.0.4).
        let fam = [name, name.strip_suffix("_total").unwrap_or(name)]
            .into_iter()
            .find(|f| fams.contains_key(*f))
            .with_context(|| format!("line {n}: {name} has no # TYPE"))?;
        let f = fams.get_mut(fam).expect("found");
        if f.kind == "counter" {
            ensure!(name.ends_with("_total"), "line {n}: counter sample {name}");
            ensure!(v >= 0.0, "line {n}: negative counter");
        }
        ensure!(
            f.samples.insert(format!("{name}|{lbl}"), v).is_none(),
            "line {n}: duplicate series"
        );
    }
    Ok(fams)
}

fn value(fams: &BTreeMap<String, Family>, series: &str, lbl: &str) -> Option<f64> {
    fams.values()
        .find_map(|f| f.samples.get(&format!("{series}|{lbl}")).copied())
}

#[test]
fn metrics_health_and_readiness() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("wsguard.sock");
    let metrics_addr = format!("{}:{PORT}", lab.ip_a);
    let pin = bpffs.path().join("wsguard");
    let state = dir.path().join("state");
    let mut agent = Agent::start(
        &lab.a,
        &dir.path().join("agent.log"),
        &[
            "--iface",
            &lab.if_a,
            "--xdp-mode",
            "generic",
            "--pin-dir",
            pin.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--metrics-addr",
            &metrics_addr,
        ],
    )?;
    agent.wait_log(" ready", 1, Duration::from_secs(30))?;
    let end = Instant::now() + Duration::from_secs(10);
    let (code, _, body) = loop {
        match http_get(&lab, "/readyz") {
            Ok(r) => break r,
            Err(e) => ensure!(Instant::now() < end, "metrics never answered: {e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        code == 200 && body.contains("ready"),
        "/readyz {code} {body}"
    );
    let (code, _, _) = http_get(&lab, "/healthz")?;
    ensure!(code == 200, "/healthz {code}");

    let mut c = Command::new(wsguard_bin()?);
    c.args(["ban", "add", "198.19.0.7", "fd00:77::/64", "--ttl", "1h"])
        .env("WSGUARD_SOCKET", &sock)
        .stdin(Stdio::null());
    let r = run_with_timeout(&mut c, Duration::from_secs(30))?;
    ensure!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let (code, ctype, text) = http_get(&lab, "/metrics")?;
    ensure!(code == 200, "/metrics {code}");
    ensure!(
        ctype.starts_with("text/plain") || ctype.starts_with("application/openmetrics-text"),
        "content type {ctype}"
    );
    let fams = parse(&text).with_context(|| text.clone())?;
    let want: [(&str, &str, &str, &[&str]); 10] = [
        (
            "wsguard_packets_total",
            "counter",
            "action",
            &[
                "passed",
                "dropped",
                "would_drop",
                "allowlisted",
                "preserved",
                "unparsed",
                "reset",
            ],
        ),
        (
            "wsguard_handshakes_total",
            "counter",
            "verdict",
            &[
                "valid",
                "bad",
                "incomplete",
                "tls",
                "ignored",
                "upstream_error",
            ],
        ),
        (
            "wsguard_bad_handshakes_total",
            "counter",
            "reason",
            &[
                "no_upgrade",
                "no_connection_upgrade",
                "no_key",
                "bad_version",
                "bad_method",
                "server_rejected",
            ],
        ),
        (
            "wsguard_bans_active",
            "gauge",
            "source",
            &["kernel", "log", "manual", "import", "crowdsec"],
        ),
        (
            "wsguard_bans_created_total",
            "counter",
            "source",
            &["kernel", "log", "manual", "import", "crowdsec"],
        ),
        (
            "wsguard_bans_refused_total",
            "counter",
            "reason",
            &["allowlisted", "full", "rate_limited"],
        ),
        ("wsguard_ban_map_entries", "gauge", "", &[]),
        ("wsguard_ban_map_capacity", "gauge", "", &[]),
        ("wsguard_events_lost_total", "counter", "", &[]),
        ("wsguard_build_info", "gauge", "version", &[]),
    ];
    for (series, kind, label, values) in want {
        let fam = fams
            .get(series)
            .or_else(|| fams.get(series.strip_suffix("_total").unwrap_or(series)))
            .with_context(|| format!("no family for {series}:\n{text}"))?;
        ensure!(fam.kind == kind, "{series}: type {} not {kind}", fam.kind);
        let got: BTreeSet<String> = fam
            .samples
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{series}|")))
            .map(str::to_owned)
            .collect();
        ensure!(!got.is_empty(), "{series}: no samples:\n{text}");
        if label.is_empty() {
            ensure!(got == BTreeSet::from([String::new()]), "{series}: {got:?}");
        } else if values.is_empty() {
            ensure!(
                got.iter().all(|g| g.starts_with(&format!("{label}="))),
                "{series}: {got:?}"
            );
        } else {
            let need: BTreeSet<String> = values.iter().map(|v| format!("{label}={v}")).collect();
            ensure!(got == need, "{series}: labels {got:?}, want {need:?}");
        }
    }
    // Two labels: every version with every result, sorted `result=…,version=…`.
    for version in ["v1", "v2"] {
        for result in ["client", "local", "malformed", "missing", "untrusted"] {
            let lbl = format!("result={result},version={version}");
            ensure!(
                value(&fams, "wsguard_proxy_headers_total", &lbl) == Some(0.0),
                "wsguard_proxy_headers_total {{{lbl}}}:\n{text}"
            );
        }
    }
    let build = format!("version={}", env!("CARGO_PKG_VERSION"));
    ensure!(
        value(&fams, "wsguard_build_info", &build) == Some(1.0),
        "{text}"
    );
    ensure!(
        value(&fams, "wsguard_bans_active", "source=manual") == Some(2.0),
        "{text}"
    );
    ensure!(
        value(&fams, "wsguard_bans_created_total", "source=manual") == Some(2.0),
        "{text}"
    );
    ensure!(
        value(&fams, "wsguard_ban_map_entries", "") == Some(2.0),
        "{text}"
    );
    ensure!(
        value(&fams, "wsguard_ban_map_capacity", "") == Some(1_000_000.0),
        "{text}"
    );

    // A refused ban is counted by reason.
    let mut c = Command::new(wsguard_bin()?);
    c.args(["ban", "add", "127.0.0.1"])
        .env("WSGUARD_SOCKET", &sock)
        .stdin(Stdio::null());
    let r = run_with_timeout(&mut c, Duration::from_secs(30))?;
    ensure!(r.status.code() == Some(3), "{r:?}");
    let fams = parse(&http_get(&lab, "/metrics")?.2)?;
    ensure!(
        value(&fams, "wsguard_bans_refused_total", "reason=allowlisted") == Some(1.0),
        "refusal counted"
    );
    let (code, _, _) = http_get(&lab, "/nope")?;
    ensure!(code == 404, "unknown path {code}");
    agent.stop()?;
    Ok(())
}

#[test]
fn the_exposition_parser_rejects_malformed_text() {
    assert!(parse("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na_total x\n",
        "# TYPE a counter\na_total{l=\"x} 1\n",
        "# TYPE a counter\na_total{1l=\"x\"} 1\n",
        "# TYPE a gauge\na 1\na 2\n",
        "# TYPE a counter\na 1\n",
        "# TYPE a counter\n# EOF\na_total 1\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// With `[crowdsec]` (issue 13): PRODUCT.md's LAPI metrics and the ones beyond them, in the
/// same strict text format; an unreachable LAPI shows as down and counted.
#[test]
fn crowdsec_metrics_with_an_unreachable_lapi() -> Result<()> {
    let lab = VethLab::new()?;
    let bpffs = BpfFs::new()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[crowdsec]\napi_url = \"http://127.0.0.1:1/\"\napi_key = \"k\"\n\
         update_frequency = \"200ms\"\ntimeout = \"500ms\"\n",
    )?;
    let p = |x: &std::path::Path| x.to_str().unwrap().to_owned();
    let metrics_addr = format!("{}:{PORT}", lab.ip_a);
    let mut agent = Agent::start(
        &lab.a,
        &dir.path().join("agent.log"),
        &[
            "--config",
            &p(&cfg),
            "--iface",
            &lab.if_a,
            "--xdp-mode",
            "generic",
            "--pin-dir",
            &p(&bpffs.path().join("wsguard")),
            "--state-dir",
            &p(&dir.path().join("state")),
            "--socket",
            &p(&dir.path().join("wsguard.sock")),
            "--metrics-addr",
            &metrics_addr,
        ],
    )?;
    agent.wait_log(" ready", 1, Duration::from_secs(30))?;
    let end = Instant::now() + Duration::from_secs(20);
    let fams = loop {
        if let Ok((200, _, text)) = http_get(&lab, "/metrics") {
            let fams = parse(&text).with_context(|| text.clone())?;
            if value(&fams, "wsguard_crowdsec_pulls_total", "result=unreachable")
                .is_some_and(|v| v >= 2.0)
            {
                break fams;
            }
        }
        ensure!(Instant::now() < end, "no failed pull counted");
        std::thread::sleep(Duration::from_millis(200));
    };
    for (series, kind, label, values) in [
        ("wsguard_crowdsec_up", "gauge", "", &[][..]),
        (
            "wsguard_crowdsec_decisions_total",
            "counter",
            "action",
            &["added", "deleted", "refused", "ignored"][..],
        ),
        (
            "wsguard_crowdsec_pushes_total",
            "counter",
            "result",
            &["ok", "failed", "dropped"][..],
        ),
        (
            "wsguard_crowdsec_decisions_refused_total",
            "counter",
            "reason",
            &["allowlisted", "full"][..],
        ),
        (
            "wsguard_crowdsec_decisions_ignored_total",
            "counter",
            "reason",
            &[
                "malformed",
                "type",
                "scope",
                "value",
                "duration",
                "expired",
                "removed_locally",
            ][..],
        ),
        (
            "wsguard_crowdsec_pull_duration_seconds",
            "gauge",
            "",
            &[][..],
        ),
        ("wsguard_crowdsec_push_queue", "gauge", "", &[][..]),
    ] {
        let fam = fams
            .get(series)
            .or_else(|| fams.get(series.strip_suffix("_total").unwrap_or(series)))
            .with_context(|| format!("no family for {series}"))?;
        ensure!(fam.kind == kind, "{series}: type {} not {kind}", fam.kind);
        let got: BTreeSet<String> = fam
            .samples
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{series}|")))
            .map(str::to_owned)
            .collect();
        let need: BTreeSet<String> = if label.is_empty() {
            BTreeSet::from([String::new()])
        } else {
            values.iter().map(|v| format!("{label}={v}")).collect()
        };
        ensure!(got == need, "{series}: labels {got:?}, want {need:?}");
    }
    ensure!(
        value(&fams, "wsguard_crowdsec_up", "") == Some(0.0),
        "LAPI is not shown down"
    );
    agent.stop()?;
    Ok(())
}
