//! A migration's copy: every entry of the pinned generation's maps into this build's fresh
//! ones, converted from the pinned layout to this build's.
//!
//! Layout 2 to 3 needs no step of its own: `FLOWS` is read in the layout its value size says
//! (`maps::Flows`, layout-2 flows become direct flows), `COUNTERS` is copied up to the old
//! length (the PROXY and reset counters start at zero), and the layout-3 maps start empty
//! (`CFG_PROXY_TRUST` is clear in the copied CONFIG, so no sender is trusted until the agent
//! calls `set_proxy_trust`).
//!
//! Each layout bump that changes what an entry means adds a [`Step`], keyed by the layout it
//! converts from; a migration applies, in order, every step from the pinned generation's
//! layout up to this build's. A map no step names is copied as is. Every step must be
//! conservative: applied to an entry that already has the new meaning, it changes nothing
//! that matters (a generation that never recorded its layout gets every step).

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::maps::IterableMap as _;
use wsguard_common::maps::{BAN_MAY_PRESERVE, BanValue, COUNTERS_LEN, Config};

use super::{
    DataPathError,
    maps::{LRU_WALK, Maps, ban_err, err},
    sys,
};
use crate::addr::Cidr;

/// What changes in the entries of layout `from` to make them layout `from + 1`.
struct Step {
    from: u32,
    /// Applied to the value of every ban, exact and CIDR, IPv4 and IPv6.
    ban: fn(&mut BanValue),
}

const STEPS: &[Step] = &[
    // Layout 2 drops a ban's packets without the flow lookup unless BAN_MAY_PRESERVE is set.
    // Layout-1 bans never had it, and flows established under the old build must stay
    // preserved, so every one of them may have such a flow.
    Step {
        from: 1,
        ban: |v| v.flags |= BAN_MAY_PRESERVE,
    },
];

/// The steps from one layout to another; a newer pinned layout (a downgrade) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conversion {
    from: u32,
    to: u32,
}

impl Conversion {
    /// `from` 0 is a generation that never recorded its layout: every step applies.
    ///
    /// A build cannot know what a newer layout changed (a flag it never heard of may be the
    /// one that keeps a flow alive, and its own writes would leave it out), so it converts
    /// nothing and the newer generation keeps enforcing untouched.
    pub fn new(from: u32, to: u32) -> Result<Self, DataPathError> {
        if from > to {
            return Err(DataPathError::Other(format!(
                "the pinned maps have layout v{from}, newer than this build's v{to}; an older \
                 build cannot convert them, so the running v{from} program is left enforcing. \
                 Run a build with layout v{from} or later, or `wsguard detach` and start this \
                 build (it restores the bans from its state file)"
            )));
        }
        Ok(Self { from, to })
    }

    fn steps(&self) -> impl Iterator<Item = &'static Step> {
        let Self { from, to } = *self;
        STEPS.iter().filter(move |s| s.from >= from && s.from < to)
    }

    pub fn ban(&self, mut v: BanValue) -> BanValue {
        for s in self.steps() {
            (s.ban)(&mut v);
        }
        v
    }
}

/// Copy every entry the data plane depends on from `old` into `new`, converted to layout
/// `to`. `BAN_FILTER` and `HOST_FILTER` are left alone: the open refills them from the bans.
pub fn copy(old: &Maps, new: &mut Maps, to: u32) -> Result<(), DataPathError> {
    let mut cfg = old.config()?;
    // CONFIG carries the layout its maps were written in, atomically with them; the record
    // beside the pins says the same unless a start died before writing it.
    let conv = Conversion::new(cfg.layout_version, to)?;
    if cfg.layout_version == 0 {
        // Never initialised (a first start died before writing it): zero window and
        // threshold would be wrong settings, so start the new maps from the defaults.
        cfg = Config {
            cidr_v4: cfg.cidr_v4,
            cidr_v6: cfg.cidr_v6,
            ..Config::new()
        };
    }
    cfg.layout_version = to;
    new.write_config(&cfg)?;
    let bans = old.bans(usize::MAX)?;
    write_bans(new, bans.iter().map(|(c, v)| (*c, conv.ban(*v))))?;
    for cidr in old.allows(usize::MAX)? {
        new.put_allow(&cidr)?;
    }
    for port in 0..65_536u32 {
        let w = old.ports.get(&port, 0).map_err(err("read PORTS"))?;
        if w != 0 {
            new.ports.set(port, w, 0).map_err(err("write PORTS"))?;
        }
    }
    // Layout 2's flows come back as layout 3's direct flows (`Flows::entries`): no PROXY
    // header was ever read for them.
    let flows = new.flows.current()?;
    for (k, v) in old.flows(LRU_WALK) {
        // LRU: a full target evicts instead of failing.
        let _ = flows.insert(k, v, 0);
    }
    for (k, v) in old.rates(LRU_WALK) {
        let _ = new.rates.insert(k, v, 0);
    }
    // Counters are appended by layout bumps: the new ones start at zero.
    for i in 0..old.counters.len().min(COUNTERS_LEN) {
        let v = old.counters.get(&i, 0).map_err(err("read COUNTERS"))?;
        new.counters.set(i, v, 0).map_err(err("write COUNTERS"))?;
    }
    if let (Some(from), Ok(to)) = (&old.proxy, new.proxy_mut()) {
        // Layout 3 on both sides (a re-size): the trust list and the senders seen.
        for r in from.from_v4.iter() {
            let (k, v) = r.map_err(err("walk PROXY_FROM_V4"))?;
            to.from_v4
                .insert(&k, v, 0)
                .map_err(err("write PROXY_FROM_V4"))?;
        }
        for r in from.from_v6.iter() {
            let (k, v) = r.map_err(err("walk PROXY_FROM_V6"))?;
            to.from_v6
                .insert(&k, v, 0)
                .map_err(err("write PROXY_FROM_V6"))?;
        }
        for (k, v) in from.senders.iter().take(LRU_WALK).filter_map(Result::ok) {
            let _ = to.senders.insert(k, v, 0);
        }
    }
    tracing::info!(
        from = conv.from,
        to,
        bans = bans.len(),
        steps = conv.steps().count(),
        "copied the pinned maps into the new layout"
    );
    Ok(())
}

/// Host bans per `BPF_MAP_UPDATE_BATCH`.
const CHUNK: usize = 8192;

/// Write `bans` into fresh maps: host bans in batches (a 1M-ban migration in about a hundred
/// syscalls), network bans one by one (LPM tries have no batch operations).
fn write_bans(
    new: &mut Maps,
    bans: impl Iterator<Item = (Cidr, BanValue)>,
) -> Result<(), DataPathError> {
    let (mut v4, mut v6) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for (c, v) in bans {
        match (c.addr(), c.is_host()) {
            (IpAddr::V4(a), true) => (v4.0.push(a.octets()), v4.1.push(v)),
            (IpAddr::V6(a), true) => (v6.0.push(a.octets()), v6.1.push(v)),
            _ => {
                new.insert_ban(&c, &v)
                    .map_err(|e| ban_err(&e, c, u32::MAX))?;
                continue;
            }
        };
    }
    batched(new.bans_v4.map().fd().as_fd(), &v4.0, &v4.1)?;
    new.mirror_v4(v4.0.into_iter().zip(v4.1))
        .map_err(|e| DataPathError::Other(format!("fill BAN_TABLE_V4: {e}")))?;
    batched(new.bans_v6.map().fd().as_fd(), &v6.0, &v6.1)
}

fn batched<K: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[BanValue],
) -> Result<(), DataPathError> {
    let fail = |e: std::io::Error| DataPathError::Other(format!("copy the exact bans: {e}"));
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        match sys::update_batch(fd, k, v) {
            Ok(()) => {}
            // No batch operations in this kernel: the same writes, one syscall each.
            Err(e) if e.done == 0 && sys::batch_unsupported(&e.err) => {
                for (k, v) in k.iter().zip(v) {
                    sys::update_elem(fd, k, v).map_err(fail)?;
                }
            }
            Err(e) => return Err(fail(e.err)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use wsguard_common::maps::{BAN_HARD, BAN_NOT_ALLOWLISTED, BAN_OBSERVE, LAYOUT_VERSION};

    use super::*;

    fn layout1(flags: u32) -> BanValue {
        BanValue {
            expires_ns: 7_000,
            created_ns: 5_000,
            drops: 42,
            flags,
            _pad: 0,
        }
    }

    #[test]
    fn layout1_bans_gain_may_preserve_and_keep_everything_else() {
        let c = Conversion::new(1, 2).unwrap();
        for flags in [
            0,
            BAN_OBSERVE,
            BAN_HARD | BAN_NOT_ALLOWLISTED,
            BAN_OBSERVE | BAN_HARD | BAN_NOT_ALLOWLISTED,
        ] {
            assert_eq!(
                c.ban(layout1(flags)),
                layout1(flags | BAN_MAY_PRESERVE),
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn steps_apply_from_the_pinned_layout_up_to_this_one() {
        let v = layout1(BAN_HARD);
        let gained = layout1(BAN_HARD | BAN_MAY_PRESERVE);
        // This build's own layout, or only a re-size (--max-bans): nothing converts.
        assert_eq!(Conversion::new(2, 2).unwrap().ban(v), v);
        assert_eq!(Conversion::new(1, 1).unwrap().ban(v), v);
        // Past the bump (a test build claiming a later layout) from before and after it.
        assert_eq!(Conversion::new(1, 3).unwrap().ban(v), gained);
        assert_eq!(Conversion::new(2, 3).unwrap().ban(v), v);
        // Never recorded: every step, each conservative.
        assert_eq!(Conversion::new(0, LAYOUT_VERSION).unwrap().ban(v), gained);
        // Idempotent: a ban that has the flag already keeps exactly its value.
        assert_eq!(Conversion::new(1, 2).unwrap().ban(gained), gained);
    }

    #[test]
    fn a_newer_pinned_layout_is_refused_naming_both() {
        let e = Conversion::new(LAYOUT_VERSION + 1, LAYOUT_VERSION)
            .unwrap_err()
            .to_string();
        let (newer, mine) = (
            format!("layout v{}", LAYOUT_VERSION + 1),
            format!("this build's v{LAYOUT_VERSION}"),
        );
        assert!(e.contains(&newer) && e.contains(&mine), "{e}");
    }

    #[test]
    fn every_step_is_below_this_builds_layout() {
        // A step keyed at or past LAYOUT_VERSION would never run for a real upgrade.
        assert!(STEPS.iter().all(|s| s.from >= 1 && s.from < LAYOUT_VERSION));
        assert!(STEPS.windows(2).all(|w| w[0].from < w[1].from));
    }
}
