//! LAPI answers into bans: sorting an answer out, then applying it chunk by chunk under the
//! locks (see the parent for the order), the resync's sweep, and the periodic tick.

use std::collections::{HashMap, HashSet};

use time::OffsetDateTime;
use tracing::{info, warn};

use super::{CHUNK, DELIBERATE, Link, TAKEOVER_MIN, lock, ms, time_of};
use crate::{
    addr::Cidr,
    crowdsec::{
        ORIGIN,
        ledger::{Entry, Ledger, Ms},
        model::{Decision, Ignored, Item, StreamAnswer},
    },
    daemon::{
        kernel::{self, Clocks},
        shared::{Agent, Inner},
    },
    model::{Ban, BanSource, Mode},
    policy::{LapiChange, Refusal, RefuseReason},
};
use std::sync::atomic::Ordering;

/// What one answer asks for, sorted out before any lock is taken.
pub(super) struct Plan {
    pub(super) adds: Vec<Decision>,
    pub(super) deletes: Vec<i64>,
    /// Startup answers: every id it holds, for the sweep; `None` also when an element of
    /// `new` was malformed (what it held cannot be known, so nothing is swept).
    pub(super) seen: Option<HashSet<i64>>,
    pub(super) read_at: Ms,
}

pub(super) fn plan(link: &Link, ans: StreamAnswer, startup: bool, read_at: Ms) -> Plan {
    let c = &link.counters;
    let mut p = Plan {
        adds: Vec::new(),
        deletes: Vec::new(),
        seen: startup.then(HashSet::new),
        read_at,
    };
    let suppressed: HashSet<i64> = {
        let l = lock(&link.ledger);
        ans.new
            .iter()
            .flatten()
            .filter_map(|i| match i {
                Item::Decision(d) if l.is_suppressed(d.id) => Some(d.id),
                _ => None,
            })
            .collect()
    };
    for item in ans.new.into_iter().flatten() {
        let raw = match item {
            Item::Decision(d) => d,
            Item::Malformed(_) => {
                c.ignore(Ignored::Malformed);
                if p.seen.take().is_some() {
                    warn!(
                        "a full LAPI answer holds malformed decisions: nothing is swept this time"
                    );
                }
                continue;
            }
        };
        if let Some(seen) = &mut p.seen {
            seen.insert(raw.id);
        }
        match raw.check() {
            Err(why) => c.ignore(why),
            Ok(d) if d.remaining_ns <= 0 => c.ignore(Ignored::Expired),
            Ok(d) if suppressed.contains(&d.id) => c.ignore(Ignored::RemovedLocally),
            Ok(d) => p.adds.push(d),
        }
    }
    for item in ans.deleted.into_iter().flatten() {
        match item {
            // Whatever its type or scope: only an id this node tracks means anything.
            Item::Decision(d) => p.deletes.push(d.id),
            Item::Malformed(_) => c.ignore(Ignored::Malformed),
        }
    }
    p
}

/// Kernel writes a chunk decided.
#[derive(Default)]
struct Effects {
    writes: Vec<(Cidr, wsguard_common::maps::BanValue)>,
    created: HashSet<Cidr>,
    dels: Vec<Cidr>,
    lifted: Vec<Cidr>,
}

impl Agent {
    /// Set the bans of `touched` from the decisions the ledger holds for them.
    /// `shrink`: a decision went, so the ban may get shorter (an add never shortens one).
    fn reconcile(
        g: &mut Inner,
        l: &mut Ledger,
        link: &Link,
        touched: HashMap<Cidr, bool>,
        c: &Clocks,
        fx: &mut Effects,
    ) {
        let now = ms(c.wall);
        for (cidr, shrink) in touched {
            let longest = l.longest(&cidr, now).map(|(_, e)| e.clone());
            let cur = g.policy.get(&cidr);
            let Some(e) = longest else {
                if cur
                    .as_ref()
                    .is_some_and(|b| b.source == BanSource::Crowdsec)
                {
                    g.policy.unban(&cidr);
                    fx.dels.push(cidr);
                }
                l.set_shadowed(cidr, false);
                continue;
            };
            if cur
                .as_ref()
                .is_some_and(|b| b.source != BanSource::Crowdsec)
            {
                l.set_shadowed(cidr, true);
                continue;
            }
            let mut expires = time_of(e.expires);
            if !shrink && let Some(old) = cur.as_ref().and_then(|b| b.expires_at) {
                expires = expires.max(old);
            }
            let ban = Ban {
                cidr,
                source: BanSource::Crowdsec,
                reason: format!("{}: {}", e.origin, e.scenario),
                mode: if g.policy.config().mode == Mode::Observe {
                    Mode::Observe
                } else {
                    Mode::Enforce
                },
                hard: false,
                created_at: c.wall,
                expires_at: Some(expires),
                offenses: 0,
                origin: Some(e.origin.clone()),
                scenario: Some(e.scenario.clone()),
            };
            match g.policy.lapi_set(ban) {
                Ok(LapiChange::Created(b)) => {
                    fx.writes.push((cidr, kernel::ban_value(&b, c)));
                    fx.created.insert(cidr);
                    l.set_shadowed(cidr, false);
                }
                Ok(LapiChange::Updated(b)) => {
                    fx.writes.push((cidr, kernel::ban_value(&b, c)));
                    l.set_shadowed(cidr, false);
                }
                Ok(LapiChange::Unchanged) => l.set_shadowed(cidr, false),
                Ok(LapiChange::Local) => l.set_shadowed(cidr, true),
                Err(r) => {
                    let i = match r.reason() {
                        RefuseReason::Full => 1,
                        _ => 0,
                    };
                    for id in l.ids_of(&cidr) {
                        l.remove(id);
                        link.counters.refused[i].fetch_add(1, Ordering::Relaxed);
                    }
                    l.set_shadowed(cidr, false);
                    if matches!(r, Refusal::Full { .. }) {
                        warn!(addr = %cidr, "LAPI decision not enforced: {r}");
                    }
                }
            }
        }
    }

    /// Write what a chunk decided to the kernel. A new ban the kernel did not take leaves
    /// the policy again (never claim a ban that is not enforced), counted as refused.
    fn write_effects(g: &mut Inner, l: &mut Ledger, link: &Link, fx: Effects) {
        if !fx.writes.is_empty()
            && let Err(e) = g.dp.put_bans(&fx.writes)
        {
            warn!(
                unwritten = e.unwritten.len(),
                "cannot write LAPI bans to the kernel: {}", e.err
            );
            for cidr in &e.unwritten {
                if fx.created.contains(cidr) {
                    g.policy.unban(cidr);
                    for id in l.ids_of(cidr) {
                        l.remove(id);
                        link.counters.refused[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        for cidr in fx.dels.iter().chain(&fx.lifted) {
            if let Err(e) = g.dp.del_ban(cidr) {
                warn!(addr = %cidr, "cannot delete ban from the kernel: {e}");
            }
        }
    }

    /// One chunk of an answer, under the locks.
    pub(super) fn apply_chunk(&self, link: &Link, deletes: &[i64], adds: &[Decision], read_at: Ms) {
        let c = Clocks::now();
        let now = ms(c.wall);
        let mut g = self.lock();
        let mut l = lock(&link.ledger);
        let mut touched: HashMap<Cidr, bool> = HashMap::new();
        let mut fx = Effects::default();
        for id in deletes {
            let Some(e) = l.remove(*id) else { continue };
            link.counters.deleted.fetch_add(1, Ordering::Relaxed);
            // The LAPI copy of a ban this node published, deleted on purpose: lifted here too.
            if e.origin == ORIGIN && l.was_pushed(&e.cidr) && now + DELIBERATE < e.expires {
                let local = g
                    .policy
                    .get(&e.cidr)
                    .is_some_and(|b| b.source != BanSource::Crowdsec);
                if local {
                    g.policy.unban(&e.cidr);
                    fx.lifted.push(e.cidr);
                    l.forget_pushed(&e.cidr);
                    lock(&link.outbox).drop_bans_of(&e.cidr);
                    info!(addr = %e.cidr, decision = id, "ban lifted: its LAPI decision was deleted");
                }
            }
            touched.insert(e.cidr, true);
        }
        let mut new_ids = Vec::new();
        for d in adds {
            let expires = read_at.saturating_add(d.remaining_ns / 1_000_000);
            if l.get(d.id).is_none() {
                new_ids.push(d.id);
            }
            l.insert(
                d.id,
                Entry {
                    cidr: d.cidr,
                    expires,
                    origin: d.origin.clone(),
                    scenario: d.scenario.clone(),
                },
            );
            touched.entry(d.cidr).or_insert(false);
        }
        Self::reconcile(&mut g, &mut l, link, touched, &c, &mut fx);
        let changed = !fx.writes.is_empty() || !fx.dels.is_empty() || !fx.lifted.is_empty();
        Self::write_effects(&mut g, &mut l, link, fx);
        let added = new_ids.iter().filter(|id| l.get(**id).is_some()).count();
        link.counters
            .added
            .fetch_add(added as u64, Ordering::Relaxed);
        drop(l);
        drop(g);
        if changed {
            self.mark_dirty();
        }
    }

    /// After a full answer: decisions it no longer holds, and `crowdsec` bans no decision
    /// holds (a lost ledger, an answer lost in transit), are swept.
    pub(super) fn sweep_after_resync(&self, link: &Link, seen: &HashSet<i64>) -> usize {
        let stale: Vec<i64> = lock(&link.ledger)
            .ids()
            .into_iter()
            .filter(|id| !seen.contains(id))
            .collect();
        for chunk in stale.chunks(CHUNK) {
            self.apply_chunk(link, chunk, &[], 0);
        }
        // Orphans: page through the crowdsec bans.
        let mut orphans = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .lock()
                .policy
                .page(Some(BanSource::Crowdsec), offset, 10_000);
            if page.is_empty() {
                break;
            }
            offset += page.len();
            let l = lock(&link.ledger);
            orphans.extend(
                page.iter()
                    .filter(|b| l.ids_of(&b.cidr).is_empty())
                    .map(|b| b.cidr),
            );
        }
        let n = stale.len() + orphans.len();
        for chunk in orphans.chunks(CHUNK) {
            let c = Clocks::now();
            let mut g = self.lock();
            let mut l = lock(&link.ledger);
            let mut fx = Effects::default();
            let touched = chunk.iter().map(|c| (*c, true)).collect();
            Self::reconcile(&mut g, &mut l, link, touched, &c, &mut fx);
            Self::write_effects(&mut g, &mut l, link, fx);
        }
        if !orphans.is_empty() {
            self.mark_dirty();
        }
        n
    }

    /// Every few seconds: forget expired decisions, and let a decision take over when the
    /// local ban it waited behind is gone.
    pub(super) fn lapi_tick(&self, link: &Link) {
        let c = Clocks::now();
        let now = ms(c.wall);
        // The ledger alone first: walking 100k decisions must not hold up the agent lock.
        let (pruned, shadowed) = {
            let mut l = lock(&link.ledger);
            (l.prune(now), l.shadowed())
        };
        if pruned.is_empty() && shadowed.is_empty() {
            return;
        }
        let mut g = self.lock();
        let mut l = lock(&link.ledger);
        let mut touched: HashMap<Cidr, bool> = pruned.into_iter().map(|c| (c, true)).collect();
        for cidr in shadowed {
            let free = g
                .policy
                .get(&cidr)
                .is_none_or(|b| b.source == BanSource::Crowdsec);
            let left = l.longest(&cidr, now).map_or(0, |(_, e)| e.expires - now);
            if free && left >= TAKEOVER_MIN {
                touched.insert(cidr, false);
            } else if free {
                l.set_shadowed(cidr, false);
            }
        }
        if touched.is_empty() {
            return;
        }
        let mut fx = Effects::default();
        Self::reconcile(&mut g, &mut l, link, touched, &c, &mut fx);
        let changed = !fx.writes.is_empty() || !fx.dels.is_empty();
        Self::write_effects(&mut g, &mut l, link, fx);
        drop(l);
        drop(g);
        if changed {
            self.mark_dirty();
        }
    }

    /// A ban from LAPI found in the pinned maps without its state record (a crash between
    /// the kernel write and the state write) is adopted as `manual`; the ledger knows better.
    pub(super) fn lapi_fixup_adopted(&self, link: &Link) {
        let mut g = self.lock();
        let l = lock(&link.ledger);
        let now = ms(OffsetDateTime::now_utc());
        let adopted: Vec<Ban> = g
            .policy
            .page(Some(BanSource::Manual), 0, usize::MAX)
            .into_iter()
            .filter(|b| b.reason == kernel::ADOPTED_REASON)
            .collect();
        let mut n = 0;
        for b in adopted {
            if let Some((_, e)) = l.longest(&b.cidr, now) {
                let fixed = Ban {
                    source: BanSource::Crowdsec,
                    reason: format!("{}: {}", e.origin, e.scenario),
                    offenses: 0,
                    origin: Some(e.origin.clone()),
                    scenario: Some(e.scenario.clone()),
                    ..b
                };
                if g.policy.restore(fixed).is_ok() {
                    n += 1;
                }
            }
        }
        drop(l);
        drop(g);
        if n > 0 {
            info!(
                bans = n,
                "pinned bans from LAPI re-attributed to source crowdsec"
            );
            self.mark_dirty();
        }
    }
}
