//! Many bans at once (imports, large `ban add` lists): host bans go to the exact hash maps
//! through `BPF_MAP_UPDATE_BATCH`, thousands per syscall; network bans take the per-entry path
//! (LPM tries have no batch operations, and each one also moves the CIDR count in CONFIG).
//!
//! The bookkeeping stays exact: which keys already exist is read before writing (from one
//! batched read of the maps when they are small next to the batch, else key by key; keys the
//! caller vouches absent are not read), so the entry count and the cap are right and a replaced
//! ban keeps its drop counter, as with [`DataPath::put_ban`]. A crash between two chunks leaves a prefix of the batch in the maps
//! and nothing half-written: each entry is one update, and host bans move no counter in the
//! kernel, so the next start adopts whatever is there.
//!
//! Test hook: `WSGUARD_TEST_KILL_AFTER_BAN_WRITES=N` SIGKILLs the process right after its Nth
//! ban entry reaches the kernel, batched or not; a batch is cut at that point so the crash lands
//! exactly there. (The daemon counts the same writes with the same variable; this check runs
//! first, inside the write, so it is the one that fires.)

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{IterableMap as _, MapData};
use tracing::warn;
use wsguard_common::maps::BanValue;

use super::{DataPath, DataPathError, maps, sys};
use crate::addr::Cidr;

/// Entries per `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_LOOKUP_BATCH` call: large enough that the
/// syscall cost vanishes, small enough that a chunk's buffers stay well under a megabyte.
const CHUNK: usize = 8192;

/// The clients of the live flows at one moment: a ban covering one may preserve its flow
/// ([`DataPath::live_flows`]).
pub struct LiveFlows(super::preserve::FlowClients);

/// What a write of many bans did (for the import log line and the tests that read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Ban entries written (new or replaced).
    pub entries: u64,
    /// Syscalls that wrote them: one per chunk of host bans, one per network ban.
    pub writes: u64,
}

impl std::ops::AddAssign for WriteStats {
    fn add_assign(&mut self, o: Self) {
        self.entries += o.entries;
        self.writes += o.writes;
    }
}

/// A write of many bans that stopped part way: everything but `unwritten` reached the kernel.
#[derive(Debug, thiserror::Error)]
#[error("{err}")]
pub struct PutBansError {
    pub unwritten: Vec<Cidr>,
    pub err: DataPathError,
    pub stats: WriteStats,
}

impl DataPath {
    /// Insert or replace every ban of `bans` (a later entry for the same network wins), like
    /// [`DataPath::put_ban`] one by one but batched for host bans. Refused as a whole, with
    /// nothing written, if the new entries do not fit under the cap.
    pub fn put_bans(&mut self, bans: &[(Cidr, BanValue)]) -> Result<WriteStats, PutBansError> {
        self.put_bans_hinted(bans, |_| false)
    }

    /// [`DataPath::put_bans`], told which entries the maps cannot hold yet: `fresh(i)` vouches
    /// that no entry for `bans[i]` exists (the caller's own record of the maps says so, as the
    /// policy's does for a ban it just created), so it is not looked up first. That lookup is
    /// one syscall per host ban and most of an import's kernel time. A wrong vouch costs the
    /// entry's drop counter and counts it once too many until the next open recounts.
    pub fn put_bans_hinted(
        &mut self,
        bans: &[(Cidr, BanValue)],
        fresh: impl Fn(usize) -> bool,
    ) -> Result<WriteStats, PutBansError> {
        let flows = self.live_flows().map_err(|err| PutBansError {
            unwritten: bans.iter().map(|(c, _)| *c).collect(),
            err,
            stats: WriteStats::default(),
        })?;
        self.put_bans_with(bans, fresh, &flows)
    }

    /// The clients of the live flows, read once for several [`DataPath::put_bans_with`]:
    /// one walk of the flow table, however many writes.
    pub fn live_flows(&self) -> Result<LiveFlows, DataPathError> {
        super::preserve::FlowClients::read(&self.maps, super::preserve::Keep::Live).map(LiveFlows)
    }

    /// [`DataPath::put_bans_hinted`] with the live flows already read.
    pub fn put_bans_with(
        &mut self,
        bans: &[(Cidr, BanValue)],
        fresh: impl Fn(usize) -> bool,
        flows: &LiveFlows,
    ) -> Result<WriteStats, PutBansError> {
        let flows = &flows.0;
        // Last one wins, as sequential puts would; keep the first-seen order otherwise.
        let mut seen = HashSet::with_capacity(bans.len());
        let mut last: Vec<(Cidr, BanValue, bool)> = bans
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, (c, _))| seen.insert(*c))
            .map(|(i, (c, v))| (*c, *v, fresh(i)))
            .collect();
        drop(seen);
        last.reverse();
        let (mut v4, mut v6, mut nets) = (Vec::new(), Vec::new(), Vec::new());
        for (c, v, fresh) in last {
            let v = flows.flagged(&c, &self.allows.flagged(&c, &v));
            match (c.addr(), c.is_host()) {
                (IpAddr::V4(a), true) => v4.push(Host {
                    cidr: c,
                    key: a.octets(),
                    value: v,
                    fresh,
                }),
                (IpAddr::V6(a), true) => v6.push(Host {
                    cidr: c,
                    key: a.octets(),
                    value: v,
                    fresh,
                }),
                _ => nets.push((c, v)),
            }
        }
        let all_unwritten = |v4: &[Host<4>], v6: &[Host<16>], nets: &[(Cidr, BanValue)]| {
            v4.iter()
                .map(|h| h.cidr)
                .chain(v6.iter().map(|h| h.cidr))
                .chain(nets.iter().map(|n| n.0))
                .collect::<Vec<_>>()
        };
        let fail = |unwritten, err, stats| PutBansError {
            unwritten,
            err,
            stats,
        };

        // Which entries are new decides the cap and which drop counters to carry over.
        let unvouched =
            v4.iter().filter(|h| !h.fresh).count() + v6.iter().filter(|h| !h.fresh).count();
        let snapshot = self.ban_entries <= 2 * unvouched as u64;
        let old4 = existing(&self.maps.bans_v4, &v4, snapshot).map(|mut old| {
            // The table's copy counts drops too: the write carries the sum into BANS_V4.
            for (k, d) in &mut old {
                *d += self.maps.in_table(*k).map_or(0, |t| t.drops);
            }
            old
        });
        let old6 = existing(&self.maps.bans_v6, &v6, snapshot);
        let (old4, old6) = match (old4, old6) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                return Err(fail(
                    all_unwritten(&v4, &v6, &nets),
                    e,
                    WriteStats::default(),
                ));
            }
        };
        let mut new = (v4.len() - old4.len() + v6.len() - old6.len()) as u64;
        for (c, _) in &nets {
            match self.maps.get_ban(c) {
                Ok(None) => new += 1,
                Ok(Some(_)) => {}
                Err(e) => {
                    return Err(fail(
                        all_unwritten(&v4, &v6, &nets),
                        e,
                        WriteStats::default(),
                    ));
                }
            }
        }
        if self.ban_entries + new > u64::from(self.max_bans) {
            return Err(fail(
                all_unwritten(&v4, &v6, &nets),
                DataPathError::Full {
                    capacity: self.max_bans,
                },
                WriteStats::default(),
            ));
        }

        // The kernel must look the new hosts' buckets up before they are banned: one pass over
        // the batch, one batched write of the words that change. A batch cut short leaves
        // some buckets looked up for nothing (slower, never wrong) until the next open.
        let mut dirty = Vec::new();
        for h in &v4 {
            if !old4.contains_key(&h.key) {
                self.prefilter.add(&h.cidr, &mut dirty);
            }
        }
        for h in &v6 {
            if !old6.contains_key(&h.key) {
                self.prefilter.add(&h.cidr, &mut dirty);
            }
        }
        let written = self.maps.host_filter().and_then(|hosts| {
            self.prefilter
                .write(&self.maps.ban_filter, hosts, &mut dirty)
        });
        if let Err(e) = written {
            return Err(fail(
                all_unwritten(&v4, &v6, &nets),
                e,
                WriteStats::default(),
            ));
        }

        let mut stats = WriteStats::default();
        let mut added = 0;
        let cap = self.max_bans;
        let fd4 = self.maps.bans_v4.map().fd().as_fd();
        let r = match write_hosts(fd4, &v4, &old4, cap, &mut stats, &mut added) {
            // IPv6 was never tried.
            Err((mut unwritten, err)) => {
                unwritten.extend(v6.iter().map(|h| h.cidr));
                Err((unwritten, err))
            }
            Ok(()) => {
                let fd6 = self.maps.bans_v6.map().fd().as_fd();
                write_hosts(fd6, &v6, &old6, cap, &mut stats, &mut added)
            }
        };
        self.ban_entries += added;
        let written: Vec<([u8; 4], BanValue)> = match &r {
            Ok(()) => v4.iter().map(|h| (h.key, h.value)).collect(),
            Err((unwritten, _)) => {
                let unwritten: HashSet<&Cidr> = unwritten.iter().collect();
                v4.iter()
                    .filter(|h| !unwritten.contains(&h.cidr))
                    .map(|h| (h.key, h.value))
                    .collect()
            }
        };
        if let Err(e) = self.maps.mirror_v4(written) {
            let err = DataPathError::Other(format!("write BAN_TABLE_V4: {e}"));
            return Err(fail(Vec::new(), err, stats));
        }
        if let Err((mut unwritten, err)) = r {
            unwritten.extend(nets.iter().map(|n| n.0));
            return Err(fail(unwritten, err, stats));
        }
        for (i, (c, v)) in nets.iter().enumerate() {
            if let Err(err) = self.put_ban(c, v) {
                return Err(fail(nets[i..].iter().map(|n| n.0).collect(), err, stats));
            }
            stats.entries += 1;
            stats.writes += 1;
        }
        Ok(stats)
    }
}

/// A host ban: the network, its key in the exact map, its value, and whether it is vouched
/// absent from the map.
struct Host<const N: usize> {
    cidr: Cidr,
    key: [u8; N],
    value: BanValue,
    fresh: bool,
}

/// Existing entries among `hosts`' keys, with their drop counters; vouched-fresh hosts are
/// taken at their word.
fn existing<const N: usize>(
    map: &aya::maps::HashMap<MapData, [u8; N], BanValue>,
    hosts: &[Host<N>],
    snapshot: bool,
) -> Result<HashMap<[u8; N], u64>, DataPathError> {
    let mut out = HashMap::new();
    if hosts.iter().all(|h| h.fresh) {
        return Ok(out);
    }
    if snapshot {
        let all = sys::lookup_all::<[u8; N], BanValue>(map.map().fd().as_fd(), CHUNK, usize::MAX)
            .map_err(|e| DataPathError::Other(format!("read the ban map: {e}")))?;
        if let Some(all) = all {
            let all: HashMap<[u8; N], u64> = all.into_iter().map(|(k, v)| (k, v.drops)).collect();
            for h in hosts.iter().filter(|h| !h.fresh) {
                if let Some(d) = all.get(&h.key) {
                    out.insert(h.key, *d);
                }
            }
            return Ok(out);
        }
    }
    for h in hosts.iter().filter(|h| !h.fresh) {
        match map.get(&h.key, 0) {
            Ok(v) => _ = out.insert(h.key, v.drops),
            Err(e) if maps::not_found(&e) => {}
            Err(e) => return Err(DataPathError::Other(format!("read a ban: {e}"))),
        }
    }
    Ok(out)
}

/// Write `hosts` in chunks; on an error, the networks not written and why.
/// [`write_serial`] in two halves at once when the batch is large (the kernel's hash maps lock
/// per bucket, so two writers run side by side); serial under the test hook, whose kill point
/// counts writes in order.
fn write_hosts<const N: usize>(
    fd: std::os::fd::BorrowedFd<'_>,
    hosts: &[Host<N>],
    old: &HashMap<[u8; N], u64>,
    capacity: u32,
    stats: &mut WriteStats,
    added: &mut u64,
) -> Result<(), (Vec<Cidr>, DataPathError)> {
    if hosts.len() < 2 * PARALLEL_MIN || KILL_LEFT.is_some() {
        return write_serial(fd, hosts, old, capacity, stats, added);
    }
    let (a, b) = hosts.split_at(hosts.len() / 2);
    let (mut sb, mut addb) = (WriteStats::default(), 0);
    let (ra, rb) = std::thread::scope(|s| {
        let hb = s.spawn(|| write_serial(fd, b, old, capacity, &mut sb, &mut addb));
        let ra = write_serial(fd, a, old, capacity, stats, added);
        (ra, hb.join().expect("the ban writer panicked"))
    });
    *stats += sb;
    *added += addb;
    match (ra, rb) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err((mut ua, e)), Err((ub, _))) => {
            ua.extend(ub);
            Err((ua, e))
        }
    }
}

/// Below this many entries a second writer costs more than it saves.
const PARALLEL_MIN: usize = 1024;

fn write_serial<const N: usize>(
    fd: std::os::fd::BorrowedFd<'_>,
    hosts: &[Host<N>],
    old: &HashMap<[u8; N], u64>,
    capacity: u32,
    stats: &mut WriteStats,
    added: &mut u64,
) -> Result<(), (Vec<Cidr>, DataPathError)> {
    let mut at = 0;
    while at < hosts.len() {
        let n = CHUNK.min(kill_budget()).min(hosts.len() - at);
        let chunk = &hosts[at..at + n];
        let keys: Vec<[u8; N]> = chunk.iter().map(|h| h.key).collect();
        let values: Vec<BanValue> = chunk
            .iter()
            .map(|h| BanValue {
                // Drops the kernel counts between the read and this write are lost: a handful.
                drops: old.get(&h.key).copied().unwrap_or(0),
                ..h.value
            })
            .collect();
        let mut r = sys::update_batch(fd, &keys, &values);
        stats.writes += 1;
        if let Err(e) = &r
            && e.done == 0
            && sys::batch_unsupported(&e.err)
        {
            r = one_by_one(fd, &keys, &values, stats);
        }
        let done = r.as_ref().map_or_else(|e| e.done, |()| n);
        stats.entries += done as u64;
        *added += chunk[..done]
            .iter()
            .filter(|h| !old.contains_key(&h.key))
            .count() as u64;
        wrote(done as u64);
        if let Err(e) = r {
            let first = chunk[done].cidr;
            let err = if matches!(e.err.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                warn!(addr = %first, "the exact ban map is full before the cap: {}", e.err);
                DataPathError::Full { capacity }
            } else {
                DataPathError::Other(format!("write the ban of {first}: {}", e.err))
            };
            return Err((hosts[at + done..].iter().map(|h| h.cidr).collect(), err));
        }
        at += n;
    }
    Ok(())
}

/// Without batch operations in the kernel: the same writes, one syscall each.
fn one_by_one<K: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[BanValue],
    stats: &mut WriteStats,
) -> Result<(), sys::BatchError> {
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        stats.writes += 1;
        sys::update_elem(fd, k, v).map_err(|err| sys::BatchError { done: i, err })?;
    }
    Ok(())
}

static KILL_LEFT: LazyLock<Option<AtomicU64>> = LazyLock::new(|| {
    std::env::var("WSGUARD_TEST_KILL_AFTER_BAN_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(AtomicU64::new)
});

/// Entries that may be written before the test hook's kill point (unbounded without it).
fn kill_budget() -> usize {
    match KILL_LEFT.as_ref().map(|l| l.load(Ordering::SeqCst)) {
        Some(left) if left > 0 => usize::try_from(left).unwrap_or(usize::MAX),
        _ => usize::MAX,
    }
}

/// `n` ban entries reached the kernel.
pub(super) fn wrote(n: u64) {
    let Some(left) = KILL_LEFT.as_ref() else {
        return;
    };
    if n == 0 {
        return;
    }
    let before = left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
            Some(l.saturating_sub(n))
        })
        .unwrap_or(0);
    if before > 0 && before <= n {
        warn!("WSGUARD_TEST_KILL_AFTER_BAN_WRITES reached: SIGKILL");
        // SAFETY: plain kill(2) of our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
