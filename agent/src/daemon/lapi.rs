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
//!
//! `apply`: answers into bans; `ops`: what the API and the ban paths ask of LAPI.

mod apply;
mod ops;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::shared::Agent;
use crate::{
    addr::Cidr,
    crowdsec::{
        ALERT_BATCH, Counters, CrowdsecConfig,
        api::{Lapi, LapiError},
        build_alerts,
        ledger::{self, Ledger, Ms},
        model::Decision,
        outbox::{self, Front, Outbox},
    },
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
                let p = apply::plan(&link, ans, startup, read_at);
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
async fn apply(agent: &Arc<Agent>, link: &Arc<Link>, p: apply::Plan) -> usize {
    let apply::Plan {
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
