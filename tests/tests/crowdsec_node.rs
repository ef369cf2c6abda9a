//! One node and CrowdSec LAPI (issue 13): a crash and restart while LAPI is down keeps LAPI's
//! bans enforced; bad answers (garbage, wrong types, huge, slow, 5xx) change nothing and are
//! counted; the push queue survives a restart and counts what it drops; `ban rm --local`;
//! the allowlist wins; bad `[crowdsec]` values stop the agent; 100k decisions at startup.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};
use wsguard_tests::{
    agent::{http, wsguard_bin},
    crowdsec::{
        Lapi, Pki,
        cluster::{Cluster, LAPI_IP_TEXT},
        fake::{Answer, FakeLapi},
        wait_until,
    },
    lab_bins,
    netns::run_with_timeout,
};

const WAIT: Duration = Duration::from_secs(20);

fn metrics(c: &Cluster) -> Result<Value> {
    http::api(&c.agent(0).socket, "GET", "/v1/metrics", None)?.json()
}

fn counter(m: &Value, group: &str, label: &str) -> Result<u64> {
    m["crowdsec"][group]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p[0].as_str() == Some(label))
                .and_then(|p| p[1].as_u64())
        })
        .with_context(|| format!("no {group}.{label} in {m}"))
}

/// One node with an agent on LAPI; `extra` goes into `[crowdsec]`.
fn node(peers: &[&str], extra: &str, flags: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::start(lab_bins!(), 1, peers)?;
    let key = c.lapi.add_bouncer("wsguard-node0")?;
    c.lapi.add_machine("wsguard-node0", "node-password-123")?;
    let cfg = Lapi::agent_config(
        &Cluster::lapi_url(),
        &key,
        &format!(
            "update_frequency = \"1s\"\ntimeout = \"2s\"\nmachine_id = \"wsguard-node0\"\npassword = \"node-password-123\"\n{extra}"
        ),
    );
    c.start_agent(0, &cfg, flags)?;
    Ok(c)
}

#[test]
fn kill9_and_restart_while_lapi_is_down_keeps_lapi_bans_enforced() -> Result<()> {
    let mut c = node(&["banned", "clean"], "", &[])?;
    let r = kill9_lapi_down(&mut c);
    c.check(r)
}

fn kill9_lapi_down(c: &mut Cluster) -> Result<()> {
    let banned = c.peer("banned").ip4;
    let clean = c.peer("clean").ip4;
    c.lapi.cscli_ok(&[
        "decisions",
        "add",
        "--range",
        &format!("{banned}/32"),
        "--duration",
        "2h",
    ])?;
    let b = c.agent(0).wait_ban(&banned.to_string(), WAIT)?;
    ensure!(b["source"] == "crowdsec", "{b}");
    c.lapi.kill();
    wait_until("LAPI seen down", WAIT, || {
        Ok(c.agent(0).status()?["crowdsec"]["up"] == false)
    })?;
    c.agent_mut(0).restart_hard()?;
    std::thread::sleep(Duration::from_secs(3));
    let b = c
        .agent(0)
        .ban_of(&banned.to_string())?
        .context("the LAPI ban was lost across kill -9 with LAPI down")?;
    ensure!(
        b["source"] == "crowdsec" && b["origin"] == "cscli",
        "ban changed: {b}"
    );
    ensure!(
        c.ping("banned", IpAddr::V4(banned), 0, 3)? == 0,
        "not dropped after the restart"
    );
    ensure!(
        c.ping("clean", IpAddr::V4(clean), 0, 2)? == 2,
        "the clean peer is dropped"
    );
    let st = c.agent(0).status()?;
    ensure!(st["crowdsec"]["up"] == false, "{st}");
    ensure!(st["crowdsec"]["decisions_enforced"] == 1, "{st}");
    // LAPI back: the resync keeps it (still active there).
    c.lapi.restart(&c.lapi_ns)?;
    wait_until("LAPI up again", WAIT, || {
        Ok(c.agent(0).status()?["crowdsec"]["up"] == true)
    })?;
    ensure!(c.agent(0).ban_of(&banned.to_string())?.is_some(), "swept");
    Ok(())
}

fn stream(new: Value) -> Answer {
    Answer::Body(serde_json::to_vec(&json!({"new": new, "deleted": null})).unwrap())
}

fn decision(id: i64, value: &str, duration: &str) -> Value {
    json!({"id": id, "origin": "cscli", "type": "ban", "scope": "Ip", "value": value,
           "duration": duration, "scenario": "manual"})
}

#[test]
fn bad_answers_change_nothing_and_are_counted() -> Result<()> {
    let mut c = Cluster::start(lab_bins!(), 1, &["x", "y"])?;
    let x = c.peer("x").ip4.to_string();
    let y = c.peer("y").ip4.to_string();
    let good = stream(json!([
        decision(1, &x, "1h"),
        {"id": "2", "origin": "cscli", "type": "ban", "scope": "Ip", "value": y, "duration": "1h", "scenario": "s"},
        {"id": 3, "origin": "cscli", "type": "captcha", "scope": "Ip", "value": y, "duration": "1h", "scenario": "s"},
        {"id": 4, "origin": "cscli", "type": "ban", "scope": "Country", "value": "FR", "duration": "1h", "scenario": "s"},
        {"id": 5, "origin": "cscli", "type": "ban", "scope": "Ip", "value": y, "duration": "forever", "scenario": "s"},
        {"id": 6, "origin": "cscli", "type": "ban", "scope": "Ip", "value": "198.18.0.999", "duration": "1h", "scenario": "s"},
        decision(7, &y, "-5s"),
    ]));
    let fake = FakeLapi::start(&c.nodes[0].ns, 18080, good)?;
    let cfg = "[crowdsec]\napi_url = \"http://127.0.0.1:18080/\"\napi_key = \"k\"\n\
               update_frequency = \"300ms\"\ntimeout = \"1s\"\nmax_response_bytes = 1048576\n";
    c.start_agent(0, cfg, &[])?;
    let r = bad_answers(&c, &fake, &x, &y);
    c.check(r)
}

fn bad_answers(c: &Cluster, fake: &FakeLapi, x: &str, y: &str) -> Result<()> {
    let agent = c.agent(0);
    let ban = agent.wait_ban(x, WAIT)?;
    let m = metrics(c)?;
    for (reason, n) in [
        ("malformed", 1),
        ("type", 1),
        ("scope", 1),
        ("duration", 1),
        ("value", 1),
        ("expired", 1),
    ] {
        ensure!(
            counter(&m, "ignored", reason)? >= n,
            "{reason} not counted: {m}"
        );
    }
    ensure!(agent.ban_of(y)?.is_none(), "a bad decision was enforced");
    let cases: Vec<(&str, Answer)> = vec![
        ("bad_answer", Answer::Body(b"garbage, not JSON".to_vec())),
        (
            "bad_answer",
            Answer::Body(br#"{"new": "x", "deleted": 7}"#.to_vec()),
        ),
        ("bad_answer", Answer::Body(b"[]".to_vec())),
        (
            "bad_answer",
            Answer::Body(br#"{"new": [], "unknown": 1}"#.to_vec()),
        ),
        (
            "http_error",
            Answer::Status(500, b"{\"message\":\"oops\"}".to_vec()),
        ),
        (
            "http_error",
            Answer::Status(403, b"{\"message\":\"access forbidden\"}".to_vec()),
        ),
        ("too_large", Answer::Huge(4 << 20)),
        ("timeout", Answer::Slow),
    ];
    for (label, answer) in cases {
        let before = counter(&metrics(c)?, "pulls", label)?;
        fake.set(answer.clone());
        wait_until(&format!("a {label} pull counted"), WAIT, || {
            Ok(counter(&metrics(c)?, "pulls", label)? > before)
        })?;
        let now = agent
            .ban_of(x)?
            .with_context(|| format!("{label}: ban lifted"))?;
        ensure!(
            now["expires_at"] == ban["expires_at"] && now["source"] == "crowdsec",
            "{label}: the ban changed: {ban} -> {now}"
        );
        ensure!(agent.ban_of(y)?.is_none(), "{label}: {y} banned");
        let st = agent.status()?;
        ensure!(st["crowdsec"]["up"] == false, "{label}: status up: {st}");
        ensure!(
            st["crowdsec"]["last_error"].as_str().is_some(),
            "{label}: no last error: {st}"
        );
    }
    ensure!(
        c.ping("x", c.peer("x").ip4.into(), 0, 3)? == 0,
        "no longer dropped"
    );
    // A full answer with malformed elements sweeps nothing (what they held is unknown).
    fake.set(stream(json!([{"id": "1"}])));
    let before = counter(&metrics(c)?, "pulls", "ok")?;
    wait_until("a pull ok", WAIT, || {
        Ok(counter(&metrics(c)?, "pulls", "ok")? > before)
    })?;
    ensure!(agent.ban_of(x)?.is_some(), "swept on a malformed answer");
    // Good again, with a second decision: applied; the first stays.
    fake.set(stream(json!([decision(1, x, "1h"), decision(8, y, "30m")])));
    agent.wait_ban(y, WAIT)?;
    ensure!(agent.ban_of(x)?.is_some(), "x lost");
    ensure!(agent.status()?["crowdsec"]["up"] == true, "not up");
    Ok(())
}

#[test]
fn failed_pushes_wait_in_a_queue_that_survives_a_restart_and_a_full_queue_counts_drops()
-> Result<()> {
    let mut c = node(&["p"], "push_queue = 3", &[])?;
    let r = push_queue(&mut c);
    c.check(r)
}

fn push_queue(c: &mut Cluster) -> Result<()> {
    c.lapi.kill();
    let addrs = [
        "198.18.0.101",
        "198.18.0.102",
        "198.18.0.103",
        "198.18.0.104",
    ];
    let out = c
        .agent(0)
        .cli(&["ban", "add", addrs[0], addrs[1], "--ttl", "1h"])?;
    ensure!(out.status.success(), "{out:?}");
    let out = c
        .agent(0)
        .cli(&["ban", "add", addrs[2], addrs[3], "--ttl", "1h", "--observe"])?;
    ensure!(out.status.success(), "{out:?}");
    let m = metrics(c)?;
    ensure!(counter(&m, "pushes", "dropped")? == 1, "{m}");
    ensure!(m["crowdsec"]["push_queue"] == 3, "{m}");
    wait_until("a failed push counted", WAIT, || {
        Ok(counter(&metrics(c)?, "pushes", "failed")? > 0)
    })?;
    // The queue is on disk before the crash.
    std::thread::sleep(Duration::from_millis(1500));
    c.agent_mut(0).restart_hard()?;
    let st = c.agent(0).status()?;
    ensure!(st["crowdsec"]["push_queue"] == 3, "queue lost: {st}");
    c.lapi.restart(&c.lapi_ns)?;
    wait_until("the queue drained", Duration::from_secs(90), || {
        Ok(c.agent(0).status()?["crowdsec"]["push_queue"] == 0)
    })?;
    let all = c.lapi.decisions()?;
    for a in &addrs[..3] {
        let d = all
            .iter()
            .find(|d| d["value"].as_str() == Some(a))
            .with_context(|| format!("{a} not published: {all:?}"))?;
        ensure!(d["origin"] == "wsguard", "{d}");
        ensure!(d["scenario"] == "wsguard/manual", "{d}");
        let simulated = d["simulated"].as_bool().unwrap_or(false)
            || d["alert"]["simulated"].as_bool().unwrap_or(false);
        ensure!(simulated == (*a == addrs[2]), "simulated flag of {a}: {d}");
    }
    ensure!(
        !all.iter().any(|d| d["value"].as_str() == Some(addrs[3])),
        "the dropped ban was published"
    );
    Ok(())
}

#[test]
fn ban_rm_local_keeps_the_decision_and_a_resync_does_not_bring_it_back() -> Result<()> {
    let mut c = node(&["p"], "", &["--allow", "198.18.0.60/32"])?;
    let r = rm_local(&mut c);
    c.check(r)
}

fn rm_local(c: &mut Cluster) -> Result<()> {
    let p = c.peer("p").ip4.to_string();
    c.lapi
        .cscli_ok(&["decisions", "add", "--ip", &p, "--duration", "1h"])?;
    c.lapi.cscli_ok(&[
        "decisions",
        "add",
        "--ip",
        "198.18.0.60",
        "--duration",
        "1h",
    ])?;
    c.agent(0).wait_ban(&p, WAIT)?;
    wait_until("the allowlisted decision refused", WAIT, || {
        let m = metrics(c)?;
        Ok(counter(&m, "refused", "allowlisted")? >= 1)
    })?;
    ensure!(
        c.agent(0).ban_of("198.18.0.60")?.is_none(),
        "the allowlist lost to LAPI"
    );
    let out = c.agent(0).cli(&["ban", "rm", "--local", &p])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        text.contains("this node only") && text.contains("--local"),
        "ban rm --local did not say so: {text}"
    );
    ensure!(c.agent(0).ban_of(&p)?.is_none(), "not lifted");
    ensure!(!c.lapi.decisions_of(&p)?.is_empty(), "deleted in LAPI");
    // A restart resyncs from scratch: the lifted decision stays lifted here.
    c.agent_mut(0).restart_graceful()?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(c.agent(0).ban_of(&p)?.is_none(), "came back at the resync");
    let m = metrics(c)?;
    ensure!(counter(&m, "ignored", "removed_locally")? >= 1, "{m}");
    Ok(())
}

#[test]
fn bad_crowdsec_config_stops_the_agent_naming_key_and_value() -> Result<()> {
    let bin = wsguard_bin()?;
    let d = tempfile::tempdir()?;
    for (toml, want) in [
        (
            "[crowdsec]\napi_url = \"ftp://x/\"\napi_key = \"k\"",
            "crowdsec.api_url",
        ),
        (
            "[crowdsec]\napi_url = \"http://x/\"\napi_key = \"k\"\nupdate_frequency = \"often\"",
            "\"often\"",
        ),
        (
            "[crowdsec]\napi_url = \"http://x/\"\napi_key_file = \"/nonexistent/key\"",
            "crowdsec.api_key_file",
        ),
        (
            "[crowdsec]\napi_url = \"http://x/\"\nkey = \"k\"",
            "unknown field `key`",
        ),
    ] {
        let p = d.path().join("agent.toml");
        std::fs::write(&p, toml)?;
        let out = run_with_timeout(
            std::process::Command::new(&bin)
                .args(["agent", "--iface", "lo", "--config"])
                .arg(&p)
                .args(["--state-dir"])
                .arg(d.path().join("state"))
                .args(["--socket"])
                .arg(d.path().join("s.sock")),
            Duration::from_secs(20),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{toml}: agent started");
        ensure!(err.contains(want), "{toml}: {err}");
        ensure!(
            !d.path().join("state").exists(),
            "state touched before the config was checked"
        );
    }
    Ok(())
}

#[test]
fn a_startup_answer_of_100k_decisions_is_enforced() -> Result<()> {
    let mut c = Cluster::start(lab_bins!(), 1, &["p"])?;
    let key = c.lapi.add_bouncer("wsguard-node0")?;
    let p = c.peer("p").ip4;
    let t = Instant::now();
    import_100k(&c.lapi, &p.to_string())?;
    eprintln!("cscli decisions import of 100000: {:?}", t.elapsed());
    let cfg = Lapi::agent_config(&Cluster::lapi_url(), &key, "update_frequency = \"2s\"");
    let t = Instant::now();
    c.start_agent(0, &cfg, &[])?;
    let r = (|| {
        let status = || http::api(&c.agent(0).socket, "GET", "/v1/status", None)?.json();
        // Polled through the socket: the API answers while the chunks are applied.
        let mut polls = 0;
        wait_until("100k enforced", Duration::from_secs(300), || {
            polls += 1;
            Ok(status()?["crowdsec"]["decisions_enforced"] == 100_000)
        })?;
        eprintln!(
            "agent start to 100000 LAPI bans enforced: {:?} ({polls} status calls answered meanwhile)",
            t.elapsed()
        );
        let st = status()?;
        ensure!(st["ban_map"]["entries"] == 100_000, "{st}");
        ensure!(
            c.ping("p", IpAddr::V4(p), 0, 3)? == 0,
            "the peer among the 100k is not dropped"
        );
        Ok(())
    })();
    c.check(r)
}

/// 100k host decisions through `cscli decisions import`: `extra`, and 99999 from
/// 198.18.64.0 on.
pub fn import_100k(lapi: &Lapi, extra: &str) -> Result<()> {
    let base = u32::from(std::net::Ipv4Addr::new(198, 18, 64, 0));
    let mut csv = format!("duration,scope,value\n4h,Ip,{extra}\n");
    for i in 0..99_999u32 {
        csv.push_str(&format!("4h,Ip,{}\n", std::net::Ipv4Addr::from(base + i)));
    }
    let f = lapi.dir().join("import.csv");
    std::fs::write(&f, csv)?;
    lapi.cscli_ok(&["decisions", "import", "-i", &f.display().to_string()])
        .map(drop)
}

#[test]
fn tls_client_certificate_and_ca_file() -> Result<()> {
    let pki = Pki::new(&[LAPI_IP_TEXT])?;
    let mut c = Cluster::start_with(lab_bins!(), 1, &["p"], Some(&pki))?;
    c.lapi.add_machine("wsguard-node0", "node-password-123")?;
    let cfg = format!(
        "[crowdsec]\napi_url = \"https://{LAPI_IP_TEXT}:8080/\"\nca_file = {:?}\ncert_file = {:?}\n\
         key_file = {:?}\nupdate_frequency = \"1s\"\ntimeout = \"5s\"\nmachine_id = \"wsguard-node0\"\n\
         password = \"node-password-123\"\n",
        pki.ca, pki.bouncer.0, pki.bouncer.1
    );
    c.start_agent(0, &cfg, &[])?;
    let r = (|| {
        let p = c.peer("p").ip4.to_string();
        c.lapi
            .cscli_ok(&["decisions", "add", "--ip", &p, "--duration", "1h"])?;
        let b = c.agent(0).wait_ban(&p, WAIT)?;
        ensure!(b["source"] == "crowdsec", "{b}");
        // LAPI named the certificate's bouncer after its CN.
        let bouncers = c.lapi.cscli_ok(&["bouncers", "list", "-o", "json"])?;
        ensure!(
            bouncers.contains("wsguard-tls-bouncer"),
            "no TLS bouncer in {bouncers}"
        );
        // The machine publishes over the same TLS client.
        let out = c
            .agent(0)
            .cli(&["ban", "add", "198.18.0.99", "--ttl", "1h"])?;
        ensure!(out.status.success(), "{out:?}");
        wait_until("published over TLS", WAIT, || {
            Ok(!c.lapi.decisions_of("198.18.0.99")?.is_empty())
        })?;
        Ok(())
    })();
    c.check(r)
}

#[test]
fn tls_refuses_a_server_the_ca_did_not_sign() -> Result<()> {
    let pki = Pki::new(&[LAPI_IP_TEXT])?;
    let other = Pki::new(&[LAPI_IP_TEXT])?;
    let mut c = Cluster::start_with(lab_bins!(), 1, &["p"], Some(&pki))?;
    // Trusting another CA: every pull fails (counted), nothing is banned.
    let cfg = format!(
        "[crowdsec]\napi_url = \"https://{LAPI_IP_TEXT}:8080/\"\nca_file = {:?}\ncert_file = {:?}\n\
         key_file = {:?}\nupdate_frequency = \"500ms\"\ntimeout = \"5s\"\n",
        other.ca, pki.bouncer.0, pki.bouncer.1
    );
    c.start_agent(0, &cfg, &[])?;
    let r = (|| {
        let p = c.peer("p").ip4.to_string();
        c.lapi
            .cscli_ok(&["decisions", "add", "--ip", &p, "--duration", "1h"])?;
        wait_until("a refused TLS pull counted", WAIT, || {
            Ok(counter(&metrics(&c)?, "pulls", "unreachable")? >= 2)
        })?;
        let st = c.agent(0).status()?;
        ensure!(st["crowdsec"]["up"] == false, "{st}");
        ensure!(
            st["crowdsec"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS")),
            "{st}"
        );
        ensure!(
            c.agent(0).ban_of(&p)?.is_none(),
            "banned through an untrusted server"
        );
        Ok(())
    })();
    c.check(r)
}
