//! The agent on a kernel without BPF links (before 5.9 for XDP, 6.6 for TCX), made real on
//! this kernel by a seccomp filter on the agent process that answers `BPF_LINK_CREATE` with
//! EINVAL, as such a kernel does. aya falls back to a netlink XDP attachment and the agent to
//! a clsact TC filter; the test checks the kernel's view, that the agent says so loudly, that
//! it enforces, that restarts adopt or swap the netlink attachment without a gap, and that the
//! kill switch removes it.

use anyhow::{Context as _, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::{Value, json};
use std::time::Duration;
use wsguard_common::maps::LAYOUT_VERSION;
use wsguard_tests::{
    agent::{Agent, AgentLab, lab::sample, stream::UdpStream, wsguard_bin},
    netns::XdpAttachment,
    seccomp,
};

const METRICS: &str = "127.0.0.1:9477";

/// Start the agent with the lab's base args, `--threshold 5`, metrics on, and `extra`; under
/// the old-kernel filter when `old_kernel`. Waits until it is ready.
fn start(s: &AgentLab, old_kernel: bool, env: &[(&str, &str)]) -> Result<Agent> {
    let base = s.base_args();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend(["--threshold", "5", "--metrics-addr", METRICS]);
    let before = std::fs::read_to_string(s.log())
        .unwrap_or_default()
        .matches(" ready")
        .count();
    let mut a = Agent::start_with(&s.lab.a, &s.log(), &args, env, |c| {
        if old_kernel {
            seccomp::without_bpf_links(c);
        }
    })?;
    a.wait_log(" ready", before + 1, Duration::from_secs(30))?;
    Ok(a)
}

/// `wsguard ARGS` against the lab's agent, in the agent's namespace: (exit code, stdout, stderr).
fn cli(s: &AgentLab, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", s.lab.a.name()))
        .arg(wsguard_bin()?)
        .args(args)
        .env("WSGUARD_SOCKET", s.socket())
        .stdin(std::process::Stdio::null())
        .output()
        .context("run wsguard")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn status_json(s: &AgentLab) -> Result<Value> {
    let (code, out, err) = cli(s, &["status", "-o", "json"])?;
    ensure!(code == 0, "status: exit {code}: {err}");
    serde_json::from_str(&out).with_context(|| format!("status not JSON: {out}"))
}

fn ban(s: &AgentLab, addr: std::net::Ipv4Addr) -> Result<()> {
    let body = json!({"addrs": [addr.to_string()], "ttl_s": null, "permanent": true,
                      "reason": "netlink test", "observe": false, "hard": true});
    let r = s.api("POST", "/v1/bans", Some(body))?;
    ensure!(r.status == 200, "{}", r.text());
    Ok(())
}

/// Every BPF link in the kernel whose program is `prog_id` (the kernel's link list, as
/// `bpftool link` shows it): an XDP program attached through netlink has none.
fn links_of_prog(prog_id: u32) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for info in aya::programs::loaded_links() {
        let info = info.context("list the kernel's BPF links")?;
        if info.program_id() == prog_id {
            ids.push(info.id());
        }
    }
    Ok(ids)
}

/// The one XDP attachment of the protected interface, as the kernel reports it: in generic
/// mode (the lab's `--xdp-mode`) and held by no BPF link, i.e. attached through netlink.
fn netlink_xdp(s: &AgentLab) -> Result<u32> {
    let xdp = s.lab.a.xdp_attachments(&s.lab.if_a)?;
    ensure!(
        xdp.len() == 1 && xdp[0].mode == "generic",
        "kernel view: {xdp:?}"
    );
    let id = xdp[0].prog_id;
    let links = links_of_prog(id)?;
    ensure!(
        links.is_empty(),
        "XDP program {id} is held by BPF links: {links:?}"
    );
    Ok(id)
}

/// TC egress: one clsact filter of wsguard's, and no TCX link.
fn clsact_only(s: &AgentLab) -> Result<()> {
    let iface = s.lab.if_a.clone();
    let tcx = s.lab.a.run(move || {
        SchedClassifier::query_tcx(&iface, TcAttachType::Egress).map(|(_, p)| p.len())
    })??;
    ensure!(tcx == 0, "{tcx} TCX programs on egress");
    let progs = s.lab.a.tc_egress_programs(&s.lab.if_a)?;
    let out = s.lab.a.exec(
        &["tc", "filter", "show", "dev", &s.lab.if_a, "egress"],
        Duration::from_secs(10),
    )?;
    ensure!(
        progs.len() == 1,
        "TC egress programs {progs:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn iface_status(s: &AgentLab) -> Result<Value> {
    let st = status_json(s)?;
    ensure!(st["pinned"] == true, "{st}");
    Ok(st["interfaces"][0].clone())
}

fn fallback_metric(s: &AgentLab) -> Result<f64> {
    let m = s.metrics(METRICS)?;
    sample(&m, "wsguard_xdp_netlink_fallback").with_context(|| format!("no metric in:\n{m}"))
}

#[test]
fn old_kernel_attaches_through_netlink_says_so_loudly_and_enforces() -> Result<()> {
    let s = AgentLab::new()?;
    let _agent = start(&s, true, &[])?;
    let id = netlink_xdp(&s)?;
    clsact_only(&s)?;
    let rec = std::fs::read_link(
        s.pin_dir()
            .join("links")
            .join(format!("{}_xdp", s.lab.if_a)),
    )?;
    ensure!(rec.to_str() == Some("netlink:generic"), "record {rec:?}");

    let i = iface_status(&s)?;
    ensure!(
        i["xdp_mode"] == "netlink-generic"
            && i["xdp_prog_id"].as_u64() == Some(u64::from(id))
            && i["tc_egress"] == "clsact",
        "status {i}, kernel prog {id}"
    );
    let (code, text, err) = cli(&s, &["status"])?;
    ensure!(code == 0, "status: {err}");
    let warning = format!(
        "warning: {}: XDP fell back to a netlink attachment (netlink-generic)",
        s.lab.if_a
    );
    ensure!(text.contains(&warning), "no {warning:?} in:\n{text}");
    ensure!(fallback_metric(&s)? == 1.0, "metric");
    let log = std::fs::read_to_string(s.log())?;
    ensure!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("XDP fell back to a netlink attachment")),
        "no error line in the log:\n{log}"
    );

    ban(&s, s.lab.ip_b2)?;
    ensure!(s.pings(s.lab.ip_b2)? == 0, "the banned source got answers");
    ensure!(s.pings(s.lab.ip_b)? == 3, "the clean source was dropped");
    Ok(())
}

#[test]
fn restarts_adopt_or_swap_the_netlink_attachment_without_a_gap() -> Result<()> {
    let s = AgentLab::new()?;
    let (a, b, b2) = (s.lab.ip_a, s.lab.ip_b, s.lab.ip_b2);
    let mut agent = start(&s, true, &[])?;
    ban(&s, b2)?;
    let first = netlink_xdp(&s)?;
    let udp = UdpStream::start(&s.lab.a, &s.lab.b, a, 7000, &[b, b2])?;
    let pause = || std::thread::sleep(Duration::from_millis(300));
    pause();

    // Fail-static: the netlink attachment outlives the agent.
    ensure!(agent.stop()?.success(), "clean exit");
    ensure!(netlink_xdp(&s)? == first, "still attached after exit");
    pause();

    // The same build on a kernel with links (no filter): the netlink attachment is adopted,
    // not doubled by a link, and still reported.
    let mut agent = start(&s, false, &[])?;
    ensure!(netlink_xdp(&s)? == first, "adopted as it was");
    let i = iface_status(&s)?;
    ensure!(
        i["xdp_mode"] == "netlink-generic" && i["xdp_prog_id"].as_u64() == Some(u64::from(first)),
        "{i}"
    );
    ensure!(fallback_metric(&s)? == 1.0, "still reported");
    pause();

    // Another build: swapped through netlink's compare-and-replace.
    ensure!(agent.stop()?.success());
    let mut agent = start(&s, false, &[("WSGUARD_TEST_BUILD_ID", "5eed0000000000b2")])?;
    let second = netlink_xdp(&s)?;
    ensure!(second != first, "the new build's program runs");
    ensure!(
        iface_status(&s)?["xdp_prog_id"].as_u64() == Some(u64::from(second)),
        "status names the swapped program"
    );
    ensure!(
        agent
            .log_text()
            .contains("netlink XDP attachment swapped atomically"),
        "{}",
        agent.log_text()
    );
    pause();

    // A crash, then a build with another map layout on the old kernel again: maps migrated,
    // program swapped the same way.
    agent.kill9()?;
    pause();
    let layout = (LAYOUT_VERSION + 1).to_string();
    let _agent = start(&s, true, &[("WSGUARD_TEST_LAYOUT_VERSION", &layout)])?;
    let third = netlink_xdp(&s)?;
    ensure!(
        third != second && third != first,
        "the migrated generation runs"
    );
    pause();

    let got = udp.finish()?;
    let clean = &got[&b];
    ensure!(clean.sent > 100, "the stream ran: {}", clean.sent);
    ensure!(
        clean.received.len() as u32 == clean.sent,
        "clean source lost {} of {} datagrams",
        clean.sent - clean.received.len() as u32,
        clean.sent
    );
    ensure!(
        got[&b2].sent > 100 && got[&b2].received.is_empty(),
        "banned source got {} of {} through",
        got[&b2].received.len(),
        got[&b2].sent
    );
    clsact_only(&s)?;
    ensure!(s.ban(&b2.to_string())?.is_some(), "the ban survived");
    Ok(())
}

#[test]
fn detach_removes_the_netlink_attachment_running_or_not() -> Result<()> {
    let s = AgentLab::new()?;
    let gone = |s: &AgentLab| -> Result<()> {
        let xdp: Vec<XdpAttachment> = s.lab.a.xdp_attachments(&s.lab.if_a)?;
        ensure!(xdp.is_empty(), "XDP still attached: {xdp:?}");
        let tc = s.lab.a.tc_egress_programs(&s.lab.if_a)?;
        ensure!(tc.is_empty(), "TC egress programs left: {tc:?}");
        ensure!(!s.pin_dir().exists(), "pins left");
        ensure!(s.pings(s.lab.ip_b2)? == 3, "something still drops");
        Ok(())
    };

    // Through the running agent.
    let mut agent = start(&s, true, &[])?;
    ban(&s, s.lab.ip_b2)?;
    netlink_xdp(&s)?;
    let (code, out, err) = cli(&s, &["detach", "-y"])?;
    ensure!(code == 0, "detach: exit {code}: {out}{err}");
    agent.wait_exit(Duration::from_secs(15))?;
    gone(&s)?;

    // With the agent down (fail-static left everything): from the pins alone.
    let mut agent = start(&s, true, &[])?;
    ban(&s, s.lab.ip_b2)?;
    netlink_xdp(&s)?;
    ensure!(agent.stop()?.success());
    ensure!(s.pings(s.lab.ip_b2)? == 0, "fail-static");
    let pin_dir = s.pin_dir().to_string_lossy().into_owned();
    let (code, out, err) = cli(&s, &["detach", "-y", "--pin-dir", &pin_dir])?;
    ensure!(
        code == 0 && out.contains("not running"),
        "detach: exit {code}: {out}{err}"
    );
    gone(&s)?;

    // And the kernel with links, unfiltered, now gets a pinned link.
    let _agent = start(&s, false, &[])?;
    let i = iface_status(&s)?;
    ensure!(i["xdp_mode"] == "generic", "{i}");
    let id = u32::try_from(i["xdp_prog_id"].as_u64().context("prog id")?)?;
    ensure!(!links_of_prog(id)?.is_empty(), "no link holds program {id}");
    ensure!(fallback_metric(&s)? == 0.0, "metric");
    Ok(())
}

#[test]
fn a_netlink_attachment_removed_by_hand_is_replaced_by_a_link() -> Result<()> {
    let s = AgentLab::new()?;
    let mut agent = start(&s, true, &[])?;
    netlink_xdp(&s)?;
    ensure!(agent.stop()?.success());
    s.lab
        .a
        .ip(&["link", "set", "dev", &s.lab.if_a, "xdpgeneric", "off"])?;
    let agent = start(&s, false, &[])?;
    ensure!(
        agent
            .log_text()
            .contains("the recorded netlink XDP attachment is gone"),
        "{}",
        agent.log_text()
    );
    let i = iface_status(&s)?;
    ensure!(i["xdp_mode"] == "generic", "{i}");
    let xdp = s.lab.a.xdp_attachments(&s.lab.if_a)?;
    ensure!(xdp.len() == 1, "{xdp:?}");
    ensure!(
        !links_of_prog(xdp[0].prog_id)?.is_empty(),
        "attached afresh, but not through a link"
    );
    ensure!(fallback_metric(&s)? == 0.0, "metric");
    ban(&s, s.lab.ip_b2)?;
    ensure!(s.pings(s.lab.ip_b2)? == 0, "the banned source got answers");
    Ok(())
}
