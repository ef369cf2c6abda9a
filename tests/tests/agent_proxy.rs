//! `proxy_protocol_from` on the real agent and the real CLI (issue 12, the agent's half): bad
//! values stop the agent at start naming the key and the value; trusted PROXY senders are
//! allowlisted with source `proxy` (listed in table and JSON, a manual ban refused with exit 3
//! naming the setting, `allow rm` refused with the fix); a burst from the sender itself bans
//! nothing; and a ban of a load balancer left pinned by an older build is lifted at start.

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use std::{path::Path, process::Command, time::Duration};
use wsguard_tests::{
    agent::{Agent, AgentLab, lab::wait_until, wsguard_bin},
    netns::run_with_timeout,
};

/// `wsguard --socket SOCK ARGS…`: exit code, stdout, stderr.
fn cli(s: &AgentLab, args: &[&str]) -> Result<(i32, String, String)> {
    let out = run_with_timeout(
        Command::new(wsguard_bin()?)
            .arg("--socket")
            .arg(s.socket())
            .args(args),
        Duration::from_secs(30),
    )?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The agent exits at start (nothing pinned) with a message naming `key` and `value`.
fn refuses_to_start(s: &AgentLab, args: &[&str], value: &str) -> Result<()> {
    let log = s
        .dir
        .path()
        .join(format!("bad-{}.log", wsguard_tests::netns::unique()));
    let pin = s.pin_dir();
    let mut all = vec![
        "--iface",
        s.lab.if_a.as_str(),
        "--pin-dir",
        pin.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let mut a = Agent::start(&s.lab.a, &log, &all)?;
    ensure!(
        !a.wait_exit(Duration::from_secs(10))?.success(),
        "{args:?}: the agent started"
    );
    let text = a.log_text();
    ensure!(
        text.contains("proxy_protocol_from") && text.contains(&format!("{value:?}")),
        "{args:?}: the error does not name the key and {value:?}:\n{text}"
    );
    ensure!(!Path::new(&pin).exists(), "{args:?}: something was pinned");
    Ok(())
}

#[test]
fn bad_proxy_protocol_from_stops_the_agent_naming_key_and_value() -> Result<()> {
    let s = AgentLab::new()?;
    for (args, value) in [
        (&["--proxy-protocol-from", "lb.example"][..], "lb.example"),
        (&["--proxy-protocol-from", "0.0.0.0/0"][..], "0.0.0.0/0"),
        (
            &[
                "--proxy-protocol-from",
                "198.18.0.2",
                "--proxy-protocol-from",
                "::/0",
            ][..],
            "::/0",
        ),
        (
            &["--proxy-protocol-from", "198.18.0.2/24"][..],
            "198.18.0.2/24",
        ),
    ] {
        refuses_to_start(&s, args, value)?;
    }
    let file = s.dir.path().join("agent.toml");
    std::fs::write(&file, "proxy_protocol_from = [\"198.18.0.0/33\"]\n")?;
    refuses_to_start(&s, &["--config", file.to_str().unwrap()], "198.18.0.0/33")?;
    Ok(())
}

#[test]
fn trusted_senders_are_allowlisted_never_banned_and_not_removable() -> Result<()> {
    let s = AgentLab::new()?;
    let lb = s.lab.ip_b2.to_string();
    let lb6 = "fd00:5753::/120";
    let _agent = s.start(&["--proxy-protocol-from", &lb, "--proxy-protocol-from", lb6])?;

    let list = s.get("/v1/allow")?;
    let proxies: Vec<&Value> = list
        .as_array()
        .context("allow list")?
        .iter()
        .filter(|e| e["source"] == "proxy")
        .collect();
    ensure!(proxies.len() == 2, "two proxy entries: {list}");
    ensure!(
        proxies[0]["addr"] == lb.as_str()
            && proxies[0]["prefix_len"] == 32
            && proxies[1]["addr"] == "fd00:5753::"
            && proxies[1]["prefix_len"] == 120,
        "{list}"
    );
    ensure!(
        proxies.iter().all(|e| e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("proxy_protocol_from")),
        "the reason names the setting: {list}"
    );
    let (code, table, _) = cli(&s, &["allow", "list"])?;
    ensure!(code == 0, "allow list: {table}");
    let row = table
        .lines()
        .find(|l| l.contains(&lb))
        .with_context(|| format!("{lb} not in the table:\n{table}"))?;
    ensure!(row.contains("proxy"), "source column: {row}");

    // A manual ban of the sender, or of a network holding it: refused, exit 3, naming the
    // setting; nothing changes.
    for target in [lb.as_str(), "198.18.0.0/24", "fd00:5753::9"] {
        let (code, out, err) = cli(&s, &["ban", "add", target, "--reason", "oops"])?;
        ensure!(
            code == 3 && err.contains("proxy_protocol_from"),
            "ban add {target}: exit {code}: {out}{err}"
        );
    }
    let (code, _, err) = cli(&s, &["allow", "rm", &lb])?;
    ensure!(
        code == 3 && err.contains("proxy_protocol_from"),
        "allow rm {lb}: exit {code}: {err}"
    );
    let after = s.get("/v1/allow")?;
    ensure!(after == list, "a refused request changed the allowlist");
    ensure!(s.bans()?.is_empty(), "a refused ban was applied");

    // The sender's own bad handshakes (no PROXY header at all): whatever the kernel makes of
    // them, the sender is never banned and never dropped. A clean source's burst after it is
    // banned, so once that ban shows, the first burst has been decided.
    s.burst(s.lab.ip_b2, 10)?;
    s.burst(s.lab.ip_b, 10)?;
    s.wait_ban(s.lab.ip_b)?;
    ensure!(s.ban(&lb)?.is_none(), "the trusted sender was banned");
    ensure!(s.pings(s.lab.ip_b2)? == 3, "the trusted sender is dropped");
    // The kernel never charged it: flows without a header from a trusted sender are counted
    // `missing` (reported under v1), and no burst of it ever reached the policy: the only
    // refusals are the three bans above, the only bad handshakes the clean source's (how many
    // of its ten were judged before its kernel ban dropped the rest depends on timing).
    let st = s.get("/v1/stats")?;
    let bad = st["handshakes"]["bad"].as_u64().unwrap_or(0);
    ensure!(
        st["proxy_headers"]["v1"]["missing"].as_u64() >= Some(10)
            && st["bans"]["refused"] == 3
            && (1..=10).contains(&bad),
        "{st}"
    );
    // Not persisted: the config is the only source of these entries.
    let st = s.wait_state("the state file", |_| true)?;
    ensure!(
        !st["allow"].to_string().contains(&lb),
        "proxy entries persisted: {st}"
    );
    Ok(())
}

#[test]
fn a_pinned_ban_of_a_load_balancer_is_lifted_once_it_is_trusted() -> Result<()> {
    // An older build (or no proxy_protocol_from) banned the load balancer: every client behind
    // it is cut off. Configuring it as a trusted sender and restarting lifts the ban at once.
    let s = AgentLab::new()?;
    let lb = s.lab.ip_b2.to_string();
    let mut agent = s.start(&[])?;
    let r = s.ban_add(&lb, Some(3600), false)?;
    ensure!(r.status == 200, "{}", r.text());
    ensure!(
        s.pings(s.lab.ip_b2)? == 0,
        "the ban drops the load balancer"
    );
    ensure!(agent.stop()?.success());
    let _agent = s.start(&["--proxy-protocol-from", &lb])?;
    ensure!(s.ban(&lb)?.is_none(), "the load balancer's ban was adopted");
    wait_until("the load balancer's ban gone from the maps", || {
        Ok(!s.kernel_bans()?.0.contains(&s.lab.ip_b2))
    })?;
    ensure!(
        s.pings(s.lab.ip_b2)? == 3,
        "the load balancer is still dropped"
    );
    Ok(())
}

/// `wsguard explain` (no agent) on a payload that begins with a PROXY header: the data plane's
/// own parser names the client, and the request after the header is judged.
fn explain(payload: &[u8]) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("payload");
    std::fs::write(&f, payload)?;
    let out = run_with_timeout(
        Command::new(wsguard_bin()?).args(["explain", f.to_str().unwrap(), "-o", "json"]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "explain: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn explain_reads_a_leading_proxy_header() -> Result<()> {
    use wsguard_tests::lab::proxy_header;
    let bad = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n".to_vec();
    let valid = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    let node: std::net::SocketAddr = "198.18.0.1:80".parse()?;
    let c4: std::net::SocketAddr = "203.0.113.7:5555".parse()?;
    let c6: std::net::SocketAddr = "[fd00::7]:4444".parse()?;

    let v1 = proxy_header::v1(c4, node);
    let e = explain(&[v1.clone(), bad.clone()].concat())?;
    ensure!(
        e["proxy"]["version"] == "v1"
            && e["proxy"]["client"] == "203.0.113.7"
            && e["proxy"]["client_port"] == 5555
            && e["proxy"]["header_bytes"] == v1.len()
            && e["verdict"] == "bad"
            && e["reason"] == "no_upgrade"
            && e["counts_against_client"] == true
            && e["total_bytes"] == bad.len(),
        "{e}"
    );
    // v2 over IPv6 with a TLV (skipped by the length), a valid handshake after it.
    let v2 = proxy_header::v2(c6, "[fd00::1]:80".parse()?, &[0x04, 0x00, 0x02, 0, 0]);
    let e = explain(&[v2.clone(), valid].concat())?;
    ensure!(
        e["proxy"]["version"] == "v2"
            && e["proxy"]["client"] == "fd00::7"
            && e["proxy"]["header_bytes"] == v2.len()
            && e["verdict"] == "valid"
            && e["counts_against_client"] == false,
        "{e}"
    );
    // A health check: LOCAL, never counted, whatever follows.
    let e = explain(
        &[
            proxy_header::v2_local(),
            b"GET /h HTTP/1.0\r\n\r\n".to_vec(),
        ]
        .concat(),
    )?;
    ensure!(
        e["proxy"]["header"] == "local"
            && e["proxy"]["client"].is_null()
            && e["counts_against_client"] == false,
        "{e}"
    );
    // Malformed (a leading zero): charged to nobody.
    let e = explain(
        &[
            b"PROXY TCP4 203.0.113.07 198.18.0.1 5555 80\r\n".to_vec(),
            bad.clone(),
        ]
        .concat(),
    )?;
    ensure!(
        e["proxy"]["header"] == "malformed" && e["counts_against_client"] == false,
        "{e}"
    );
    // No header: as before.
    let e = explain(&bad)?;
    ensure!(
        e["proxy"].is_null() && e["counts_against_client"] == true,
        "{e}"
    );
    // The table names the client.
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("p");
    std::fs::write(&f, [v1, bad].concat())?;
    let out = run_with_timeout(
        Command::new(wsguard_bin()?).args(["explain", f.to_str().unwrap()]),
        Duration::from_secs(30),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("naming client 203.0.113.7:5555") && text.contains("ban of 203.0.113.7"),
        "{text}"
    );
    Ok(())
}
