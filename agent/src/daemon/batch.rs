//! Many API bans at once (`ban add` lists, import batches), under the agent lock: the policy
//! decides them and the kernel takes them, a chunk at a time in a two-stage pipeline, so the
//! policy decides one chunk on this thread while the kernel writes the one before on another.
//! The kernel write is most of a large batch's time, and nobody sees the policy ahead of the
//! maps: the lock is held throughout, and a ban the kernel did not take is rolled back.

use std::collections::HashSet;

use super::{
    kernel::{self, Clocks},
    shared::{Agent, BanError},
};
use crate::{
    addr::Cidr,
    api::ApiError,
    datapath::{DataPath, DataPathError, LiveFlows, PutBansError, WriteStats},
    model::Ban,
    policy::{Applied, BanRequest, Change, Policy, Refusal, RefuseReason},
};

/// The smallest chunk worth a stage of its own; a batch splits into at most [`STAGES`] chunks.
const MIN_CHUNK: usize = 1024;
const STAGES: usize = 4;

/// What [`decide_and_write`] did.
struct Decided {
    applied: Vec<Applied>,
    stats: WriteStats,
    /// A refusal the preflight did not foresee (a bug): what was decided before it is applied.
    refused: Option<Refusal>,
    /// The write that failed, with every decided change that did not reach the kernel.
    failed: Option<PutBansError>,
}

fn changes(applied: &[Applied]) -> impl Iterator<Item = &Applied> {
    applied.iter().filter(|a| a.change != Change::Unchanged)
}

/// The kernel entries for `applied`, and which of them the policy just created (no entry in
/// the maps: the policy holds every ban the maps do).
fn writes_of(
    applied: &[Applied],
    c: &Clocks,
) -> (Vec<(Cidr, wsguard_common::maps::BanValue)>, Vec<bool>) {
    changes(applied)
        .map(|a| {
            (
                (a.ban.cidr, kernel::ban_value(&a.ban, c)),
                a.change == Change::Created,
            )
        })
        .unzip()
}

type Writes = (Vec<(Cidr, wsguard_common::maps::BanValue)>, Vec<bool>);

fn write(
    dp: &mut DataPath,
    (writes, fresh): &Writes,
    flows: &LiveFlows,
) -> Result<WriteStats, PutBansError> {
    dp.put_bans_with(writes, |i| fresh[i], flows)
}

/// Decide `reqs` in order and write each decided chunk to the kernel while the next one is
/// decided. Stops deciding at the first refusal or failed write.
fn decide_and_write(
    policy: &mut Policy,
    dp: &mut DataPath,
    reqs: Vec<BanRequest>,
    c: &Clocks,
    flows: &LiveFlows,
) -> Decided {
    let chunk = reqs.len().div_ceil(STAGES).max(MIN_CHUNK);
    let mut d = Decided {
        applied: Vec::with_capacity(reqs.len()),
        stats: WriteStats::default(),
        refused: None,
        failed: None,
    };
    let mut reqs = reqs.into_iter().peekable();
    // With the writer while it writes, back here once it is joined.
    let mut dp = Some(dp);
    std::thread::scope(|s| {
        type Written<'d> = (&'d mut DataPath, Result<WriteStats, PutBansError>);
        let mut writer: Option<std::thread::ScopedJoinHandle<'_, Written<'_>>> = None;
        loop {
            let start = d.applied.len();
            if d.refused.is_none() {
                for r in reqs.by_ref().take(chunk) {
                    match policy.ban(r, c.wall) {
                        Ok(a) => d.applied.push(a),
                        Err(r) => {
                            d.refused = Some(r);
                            break;
                        }
                    }
                }
            }
            if let Some(h) = writer.take() {
                let (back, r) = h.join().expect("the ban writer panicked");
                dp = Some(back);
                match r {
                    Ok(st) => d.stats += st,
                    Err(mut e) => {
                        // That chunk's unwritten, then everything decided after it.
                        e.unwritten
                            .extend(changes(&d.applied[start..]).map(|a| a.ban.cidr));
                        d.failed = Some(e);
                        return;
                    }
                }
            }
            if d.applied.len() == start {
                return;
            }
            let writes = writes_of(&d.applied[start..], c);
            let dp = dp.take().expect("joined above");
            if reqs.peek().is_none() || d.refused.is_some() {
                // The last chunk: nothing left to decide meanwhile.
                match write(dp, &writes, flows) {
                    Ok(st) => d.stats += st,
                    Err(e) => d.failed = Some(e),
                }
                return;
            }
            writer = Some(s.spawn(move || {
                let r = write(dp, &writes, flows);
                (dp, r)
            }));
        }
    });
    d
}

impl Agent {
    /// Apply a batch of API bans: every request is checked first and a refused batch changes
    /// nothing. The policy decides them and the kernel takes them (host bans thousands per
    /// syscall, see the module doc); a ban the kernel did not take is rolled back so the
    /// policy never claims a ban that is not enforced. `refused` words the error of a refused
    /// batch.
    pub(super) fn ban_batch(
        &self,
        reqs: Vec<BanRequest>,
        refused: impl FnOnce(Vec<(usize, Refusal)>) -> ApiError,
    ) -> Result<(Vec<Ban>, WriteStats), ApiError> {
        let c = Clocks::now();
        let mut g = self.lock();
        if let Err(bad) = g.policy.preflight(&reqs) {
            return Err(refused(bad));
        }
        let flows =
            g.dp.live_flows()
                .map_err(|e| ApiError::internal(e.to_string()))?;
        let inner = &mut *g;
        let Decided {
            mut applied,
            stats,
            refused,
            failed,
        } = decide_and_write(&mut inner.policy, &mut inner.dp, reqs, &c, &flows);
        // The preflight makes a refusal here unreachable short of a bug; what was decided
        // before it is applied.
        let mut err = refused.map(|r| ApiError::refused(r.to_string()));
        let stats = match failed {
            None => stats,
            Some(e) => {
                let unwritten: HashSet<Cidr> = e.unwritten.iter().copied().collect();
                for a in &applied {
                    if a.change == Change::Created && unwritten.contains(&a.ban.cidr) {
                        g.policy.unban(&a.ban.cidr);
                    }
                }
                applied.retain(|a| !unwritten.contains(&a.ban.cidr));
                let first = e.unwritten.first().copied();
                err = Some(match (e.err, first) {
                    (DataPathError::Full { .. }, Some(cidr)) => {
                        g.policy.count_refused(RefuseReason::Full);
                        let max = u64::from(g.dp.ban_capacity());
                        ApiError::refused(Refusal::Full { cidr, max }.to_string())
                    }
                    (err, Some(cidr)) => {
                        ApiError::internal(BanError::Kernel { cidr, err }.to_string())
                    }
                    (err, None) => ApiError::internal(err.to_string()),
                });
                let mut st = stats;
                st += e.stats;
                st
            }
        };
        // After the ban maps: a flow cut for a hard ban must find the ban in force.
        super::proxy::cut_hard(&mut g, changes(&applied).map(|a| &a.ban));
        drop(g);
        self.mark_dirty();
        self.lapi_publish(changes(&applied).map(|a| &a.ban));
        match err {
            Some(e) => Err(e),
            None => Ok((applied.into_iter().map(|a| a.ban).collect(), stats)),
        }
    }
}
