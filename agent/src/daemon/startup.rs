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
//!
//! Either way the state file supplies what the kernel does not record (source, reason,
//! offences) and expired bans are dropped and counted.

use std::{collections::BTreeSet, path::Path};

use anyhow::{Context as _, bail};
use tracing::{error, info, warn};

use super::{
    kernel::{self, Clocks},
    shared::Inner,
};
use crate::{
    addr::Cidr,
    config::AgentConfig,
    datapath::{DataPath, DataPathOptions},
    model::{Ban, Mode},
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

pub fn open(cfg: &AgentConfig) -> anyhow::Result<Inner> {
    let saved = load_state(&cfg.state_dir);
    let pinned_before = pins_present(&cfg.pin_dir);
    let opts = DataPathOptions {
        pin_dir: cfg.pin_dir.clone(),
        interfaces: cfg.interfaces.clone(),
        xdp_mode: cfg.xdp_mode,
        max_bans: cfg.max_bans,
    };
    let mut dp = DataPath::open(&opts).with_context(|| {
        format!(
            "cannot load the data path on {} (pin dir {})",
            cfg.interfaces.join(","),
            cfg.pin_dir.display()
        )
    })?;
    if !dp.pinned() && cfg.mode == Mode::Enforce {
        bail!(
            "refusing to enforce: {} is not on a bpffs and bpffs cannot be mounted there, so bans and \
             programs would vanish with the agent; mount bpffs there, pick another --pin-dir, or run \
             with --mode observe",
            cfg.pin_dir.display()
        );
    }
    let current = dp.config().context("cannot read the kernel CONFIG")?;
    dp.set_config(&kernel::kernel_config(cfg, &current))
        .context("cannot write the kernel CONFIG")?;
    dp.set_ports(&cfg.ports)
        .context("cannot write the watched ports")?;

    let mut policy = Policy::new(policy_config(cfg), &kernel::node_addrs(), &cfg.allow);
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
    let mut inner = Inner::new(policy, dp, kernel_allow);
    inner.sync_allow();
    reconcile_bans(&mut inner, saved.bans, pinned_before)?;
    Ok(inner)
}

fn reconcile_bans(inner: &mut Inner, saved: Vec<Ban>, pins_were_there: bool) -> anyhow::Result<()> {
    let c = Clocks::now();
    let mut saved: std::collections::HashMap<Cidr, Ban> =
        saved.into_iter().map(|b| (b.cidr, b)).collect();
    let live = inner.dp.bans().context("cannot read the ban maps")?;
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
    for (cidr, ban) in saved {
        if ban.is_expired(c.wall) {
            expired += 1;
        } else if pins_were_there {
            dropped += 1;
        } else {
            match inner.policy.restore(ban.clone()) {
                Ok(()) => match inner.dp.put_ban(&cidr, &kernel::ban_value(&ban, &c)) {
                    Ok(()) => restored += 1,
                    Err(e) => {
                        inner.policy.unban(&cidr);
                        error!(addr = %cidr, "cannot restore ban: {e}");
                    }
                },
                Err(r) => warn!("not restoring saved ban: {r}"),
            }
        }
    }
    inner.policy.count_expired(expired);
    info!(
        active = inner.policy.len(),
        adopted,
        restored,
        expired,
        dropped_stale = dropped,
        "bans reconciled"
    );
    Ok(())
}
