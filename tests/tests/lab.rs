//! The lab on its own, without wsguard: real nginx proxies WebSockets to the echo backend for
//! legitimate clients in their own namespaces, and attackers' bad handshakes get the answers
//! the incident's server gave (400 for a missing Upgrade) through nginx. The end-to-end tests
//! rely on exactly this behaviour.

use anyhow::{Result, ensure};
use std::collections::BTreeMap;
use wsguard_tests::{
    lab::{
        Lab,
        expect::{FINISH as RUN, clean},
        summary::AttackSummary,
        topology::PeerSpec,
    },
    lab_bins,
};

#[test]
fn legit_clients_hold_websockets_while_attackers_get_rejected() -> Result<()> {
    let specs = ["legit1", "legit2", "attacker"].map(PeerSpec::new);
    let lab = Lab::start(lab_bins!(), &specs)?;
    lab.check(run_legit_and_attack(&lab))
}

fn run_legit_and_attack(lab: &Lab) -> Result<()> {
    let l1 = lab.legit("legit1", false, 5, "4s")?;
    let l2 = lab.legit("legit2", false, 5, "4s")?;
    // What nginx answers to each kind of bad handshake, relayed from the backend. nginx sets
    // `Connection: upgrade` itself whenever `Upgrade` is present (the ingress-nginx map), so a
    // handshake missing only `Connection: Upgrade` reaches the backend valid and gets 101:
    // only the data plane, which sees the client's own bytes, can call it bad.
    let expected = [
        ("no_upgrade", "400"),
        ("no_key", "400"),
        ("bad_version", "426"),
        ("bad_method", "405"),
        ("no_connection_upgrade", "101"),
    ];
    for (reason, status) in expected {
        let s: AttackSummary = lab
            .attack("attacker", false, reason, 20, "1s", "/ws")?
            .finish(RUN)?;
        ensure!(s.attempts > 0, "{reason}: no attempts: {s:?}");
        let want = BTreeMap::from([(status.to_owned(), s.attempts)]);
        ensure!(s.statuses == want, "{reason}: expected all {status}: {s:?}");
    }
    // A valid handshake the application rejects: only the answer on egress shows it.
    let s: AttackSummary = lab
        .attack("attacker", false, "valid", 10, "1s", "/reject")?
        .finish(RUN)?;
    let want = BTreeMap::from([("400".to_owned(), s.attempts)]);
    ensure!(s.attempts > 0 && s.statuses == want, "/reject: {s:?}");

    clean(&l1.finish(RUN)?, 5)?;
    clean(&l2.finish(RUN)?, 5)?;
    let attacker = lab.peer("attacker").ip4.into();
    let logged = lab.nginx.requests_from(attacker);
    ensure!(logged > 0, "nginx logged nothing from the attacker");
    Ok(())
}

#[test]
fn ipv6_clients_and_attackers_reach_nginx() -> Result<()> {
    let specs = [PeerSpec::new("v6"), PeerSpec::new("attacker")];
    let lab = Lab::start(lab_bins!(), &specs)?;
    lab.check((|| {
        let v6 = lab.legit("v6", true, 3, "3s")?;
        let bad: AttackSummary = lab
            .attack("attacker", true, "no_upgrade", 20, "1s", "/ws")?
            .finish(RUN)?;
        ensure!(
            bad.attempts > 0 && bad.statuses.get("400") == Some(&bad.attempts),
            "IPv6 attacker: {bad:?}"
        );
        clean(&v6.finish(RUN)?, 3)?;
        for peer in ["v6", "attacker"] {
            let addr = lab.peer(peer).ip6.into();
            ensure!(
                lab.nginx.requests_from(addr) > 0,
                "nginx saw nothing from {addr}"
            );
        }
        Ok(())
    })())
}
