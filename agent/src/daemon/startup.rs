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
    model::{Ban, Mode},
    paths,
    policy::{Policy, PolicyConfig},
    state::{self, Loaded, State},
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

/// Read the state file; an unusable one is moved aside and the agent goes on without it.
pub fn load_state(dir: &Path) -> Option<State> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    match state::load(dir, now) {
        Ok(Loaded::Found(s)) => Some(s),
        Ok(Loaded::Missing) => None,
        Ok(Loaded::MovedAside { to, why }) => {
            error!(moved_to = %to.display(), "state file unusable, starting from the pinned maps: {why}");
            None
        }
        Err(e) => {
            error!("cannot read the state file, starting from the pinned maps: {e}");
            None
        }
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
    let saved = load_state(&cfg.state_dir);
    info!(
        bans = saved.as_ref().map_or(0, |s| s.bans.len()),
        ms = t.elapsed().as_millis() as u64,
        "state file read"
    );
    let marker = cfg.state_dir.join(paths::RESTORE_MARKER);
    let interrupted = marker.exists();
    if interrupted {
        warn!("the previous start died while restoring bans from the state file; finishing it");
    }
    let restoring = interrupted || !pins_present(&cfg.pin_dir);
    if restoring
        && saved.as_ref().is_some_and(|s| !s.bans.is_empty())
        && let Err(e) = mark_restoring(&cfg.state_dir)
    {
        // Enforcing matters more than surviving a crash in the next second or two.
        error!(marker = %marker.display(), "cannot mark the restore as pending, restoring anyway: {e}");
    }
    let opts = DataPathOptions {
        pin_dir: cfg.pin_dir.clone(),
        interfaces: cfg.interfaces.clone(),
        xdp_mode: cfg.xdp_mode,
        max_bans: cfg.max_bans,
    };
    let mut dp = match DataPath::open(&opts) {
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
    let current = dp.config().context("cannot read the kernel CONFIG")?;
    dp.set_config(&kernel::kernel_config(cfg, &current))
        .context("cannot write the kernel CONFIG")?;
    dp.set_ports(&cfg.ports)
        .context("cannot write the watched ports")?;
    // At every start (fresh, adopted or upgraded maps): the config is the only source of the
    // trusted senders, so a sender dropped from it stops being believed here.
    dp.set_proxy_trust(&cfg.proxy_protocol_from)
        .context("cannot write the trusted PROXY senders (proxy_protocol_from)")?;

    let mut policy = Policy::new(policy_config(cfg), &kernel::node_addrs(), &cfg.allow);
    // Before the bans are reconciled: a pinned ban of a load balancer (an older build judged
    // its flows as its own) is lifted here rather than adopted.
    policy.set_proxy_trust(&cfg.proxy_protocol_from);
    for c in crate::proxy::wide(&cfg.proxy_protocol_from) {
        warn!(
            proxy_protocol_from = %c,
            "a wide trusted PROXY sender range: any host in it can claim to relay any client \
             (and get it banned); list the load balancers' own subnets"
        );
    }
    let saved = saved.unwrap_or_default();
    for e in &saved.allow {
        if let Err(err) = policy.allow_add(e.cidr, e.reason.clone()) {
            warn!(addr = %e.cidr, "dropping saved allowlist entry: {err}");
        }
    }
    for (c, o) in &saved.offenses {
        policy.restore_offense(*c, *o);
    }
    let kernel_allow: BTreeSet<Cidr> = dp
        .allows()
        .context("cannot read the allowlist maps")?
        .into_iter()
        .collect();
    info!(ms = t.elapsed().as_millis() as u64, "data path open");
    let mut inner = Inner::new(policy, dp, kernel_allow);
    inner.sync_allow();
    reconcile_bans(&mut inner, saved.bans, !restoring)?;
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it only makes the next start re-check the state against the maps.
        Err(e) => warn!(marker = %marker.display(), "cannot remove the restore marker: {e}"),
    }
    Ok(inner)
}

/// `maps_are_truth`: a saved ban missing from the maps was removed since the state write (and
/// stays removed); otherwise it is written back.
fn reconcile_bans(inner: &mut Inner, saved: Vec<Ban>, maps_are_truth: bool) -> anyhow::Result<()> {
    let c_started = std::time::Instant::now();
    let c = Clocks::now();
    let mut saved: std::collections::HashMap<Cidr, Ban> =
        saved.into_iter().map(|b| (b.cidr, b)).collect();
    let live = inner.dp.bans().context("cannot read the ban maps")?;
    let read_ms = c_started.elapsed().as_millis() as u64;
    let (mut adopted, mut expired, mut restored, mut dropped) = (0, 0u64, 0, 0);
    for (cidr, v) in live {
        if v.is_expired(c.boot_ns) {
            let _ = inner.dp.del_ban(&cidr);
            saved.remove(&cidr);
            expired += 1;
            continue;
        }
        let from_kernel = kernel::adopted_ban(cidr, &v, &c);
        let ban = match saved.remove(&cidr) {
            // The live entry's timing and flags are newer than any state write.
            Some(s) => Ban {
                mode: from_kernel.mode,
                hard: from_kernel.hard,
                expires_at: from_kernel.expires_at,
                ..s
            },
            None => {
                adopted += 1;
                from_kernel
            }
        };
        if let Err(r) = inner.policy.restore(ban) {
            warn!("lifting pinned ban: {r}");
            let _ = inner.dp.del_ban(&cidr);
        }
    }
    let mut batch = Vec::new();
    for (cidr, ban) in saved {
        if ban.is_expired(c.wall) {
            expired += 1;
        } else if maps_are_truth {
            dropped += 1;
        } else {
            let v = kernel::ban_value(&ban, &c);
            match inner.policy.restore(ban) {
                Ok(()) => batch.push((cidr, v)),
                Err(r) => warn!("not restoring saved ban: {r}"),
            }
        }
    }
    for chunk in batch.chunks(RESTORE_CHUNK) {
        restored += restore_chunk(inner, chunk);
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
