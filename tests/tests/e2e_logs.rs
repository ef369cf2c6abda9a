//! Issue 7 end to end: bans from logs, where the kernel cannot read the handshake. Real nginx
//! in the node namespace terminates TLS with a certificate made by the test, so the XDP program
//! sees only encrypted bytes; nginx writes its access log (ingress-nginx's default format, and
//! JSON); an attacker sends bad WebSocket handshakes over TLS; wsguard, reading that log, bans
//! it with source `log`, and XDP then drops its packets while a legitimate wss:// client keeps
//! working.

use anyhow::{Context as _, Result, ensure};
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use wsguard_tests::{
    lab::{
        BACKEND_ADDR, Lab, WS_PATH,
        nginx::{AccessFormat, Nginx, TlsSite},
        topology::PeerSpec,
    },
    lab_bins,
    netns::run_with_timeout,
};

const TLS_PORT: u16 = 443;
const HEALTH_PORT: u16 = 8081;
/// Bad handshakes per window that make a log burst (the test's rule).
const THRESHOLD: u32 = 10;
/// How long a burst may take to become a ban: file polling (250 ms) plus the CLI poll. Not a
/// timing assertion: a slower ban still fails only past this.
const BAN_WAIT: Duration = Duration::from_secs(10);
/// An address in no lab namespace: its log ban can never match a packet.
const UNSEEN: &str = "198.51.100.77";

/// A self-signed certificate for the node, made with openssl.
fn make_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = run_with_timeout(
        Command::new("/usr/bin/openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=wsguard-lab"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((cert, key))
}

/// The lab, a TLS nginx writing `format`, and the agent reading that log.
struct LogLab {
    lab: Lab,
    tls: Nginx,
    /// Another log the test writes itself (combined format).
    app_log: PathBuf,
}

fn start(format: AccessFormat) -> Result<LogLab> {
    let mut lab = Lab::start(
        lab_bins!(),
        &[PeerSpec::new("attacker"), PeerSpec::new("legit")],
    )?;
    let (cert, key) = make_cert(lab.dir())?;
    let site = TlsSite {
        cert,
        key,
        port: TLS_PORT,
        health_port: HEALTH_PORT,
        format,
    };
    let backend: SocketAddr = BACKEND_ADDR.parse()?;
    let tls = Nginx::start_tls(&lab.topo.node, lab.dir(), backend, &site)?;
    let access = tls.prefix.join("access.log");
    let app_log = lab.dir().join("app-access.log");
    fs::write(&app_log, "")?;
    let fmt = match format {
        AccessFormat::IngressNginx => "ingress-nginx",
        AccessFormat::Json => "json",
    };
    let cfg = format!(
        r#"
[[logs.sources]]
name = "ingress"
paths = ["{access}"]
format = "{fmt}"

[[logs.sources]]
name = "behind-lb"
paths = ["{app}"]
format = "combined"

[[logs.sources]]
name = "missing"
paths = ["{missing}"]
format = "combined"

[[logs.rules]]
name = "ws_4xx"
statuses = [400, 403, 426]
paths = ["{WS_PATH}"]
threshold = {THRESHOLD}
window = "60s"
reason = "bad WebSocket handshakes in the access log"
"#,
        access = access.display(),
        app = app_log.display(),
        missing = lab.dir().join("no-such-dir/app.log").display(),
    );
    let cfg_path = lab.dir().join("agent.toml");
    fs::write(&cfg_path, cfg)?;
    let cfg_s = cfg_path.display().to_string();
    lab.start_agent(&["--config", &cfg_s])?;
    Ok(LogLab { lab, tls, app_log })
}

impl LogLab {
    fn node_ip(&self) -> String {
        self.lab.topo.node_ip(false).to_string()
    }

    /// One HTTPS request from `peer` with `headers`; the HTTP status curl saw (0: none, the
    /// connection failed or timed out).
    fn https(&self, peer: &str, headers: &[&str], max_time: &str) -> Result<u16> {
        let p = self.lab.peer(peer);
        let url = format!("https://{}:{TLS_PORT}{WS_PATH}", self.node_ip());
        let bind = p.ip4.to_string();
        let mut cmd: Vec<&str> = vec![
            "curl",
            "-sk",
            "--http1.1",
            "--interface",
            &bind,
            "--connect-timeout",
            "1",
            "--max-time",
            max_time,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        for h in headers {
            cmd.extend_from_slice(&["-H", h]);
        }
        cmd.push(&url);
        let out = p.ns.exec(&cmd, Duration::from_secs(10))?;
        let code = String::from_utf8_lossy(&out.stdout);
        code.trim()
            .parse()
            .with_context(|| format!("curl printed no status: {code:?}"))
    }

    /// A GET of the WebSocket path without `Upgrade`: the backend answers 400.
    fn bad_handshake(&self) -> Result<u16> {
        self.https("attacker", &[], "2")
    }

    /// A valid WebSocket handshake over TLS; 101 when it is accepted. curl does not speak
    /// WebSocket, so it waits on the open connection until `--max-time`.
    fn good_handshake(&self, peer: &str) -> Result<u16> {
        self.https(
            peer,
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ],
            "1",
        )
    }

    /// `/metrics` of the agent, from inside the node.
    fn metrics(&self) -> Result<String> {
        let out = self.lab.topo.node.exec(
            &["curl", "-s", "http://127.0.0.1:9477/metrics"],
            Duration::from_secs(10),
        )?;
        ensure!(out.status.success(), "cannot scrape the agent's metrics");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(text: &str, series: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {series} in\n{text}"))
}

/// Poll `/metrics` until `series` reaches `min`; its last value either way.
fn wait_metric(l: &LogLab, series: &str, min: u64, timeout: Duration) -> Result<u64> {
    let end = Instant::now() + timeout;
    loop {
        let v = metric(&l.metrics()?, series)?;
        if v >= min || Instant::now() > end {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tls_attacker_is_banned_from_the_log(format: AccessFormat) -> Result<()> {
    let l = start(format)?;
    let r = scenario(&l);
    let diag = format!(
        "--- TLS nginx access.log\n{}\n--- TLS nginx error.log\n{}",
        l.tls.access_log(),
        l.tls.error_log()
    );
    l.lab.check(r.with_context(|| diag))
}

fn scenario(l: &LogLab) -> Result<()> {
    let agent = l.lab.agent.as_ref().expect("agent");
    let attacker = l.lab.peer("attacker").ip4.to_string();
    let legit = l.lab.peer("legit").ip4.to_string();

    ensure!(
        l.good_handshake("legit")? == 101,
        "wss:// handshake refused before any attack"
    );
    let mut rejected = 0;
    for _ in 0..THRESHOLD * 3 {
        if agent.ban_of(&attacker)?.is_some() {
            break;
        }
        if l.bad_handshake()? == 400 {
            rejected += 1;
        }
    }
    ensure!(
        rejected >= THRESHOLD,
        "nginx answered only {rejected} bad handshakes with 400"
    );
    let ban = agent.wait_ban(&attacker, BAN_WAIT)?;
    ensure!(ban["source"] == "log", "not a log ban: {ban}");
    ensure!(ban["mode"] == "enforce", "not enforced: {ban}");
    let reason = ban["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("ws_4xx") && reason.contains("ingress"),
        "reason names neither rule nor log: {ban}"
    );
    // The kernel read no handshake: TLS on a port it does not parse.
    let kernel_bad = agent.stat("handshakes", "bad")?;
    ensure!(
        kernel_bad == 0,
        "the kernel saw {kernel_bad} bad handshakes"
    );

    // Enforced in XDP: the attacker's new connections fail and the drop counters rise.
    let dropped_before = agent.stat("packets", "dropped")?;
    for i in 0..3 {
        let code = l.bad_handshake()?;
        ensure!(code == 0, "attempt {i} after the ban got HTTP {code}");
    }
    let dropped = agent.wait_stat("packets", "dropped", dropped_before + 3, BAN_WAIT)?;
    ensure!(
        dropped >= dropped_before + 3,
        "XDP drops did not rise: {dropped_before} -> {dropped}"
    );
    let ban = agent.ban_of(&attacker)?.context("ban gone")?;
    ensure!(
        ban["dropped_packets"].as_u64().unwrap_or(0) > 0,
        "the ban's own drop counter stayed 0: {ban}"
    );
    ensure!(
        l.good_handshake("legit")? == 101,
        "the legitimate wss:// client stopped working"
    );
    ensure!(agent.ban_of(&legit)?.is_none(), "legitimate client banned");

    // A log line naming an address XDP never sees still bans, and shows as unmatched.
    let lines: String = (0..THRESHOLD)
        .map(|i| {
            format!(
                "{UNSEEN} - - [24/Nov/2026:20:00:{i:02} +0000] \"GET {WS_PATH} HTTP/1.1\" 400 0 \"-\" \"bot\"\n"
            )
        })
        .collect();
    fs::OpenOptions::new()
        .append(true)
        .open(&l.app_log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()))?;
    let unseen = agent.wait_ban(UNSEEN, BAN_WAIT)?;
    ensure!(unseen["source"] == "log", "not a log ban: {unseen}");
    let m = l.metrics()?;
    ensure!(
        metric(&m, "wsguard_log_bans_active")? == 2,
        "log bans:\n{m}"
    );
    // The drop counters are re-read at most every second.
    let unmatched = wait_metric(l, "wsguard_log_bans_unmatched", 1, BAN_WAIT)?;
    ensure!(unmatched == 1, "unmatched log bans: {unmatched}");

    let m = l.metrics()?;
    for (series, min) in [
        (
            "wsguard_log_lines_total{source=\"ingress\"}",
            u64::from(THRESHOLD) + 1,
        ),
        (
            "wsguard_log_lines_matched_total{source=\"ingress\"}",
            u64::from(THRESHOLD),
        ),
        ("wsguard_log_bursts_total{source=\"ingress\"}", 1),
        ("wsguard_log_bursts_total{source=\"behind-lb\"}", 1),
        ("wsguard_bans_created_total{source=\"log\"}", 2),
    ] {
        let v = metric(&m, series)?;
        ensure!(v >= min, "{series} = {v}, want >= {min}");
    }
    let missing = m
        .lines()
        .find(|l| l.starts_with("wsguard_log_file_missing{source=\"missing\""))
        .context("missing file not reported")?;
    ensure!(
        missing.ends_with(" 1"),
        "missing file not flagged: {missing}"
    );
    let parse_errors: u64 = m
        .lines()
        .filter(|l| l.starts_with("wsguard_log_parse_errors_total{source=\"ingress\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    ensure!(parse_errors == 0, "nginx's own lines failed to parse:\n{m}");

    // `status` says the same, for an operator without a Prometheus.
    let st = agent.cli_json(&["status", "-o", "json"])?;
    let logs = &st["logs"];
    ensure!(
        logs["bans"] == 2 && logs["bans_unmatched"] == 1,
        "status logs: {st}"
    );
    let missing_src = logs["sources"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "missing"))
        .with_context(|| format!("no `missing` source in status: {st}"))?;
    ensure!(
        missing_src["files"][0]["error"].is_string(),
        "missing file has no error in status: {missing_src}"
    );
    let text = agent.cli(&["status"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(
        text.contains("1 of 2 log bans never matched a packet")
            && text.contains("log source missing"),
        "status text lacks the log warnings:\n{text}"
    );
    Ok(())
}

#[test]
fn tls_attacker_banned_from_ingress_nginx_log() -> Result<()> {
    tls_attacker_is_banned_from_the_log(AccessFormat::IngressNginx)
}

#[test]
fn tls_attacker_banned_from_json_access_log() -> Result<()> {
    tls_attacker_is_banned_from_the_log(AccessFormat::Json)
}
