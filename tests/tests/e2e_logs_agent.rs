//! The agent's side of log detection (issue 7) and of its start-up order, on a veth lab:
//! offsets survive a restart (old lines are never read again), the default start is at the end
//! of the file, a bad `[logs]` value or a busy syslog port stops the start before the kernel is
//! touched, and "ready" never comes before the API socket accepts connections.

use anyhow::{Context as _, Result, ensure};
use std::{
    fs,
    io::Write as _,
    os::unix::net::UnixListener,
    path::Path,
    time::{Duration, Instant},
};
use wsguard_tests::agent::lab::AgentLab;

const METRICS: &str = "127.0.0.1:9477";
const WAIT: Duration = Duration::from_secs(10);

fn append(path: &Path, addr: &str, n: usize) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    for i in 0..n {
        writeln!(
            f,
            "{addr} - - [24/Nov/2026:20:00:{:02} +0000] \"GET /ws HTTP/1.1\" 400 0 \"-\" \"t\"",
            i % 60
        )?;
    }
    Ok(())
}

fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Poll until `series` reaches `min`; its last value either way.
fn wait_metric(lab: &AgentLab, series: &str, min: u64) -> Result<u64> {
    let end = Instant::now() + WAIT;
    loop {
        let v = metric(&lab.metrics(METRICS)?, series).unwrap_or(0);
        if v >= min || Instant::now() > end {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn log_lines_are_read_once_across_restarts() -> Result<()> {
    let lab = AgentLab::new()?;
    let log = lab.dir.path().join("access.log");
    // Present before the first start: skipped (start_at = end).
    append(&log, "198.18.7.1", 50)?;
    let cfg = lab.dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!(
            "[[logs.sources]]\nname = \"app\"\npaths = [\"{}\"]\nformat = \"combined\"\n\n\
             [[logs.rules]]\nname = \"r\"\nstatuses = [400]\nthreshold = 5\nwindow = \"1h\"\n",
            log.display()
        ),
    )?;
    let cfg_s = cfg.display().to_string();
    let args = ["--config", &cfg_s, "--metrics-addr", METRICS];
    let lines = "wsguard_log_lines_total{source=\"app\"}";

    let mut agent = lab.start(&args)?;
    append(&log, "198.18.7.2", 3)?;
    ensure!(
        wait_metric(&lab, lines, 3)? == 3,
        "first run read other than 3 lines"
    );
    ensure!(
        lab.ban("198.18.7.1")?.is_none(),
        "lines from before the start were read"
    );
    let st = agent.stop()?;
    ensure!(st.success(), "agent exit {st}");

    // Restarted: 3 new lines from the same address. Re-reading the first 3 would make the 5
    // of a burst; only the new ones count.
    let mut agent = lab.start(&args)?;
    append(&log, "198.18.7.2", 3)?;
    let read = wait_metric(&lab, lines, 3)?;
    ensure!(
        read == 3,
        "second run read {read} lines, want the 3 new ones"
    );
    ensure!(lab.ban("198.18.7.2")?.is_none(), "old lines counted again");
    // And the detector works in this run: 2 more make 5.
    append(&log, "198.18.7.2", 2)?;
    let ban = lab.wait_ban("198.18.7.2".parse()?)?;
    ensure!(ban["source"] == "log", "not a log ban: {ban}");
    agent.stop()?;
    Ok(())
}

#[test]
fn ready_only_once_the_api_socket_is_ours() -> Result<()> {
    let lab = AgentLab::new()?;
    // Another process serves the socket: the agent must fail, never say ready without it.
    let busy = UnixListener::bind(lab.socket())?;
    let base = lab.base_args();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend(["--metrics-addr", "off"]);
    let mut agent = wsguard_tests::agent::Agent::start(&lab.lab.a, &lab.log(), &args)?;
    let st = agent.wait_exit(Duration::from_secs(30))?;
    let log = agent.log_text();
    ensure!(!st.success(), "agent ran with a busy socket:\n{log}");
    ensure!(
        !log.contains(" ready"),
        "agent said ready without its socket:\n{log}"
    );
    ensure!(log.contains("already serving"), "no reason given:\n{log}");
    drop(busy);

    // Free socket: once "ready" is logged, the API answers at once.
    let _agent = lab.start(&[])?;
    let st = lab.get("/v1/status").context("status right after ready")?;
    ensure!(st["mode"] == "enforce", "status: {st}");
    Ok(())
}

/// `wsguard agent` with the lab's base args plus `extra`, expected to fail at start: its exit
/// status and log.
fn failed_start(lab: &AgentLab, extra: &[&str]) -> Result<String> {
    let base = lab.base_args();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend(["--metrics-addr", "off"]);
    args.extend_from_slice(extra);
    let mut agent = wsguard_tests::agent::Agent::start(&lab.lab.a, &lab.log(), &args)?;
    let st = agent.wait_exit(Duration::from_secs(30))?;
    let log = agent.log_text();
    ensure!(!st.success(), "the agent started:\n{log}");
    ensure!(!log.contains(" ready"), "the agent said ready:\n{log}");
    // Stopped before the kernel: nothing attached, nothing pinned.
    let pinned = fs::read_dir(lab.pin_dir()).map(|d| d.count()).unwrap_or(0);
    ensure!(pinned == 0, "{pinned} pins left by a failed start:\n{log}");
    Ok(log)
}

#[test]
fn a_bad_logs_value_stops_the_agent_naming_the_key() -> Result<()> {
    let lab = AgentLab::new()?;
    let cfg = lab.dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "[[logs.sources]]\nname = \"ingress\"\npaths = [\"/var/log/ingress/access.log\"]\n\
         format = \"ingress-nginx\"\n\n[[logs.rules]]\nname = \"ws_4xx\"\nstatuses = [400]\n\
         window = \"soon\"\n",
    )?;
    let cfg_s = cfg.display().to_string();
    let log = failed_start(&lab, &["--config", &cfg_s])?;
    ensure!(
        log.contains("logs.rules[0].window") && log.contains("soon"),
        "the error does not name the key and value:\n{log}"
    );
    ensure!(!lab.socket().exists(), "socket created");
    Ok(())
}

#[test]
fn a_busy_syslog_port_stops_the_start_before_the_kernel() -> Result<()> {
    let lab = AgentLab::new()?;
    let busy = lab
        .lab
        .a
        .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))??;
    let addr = busy.local_addr()?;
    let cfg = lab.dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!("[[logs.sources]]\nname = \"sys\"\nsyslog = \"{addr}\"\nformat = \"json\"\n"),
    )?;
    let cfg_s = cfg.display().to_string();
    let log = failed_start(&lab, &["--config", &cfg_s])?;
    ensure!(
        log.contains("cannot listen for syslog") && log.contains(&addr.to_string()),
        "the error does not name the source and address:\n{log}"
    );
    Ok(())
}
