//! The API's view of the agent: every `Backend` method, in PRODUCT.md's JSON shapes.

use std::{collections::HashMap, net::IpAddr, sync::atomic::Ordering, time::Duration};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tracing::{info, warn};
use wsguard_common::{
    BadReason, Verdict,
    maps::{Counter, FLOW_ANSWERED, FLOW_ESTABLISHED},
};

use super::{
    kernel::{self, Clocks},
    shared::Agent,
};
use crate::{
    addr::Cidr,
    api::*,
    model::{AllowEntry, Ban, BanSource},
    policy::{AllowError, BanRequest, RefuseReason, Ttl},
};

/// How old the drop counters of a listing's later pages may be: a 1M-ban list takes seconds,
/// and re-reading every map per page would make it quadratic.
const LIST_DROPS_AGE: Duration = Duration::from_secs(10);

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

pub fn ban_json(b: &Ban, drops: u64) -> BanJson {
    BanJson {
        addr: b.cidr.addr().to_string(),
        prefix_len: b.cidr.prefix_len(),
        source: b.source,
        reason: b.reason.clone(),
        mode: b.mode,
        hard: b.hard,
        created_at: rfc3339(b.created_at),
        expires_at: b.expires_at.map(rfc3339),
        dropped_packets: drops,
        offenses: b.offenses,
        origin: b.origin.clone(),
        scenario: b.scenario.clone(),
    }
}

fn allow_json(e: &AllowEntry) -> AllowJson {
    AllowJson {
        addr: e.cidr.addr().to_string(),
        prefix_len: e.cidr.prefix_len(),
        source: e.source,
        reason: e.reason.clone(),
    }
}

/// Parse every address; an error lists every bad one.
fn parse_all(addrs: &[String]) -> Result<Vec<Cidr>, ApiError> {
    let mut bad = Vec::new();
    let mut out = Vec::new();
    for a in addrs {
        match a.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => bad.push(e.to_string()),
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::invalid(bad.join("; ")));
    }
    if out.is_empty() {
        return Err(ApiError::invalid("no address given"));
    }
    Ok(out)
}

fn ttl(ttl_s: Option<u64>, permanent: bool) -> Result<Ttl, String> {
    match (permanent, ttl_s) {
        (true, Some(_)) => Err("give either a TTL or permanent, not both".into()),
        (true, None) => Ok(Ttl::Permanent),
        (false, Some(0)) => Err("a TTL must be at least 1s".into()),
        (false, Some(s)) => Ok(Ttl::For(Duration::from_secs(s))),
        (false, None) => Ok(Ttl::Default),
    }
}

impl Agent {
    fn remove(
        &self,
        addrs: &[String],
        mut f: impl FnMut(&Cidr) -> Result<bool, ApiError>,
    ) -> Result<RemoveResponse, ApiError> {
        let cidrs = parse_all(addrs)?;
        let mut resp = RemoveResponse::default();
        for c in cidrs {
            if f(&c)? {
                resp.removed.push(c.to_string())
            } else {
                resp.missing.push(c.to_string())
            }
        }
        if !resp.removed.is_empty() {
            self.mark_dirty();
        }
        Ok(resp)
    }
}

impl Backend for Agent {
    fn ban_add(&self, req: BanAddRequest) -> Result<Vec<BanJson>, ApiError> {
        let cidrs = parse_all(&req.addrs)?;
        let ttl = ttl(req.ttl_s, req.permanent).map_err(ApiError::invalid)?;
        let reason = req
            .reason
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "manual".into());
        let reqs = cidrs
            .into_iter()
            .map(|cidr| BanRequest {
                cidr,
                source: BanSource::Manual,
                reason: reason.clone(),
                ttl,
                observe: req.observe,
                hard: req.hard,
            })
            .collect();
        let (bans, _) = self.ban_batch(reqs, |bad| {
            let msgs: Vec<String> = bad.iter().map(|(_, r)| r.to_string()).collect();
            ApiError::refused(msgs.join("; "))
        })?;
        let cidrs: Vec<Cidr> = bans.iter().map(|b| b.cidr).collect();
        let drops = self
            .lock()
            .dp
            .drops_of(&cidrs)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(bans
            .iter()
            .zip(drops)
            .map(|(b, d)| ban_json(b, d))
            .collect())
    }

    fn ban_rm(&self, req: RemoveRequest) -> Result<RemoveResponse, ApiError> {
        if let Some(link) = self.lapi().cloned() {
            return self.lapi_ban_rm(&link, parse_all(&req.addrs)?, req.local);
        }
        self.remove(&req.addrs, |c| Ok(self.lock().remove_ban(c).is_some()))
    }

    fn ban_list(
        &self,
        source: Option<BanSource>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<BanJson>, ApiError> {
        let mut g = self.lock();
        let page = g.policy.page(source, offset, limit);
        // A listing reads the counters at its first page and then from that walk (at most
        // LIST_DROPS_AGE old): one batch walk of the maps costs less than a lookup per ban.
        let max_age = if offset == 0 {
            Duration::ZERO
        } else {
            LIST_DROPS_AGE
        };
        let drops = g.drops(max_age);
        Ok(page
            .iter()
            .map(|b| ban_json(b, drops.get(&b.cidr).copied().unwrap_or(0)))
            .collect())
    }

    fn allow_add(&self, req: AllowAddRequest) -> Result<AllowJson, ApiError> {
        let cidr: Cidr = req
            .addr
            .parse()
            .map_err(|e: crate::addr::AddrError| ApiError::invalid(e.to_string()))?;
        let reason = req
            .reason
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "manual".into());
        let mut g = self.lock();
        let (entry, lifted) = g
            .policy
            .allow_add(cidr, reason)
            .map_err(|e| ApiError::refused(e.to_string()))?;
        // Kernel allowlist first: it wins over any ban even before the bans are deleted.
        g.sync_allow();
        for b in &lifted {
            let _ = g.dp.del_ban(&b.cidr);
            info!(addr = %b.cidr, allow = %cidr, "ban lifted by allowlist entry");
        }
        drop(g);
        self.mark_dirty();
        Ok(allow_json(&entry))
    }

    fn allow_rm(&self, req: RemoveRequest) -> Result<RemoveResponse, ApiError> {
        let cidrs = parse_all(&req.addrs)?;
        // Check all first so a protected entry in the list changes nothing.
        {
            let g = self.lock();
            for c in &cidrs {
                if let Some(e) = g
                    .policy
                    .allow_entries()
                    .find(|e| e.cidr == *c && e.source != crate::model::AllowSource::Manual)
                {
                    return Err(ApiError::refused(
                        AllowError::Protected {
                            cidr: *c,
                            kind: e.source,
                        }
                        .to_string(),
                    ));
                }
            }
        }
        self.remove(&req.addrs, |c| {
            let mut g = self.lock();
            let r = g
                .policy
                .allow_rm(c)
                .map_err(|e| ApiError::refused(e.to_string()))?;
            g.sync_allow();
            Ok(r.is_some())
        })
    }

    fn allow_list(&self) -> Result<Vec<AllowJson>, ApiError> {
        Ok(self.lock().policy.allow_entries().map(allow_json).collect())
    }

    fn stats(&self) -> Result<StatsJson, ApiError> {
        let g = self.lock();
        let k =
            g.dp.counters()
                .map_err(|e| ApiError::internal(e.to_string()))?;
        let n = |c: Counter| k[c as usize];
        let r = |r: BadReason| k[Counter::BadReason0 as usize + r as usize];
        let pc = g.policy.counters();
        Ok(StatsJson {
            packets: PacketsJson {
                passed: n(Counter::Passed),
                dropped: n(Counter::Dropped),
                would_drop: n(Counter::WouldDrop),
                allowlisted: n(Counter::Allowlisted),
                preserved: n(Counter::Preserved),
                unparsed: n(Counter::Unparsed),
                reset: super::proxy::reset(&k),
            },
            handshakes: HandshakesJson {
                valid: n(Counter::HsValid),
                bad: n(Counter::HsBad),
                incomplete: n(Counter::HsIncomplete),
                tls: n(Counter::HsTls),
                ignored: n(Counter::HsIgnored),
                upstream_errors: n(Counter::UpstreamErrors),
            },
            bad_reasons: BadReasonsJson {
                no_upgrade: r(BadReason::NoUpgrade),
                no_connection_upgrade: r(BadReason::NoConnectionUpgrade),
                no_key: r(BadReason::NoKey),
                bad_version: r(BadReason::BadVersion),
                bad_method: r(BadReason::BadMethod),
                server_rejected: r(BadReason::ServerRejected),
            },
            bans: BansStatsJson {
                active: g.policy.len() as u64,
                created: pc.created_total(),
                expired: pc.expired,
                refused: pc.refused_total(),
                capacity: u64::from(self.cfg.max_bans),
            },
            events_lost: n(Counter::EventsLost),
            proxy_headers: super::proxy::headers(&k),
        })
    }

    fn top(&self, n: usize) -> Result<Vec<TopJson>, ApiError> {
        let mut g = self.lock();
        let rates =
            g.dp.rates()
                .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut rows: HashMap<IpAddr, (u64, u64)> = HashMap::new();
        for (ip, count) in rates {
            rows.entry(kernel::ip16(match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            }))
            .or_default()
            .0 += u64::from(count);
        }
        for (c, d) in g.drops(Duration::from_secs(1)).clone() {
            if c.is_host() && d > 0 {
                rows.entry(c.addr()).or_default().1 += d;
            }
        }
        let mut v: Vec<TopJson> = rows
            .into_iter()
            .map(|(ip, (bad, drops))| TopJson {
                addr: ip.to_string(),
                bad_handshakes: bad,
                dropped_packets: drops,
                banned: banned_by(&g.policy, ip).is_some(),
            })
            .collect();
        v.sort_by(|a, b| {
            (b.bad_handshakes, b.dropped_packets, &a.addr).cmp(&(
                a.bad_handshakes,
                a.dropped_packets,
                &b.addr,
            ))
        });
        v.truncate(n);
        Ok(v)
    }

    fn flows(&self, addr: Option<IpAddr>) -> Result<Vec<FlowJson>, ApiError> {
        let c = Clocks::now();
        let g = self.lock();
        let flows =
            g.dp.flows()
                .map_err(|e| ApiError::internal(e.to_string()))?;
        let want = addr.map(Cidr::host);
        let mut out = Vec::new();
        for (k, v) in flows {
            let client = kernel::ip16(k.client);
            let proxied = super::proxy::flow(&v);
            // `--addr` finds a proxied flow by either end: the load balancer or its client.
            if want.is_some_and(|w| w.addr() != client && proxied.client != Some(w.addr())) {
                continue;
            }
            // A proxied flow belongs to (and is preserved for) the client its header named.
            let judged = proxied.client.unwrap_or(client);
            let verdict = Verdict::from_u8(v.verdict);
            let state = match v.state {
                FLOW_ESTABLISHED => "established",
                FLOW_ANSWERED => "answered",
                _ => "handshake",
            };
            let preserved = v.state == FLOW_ESTABLISHED
                && banned_by(&g.policy, judged)
                    .is_some_and(|b| v.first_seen_ns < c.boot_of(b.created_at));
            out.push(FlowJson {
                client: client.to_string(),
                client_port: u16::from_be(k.client_port),
                server: kernel::ip16(k.server).to_string(),
                server_port: u16::from_be(k.server_port),
                verdict: verdict.map_or("unknown", |v| v.as_str()).to_owned(),
                reason: (verdict == Some(Verdict::Bad))
                    .then(|| BadReason::from_u8(v.reason).map(|r| r.as_str().to_owned()))
                    .flatten(),
                state: state.into(),
                preserved,
                age_s: c.boot_ns.saturating_sub(v.first_seen_ns) / 1_000_000_000,
                proxy_client: proxied.client.map(|ip| ip.to_string()),
                proxy_client_port: proxied.client.map(|_| proxied.port),
                proxy_state: proxied.state.map(str::to_owned),
            });
        }
        Ok(out)
    }

    fn status(&self) -> Result<StatusJson, ApiError> {
        // Before the agent lock: logs_view takes it itself.
        let logs = self.logs_view().map(|v| v.status_json());
        let crowdsec = self.lapi_status();
        let g = self.lock();
        Ok(StatusJson {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: self.cfg.mode,
            uptime_s: self.started.elapsed().as_secs(),
            pinned: g.dp.pinned(),
            interfaces: g.dp.interfaces(),
            ban_map: BanMapJson {
                entries: g.policy.len() as u64,
                capacity: u64::from(self.cfg.max_bans),
            },
            logs,
            crowdsec,
            proxy_protocol: super::proxy::status(&self.cfg, &g),
        })
    }

    fn import(&self, req: ImportRequest) -> Result<ImportResponse, ApiError> {
        let mut bad = Vec::new();
        let mut reqs = Vec::with_capacity(req.len());
        let reason_of = |r: Option<String>| {
            r.filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| "import".into())
        };
        let mut i = 0usize;
        let mut add = |addr: &str, ttl_s, permanent, reason: &String, observe, hard| {
            let parsed = addr.parse::<Cidr>().map_err(|x| x.to_string());
            match parsed.and_then(|cidr| Ok((cidr, ttl(ttl_s, permanent)?))) {
                Ok((cidr, ttl)) => reqs.push(BanRequest {
                    cidr,
                    source: BanSource::Import,
                    reason: reason.clone(),
                    ttl,
                    observe,
                    hard,
                }),
                Err(m) => bad.push(format!("entry {i} ({addr:?}): {m}")),
            }
            i += 1;
        };
        for e in req.entries {
            let reason = reason_of(e.reason);
            add(&e.addr, e.ttl_s, e.permanent, &reason, e.observe, e.hard);
        }
        for g in req.groups {
            let reason = reason_of(g.reason);
            for a in &g.addrs {
                add(a, g.ttl_s, g.permanent, &reason, g.observe, g.hard);
            }
        }
        if !bad.is_empty() {
            return Err(ApiError::invalid(format!(
                "nothing imported: {}",
                bad.join("; ")
            )));
        }
        let n = reqs.len() as u64;
        let (_, stats) = self.ban_batch(reqs, |refused| {
            let msgs: Vec<String> = refused
                .iter()
                .map(|(i, r)| format!("entry {i}: {r}"))
                .collect();
            ApiError::refused(format!("nothing imported: {}", msgs.join("; ")))
        })?;
        info!(
            bans = n,
            kernel_entries = stats.entries,
            kernel_writes = stats.writes,
            "import applied"
        );
        Ok(ImportResponse { imported: n })
    }

    fn detach(&self) -> Result<(), ApiError> {
        warn!(pin_dir = %self.cfg.pin_dir.display(), "detach requested: removing programs, links and pins, then exiting");
        crate::datapath::DataPath::detach_all(&self.cfg.pin_dir)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.detached.store(true, Ordering::SeqCst);
        self.exit.notify_one();
        Ok(())
    }

    fn metrics(&self) -> Result<MetricsSnapshot, ApiError> {
        let stats = self.stats()?;
        let g = self.lock();
        let p = &g.policy;
        let active = p.active_by_source();
        let created = p.counters().created;
        let refused = p.counters().refused;
        let fallbacks =
            g.dp.interfaces()
                .iter()
                .filter(|i| i.xdp_mode.starts_with("netlink"))
                .count();
        Ok(MetricsSnapshot {
            stats,
            bans_active: BanSource::ALL
                .iter()
                .zip(active)
                .map(|(s, n)| (*s, n))
                .collect(),
            bans_created: BanSource::ALL
                .iter()
                .zip(created)
                .map(|(s, n)| (*s, n))
                .collect(),
            bans_refused: RefuseReason::ALL
                .iter()
                .zip(refused)
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .collect(),
            ban_map_entries: p.len() as u64,
            ban_map_capacity: u64::from(self.cfg.max_bans),
            netlink_fallbacks: fallbacks as u64,
            breaker_open: p.breaker_open(OffsetDateTime::now_utc()),
            crowdsec: None,
        })
        .map(|mut m| {
            m.crowdsec = self.lapi_metrics();
            m
        })
    }

    fn ready(&self) -> bool {
        self.is_ready()
    }
}

/// The ban that covers `ip`: its host ban, else the first CIDR ban containing it.
fn banned_by(p: &crate::policy::Policy, ip: IpAddr) -> Option<Ban> {
    p.covering(ip)
}
