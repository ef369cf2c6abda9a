//! The agent's state shared by the tasks and the API: the policy engine and the kernel handle
//! behind one std mutex (map operations are single syscalls; critical sections stay short).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        LazyLock, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
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
    state::{self, State},
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
    /// Snapshots taken so far, and the number of the last one written.
    snapshots: AtomicU64,
    written: Mutex<u64>,
    /// The running log sources (`[logs]`), once started.
    pub(super) logs: Mutex<Option<LogsHandle>>,
}

pub struct Inner {
    pub policy: Policy,
    pub dp: DataPath,
    /// What the kernel allowlist holds, so syncing it is a diff.
    pub kernel_allow: BTreeSet<Cidr>,
    /// Per-ban drop counters read from the maps, refreshed at most every second so listing
    /// 1M bans page by page does not walk the map once per page.
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
            snapshots: AtomicU64::new(0),
            written: Mutex::new(0),
            logs: Mutex::new(None),
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

    pub fn mark_dirty(&self) {
        self.dirty.notify_one();
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
            }
            Ok(a) if a.change == Change::Updated => self.mark_dirty(),
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
    /// a time, and a write never replaces a newer snapshot: the debounced writer and the exit
    /// path can race (an aborted writer's blocking half keeps running).
    pub fn save_state(&self) -> Result<(), state::StateError> {
        let (n, snap) = {
            let g = self.lock();
            (
                self.snapshots.fetch_add(1, Ordering::SeqCst) + 1,
                Self::snapshot_of(&g),
            )
        };
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written > n {
            return Ok(());
        }
        state::save(&self.cfg.state_dir, &snap)?;
        *written = n;
        Ok(())
    }

    fn snapshot_of(g: &Inner) -> State {
        let p = &g.policy;
        State {
            version: state::VERSION,
            bans: p.bans().cloned().collect(),
            allow: p
                .allow_entries()
                .filter(|e| e.source == crate::model::AllowSource::Manual)
                .cloned()
                .collect(),
            offenses: p.offenses().iter().map(|(c, o)| (*c, *o)).collect(),
        }
    }
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

    /// Drop counters per ban from the maps; `fresh` forces a re-read.
    pub fn drops(&mut self, fresh: bool) -> &HashMap<Cidr, u64> {
        let stale = self
            .drops
            .as_ref()
            .is_none_or(|(t, _)| fresh || t.elapsed().as_secs() >= 1);
        if stale {
            let m = match self.dp.bans() {
                Ok(v) => v.into_iter().map(|(c, b)| (c, b.drops)).collect(),
                Err(e) => {
                    warn!("cannot read the ban maps: {e}");
                    HashMap::new()
                }
            };
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
