//! What the lab's tests assert about clients, shared by the lab and end-to-end tests.

use anyhow::{Result, ensure};
use std::time::Duration;

use super::{
    Lab,
    proc::Proc,
    summary::{AttackSummary, LegitSummary},
    topology::PeerSpec,
};

/// Upper bound for any client run to finish after its own duration.
pub const FINISH: Duration = Duration::from_secs(30);

/// `legit0`, `legit1`, …: one namespace (one source address) per legitimate user.
pub fn legit_peers(n: usize) -> Vec<PeerSpec> {
    (0..n)
        .map(|i| PeerSpec::new(&format!("legit{i}")))
        .collect()
}

/// `per_peer` WebSockets from each `legit*` peer of the lab, for `duration`.
pub fn start_legit(lab: &Lab, v6: bool, per_peer: u32, duration: &str) -> Result<Vec<Proc>> {
    lab.topo
        .peers
        .iter()
        .filter(|p| p.name.starts_with("legit"))
        .map(|p| lab.legit(&p.name, v6, per_peer, duration))
        .collect()
}

/// Every legitimate client ran without a single failure, disconnect or refused connect, on
/// exactly the WebSockets it opened at the start, and exchanged messages throughout.
pub fn clean(s: &LegitSummary, conns: u64) -> Result<()> {
    ensure!(
        s.failures == 0 && s.disconnects == 0 && s.connect_failures == 0,
        "legitimate clients saw failures: {s:?}"
    );
    ensure!(s.connections == conns, "expected {conns} WebSockets: {s:?}");
    ensure!(s.messages_ok >= conns * 10, "too few echoes: {s:?}");
    Ok(())
}

/// Wait for every legitimate client and check each is [`clean`].
pub fn all_clean(procs: Vec<Proc>, per_peer: u64) -> Result<LegitSummary> {
    let mut total = LegitSummary::default();
    for p in procs {
        let name = p.name.clone();
        let s: LegitSummary = p.finish(FINISH)?;
        clean(&s, per_peer).map_err(|e| e.context(name))?;
        total.connections += s.connections;
        total.messages_ok += s.messages_ok;
    }
    Ok(total)
}

/// Answers of any status (the attacker got through to nginx).
pub fn answered(s: &AttackSummary) -> u64 {
    s.statuses.values().sum()
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-01-02T03:04:05Z`, fraction allowed):
/// enough to compare a ban's `created_at` and `expires_at`.
pub fn rfc3339_secs(s: &str) -> Result<f64> {
    let bad = || anyhow::anyhow!("not an RFC 3339 UTC time: {s:?}");
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(str::parse).collect::<Result<_, _>>()?;
    ensure!(d.len() == 3 && h.len() == 3, "{}", bad());
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    Ok(secs as f64 + format!("0.{frac}").parse::<f64>()?)
}

/// A ban's TTL in whole seconds, from its `created_at` and `expires_at`.
pub fn ban_ttl_secs(ban: &serde_json::Value) -> Result<i64> {
    let field = |k: &str| {
        ban[k]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("ban without {k}: {ban}"))
            .and_then(rfc3339_secs)
    };
    Ok((field("expires_at")? - field("created_at")?).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rfc3339() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z").unwrap(), 0.0);
        assert_eq!(
            rfc3339_secs("2000-03-01T00:00:01.5Z").unwrap(),
            951_868_801.5
        );
        assert!(rfc3339_secs("2000-03-01 00:00:01").is_err());
        let ban = serde_json::json!({
            "created_at": "2026-01-31T23:59:58Z", "expires_at": "2026-02-01T00:00:10Z"});
        assert_eq!(ban_ttl_secs(&ban).unwrap(), 12);
    }
}
