//! `BAN_NOT_ALLOWLISTED`: the promise to the kernel that no allowlist entry overlaps a ban,
//! which lets the drop path skip the allowlist lookup.
//!
//! The data path keeps an index of the allowlist to decide the flag of every ban it writes.
//! Adding an allowlist entry inserts it first, then clears the flag on every ban it overlaps;
//! a crash in between is repaired at the next open, which sets every ban's flag from the maps.
//! Removing an entry leaves the flags it cleared as they are (only slower) until that open.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    os::fd::AsFd as _,
};

use aya::maps::IterableMap as _;
use wsguard_common::maps::{BAN_NOT_ALLOWLISTED, BanValue};

use super::{DataPath, DataPathError, maps, sys};
use crate::addr::Cidr;

/// Allowlist entries per family, by prefix length, as masked addresses.
#[derive(Default)]
pub struct AllowIndex {
    v4: BTreeMap<u8, HashSet<u128>>,
    v6: BTreeMap<u8, HashSet<u128>>,
}

fn parts(c: &Cidr) -> (bool, u128, u8, u8) {
    match c.addr() {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)), c.prefix_len(), 32),
        IpAddr::V6(a) => (true, u128::from(a), c.prefix_len(), 128),
    }
}

fn mask(a: u128, p: u8, max: u8) -> u128 {
    if p == 0 {
        0
    } else {
        let host = u32::from(max - p);
        a >> host << host
    }
}

impl AllowIndex {
    pub fn new<'a>(allows: impl IntoIterator<Item = &'a Cidr>) -> Self {
        let mut i = Self::default();
        for c in allows {
            i.add(c);
        }
        i
    }

    fn family(&mut self, v6: bool) -> &mut BTreeMap<u8, HashSet<u128>> {
        if v6 { &mut self.v6 } else { &mut self.v4 }
    }

    pub fn add(&mut self, c: &Cidr) {
        let (v6, a, p, _) = parts(c);
        self.family(v6).entry(p).or_default().insert(a);
    }

    pub fn remove(&mut self, c: &Cidr) {
        let (v6, a, p, _) = parts(c);
        let fam = self.family(v6);
        if let Some(set) = fam.get_mut(&p) {
            set.remove(&a);
            if set.is_empty() {
                fam.remove(&p);
            }
        }
    }

    /// Whether an entry contains `c` or lies inside it. One set lookup per prefix length in
    /// use for entries as wide or wider; a walk of the narrower ones, which only a network
    /// ban can contain.
    pub fn overlaps(&self, c: &Cidr) -> bool {
        let (v6, a, p, max) = parts(c);
        let fam = if v6 { &self.v6 } else { &self.v4 };
        fam.iter().any(|(q, set)| {
            if *q <= p {
                set.contains(&mask(a, *q, max))
            } else {
                set.iter().any(|x| mask(*x, p, max) == a)
            }
        })
    }

    /// `v` with the flag as the allowlist says.
    pub fn flagged(&self, c: &Cidr, v: &BanValue) -> BanValue {
        let mut v = *v;
        if self.overlaps(c) {
            v.flags &= !BAN_NOT_ALLOWLISTED;
        } else {
            v.flags |= BAN_NOT_ALLOWLISTED;
        }
        v
    }
}

impl DataPath {
    /// After `allow` reached the kernel: clear the flag of every ban it overlaps. Bans that
    /// overlap an allowlist entry are refused by policy, so this usually rewrites nothing;
    /// finding them reads every ban once (batched).
    pub(super) fn unflag_overlapping(&mut self, allow: &Cidr) -> Result<(), DataPathError> {
        let hit: Vec<Cidr> = if allow.is_host() {
            vec![*allow]
        } else {
            self.maps
                .bans(self.max_bans as usize + 1)?
                .into_iter()
                .filter(|(c, v)| v.flags & BAN_NOT_ALLOWLISTED != 0 && c.overlaps(allow))
                .map(|(c, _)| c)
                .collect()
        };
        let mut out = Vec::new();
        for c in hit
            .iter()
            .chain(network_bans_containing(self, allow)?.iter())
        {
            // Read again just before the write: the drop counter keeps moving.
            if let Some(v) = self.maps.get_ban(c)?
                && v.flags & BAN_NOT_ALLOWLISTED != 0
            {
                out.push((
                    *c,
                    BanValue {
                        flags: v.flags & !BAN_NOT_ALLOWLISTED,
                        ..v
                    },
                ));
            }
        }
        self.rewrite(&out)
    }

    /// Write the bans whose allowlist flag the open found wrong, already re-flagged (repairs a
    /// crash between an allowlist insert and its unflagging, and flags bans written before the
    /// flag existed).
    pub(super) fn reconcile_flags(
        &mut self,
        out: &[(Cidr, BanValue)],
    ) -> Result<(), DataPathError> {
        if !out.is_empty() {
            tracing::info!(bans = out.len(), "setting the allowlist flag of bans");
        }
        self.rewrite(out)
    }

    /// Write back existing bans with new values: host bans batched, networks one by one.
    fn rewrite(&mut self, bans: &[(Cidr, BanValue)]) -> Result<(), DataPathError> {
        let (mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (c, v) in bans {
            match (c.addr(), c.is_host()) {
                (IpAddr::V4(a), true) => {
                    k4.push(a.octets());
                    v4.push(*v);
                }
                (IpAddr::V6(a), true) => {
                    k6.push(a.octets());
                    v6.push(*v);
                }
                _ => self
                    .maps
                    .insert_ban(c, v)
                    .map_err(|e| maps::ban_err(&e, *c, self.max_bans))?,
            }
        }
        write_hosts(self.maps.bans_v4.map().fd().as_fd(), &k4, &v4)?;
        self.maps
            .mirror_v4(k4.into_iter().zip(v4))
            .map_err(maps::err("write BAN_TABLE_V4"))?;
        write_hosts(self.maps.bans_v6.map().fd().as_fd(), &k6, &v6)
    }
}

/// Network bans that contain `allow` but are not inside it: the walk above misses none of
/// them for a network allow, but a host allow needs them too.
fn network_bans_containing(dp: &DataPath, allow: &Cidr) -> Result<Vec<Cidr>, DataPathError> {
    if !allow.is_host() {
        return Ok(Vec::new());
    }
    let max = if allow.is_v4() { 32 } else { 128 };
    let mut out = Vec::new();
    // At most one network per prefix length contains an address: a lookup each.
    for p in 1..max {
        let net = ipnet::IpNet::new(allow.addr(), p)
            .map_err(|e| DataPathError::Other(format!("{allow}/{p}: {e}")))?
            .trunc();
        let c = Cidr::new(net.network(), p)
            .map_err(|e| DataPathError::Other(format!("{allow}/{p}: {e}")))?;
        if dp.maps.get_ban(&c)?.is_some() {
            out.push(c);
        }
    }
    Ok(out)
}

fn write_hosts<K: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[BanValue],
) -> Result<(), DataPathError> {
    for (k, v) in keys.chunks(8192).zip(values.chunks(8192)) {
        let r = match sys::update_batch(fd, k, v) {
            Err(e) if e.done == 0 && sys::batch_unsupported(&e.err) => k
                .iter()
                .zip(v)
                .try_for_each(|(k, v)| sys::update_elem(fd, k, v)),
            r => r.map_err(|e| e.err),
        };
        r.map_err(|e| DataPathError::Other(format!("write a ban's allowlist flag: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn overlap_both_ways_and_per_family() {
        let mut i = AllowIndex::new(&[c("198.18.0.0/24"), c("fd00:1::5")]);
        assert!(i.overlaps(&c("198.18.0.7")), "entry contains the ban");
        assert!(i.overlaps(&c("198.16.0.0/14")), "ban contains the entry");
        assert!(!i.overlaps(&c("198.18.1.7")) && i.overlaps(&c("198.18.0.0/25")));
        assert!(i.overlaps(&c("fd00:1::/64")) && !i.overlaps(&c("fd00:2::/64")));
        assert!(
            !i.overlaps(&c("::c612:7")),
            "IPv6 never matches IPv4 entries"
        );
        i.remove(&c("198.18.0.0/24"));
        assert!(!i.overlaps(&c("198.18.0.7")));
        let v = i.flagged(&c("198.18.0.7"), &BanValue::default());
        assert_eq!(v.flags, BAN_NOT_ALLOWLISTED);
        assert_eq!(i.flagged(&c("fd00:1::5"), &v).flags, 0);
    }
}
