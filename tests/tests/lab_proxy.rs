//! The load-balancer lab on its own, without wsguard: real HAProxy in TCP mode with
//! `send-proxy` and `send-proxy-v2` in front of nginx listening with `proxy_protocol`. Clients
//! of both families reach the backend through it, nginx logs them by their own addresses (not
//! the load balancer's), the attackers get the incident's answers, and HAProxy's health checks
//! keep the node up. The PROXY end-to-end tests rely on exactly this behaviour.

use anyhow::{Result, ensure};
use std::time::Duration;
use wsguard_tests::{
    lab::{
        expect::{FINISH, clean},
        haproxy::SendProxy,
        proxied::{LbOptions, ProxiedLab},
        summary::AttackSummary,
        topology::PeerSpec,
    },
    lab_bins,
};

fn lab(send_proxy: SendProxy, to_node_v6: bool) -> Result<ProxiedLab> {
    let specs = ["legit4", "legit6", "attacker"].map(PeerSpec::new);
    ProxiedLab::start(
        lab_bins!(),
        &specs,
        LbOptions {
            send_proxy,
            to_node_v6,
            check_every: Some(Duration::from_millis(200)),
        },
    )
}

fn through_the_lb(p: &ProxiedLab) -> Result<()> {
    let l4 = p.legit("legit4", false, 3, "3s")?;
    let l6 = p.legit("legit6", true, 3, "3s")?;
    for v6 in [false, true] {
        let s: AttackSummary = p
            .attack("attacker", v6, "no_upgrade", 20, "1s", "2s")?
            .finish(FINISH)?;
        ensure!(
            s.attempts > 0 && s.statuses.get("400") == Some(&s.attempts),
            "attacker (v6 {v6}) through the LB: {s:?}"
        );
    }
    clean(&l4.finish(FINISH)?, 3)?;
    clean(&l6.finish(FINISH)?, 3)?;
    let nginx = &p.lab.nginx;
    for (peer, v6) in [("legit4", false), ("legit6", true), ("attacker", false)] {
        let addr = p.lab.peer(peer).ip(v6);
        ensure!(
            nginx.requests_from(addr) > 0,
            "nginx logged nothing from {addr} ({peer})"
        );
    }
    let attacker6 = p.lab.peer("attacker").ip6.into();
    ensure!(
        nginx.requests_from(attacker6) > 0,
        "IPv6 attacker not logged"
    );
    for v6 in [false, true] {
        let lb = p.lb_ip(v6);
        ensure!(
            nginx.requests_from(lb) == 0,
            "nginx logged the load balancer {lb} as a client"
        );
    }
    let errors = nginx.error_log();
    ensure!(
        !errors.contains("broken header"),
        "nginx could not read a PROXY header:\n{errors}"
    );
    // HAProxy checked the node all along (every 200 ms), through the PROXY header; nginx
    // answered them and names the load balancer as their client.
    let checks = nginx.health_log();
    let lb = p.lb_source().to_string();
    let answered = checks
        .lines()
        .filter(|l| l.starts_with(&format!("{lb} 200 ")))
        .count();
    ensure!(
        answered >= 5 && answered == checks.lines().count(),
        "health checks from {lb}: {answered} answered of:\n{checks}"
    );
    let lb_log = p.lb.log();
    ensure!(
        !lb_log.contains("is DOWN"),
        "health checks failed:\n{lb_log}"
    );
    Ok(())
}

#[test]
fn send_proxy_v1_carries_clients_of_both_families() -> Result<()> {
    let p = lab(SendProxy::V1, false)?;
    p.check(through_the_lb(&p))
}

#[test]
fn send_proxy_v2_carries_clients_of_both_families_over_ipv6() -> Result<()> {
    let p = lab(SendProxy::V2, true)?;
    p.check(through_the_lb(&p))
}
