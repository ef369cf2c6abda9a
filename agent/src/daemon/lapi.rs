//! CrowdSec LAPI in the agent (issue 13): the pull loop that turns decisions into `crowdsec`
//! bans, the push loop that publishes this node's bans, and `ban rm` deleting in LAPI.
//!
//! Fail-static: a pull that fails (unreachable, slow, 5xx, garbage, too large) changes no ban.
//! The loop backs off (doubling from `update_frequency` up to six times it), reports LAPI down,
//! and its next success is a full resync (`startup=true`) that marks and sweeps: decisions
//! the answer no longer holds are removed one by one, nothing is flushed. A full resync also
//! runs every hour, because 1.4 moves a bouncer's stream position before it sends the answer
//! (a lost answer is otherwise lost for good) and hard deletes never reach the stream.
//!
//! Large answers are applied in chunks of [`CHUNK`] decisions, each under the agent lock on
//! the blocking pool with one batched kernel write, so the API and the burst handler get the
//! lock between chunks; the data plane never waits for any of it.
//!
//! Lock order: the agent lock, then the ledger, then the outbox.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::{
    kernel::{self, Clocks},
    shared::{Agent, Inner},
};
use crate::{
    addr::Cidr,
    api::{ApiError, RemoveResponse},
    crowdsec::{
        ALERT_BATCH, Counters, CrowdsecConfig, CrowdsecStatusJson, ORIGIN,
        api::{Lapi, LapiError},
        build_alerts,
        ledger::{self, Entry, Ledger, Ms},
        model::{Decision, Ignored, Item, StreamAnswer},
        outbox::{self, Front, Outbox, PushBan},
        scenario_of,
    },
    model::{Ban, BanSource, Mode},
    policy::{LapiChange, Refusal, RefuseReason},
};

/// Decisions applied per lock hold.
const CHUNK: usize = 4096;
/// A full resync at least this often.
const RESYNC_EVERY: Duration = Duration::from_secs(3600);
/// A deleted decision whose expiry was further away than this was deleted on purpose (an
/// operator, `wsguard ban rm` elsewhere), not by reaching its end.
const DELIBERATE: Ms = 5_000;
/// A decision waiting behind a local ban takes over only with at least this much left.
const TAKEOVER_MIN: Ms = 2_000;
/// How long `ban rm` waits for LAPI before queueing the deletion.
const RM_WAIT: Duration = Duration::from_secs(10);
/// Bans that arrive within this of each other go out in one alert.
const PUSH_COALESCE: Duration = Duration::from_millis(200);
const PUSH_BACKOFF_MAX: Duration = Duration::from_secs(60);

pub struct Link {
    pub api: Lapi,
    pub counters: Counters,
    ledger: Mutex<Ledger>,
    outbox: Mutex<Outbox>,
    push_wake: Notify,
    save_wake: Notify,
    state_dir: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(t: OffsetDateTime) -> Ms {
    (t.unix_timestamp_nanos() / 1_000_000) as Ms
}

fn time_of(ms: Ms) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Link {
    /// Everything that can fail at start (certificates, the saved files) fails here, before
    /// the kernel is touched.
    pub fn new(cfg: &CrowdsecConfig, state_dir: &std::path::Path) -> anyhow::Result<Self> {
        let api = Lapi::new(cfg).map_err(|e| anyhow::anyhow!("[crowdsec]: {e}"))?;
        let ledger = Ledger::load(state_dir).unwrap_or_else(|e| {
            let to = ledger::move_aside(state_dir, ledger::FILE);
            error!(moved_to = ?to, "the LAPI decision ledger is unusable, rebuilding it at the next full pull: {e}");
            Ledger::default()
        });
        let outbox = Outbox::load(state_dir, cfg.push_queue).unwrap_or_else(|e| {
            let to = ledger::move_aside(state_dir, outbox::FILE);
            error!(moved_to = ?to, "the LAPI push queue is unusable, starting empty: {e}");
            Outbox::new(cfg.push_queue)
        });
        Ok(Self {
            api,
            counters: Counters::default(),
            ledger: Mutex::new(ledger),
            outbox: Mutex::new(outbox),
            push_wake: Notify::new(),
            save_wake: Notify::new(),
            state_dir: state_dir.to_owned(),
        })
    }

    fn cfg(&self) -> &CrowdsecConfig {
        self.api.config()
    }

    fn pushes(&self) -> bool {
        self.cfg().push
    }

    pub fn queue_len(&self) -> u64 {
        lock(&self.outbox).len() as u64
    }

    /// Write the ledger and the queue if they changed.
    pub fn save(&self) {
        let snaps = {
            let mut l = lock(&self.ledger);
            let mut o = lock(&self.outbox);
            let ls = l.dirty.then(|| l.snapshot());
            let os = o.dirty.then(|| o.snapshot());
            l.dirty = false;
            o.dirty = false;
            (ls, os)
        };
        if let Some(b) = snaps.0
            && let Err(e) = ledger::write_atomic(&self.state_dir, ledger::FILE, &b)
        {
            error!("cannot write the LAPI decision ledger: {e}");
            lock(&self.ledger).dirty = true;
        }
        if let Some(b) = snaps.1
            && let Err(e) = ledger::write_atomic(&self.state_dir, outbox::FILE, &b)
        {
            error!("cannot write the LAPI push queue: {e}");
            lock(&self.outbox).dirty = true;
        }
    }
}

/// What one answer asks for, sorted out before any lock is taken.
struct Plan {
    adds: Vec<Decision>,
    deletes: Vec<i64>,
    /// Startup answers: every id it holds, for the sweep; `None` also when an element of
    /// `new` was malformed (what it held cannot be known, so nothing is swept).
    seen: Option<HashSet<i64>>,
    read_at: Ms,
}

fn plan(link: &Link, ans: StreamAnswer, startup: bool, read_at: Ms) -> Plan {
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
    pub(super) fn lapi(&self) -> Option<&Arc<Link>> {
        self.lapi.get()
    }

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
            let cur = g.policy.get(&cidr).cloned();
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
    fn apply_chunk(&self, link: &Link, deletes: &[i64], adds: &[Decision], read_at: Ms) {
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
    fn sweep_after_resync(&self, link: &Link, seen: &HashSet<i64>) -> usize {
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
    fn lapi_tick(&self, link: &Link) {
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
    fn lapi_fixup_adopted(&self, link: &Link) {
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

    /// Queue this node's new or extended bans for publishing (never `crowdsec` ones: no echo).
    pub(super) fn lapi_publish(&self, bans: &[Ban]) {
        let Some(link) = self.lapi().filter(|l| l.pushes()) else {
            return;
        };
        let mut queued = 0;
        {
            let mut l = lock(&link.ledger);
            let mut o = lock(&link.outbox);
            for b in bans.iter().filter(|b| b.source != BanSource::Crowdsec) {
                let expires = b.expires_at.map(ms);
                let job = PushBan {
                    cidr: b.cidr,
                    scenario: scenario_of(b.source, &b.reason),
                    reason: b.reason.clone(),
                    expires,
                    simulated: b.mode == Mode::Observe,
                };
                if o.push_ban(job) {
                    queued += 1;
                    l.mark_pushed(b.cidr, expires.unwrap_or(i64::MAX));
                } else {
                    link.counters.pushes_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if queued > 0 {
            link.push_wake.notify_one();
            link.save_wake.notify_one();
        }
    }

    /// `ban rm` with `[crowdsec]`: lift here; unless `--local`, delete LAPI's decisions for
    /// the address too (so every node lifts it), or queue the deletion if LAPI is away.
    pub(super) fn lapi_ban_rm(
        &self,
        link: &Link,
        cidrs: Vec<Cidr>,
        local: bool,
    ) -> Result<RemoveResponse, ApiError> {
        let mut resp = RemoveResponse::default();
        let mut to_delete = Vec::new();
        {
            let mut g = self.lock();
            let mut l = lock(&link.ledger);
            let mut o = lock(&link.outbox);
            for c in cidrs {
                let removed = g.remove_ban(&c);
                let ids = l.suppress(&c);
                let pushed = l.was_pushed(&c);
                l.forget_pushed(&c);
                o.drop_bans_of(&c);
                let from_lapi = removed
                    .as_ref()
                    .is_some_and(|b| b.source == BanSource::Crowdsec);
                match removed {
                    Some(_) => resp.removed.push(c.to_string()),
                    None => resp.missing.push(c.to_string()),
                }
                let in_lapi = !ids.is_empty() || pushed;
                if in_lapi && !local && link.pushes() {
                    to_delete.push((c, ids));
                } else if in_lapi && (from_lapi || !ids.is_empty()) {
                    resp.lapi_kept.push(c.to_string());
                }
            }
        }
        if !resp.removed.is_empty() {
            self.mark_dirty();
        }
        link.save_wake.notify_one();
        let rt = tokio::runtime::Handle::try_current().ok();
        for (c, ids) in to_delete {
            let done = rt.as_ref().and_then(|rt| {
                rt.block_on(async {
                    tokio::time::timeout(RM_WAIT, delete_in_lapi(&link.api, &c, &ids))
                        .await
                        .ok()
                })
            });
            match done {
                Some(Ok(n)) => resp.lapi_deleted.push((c.to_string(), n)),
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RM_WAIT:?}"),
                    };
                    warn!(addr = %c, "cannot delete the ban in LAPI, queued: {why}");
                    lock(&link.outbox).push_delete(c, ids);
                    link.push_wake.notify_one();
                    resp.lapi_queued.push(c.to_string());
                }
            }
        }
        Ok(resp)
    }

    pub(super) fn lapi_status(&self) -> Option<CrowdsecStatusJson> {
        let link = self.lapi()?;
        let enforced = {
            let g = self.lock();
            let i = BanSource::ALL
                .iter()
                .position(|s| *s == BanSource::Crowdsec)
                .expect("in ALL");
            g.policy.active_by_source()[i]
        };
        let tracked = lock(&link.ledger).len() as u64;
        let f = link.counters.facts().clone();
        let (last_pull, last_push, down_since) = f.status();
        Some(CrowdsecStatusJson {
            url: link.cfg().url.shown.clone(),
            up: link.counters.up.load(Ordering::Relaxed),
            last_pull,
            last_push,
            down_since,
            decisions_enforced: enforced,
            decisions_tracked: tracked,
            push: link.pushes(),
            push_queue: link.queue_len(),
            last_error: f.last_error,
        })
    }

    pub(super) fn lapi_metrics(&self) -> Option<crate::crowdsec::CrowdsecMetrics> {
        let link = self.lapi()?;
        Some(link.counters.metrics(link.queue_len()))
    }
}

/// Delete LAPI's decisions for `c`: the ids this node knows, and by value whatever else holds
/// exactly this address (what this node published and has not pulled back yet).
async fn delete_in_lapi(api: &Lapi, c: &Cidr, ids: &[i64]) -> Result<u64, LapiError> {
    let mut n = 0;
    for id in ids {
        n += api.delete_id(*id).await?;
    }
    let (_, value) = crate::crowdsec::model::scope_value(c);
    n += api.delete_value(&value).await?;
    Ok(n)
}

/// Start the LAPI tasks: pull, push (with machine credentials), and the file writer.
pub fn spawn(agent: &Arc<Agent>) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(link) = agent.lapi().cloned() else {
        return Vec::new();
    };
    agent.lapi_fixup_adopted(&link);
    info!(
        url = %link.cfg().url.shown,
        every = %crate::duration::human(link.cfg().update_frequency),
        push = link.pushes(),
        tracked = lock(&link.ledger).len(),
        queued = link.queue_len(),
        "CrowdSec LAPI configured"
    );
    let mut tasks = vec![
        tokio::spawn(pull_loop(agent.clone(), link.clone())),
        tokio::spawn(saver(link.clone())),
    ];
    if link.pushes() {
        tasks.push(tokio::spawn(push_loop(link.clone())));
    }
    tasks
}

async fn saver(link: Arc<Link>) {
    loop {
        link.save_wake.notified().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let l = link.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || l.save()).await {
            error!("LAPI file writer: {e}");
        }
    }
}

async fn pull_loop(agent: Arc<Agent>, link: Arc<Link>) {
    let every = link.cfg().update_frequency;
    let backoff_max = every * 6;
    let mut startup = true;
    let mut last_full = Instant::now();
    let mut wait = every;
    loop {
        if last_full.elapsed() >= RESYNC_EVERY {
            startup = true;
        }
        let t = Instant::now();
        let r = link.api.stream(startup).await;
        let read_at = ms(OffsetDateTime::now_utc());
        match r {
            Ok(ans) => {
                let p = plan(&link, ans, startup, read_at);
                let (n_new, n_del) = (p.adds.len(), p.deletes.len());
                let swept = apply(&agent, &link, p).await;
                link.counters.pull_result("ok");
                let was_up = link.counters.up.swap(true, Ordering::Relaxed);
                {
                    let mut f = link.counters.facts();
                    f.last_pull = Some(OffsetDateTime::now_utc());
                    f.down_since = None;
                }
                if startup {
                    info!(
                        decisions = n_new,
                        swept,
                        ms = t.elapsed().as_millis() as u64,
                        "LAPI full pull applied"
                    );
                    last_full = Instant::now();
                } else if n_new + n_del > 0 {
                    info!(new = n_new, deleted = n_del, "LAPI decisions applied");
                }
                if !was_up && !startup {
                    info!("LAPI is back");
                }
                startup = false;
                wait = every;
            }
            Err(e) => {
                link.counters.pull_result(e.label());
                let was_up = link.counters.up.swap(false, Ordering::Relaxed);
                {
                    let mut f = link.counters.facts();
                    f.down_since.get_or_insert_with(OffsetDateTime::now_utc);
                    f.last_error = Some(format!("pull: {e}"));
                }
                if was_up || !startup {
                    warn!(
                        "LAPI pull failed, keeping every ban (fail-static), retrying with backoff and a full resync: {e}"
                    );
                }
                startup = true;
                wait = if was_up {
                    every
                } else {
                    (wait * 2).min(backoff_max)
                };
            }
        }
        link.counters
            .last_pull_ms
            .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
        let (a, l) = (agent.clone(), link.clone());
        let _ = tokio::task::spawn_blocking(move || a.lapi_tick(&l)).await;
        link.save_wake.notify_one();
        tokio::time::sleep(wait).await;
    }
}

/// Apply a plan chunk by chunk on the blocking pool; returns how many were swept.
async fn apply(agent: &Arc<Agent>, link: &Arc<Link>, p: Plan) -> usize {
    let Plan {
        adds,
        deletes,
        seen,
        read_at,
    } = p;
    // Deletions first, so a decision replaced by a longer one in the same answer stays.
    for chunk in deletes.chunks(CHUNK) {
        let (a, l, v) = (agent.clone(), link.clone(), chunk.to_vec());
        let _ = tokio::task::spawn_blocking(move || a.apply_chunk(&l, &v, &[], read_at)).await;
    }
    let mut it = adds.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Decision> = it.by_ref().take(CHUNK).collect();
        let (a, l) = (agent.clone(), link.clone());
        let _ = tokio::task::spawn_blocking(move || a.apply_chunk(&l, &[], &chunk, read_at)).await;
    }
    match seen {
        Some(seen) => {
            let (a, l) = (agent.clone(), link.clone());
            tokio::task::spawn_blocking(move || a.sweep_after_resync(&l, &seen))
                .await
                .unwrap_or(0)
        }
        None => 0,
    }
}

async fn push_loop(link: Arc<Link>) {
    let machine = link
        .cfg()
        .machine
        .as_ref()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let mut backoff = Duration::from_secs(1);
    loop {
        if lock(&link.outbox).is_empty() {
            link.push_wake.notified().await;
            tokio::time::sleep(PUSH_COALESCE).await;
        }
        let (front, seq) = lock(&link.outbox).front(ALERT_BATCH);
        let r = match front {
            Front::Empty => continue,
            Front::Bans(bans) => {
                let alerts = build_alerts(&bans, &machine, OffsetDateTime::now_utc());
                let n: usize = alerts.iter().map(|a| a.decisions.len()).sum();
                let r = if alerts.is_empty() {
                    Ok(())
                } else {
                    link.api.post_alerts(&alerts).await.map(drop)
                };
                match &r {
                    Ok(()) => {
                        link.counters
                            .pushes_ok
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if n > 0 {
                            info!(bans = n, alerts = alerts.len(), "published to LAPI");
                        }
                    }
                    Err(_) => {
                        link.counters
                            .pushes_failed
                            .fetch_add(bans.len() as u64, Ordering::Relaxed);
                    }
                }
                r
            }
            Front::Delete(c, ids) => delete_in_lapi(&link.api, &c, &ids).await.map(|n| {
                info!(addr = %c, decisions = n, "deleted in LAPI (queued ban rm)");
            }),
        };
        match r {
            Ok(()) => {
                lock(&link.outbox).pop_through(seq);
                link.counters.facts().last_push = Some(OffsetDateTime::now_utc());
                link.save_wake.notify_one();
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                warn!(retry_in = ?backoff, "LAPI push failed, kept in the queue: {e}");
                link.counters.facts().last_error = Some(format!("push: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PUSH_BACKOFF_MAX);
            }
        }
    }
}
