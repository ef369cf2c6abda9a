//! The one policy engine every ban goes through: kernel bursts, log detectors, the API's manual
//! bans and imports. Pure logic: no I/O, no clocks (callers pass `now`), so every rail is unit
//! tested. The daemon applies what it decides to the kernel maps and the state file.
//!
//! Decisions where PRODUCT.md is silent:
//! - A ban of `/0` is refused and counted as `allowlisted`: it necessarily overlaps the
//!   built-in allowlist.
//! - A request for an address that is already banned is not a new offence: it extends the
//!   ban (to the explicit TTL, or to the ban's current escalation level), never shortens it, and
//!   only strengthens it (enforce beats observe, hard beats soft). API requests replace the
//!   source and reason; automatic ones leave them.
//! - Escalation applies to every source whose request carries no explicit TTL; an explicit TTL
//!   wins but still counts as an offence.
//! - Offence history is forgotten `offense_memory` after the last offence of an address that
//!   is no longer banned, so a storm of one-off sources does not grow it forever.
//! - A ban carries its own offence count while it lasts; the history gets an entry when a
//!   kernel, log or manual ban ends. Imports and CrowdSec decisions are not offences seen by
//!   this node and leave no history (a million imported bans must not cost a million
//!   entries), so re-importing an address does not escalate it.

mod allow;
mod breaker;
mod lapi;
mod page;
mod store;
#[cfg(test)]
mod tests;

pub use allow::{AllowError, builtin_ranges};
pub use breaker::{Breaker, BreakerConfig, Gate};
pub use lapi::LapiChange;

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    addr::Cidr,
    model::{AllowEntry, AllowSource, Ban, BanSource, Mode},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub ban_ttl: Duration,
    pub ban_max_ttl: Duration,
    /// Total bans (every map) at which new bans are refused.
    pub max_bans: u64,
    /// Global mode: in observe, every new ban is an observe ban.
    pub mode: Mode,
    pub breaker: BreakerConfig,
    pub offense_memory: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    /// `ban_ttl`, escalated ×4 per prior offence up to `ban_max_ttl`.
    Default,
    For(Duration),
    Permanent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanRequest {
    pub cidr: Cidr,
    pub source: BanSource,
    pub reason: String,
    pub ttl: Ttl,
    pub observe: bool,
    pub hard: bool,
}

/// Why a ban was refused, as the `reason` label of `wsguard_bans_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    Allowlisted,
    Full,
    RateLimited,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 3] = [Self::Allowlisted, Self::Full, Self::RateLimited];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowlisted => "allowlisted",
            Self::Full => "full",
            Self::RateLimited => "rate_limited",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to ban {0}: a /0 ban would ban everything")]
    Everything(Cidr),
    #[error("refusing to ban {cidr}: it overlaps the allowlist entry {allow} ({}: {note}){}", kind.as_str(), refusal_hint(*kind))]
    Allowlisted {
        cidr: Cidr,
        allow: Cidr,
        kind: AllowSource,
        /// The entry's reason, e.g. `loopback`, `node address`.
        note: String,
    },
    #[error(
        "refusing to ban {cidr}: the ban map is full ({max} bans); new bans are refused, old ones stay"
    )]
    Full { cidr: Cidr, max: u64 },
    #[error("refusing to ban {cidr}: too many automatic bans in a short time (circuit breaker)")]
    RateLimited { cidr: Cidr },
}

/// What to do instead, for the allowlist entries an operator may try to ban by mistake.
fn refusal_hint(kind: AllowSource) -> &'static str {
    match kind {
        AllowSource::Proxy => {
            ": banning a load balancer would cut every client behind it; its clients are judged \
             and banned by the address its PROXY header names"
        }
        _ => "",
    }
}

impl Refusal {
    pub fn reason(&self) -> RefuseReason {
        match self {
            Self::Everything(_) | Self::Allowlisted { .. } => RefuseReason::Allowlisted,
            Self::Full { .. } => RefuseReason::Full,
            Self::RateLimited { .. } => RefuseReason::RateLimited,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    /// An existing ban got longer or stronger: rewrite it in the kernel.
    Updated,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub ban: Ban,
    pub change: Change,
}

/// Offence history of one address or network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offense {
    pub count: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// Indexed like `BanSource::ALL`.
    pub created: [u64; BanSource::ALL.len()],
    /// Indexed like `RefuseReason::ALL`.
    pub refused: [u64; 3],
    pub expired: u64,
}

impl PolicyCounters {
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }
    pub fn created_total(&self) -> u64 {
        self.created.iter().sum()
    }
}

pub struct Policy {
    cfg: PolicyConfig,
    bans: store::Store,
    active: [u64; BanSource::ALL.len()],
    allow: allow::Allowlist,
    offenses: HashMap<Cidr, Offense>,
    breaker: Breaker,
    counters: PolicyCounters,
    last_offense_prune: Option<OffsetDateTime>,
    /// Bumped on every insert and removal, so a page cursor knows it is still valid.
    generation: u64,
    cursor: Option<page::PageCursor>,
}

fn src_idx(s: BanSource) -> usize {
    BanSource::ALL.iter().position(|x| *x == s).expect("in ALL")
}

impl Policy {
    /// `builtin`: loopback, link-local and the node's addresses; `config`: `allow` entries.
    pub fn new(cfg: PolicyConfig, builtin: &[Cidr], config: &[Cidr]) -> Self {
        Self {
            breaker: Breaker::new(cfg.breaker),
            cfg,
            bans: store::Store::new(),
            active: [0; BanSource::ALL.len()],
            allow: allow::Allowlist::new(builtin, config),
            offenses: HashMap::new(),
            counters: PolicyCounters::default(),
            last_offense_prune: None,
            generation: 0,
            cursor: None,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Check the rails a ban must pass regardless of rate (allowlist, `/0`), without changing
    /// anything.
    pub fn check_allowed(&self, cidr: &Cidr) -> Result<(), Refusal> {
        if cidr.is_everything() {
            return Err(Refusal::Everything(*cidr));
        }
        match self.allow.overlapping(cidr) {
            Some(e) => Err(Refusal::Allowlisted {
                cidr: *cidr,
                allow: e.cidr,
                kind: e.source,
                note: e.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Check a batch of API requests as a whole: every refusal with its index, counted, and
    /// nothing applied. A batch that would overflow the cap is refused entirely.
    pub fn preflight(&mut self, reqs: &[BanRequest]) -> Result<(), Vec<(usize, Refusal)>> {
        let mut bad = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if let Err(e) = self.check_allowed(&r.cidr) {
                bad.push((i, e));
            }
        }
        // Counting the new networks costs a lookup each: only when the batch could overflow.
        let could_overflow = self.bans.len() as u64 + reqs.len() as u64 > self.cfg.max_bans;
        let new: BTreeSet<Cidr> = if bad.is_empty() && could_overflow {
            reqs.iter()
                .filter(|r| !self.bans.contains(&r.cidr))
                .map(|r| r.cidr)
                .collect()
        } else {
            BTreeSet::new()
        };
        if bad.is_empty() && self.bans.len() as u64 + new.len() as u64 > self.cfg.max_bans {
            let full = reqs
                .iter()
                .enumerate()
                .filter(|(_, r)| new.contains(&r.cidr));
            bad = full
                .map(|(i, r)| {
                    (
                        i,
                        Refusal::Full {
                            cidr: r.cidr,
                            max: self.cfg.max_bans,
                        },
                    )
                })
                .collect();
        }
        for (_, e) in &bad {
            self.count_refused(e.reason());
        }
        if bad.is_empty() { Ok(()) } else { Err(bad) }
    }

    /// Decide a ban request and record it. Refusals are counted.
    pub fn ban(&mut self, req: BanRequest, now: OffsetDateTime) -> Result<Applied, Refusal> {
        let r = self.decide(req, now);
        if let Err(e) = &r {
            self.count_refused(e.reason());
        }
        r
    }

    fn decide(&mut self, req: BanRequest, now: OffsetDateTime) -> Result<Applied, Refusal> {
        self.check_allowed(&req.cidr)?;
        if let Some(old) = self.bans.get(&req.cidr) {
            return Ok(self.extend(old, req, now));
        }
        if self.bans.len() as u64 >= self.cfg.max_bans {
            return Err(Refusal::Full {
                cidr: req.cidr,
                max: self.cfg.max_bans,
            });
        }
        let automatic = matches!(req.source, BanSource::Kernel | BanSource::Log);
        let gate = if automatic {
            self.breaker.admit(now)
        } else {
            Gate::Pass
        };
        if gate == Gate::Refuse {
            return Err(Refusal::RateLimited { cidr: req.cidr });
        }
        // The ban holds the count now; the history gets it back when the ban ends.
        let prior = self.offenses.remove(&req.cidr).map_or(0, |o| o.count);
        let expires_at = self.expiry(req.ttl, prior, now);
        let mut reason = req.reason;
        if gate == Gate::Observe {
            reason.push_str(" [observe: ban rate limit exceeded]");
        }
        let observe = req.observe || gate == Gate::Observe || self.cfg.mode == Mode::Observe;
        let offenses = prior.saturating_add(1);
        let ban = Ban {
            cidr: req.cidr,
            source: req.source,
            reason,
            mode: if observe {
                Mode::Observe
            } else {
                Mode::Enforce
            },
            hard: req.hard,
            created_at: now,
            expires_at,
            offenses,
            origin: None,
            scenario: None,
        };
        self.counters.created[src_idx(req.source)] += 1;
        self.insert_flags(&ban, 0);
        Ok(Applied {
            ban,
            change: Change::Created,
        })
    }

    fn extend(&mut self, old: Ban, req: BanRequest, now: OffsetDateTime) -> Applied {
        let mut ban = old.clone();
        // `Default` means the ban's own escalation level: a re-burst keeps what it earned.
        let prior = old.offenses.saturating_sub(1);
        let wanted = self.expiry(req.ttl, prior, now);
        ban.expires_at = match (old.expires_at, wanted) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
        ban.hard |= req.hard;
        let enforce_wanted = !req.observe && self.cfg.mode == Mode::Enforce;
        if enforce_wanted && !self.breaker.is_open(now) {
            ban.mode = Mode::Enforce;
        }
        if matches!(req.source, BanSource::Manual | BanSource::Import) {
            ban.source = req.source;
            ban.reason = req.reason;
        }
        if ban == old {
            return Applied {
                ban,
                change: Change::Unchanged,
            };
        }
        self.replace(&ban);
        Applied {
            ban,
            change: Change::Updated,
        }
    }

    fn expiry(&self, ttl: Ttl, prior: u32, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let d = match ttl {
            Ttl::Permanent => return None,
            Ttl::For(d) => d,
            Ttl::Default => escalate(self.cfg.ban_ttl, self.cfg.ban_max_ttl, prior),
        };
        // Absurd TTLs (e.g. `99999d`) are clamped rather than overflowing into "permanent".
        let d = time::Duration::try_from(d)
            .unwrap_or(time::Duration::MAX)
            .min(time::Duration::days(36500));
        Some(now + d)
    }

    /// Put back a ban from the state file or the pinned maps, without counting it as created.
    /// The allowlist still wins (it may have grown since); the cap and breaker do not apply.
    pub fn restore(&mut self, ban: Ban) -> Result<(), Refusal> {
        self.check_allowed(&ban.cidr)?;
        self.replace(&ban);
        Ok(())
    }

    /// Put back a saved ban that the kernel maps have yet to confirm (start-up): it stays
    /// pending until [`Policy::confirm`] or it is dropped by [`Policy::take_pending`].
    pub fn restore_pending(&mut self, ban: Ban) -> Result<(), Refusal> {
        self.check_allowed(&ban.cidr)?;
        self.remove_quiet(&ban.cidr);
        self.insert_flags(&ban, store::PENDING);
        Ok(())
    }

    /// Whether `cidr` has a ban still pending, as restored from the state file.
    pub fn is_pending(&self, cidr: &Cidr) -> bool {
        self.bans
            .rec(cidr)
            .is_some_and(|r| r.flags & store::PENDING != 0)
    }

    /// Confirm the pending ban of `cidr` with what the kernel holds for it (its expiry and
    /// flags are newer than any state write), in place: a restart confirms a million bans this
    /// way. False when `cidr` has no pending ban (the caller adopts the kernel's entry). The
    /// allowlist was checked when the ban became pending, and every entry added since lifted
    /// what it covers.
    pub fn confirm_from_kernel(
        &mut self,
        cidr: &Cidr,
        expires_at: Option<OffsetDateTime>,
        mode: Mode,
        hard: bool,
    ) -> bool {
        let done = self.bans.confirm(cidr, expires_at, mode, hard);
        if done {
            self.generation += 1;
        }
        done
    }

    pub fn confirm(&mut self, cidr: &Cidr) {
        self.bans.set_flags(cidr, 0, store::PENDING);
    }

    /// Up to `max` bans still pending, in address order, confirmed as they are returned (the
    /// caller writes them back or drops them).
    pub fn take_pending(&mut self, max: usize) -> Vec<Ban> {
        let out: Vec<Ban> = self
            .bans
            .iter()
            .filter(|(_, r)| r.flags & store::PENDING != 0)
            .take(max)
            .map(|(c, r)| self.bans.ban(*c, r))
            .collect();
        for b in &out {
            self.bans.set_flags(&b.cidr, 0, store::PENDING);
        }
        out
    }

    pub fn restore_offense(&mut self, cidr: Cidr, o: Offense) {
        let e = self.offenses.entry(cidr).or_insert(o);
        e.count = e.count.max(o.count);
        e.last = e.last.max(o.last);
    }

    pub fn unban(&mut self, cidr: &Cidr) -> Option<Ban> {
        self.remove(cidr)
    }

    /// Remove and return every ban that expired at `now`, counted.
    pub fn expire(&mut self, now: OffsetDateTime) -> Vec<Ban> {
        let due = self.bans.due(store::nanos(now));
        let gone: Vec<Ban> = due.iter().filter_map(|c| self.remove(c)).collect();
        self.counters.expired += gone.len() as u64;
        self.prune_offenses(now);
        gone
    }

    fn prune_offenses(&mut self, now: OffsetDateTime) {
        // Hourly is plenty for a history measured in days.
        if self
            .last_offense_prune
            .is_some_and(|t| now - t < time::Duration::HOUR)
        {
            return;
        }
        self.last_offense_prune = Some(now);
        let memory =
            time::Duration::try_from(self.cfg.offense_memory).unwrap_or(time::Duration::MAX);
        let bans = &self.bans;
        self.offenses
            .retain(|c, o| bans.contains(c) || now - o.last < memory);
    }

    /// Expired bans found at start-up (pinned maps or state) that never reached `expire`.
    pub fn count_expired(&mut self, n: u64) {
        self.counters.expired += n;
    }

    pub fn count_refused(&mut self, r: RefuseReason) {
        let i = RefuseReason::ALL
            .iter()
            .position(|x| *x == r)
            .expect("in ALL");
        self.counters.refused[i] += 1;
    }

    /// Add an API allowlist entry; returns it and the bans it lifted (the allowlist wins).
    pub fn allow_add(
        &mut self,
        cidr: Cidr,
        reason: String,
    ) -> Result<(AllowEntry, Vec<Ban>), AllowError> {
        let entry = self.allow.add(cidr, AllowSource::Manual, reason)?;
        Ok((entry, self.lift_overlapping(&cidr)))
    }

    pub fn allow_rm(&mut self, cidr: &Cidr) -> Result<Option<AllowEntry>, AllowError> {
        self.allow.remove_manual(cidr)
    }

    /// Replace the trusted PROXY senders (`proxy_protocol_from`), allowlisted with source
    /// `proxy`; returns the bans lifted because a sender overlaps them.
    pub fn set_proxy_trust(&mut self, cidrs: &[Cidr]) -> Vec<Ban> {
        let added = self.allow.set_proxy(cidrs);
        added
            .iter()
            .flat_map(|c| self.lift_overlapping(c))
            .collect()
    }

    /// Replace the node's own addresses in the built-in allowlist (they change at run time);
    /// returns bans lifted because a new address overlaps them.
    pub fn set_node_addrs(&mut self, addrs: &[Cidr]) -> Vec<Ban> {
        let added = self.allow.set_node(addrs);
        added
            .iter()
            .flat_map(|c| self.lift_overlapping(c))
            .collect()
    }

    fn lift_overlapping(&mut self, cidr: &Cidr) -> Vec<Ban> {
        let hit: Vec<Cidr> = self
            .bans
            .cidrs()
            .filter(|b| b.overlaps(cidr))
            .copied()
            .collect();
        hit.iter().filter_map(|c| self.remove(c)).collect()
    }

    pub fn allow_entries(&self) -> impl Iterator<Item = &AllowEntry> {
        self.allow.entries()
    }

    /// Every ban in address order, each built as it is reached.
    pub fn bans(&self) -> impl Iterator<Item = Ban> + '_ {
        self.bans.iter().map(|(c, r)| self.bans.ban(*c, r))
    }

    /// Up to `max` bans after `after` (from the first if `None`), in address order: the
    /// state writer's chunks.
    pub fn bans_after(&self, after: Option<Cidr>, max: usize) -> Vec<Ban> {
        let it: Box<dyn Iterator<Item = (&Cidr, &store::Rec)>> = match after {
            Some(c) => Box::new(self.bans.after(c)),
            None => Box::new(self.bans.iter()),
        };
        it.take(max).map(|(c, r)| self.bans.ban(*c, r)).collect()
    }

    pub fn get(&self, cidr: &Cidr) -> Option<Ban> {
        self.bans.get(cidr)
    }

    /// The ban that covers `ip`: its host ban, else the first network ban containing it.
    pub fn covering(&self, ip: std::net::IpAddr) -> Option<Ban> {
        self.get(&Cidr::host(ip)).or_else(|| {
            let c = self
                .bans
                .cidrs()
                .find(|c| !c.is_host() && c.contains(&ip))?;
            self.get(c)
        })
    }

    pub fn len(&self) -> usize {
        self.bans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bans.len() == 0
    }

    /// Active bans per source, indexed like `BanSource::ALL`.
    pub fn active_by_source(&self) -> [u64; BanSource::ALL.len()] {
        self.active
    }

    pub fn offenses(&self) -> &HashMap<Cidr, Offense> {
        &self.offenses
    }

    pub fn counters(&self) -> &PolicyCounters {
        &self.counters
    }

    pub fn breaker_open(&self, now: OffsetDateTime) -> bool {
        self.breaker.is_open(now)
    }

    fn insert_flags(&mut self, ban: &Ban, flags: u8) {
        self.active[src_idx(ban.source)] += 1;
        self.generation += 1;
        self.bans.put(ban, flags);
        self.bans.settle();
    }

    /// Replace the ban of `ban.cidr` (if any) without it counting as an end of the old one.
    fn replace(&mut self, ban: &Ban) {
        self.remove_quiet(&ban.cidr);
        self.insert_flags(ban, 0);
    }

    fn remove_quiet(&mut self, cidr: &Cidr) -> Option<Ban> {
        let ban = self.bans.remove(cidr)?;
        self.generation += 1;
        self.active[src_idx(ban.source)] -= 1;
        Some(ban)
    }

    /// A ban ends: its offence count goes back to the history, for the sources that feed it.
    fn remove(&mut self, cidr: &Cidr) -> Option<Ban> {
        let ban = self.remove_quiet(cidr)?;
        if matches!(
            ban.source,
            BanSource::Kernel | BanSource::Log | BanSource::Manual
        ) {
            self.restore_offense(
                ban.cidr,
                Offense {
                    count: ban.offenses,
                    last: ban.created_at,
                },
            );
        }
        Some(ban)
    }
}

/// `base × 4^prior`, capped at `max`.
pub fn escalate(base: Duration, max: Duration, prior: u32) -> Duration {
    let mut d = base;
    for _ in 0..prior {
        d = d.saturating_mul(4);
        if d >= max {
            return max;
        }
    }
    d.min(max)
}
