//! The agent's state shared by the tasks and the API: the policy engine and the kernel handle
//! behind one std mutex (map operations are single syscalls; critical sections stay short).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        LazyLock, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};
use wsguard_common::maps::BurstEvent;

use super::kernel::{self, Clocks};
use crate::{
    addr::Cidr,
    config::AgentConfig,
    datapath::{DataPath, DataPathError},
    duration,
    logs::LogsHandle,
    model::{Ban, BanSource},
    policy::{Applied, BanRequest, Change, Policy, Refusal, RefuseReason, Ttl},
    state,
};

pub struct Agent {
    pub cfg: AgentConfig,
    inner: Mutex<Inner>,
    pub started: Instant,
    ready: AtomicBool,
    /// Something persisted changed: the writer task saves soon.
    pub dirty: tokio::sync::Notify,
    /// `wsguard detach` ran: the agent exits.
    pub exit: tokio::sync::Notify,
    pub detached: AtomicBool,
    /// Calls to `mark_dirty` so far: a snapshot records how many it covers.
    changes: AtomicU64,
    /// Snapshots taken so far; a write of a snapshot numbered below `abandon_below` stops
    /// part way (the exit path does not wait for a stale write to finish).
    snapshots: AtomicU64,
    abandon_below: AtomicU64,
    /// The last snapshot written: its number and the changes it covers. Held for the whole
    /// write, so writes happen one at a time.
    written: Mutex<Written>,
    /// The running log sources (`[logs]`), once started.
    pub(super) logs: Mutex<Option<LogsHandle>>,
    /// CrowdSec LAPI (`[crowdsec]`), set once before the tasks start.
    pub(super) lapi: std::sync::OnceLock<std::sync::Arc<super::lapi::Link>>,
}

pub struct Inner {
    pub policy: Policy,
    pub dp: DataPath,
    /// What the kernel allowlist holds, so syncing it is a diff.
    pub kernel_allow: BTreeSet<Cidr>,
    /// Non-zero drop counters read from the maps, and when (see [`Inner::drops`]).
    drops: Option<(Instant, HashMap<Cidr, u64>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("cannot write the ban of {cidr} to the kernel: {err}")]
    Kernel { cidr: Cidr, err: DataPathError },
}

impl Agent {
    pub fn new(cfg: AgentConfig, inner: Inner) -> Self {
        Self {
            cfg,
            inner: Mutex::new(inner),
            started: Instant::now(),
            ready: AtomicBool::new(false),
            dirty: tokio::sync::Notify::new(),
            exit: tokio::sync::Notify::new(),
            detached: AtomicBool::new(false),
            changes: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            abandon_below: AtomicU64::new(0),
            written: Mutex::new(Written::default()),
            logs: Mutex::new(None),
            lapi: std::sync::OnceLock::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Call after the change is made (and the lock released): a snapshot taken under the lock
    /// then never claims a change it does not hold.
    pub fn mark_dirty(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.dirty.notify_one();
    }

    /// Calls to [`Agent::mark_dirty`] so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// A burst from the kernel ring buffer goes through the policy like any other ban.
    pub fn on_burst(&self, ev: &BurstEvent) {
        self.auto_ban(BanRequest {
            cidr: Cidr::host(kernel::ip16(ev.addr)),
            source: BanSource::Kernel,
            reason: burst_reason(ev, &self.cfg),
            ttl: Ttl::Default,
            observe: false,
            hard: false,
        });
    }

    /// The entry point of every automatic detector (kernel bursts, log bursts): decide through
    /// the policy (allowlist, cap, breaker), write the kernel, log the outcome.
    pub fn auto_ban(&self, req: BanRequest) {
        let cidr = req.cidr;
        let c = Clocks::now();
        let mut g = self.lock();
        let was_open = g.policy.breaker_open(c.wall);
        let r = g.apply_ban(req, &c);
        let now_open = g.policy.breaker_open(c.wall);
        drop(g);
        if now_open && !was_open {
            warn!(
                limit = self.cfg.breaker.limit,
                window = %duration::human(self.cfg.breaker.window),
                "circuit breaker open: too many new automatic bans, new ones are observe-only \
                 (wsguard_circuit_breaker_open); check for a misbehaving client release or a \
                 too low threshold"
            );
        }
        match r {
            Ok(a) if a.change == Change::Created => {
                let b = &a.ban;
                let ttl = b
                    .expires_at
                    .map(|e| duration::human((e - b.created_at).unsigned_abs()));
                info!(addr = %cidr, source = b.source.as_str(), mode = b.mode.as_str(), ttl = ttl.as_deref().unwrap_or("permanent"), offenses = b.offenses, reason = %b.reason, "banned");
                self.mark_dirty();
                self.lapi_publish([b]);
            }
            Ok(a) if a.change == Change::Updated => {
                self.mark_dirty();
                self.lapi_publish([&a.ban]);
            }
            Ok(_) => {}
            // A storm refuses thousands: the metric counts them, the log says it once (above).
            Err(BanError::Refused(r)) if r.reason() == RefuseReason::RateLimited => {
                debug!(addr = %cidr, "{r}")
            }
            Err(BanError::Refused(r)) => info!(addr = %cidr, "{r}"),
            Err(e) => warn!("{e}"),
        }
    }

    /// Remove expired bans from the policy and the maps.
    pub fn sweep(&self) {
        let c = Clocks::now();
        let mut g = self.lock();
        let gone = g.policy.expire(c.wall);
        for b in &gone {
            if let Err(e) = g.dp.del_ban(&b.cidr) {
                warn!(addr = %b.cidr, "cannot delete expired ban: {e}");
            }
        }
        match g.dp.settle_preserve() {
            Ok(0) => {}
            Ok(n) => debug!(
                bans = n,
                "no flow to preserve: flow lookups off for these bans"
            ),
            Err(e) => warn!("cannot settle which bans preserve flows: {e}"),
        }
        super::proxy::settle(&mut g);
        drop(g);
        if !gone.is_empty() {
            info!(count = gone.len(), "bans expired");
            self.mark_dirty();
        }
    }

    /// The node's addresses change (DHCP, new pods' gateways): keep the built-ins current.
    pub fn refresh_node_addrs(&self) {
        let addrs = kernel::node_addrs();
        let mut g = self.lock();
        let lifted = g.policy.set_node_addrs(&addrs);
        for b in &lifted {
            let _ = g.dp.del_ban(&b.cidr);
            info!(addr = %b.cidr, "ban lifted: now a node address");
        }
        g.sync_allow();
        drop(g);
        if !lifted.is_empty() {
            self.mark_dirty();
        }
    }

    /// Write the current state. Snapshots are numbered under the agent lock and written one at
    /// a time, and a write never replaces a newer snapshot: the writer task and the exit path
    /// can race (an aborted writer's blocking half keeps running).
    ///
    /// The bans are copied under the lock a chunk at a time, never all at once: a write holds
    /// at least every change made before it started (`changes` is read first), and a change
    /// made during it is in the next write, which `mark_dirty` has already asked for.
    pub fn save_state(&self) -> Result<(), state::StateError> {
        let t = Instant::now();
        let (n, changes, header) = {
            let g = self.lock();
            (
                self.snapshots.fetch_add(1, Ordering::SeqCst) + 1,
                self.changes.load(Ordering::SeqCst),
                Self::header_of(&g),
            )
        };
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if written.snapshot > n {
            return Ok(());
        }
        let abandon = || self.abandon_below.load(Ordering::SeqCst) > n;
        let mut after = None;
        let mut bans = 0usize;
        let mut next = || {
            let chunk = self.lock().policy.bans_after(after, SAVE_CHUNK);
            after = chunk.last().map(|b| b.cidr);
            bans += chunk.len();
            chunk
        };
        match state::save(&self.cfg.state_dir, &header, &mut next, &abandon) {
            Ok(()) => {}
            Err(state::StateError::Abandoned) => return Ok(()),
            Err(e) => return Err(e),
        }
        *written = Written {
            snapshot: n,
            changes,
        };
        drop(written);
        if t.elapsed() >= Duration::from_secs(1) {
            info!(bans, ms = t.elapsed().as_millis() as u64, "slow state save");
        }
        Ok(())
    }

    /// Some change is not in the file yet (nor in a write that has finished).
    pub fn unsaved(&self) -> bool {
        let w = *self.written.lock().unwrap_or_else(|p| p.into_inner());
        w.changes < self.changes.load(Ordering::SeqCst)
    }

    /// The exit path's save: nothing to do when the file already holds every change; else a
    /// write of an older snapshot still running is abandoned (it would be replaced anyway)
    /// and the current state is written once.
    pub fn save_state_at_exit(&self) -> Result<(), state::StateError> {
        let want = self.changes.load(Ordering::SeqCst);
        let covered = |w: &Written| w.changes >= want;
        if covered(&self.written.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(());
        }
        self.abandon_below
            .store(self.snapshots.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
        self.save_state()
    }

    /// What the state file holds besides the bans, copied under the lock.
    fn header_of(g: &Inner) -> state::Header {
        let p = &g.policy;
        state::Header {
            allow: p
                .allow_entries()
                .filter(|e| e.source == crate::model::AllowSource::Manual)
                .cloned()
                .collect(),
            offenses: p.offenses().iter().map(|(c, o)| (*c, *o)).collect(),
        }
    }
}

/// Bans copied per lock hold while the state is written (a few milliseconds each).
const SAVE_CHUNK: usize = 8192;

#[derive(Clone, Copy, Debug, Default)]
struct Written {
    snapshot: u64,
    changes: u64,
}

impl Inner {
    pub fn new(policy: Policy, dp: DataPath, kernel_allow: BTreeSet<Cidr>) -> Self {
        Self {
            policy,
            dp,
            kernel_allow,
            drops: None,
        }
    }

    /// Decide `req` and write the result to the kernel. A new ban the kernel will not take is
    /// rolled back so the policy never claims a ban that is not enforced.
    pub fn apply_ban(&mut self, req: BanRequest, c: &Clocks) -> Result<Applied, BanError> {
        let a = self.policy.ban(req, c.wall)?;
        if a.change == Change::Unchanged {
            return Ok(a);
        }
        match self.dp.put_ban(&a.ban.cidr, &kernel::ban_value(&a.ban, c)) {
            Ok(()) => {
                after_ban_write();
                super::proxy::cut_hard(self, [&a.ban]);
                Ok(a)
            }
            Err(err) => {
                if a.change == Change::Created {
                    self.policy.unban(&a.ban.cidr);
                }
                if let DataPathError::Full { capacity } = err {
                    self.policy.count_refused(RefuseReason::Full);
                    let max = u64::from(capacity);
                    return Err(Refusal::Full {
                        cidr: a.ban.cidr,
                        max,
                    }
                    .into());
                }
                Err(BanError::Kernel {
                    cidr: a.ban.cidr,
                    err,
                })
            }
        }
    }

    pub fn remove_ban(&mut self, cidr: &Cidr) -> Option<Ban> {
        let b = self.policy.unban(cidr)?;
        if let Err(e) = self.dp.del_ban(cidr) {
            warn!(addr = %cidr, "cannot delete ban from the kernel: {e}");
        }
        Some(b)
    }

    /// Make the kernel allowlist equal the policy's.
    pub fn sync_allow(&mut self) {
        let want: BTreeSet<Cidr> = self.policy.allow_entries().map(|e| e.cidr).collect();
        for c in want.difference(&self.kernel_allow.clone()) {
            match self.dp.put_allow(c) {
                Ok(()) => _ = self.kernel_allow.insert(*c),
                Err(e) => warn!(addr = %c, "cannot write allowlist entry: {e}"),
            }
        }
        for c in self.kernel_allow.clone().difference(&want) {
            match self.dp.del_allow(c) {
                Ok(()) => _ = self.kernel_allow.remove(c),
                Err(e) => warn!(addr = %c, "cannot delete allowlist entry: {e}"),
            }
        }
    }

    /// Drop counters of the bans that dropped anything (absent: 0), from one walk of the maps
    /// (batch reads) at most `max_age` ago: many lookups, a page of a listing or a `top`, share
    /// a walk, and bans that never dropped a packet (most of a large blocklist) take no room.
    pub fn drops(&mut self, max_age: Duration) -> &HashMap<Cidr, u64> {
        let stale = self
            .drops
            .as_ref()
            .is_none_or(|(t, _)| max_age.is_zero() || t.elapsed() >= max_age);
        if stale {
            let mut m = HashMap::new();
            let walked = self.dp.each_ban(&mut |chunk| {
                m.extend(
                    chunk
                        .iter()
                        .filter(|(_, v)| v.drops > 0)
                        .map(|(c, v)| (*c, v.drops)),
                );
                Ok(())
            });
            if let Err(e) = walked {
                warn!("cannot read the ban maps: {e}");
                m.clear();
            }
            self.drops = Some((Instant::now(), m));
        }
        &self.drops.as_ref().expect("just set").1
    }
}

/// Test hook: `WSGUARD_TEST_KILL_AFTER_BAN_WRITES=N` SIGKILLs the agent right after its Nth
/// ban written to the kernel, so a test can crash it in the middle of a batch at a known point
/// (an outside `kill -9` can only guess the moment).
pub fn after_ban_write() {
    static LEFT: LazyLock<Option<AtomicU64>> = LazyLock::new(|| {
        std::env::var("WSGUARD_TEST_KILL_AFTER_BAN_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(AtomicU64::new)
    });
    if let Some(left) = LEFT.as_ref()
        && left.fetch_sub(1, Ordering::SeqCst) == 1
    {
        warn!("WSGUARD_TEST_KILL_AFTER_BAN_WRITES reached: SIGKILL");
        // SAFETY: plain kill(2) of our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

fn burst_reason(ev: &BurstEvent, cfg: &AgentConfig) -> String {
    let reasons: Vec<String> = wsguard_common::BadReason::ALL
        .iter()
        .zip(ev.reasons)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.as_str()))
        .collect();
    format!(
        "{} bad handshakes in {} on port {} ({})",
        ev.count,
        duration::human(cfg.window),
        ev.port,
        reasons.join(", ")
    )
}
