//! Start-up: state file, kernel handle, and reconciling the two.
//!
//! Which side is the truth for *which bans exist* depends on whether the pins were there
//! before we opened the data path:
//! - pins present (agent restart, upgrade, kill -9): the live maps are the truth. A ban in the
//!   maps but not in the state (state lost, or written just before the crash) is adopted; a
//!   ban in the state but not in the maps was removed after the last state write (API, expiry)
//!   and stays removed.
//! - pins absent (node reboot, after `wsguard detach`): the state file is the truth and every
//!   unexpired ban is written back.
//! - restore interrupted (`restore-pending` marker in the state directory, left by a start that
//!   was killed while writing saved bans back into fresh maps): the state file is still the
//!   truth for bans missing from the maps; live entries are adopted as above.
//! - pin directory not on bpffs (and bpffs cannot be mounted there): enforce mode refuses to
//!   start; observe mode runs unpinned (nothing survives the agent, and nothing is dropped).
//!
//! In every case the state file supplies what the kernel does not record (source, reason,
//! offences) and expired bans are dropped and counted.

use std::{collections::BTreeSet, path::Path};

use time::OffsetDateTime;

use anyhow::{Context as _, bail};
use tracing::{error, info, warn};
use wsguard_common::maps::BanValue;

use super::{
    kernel::{self, Clocks},
    shared::Inner,
};
use crate::{
    addr::Cidr,
    config::AgentConfig,
    datapath::{DataPath, DataPathError, DataPathOptions},
    model::{AllowEntry, Ban, Mode},
    paths,
    policy::{Offense, Policy, PolicyConfig},
    state::{self, Loaded},
};

pub fn policy_config(cfg: &AgentConfig) -> PolicyConfig {
    PolicyConfig {
        ban_ttl: cfg.ban_ttl,
        ban_max_ttl: cfg.ban_max_ttl,
        max_bans: u64::from(cfg.max_bans),
        mode: cfg.mode,
        breaker: cfg.breaker,
        offense_memory: cfg.offense_memory,
    }
}

/// The state file read straight into the policy: saved bans wait there, pending, for the
/// kernel maps to confirm them (no second copy of a million bans).
struct Restore<'a> {
    policy: &'a mut Policy,
    now: OffsetDateTime,
    bans: u64,
    expired: u64,
}

impl state::Sink for Restore<'_> {
    fn allow(&mut self, e: AllowEntry) {
        if let Err(err) = self.policy.allow_add(e.cidr, e.reason.clone()) {
            warn!(addr = %e.cidr, "dropping saved allowlist entry: {err}");
        }
    }

    fn offense(&mut self, c: Cidr, o: Offense) {
        self.policy.restore_offense(c, o);
    }

    fn ban(&mut self, b: Ban) {
        // Expired ones too: the kernel's entry of the same ban is counted once, in the walk.
        if b.is_expired(self.now) {
            self.expired += 1;
        }
        self.bans += 1;
        if let Err(r) = self.policy.restore_pending(b) {
            warn!("not restoring saved ban: {r}");
        }
    }
}

/// Read the state file into `policy`; an unusable one is moved aside and the agent goes on
/// without it (`fresh` makes the policy again, as the part read is thrown away).
fn load_state(dir: &Path, policy: &mut Policy, fresh: impl Fn() -> Policy) {
    let t = std::time::Instant::now();
    let now = OffsetDateTime::now_utc();
    let mut r = Restore {
        policy,
        now,
        bans: 0,
        expired: 0,
    };
    let res = state::load(dir, now.unix_timestamp(), &mut r);
    let (bans, expired) = (r.bans, r.expired);
    let failed = match res {
        Ok(Loaded::Found) => {
            info!(
                bans,
                expired,
                ms = t.elapsed().as_millis() as u64,
                "state file read"
            );
            return;
        }
        Ok(Loaded::Missing) => return,
        Ok(Loaded::MovedAside { to, why }) => {
            error!(moved_to = %to.display(), "state file unusable, starting from the pinned maps: {why}");
            true
        }
        Err(e) => {
            error!("cannot read the state file, starting from the pinned maps: {e}");
            false
        }
    };
    if failed {
        *policy = fresh();
    }
}

fn pins_present(pin_dir: &Path) -> bool {
    std::fs::read_dir(pin_dir).is_ok_and(|mut d| d.next().is_some())
}

/// Create the restore marker durably (file and directory entry) before the first write.
fn mark_restoring(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(dir.join(paths::RESTORE_MARKER))?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

pub fn open(cfg: &AgentConfig) -> anyhow::Result<Inner> {
    let t = std::time::Instant::now();
    let marker = cfg.state_dir.join(paths::RESTORE_MARKER);
    let interrupted = marker.exists();
    if interrupted {
        warn!("the previous start died while restoring bans from the state file; finishing it");
    }
    let restoring = interrupted || !pins_present(&cfg.pin_dir);
    let node = kernel::node_addrs();
    let fresh = || {
        let mut p = Policy::new(policy_config(cfg), &node, &cfg.allow);
        // Before the bans are reconciled: a pinned ban of a load balancer (an older build
        // judged its flows as its own) is lifted here rather than adopted.
        p.set_proxy_trust(&cfg.proxy_protocol_from);
        p
    };
    for c in crate::proxy::wide(&cfg.proxy_protocol_from) {
        warn!(
            proxy_protocol_from = %c,
            "a wide trusted PROXY sender range: any host in it can claim to relay any client \
             (and get it banned); list the load balancers' own subnets"
        );
    }
    // The state file and the data path do not depend on each other, and at a million bans each
    // takes about a second (parsing the file; loading the programs and walking the maps): read
    // side by side, a restart is ready that much sooner.
    let (mut dp, policy) = std::thread::scope(|s| {
        let state = s.spawn(|| {
            let mut policy = fresh();
            load_state(&cfg.state_dir, &mut policy, fresh);
            policy
        });
        let dp = open_data_path(cfg, t);
        let policy = state
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        dp.map(|dp| (dp, policy))
    })?;
    let current = dp.config().context("cannot read the kernel CONFIG")?;
    dp.set_config(&kernel::kernel_config(cfg, &current))
        .context("cannot write the kernel CONFIG")?;
    dp.set_ports(&cfg.ports)
        .context("cannot write the watched ports")?;
    // At every start (fresh, adopted or upgraded maps): the config is the only source of the
    // trusted senders, so a sender dropped from it stops being believed here.
    dp.set_proxy_trust(&cfg.proxy_protocol_from)
        .context("cannot write the trusted PROXY senders (proxy_protocol_from)")?;
    if restoring
        && !policy.is_empty()
        && let Err(e) = mark_restoring(&cfg.state_dir)
    {
        // Enforcing matters more than surviving a crash in the next second or two.
        error!(marker = %marker.display(), "cannot mark the restore as pending, restoring anyway: {e}");
    }
    let kernel_allow: BTreeSet<Cidr> = dp
        .allows()
        .context("cannot read the allowlist maps")?
        .into_iter()
        .collect();
    let mut inner = Inner::new(policy, dp, kernel_allow);
    inner.sync_allow();
    reconcile_bans(&mut inner, !restoring)?;
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it only makes the next start re-check the state against the maps.
        Err(e) => warn!(marker = %marker.display(), "cannot remove the restore marker: {e}"),
    }
    Ok(inner)
}

/// Load or adopt the data path (see `DataPath::open`); unpinned in observe mode off bpffs.
fn open_data_path(cfg: &AgentConfig, t: std::time::Instant) -> anyhow::Result<DataPath> {
    let opts = DataPathOptions {
        pin_dir: cfg.pin_dir.clone(),
        interfaces: cfg.interfaces.clone(),
        xdp_mode: cfg.xdp_mode,
        max_bans: cfg.max_bans,
    };
    let dp = match DataPath::open(&opts) {
        Ok(dp) => dp,
        // Observe mode drops nothing, so losing the maps with the agent costs only counters.
        Err(DataPathError::NotBpffs { path, detail }) if cfg.mode == Mode::Observe => {
            warn!(
                pin_dir = %path.display(),
                "the pin directory is not on bpffs ({detail}): running unpinned in observe mode; \
                 programs and maps go away with the agent"
            );
            DataPath::open_unpinned(&opts).context("cannot load the data path unpinned")?
        }
        Err(DataPathError::NotBpffs { path, detail }) => bail!(
            "refusing to enforce: the pin directory {} is not on bpffs ({detail}), so bans and \
             programs would not survive the agent; mount bpffs there, pick another --pin-dir, or \
             run with --mode observe",
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot load the data path on {} (pin dir {})",
                    cfg.interfaces.join(","),
                    cfg.pin_dir.display()
                )
            });
        }
    };
    info!(ms = t.elapsed().as_millis() as u64, "data path open");
    Ok(dp)
}

/// The saved bans are in the policy, pending. One walk of the maps confirms those it finds
/// (the live entry's timing and flags are newer than any state write) and adopts the rest;
/// then the saved bans still pending were removed since the state write (`maps_are_truth`:
/// they stay removed) or are written back.
fn reconcile_bans(inner: &mut Inner, maps_are_truth: bool) -> anyhow::Result<()> {
    let c_started = std::time::Instant::now();
    let c = Clocks::now();
    let (mut adopted, mut expired, mut restored, mut dropped) = (0, 0u64, 0, 0);
    let mut gone = Vec::new();
    let Inner { policy, dp, .. } = inner;
    let mut judge = |slab: &mut Vec<(Cidr, BanValue)>| {
        // In address order: the policy's store is a B-tree, and lookups in the maps' hash
        // order miss the cache at almost every node (a million of them took about a second);
        // sorted, consecutive lookups share most of their path.
        slab.sort_unstable_by_key(|(cidr, _)| *cidr);
        for (cidr, v) in slab.drain(..) {
            if v.is_expired(c.boot_ns) {
                gone.push(cidr);
                policy.unban(&cidr);
                expired += 1;
                continue;
            }
            let (expires_at, mode, hard) = kernel::timing_of(&v, &c);
            if policy.confirm_from_kernel(&cidr, expires_at, mode, hard) {
                continue;
            }
            adopted += 1;
            let ban = kernel::adopted_ban(cidr, &v, &c);
            if let Err(r) = policy.restore(ban) {
                warn!("lifting pinned ban: {r}");
                gone.push(cidr);
            }
        }
    };
    let mut slab = Vec::new();
    dp.each_ban(&mut |chunk| {
        slab.extend_from_slice(chunk);
        if slab.len() >= CONFIRM_SLAB {
            judge(&mut slab);
        }
        Ok(())
    })
    .context("cannot read the ban maps")?;
    judge(&mut slab);
    let read_ms = c_started.elapsed().as_millis() as u64;
    for cidr in &gone {
        let _ = inner.dp.del_ban(cidr);
    }
    loop {
        let pending = inner.policy.take_pending(RESTORE_CHUNK);
        if pending.is_empty() {
            break;
        }
        let mut batch = Vec::new();
        for b in &pending {
            if b.is_expired(c.wall) {
                expired += 1;
                inner.policy.unban(&b.cidr);
            } else if maps_are_truth {
                dropped += 1;
                inner.policy.unban(&b.cidr);
            } else {
                batch.push((b.cidr, kernel::ban_value(b, &c)));
            }
        }
        restored += restore_chunk(inner, &batch);
    }
    inner.policy.count_expired(expired);
    info!(
        active = inner.policy.len(),
        adopted,
        restored,
        expired,
        dropped_stale = dropped,
        read_maps_ms = read_ms,
        ms = c_started.elapsed().as_millis() as u64,
        "bans reconciled"
    );
    Ok(())
}

/// Kernel entries sorted and judged together at start-up: 7 MiB, against the 128 MiB the agent
/// may use at a million bans.
const CONFIRM_SLAB: usize = 1 << 17;

/// Saved bans written back per `put_bans` call: the write is batched either way; the chunk
/// only bounds what a refusal (cap) sends down the one-by-one path.
const RESTORE_CHUNK: usize = 65_536;

/// Write back saved bans already in the policy, batched; returns how many reached the kernel.
/// A chunk over the cap is refused whole by `put_bans`, so it goes one by one and fills what
/// room there is; a ban the kernel does not take leaves the policy too.
fn restore_chunk(inner: &mut Inner, chunk: &[(Cidr, BanValue)]) -> u64 {
    let err = match inner.dp.put_bans(chunk) {
        Ok(_) => return chunk.len() as u64,
        Err(e) => e,
    };
    if matches!(err.err, DataPathError::Full { .. }) && err.unwritten.len() == chunk.len() {
        let mut n = 0;
        for (cidr, v) in chunk {
            match inner.dp.put_ban(cidr, v) {
                Ok(()) => n += 1,
                Err(e) => {
                    inner.policy.unban(cidr);
                    error!(addr = %cidr, "cannot restore ban: {e}");
                }
            }
        }
        return n;
    }
    error!(
        unwritten = err.unwritten.len(),
        "cannot restore saved bans: {}", err.err
    );
    for cidr in &err.unwritten {
        inner.policy.unban(cidr);
    }
    (chunk.len() - err.unwritten.len()) as u64
}
