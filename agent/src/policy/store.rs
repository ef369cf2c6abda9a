//! The bans as the policy holds them, compactly: a million bans that share a source, a reason
//! and an origin hold one copy of those (an interned [`Meta`]), and each ban is its address
//! plus a fixed 32-byte record. A [`Ban`] is built only when someone asks for one.
//!
//! The tree is repacked after large batches ([`Store::settle`]): a B-tree filled in address
//! order leaves its nodes about half full, a repacked one fills them.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::Arc,
};

use time::OffsetDateTime;

use crate::{
    addr::Cidr,
    model::{Ban, BanSource, Mode},
};

/// What bans share: looked up by value, stored once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Meta {
    pub source: BanSource,
    pub reason: Box<str>,
    pub origin: Option<Box<str>>,
    pub scenario: Option<Box<str>>,
}

/// One ban without what it shares. Times are Unix nanoseconds, so a ban reads back exactly as
/// it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rec {
    pub created: i64,
    /// [`PERMANENT`] for a ban without expiry.
    pub expires: i64,
    pub meta: u32,
    pub offenses: u32,
    pub flags: u8,
}

pub(super) const PERMANENT: i64 = i64::MAX;
pub(super) const OBSERVE: u8 = 1;
pub(super) const HARD: u8 = 2;
/// Restored from the state file, not yet found in (or written back to) the kernel maps.
pub(super) const PENDING: u8 = 4;

pub(super) fn nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(if t.year() < 1970 {
        i64::MIN
    } else {
        PERMANENT - 1
    })
}

pub(super) fn time_of(n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[derive(Default)]
struct Metas {
    by_id: Vec<Option<(Arc<Meta>, u64)>>,
    ids: HashMap<Arc<Meta>, u32>,
    free: Vec<u32>,
    /// The last id interned: a batch of bans mostly shares one, found without hashing.
    last: Option<u32>,
}

impl Metas {
    /// The id of the metadata of `ban`, one more use of it.
    fn intern_of(&mut self, ban: &Ban) -> u32 {
        if let Some(id) = self.last
            && let Some((m, refs)) = &mut self.by_id[id as usize]
            && m.source == ban.source
            && *m.reason == *ban.reason
            && m.origin.as_deref() == ban.origin.as_deref()
            && m.scenario.as_deref() == ban.scenario.as_deref()
        {
            *refs += 1;
            return id;
        }
        let id = self.intern(Meta {
            source: ban.source,
            reason: ban.reason.as_str().into(),
            origin: ban.origin.as_deref().map(Into::into),
            scenario: ban.scenario.as_deref().map(Into::into),
        });
        self.last = Some(id);
        id
    }

    fn intern(&mut self, m: Meta) -> u32 {
        if let Some(&id) = self.ids.get(&m) {
            if let Some((_, refs)) = &mut self.by_id[id as usize] {
                *refs += 1;
            }
            return id;
        }
        let m = Arc::new(m);
        let id = match self.free.pop() {
            Some(id) => {
                self.by_id[id as usize] = Some((m.clone(), 1));
                id
            }
            None => {
                self.by_id.push(Some((m.clone(), 1)));
                (self.by_id.len() - 1) as u32
            }
        };
        self.ids.insert(m, id);
        id
    }

    fn release(&mut self, id: u32) {
        let slot = &mut self.by_id[id as usize];
        let Some((m, refs)) = slot else { return };
        *refs -= 1;
        if *refs == 0 {
            self.ids.remove(&**m);
            *slot = None;
            self.free.push(id);
        }
    }

    fn get(&self, id: u32) -> &Meta {
        &self.by_id[id as usize].as_ref().expect("live meta id").0
    }
}

#[derive(Default)]
pub(super) struct Store {
    map: BTreeMap<Cidr, Rec>,
    metas: Metas,
    /// Inserts since the last repack.
    inserted: usize,
    /// No ban expires before this (a lower bound: removals do not raise it).
    next_expiry: i64,
}

impl Store {
    pub fn new() -> Self {
        Self {
            next_expiry: PERMANENT,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn contains(&self, c: &Cidr) -> bool {
        self.map.contains_key(c)
    }

    pub fn rec(&self, c: &Cidr) -> Option<Rec> {
        self.map.get(c).copied()
    }

    pub fn source(&self, r: &Rec) -> BanSource {
        self.metas.get(r.meta).source
    }

    pub fn get(&self, c: &Cidr) -> Option<Ban> {
        self.map.get(c).map(|r| self.ban(*c, r))
    }

    pub fn ban(&self, cidr: Cidr, r: &Rec) -> Ban {
        let m = self.metas.get(r.meta);
        Ban {
            cidr,
            source: m.source,
            reason: m.reason.to_string(),
            mode: if r.flags & OBSERVE != 0 {
                Mode::Observe
            } else {
                Mode::Enforce
            },
            hard: r.flags & HARD != 0,
            created_at: time_of(r.created),
            expires_at: (r.expires != PERMANENT).then(|| time_of(r.expires)),
            offenses: r.offenses,
            origin: m.origin.as_deref().map(str::to_owned),
            scenario: m.scenario.as_deref().map(str::to_owned),
        }
    }

    /// Replace any ban of `ban.cidr` with `ban`; `flags` adds store-only flags ([`PENDING`]).
    pub fn put(&mut self, ban: &Ban, flags: u8) {
        let meta = self.metas.intern_of(ban);
        let rec = Rec {
            created: nanos(ban.created_at),
            expires: ban
                .expires_at
                .map_or(PERMANENT, |e| nanos(e).min(PERMANENT - 1)),
            meta,
            offenses: ban.offenses,
            flags: flags
                | if ban.mode == Mode::Observe {
                    OBSERVE
                } else {
                    0
                }
                | if ban.hard { HARD } else { 0 },
        };
        self.next_expiry = self.next_expiry.min(rec.expires);
        match self.map.insert(ban.cidr, rec) {
            Some(old) => self.metas.release(old.meta),
            None => self.inserted += 1,
        }
    }

    /// Confirm the pending ban of `c` with the kernel entry's timing and flags, in place; false
    /// when `c` has no pending ban.
    pub fn confirm(
        &mut self,
        c: &Cidr,
        expires: Option<OffsetDateTime>,
        mode: Mode,
        hard: bool,
    ) -> bool {
        let Some(r) = self.map.get_mut(c).filter(|r| r.flags & PENDING != 0) else {
            return false;
        };
        r.expires = expires.map_or(PERMANENT, |e| nanos(e).min(PERMANENT - 1));
        r.flags = if mode == Mode::Observe { OBSERVE } else { 0 } | if hard { HARD } else { 0 };
        self.next_expiry = self.next_expiry.min(r.expires);
        true
    }

    pub fn set_flags(&mut self, c: &Cidr, set: u8, clear: u8) {
        if let Some(r) = self.map.get_mut(c) {
            r.flags = (r.flags | set) & !clear;
        }
    }

    pub fn remove(&mut self, c: &Cidr) -> Option<Ban> {
        let r = self.map.remove(c)?;
        let ban = self.ban(*c, &r);
        self.metas.release(r.meta);
        Some(ban)
    }

    /// Repack the tree once a good part of it was inserted since the last time, so the cost
    /// is a constant per insert and the nodes stay full.
    pub fn settle(&mut self) {
        if self.inserted < 4096 || self.inserted * 2 < self.map.len() {
            return;
        }
        self.inserted = 0;
        let Some(second) = self.map.keys().nth(1).copied() else {
            return;
        };
        // `append` of two non-empty trees builds a packed tree from both, freeing the old
        // nodes as it goes (an empty side would only be swapped in).
        let mut rest = self.map.split_off(&second);
        self.map.append(&mut rest);
    }

    /// Addresses whose ban is due at `now`: a walk of every ban, done only when some ban may
    /// be due (a few milliseconds for a million, where an index by expiry would cost tens of
    /// bytes per ban).
    pub fn due(&mut self, now: i64) -> Vec<Cidr> {
        if now < self.next_expiry {
            return Vec::new();
        }
        let mut next = PERMANENT;
        let mut due = Vec::new();
        for (c, r) in &self.map {
            if r.expires <= now {
                due.push(*c);
            } else {
                next = next.min(r.expires);
            }
        }
        self.next_expiry = next;
        due
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Cidr, &Rec)> {
        self.map.iter()
    }

    pub fn after(&self, c: Cidr) -> impl Iterator<Item = (&Cidr, &Rec)> {
        self.map.range((Bound::Excluded(c), Bound::Unbounded))
    }

    pub fn cidrs(&self) -> impl Iterator<Item = &Cidr> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn ban(addr: &str, reason: &str) -> Ban {
        let t = datetime!(2030-01-02 03:04:05.123456789 UTC);
        Ban {
            cidr: addr.parse().unwrap(),
            source: BanSource::Import,
            reason: reason.into(),
            mode: Mode::Observe,
            hard: true,
            created_at: t,
            expires_at: Some(t + time::Duration::minutes(10)),
            offenses: 3,
            origin: Some("cscli".into()),
            scenario: None,
        }
    }

    #[test]
    fn a_ban_reads_back_exactly_and_shares_its_metadata() {
        let mut s = Store::new();
        for i in 0..10_000u32 {
            s.put(&ban(&format!("198.18.{}.{}", i / 256, i % 256), "list"), 0);
        }
        s.put(&ban("fd00::/64", "other"), 0);
        assert_eq!(s.metas.ids.len(), 2, "two distinct metadata, not 10001");
        assert_eq!(
            s.get(&"198.18.3.7".parse().unwrap()),
            Some(ban("198.18.3.7", "list"))
        );
        let mut p = ban("198.18.0.1", "list");
        p.expires_at = None;
        s.put(&p, 0);
        assert_eq!(s.get(&p.cidr), Some(p));
    }

    #[test]
    fn metadata_no_ban_uses_is_freed_and_its_id_reused() {
        let mut s = Store::new();
        s.put(&ban("198.18.0.1", "a"), 0);
        s.put(&ban("198.18.0.2", "b"), 0);
        s.put(&ban("198.18.0.2", "c"), 0);
        assert_eq!(s.metas.ids.len(), 2, "b went with its last ban");
        s.remove(&"198.18.0.1".parse().unwrap());
        assert_eq!(s.metas.ids.len(), 1);
        s.put(&ban("198.18.0.3", "d"), 0);
        assert_eq!(s.metas.by_id.len(), 3, "freed ids are reused");
    }

    #[test]
    fn settle_repacks_without_losing_or_changing_a_ban() {
        let mut s = Store::new();
        for i in 0..20_000u32 {
            s.put(&ban(&format!("198.18.{}.{}", i / 256, i % 256), "x"), 0);
        }
        let before: Vec<_> = s.iter().map(|(c, r)| (*c, *r)).collect();
        s.settle();
        assert_eq!(s.inserted, 0);
        let after: Vec<_> = s.iter().map(|(c, r)| (*c, *r)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn due_walks_only_when_something_may_be_due() {
        let mut s = Store::new();
        let b = ban("198.18.0.1", "x");
        s.put(&b, 0);
        let at = nanos(b.expires_at.unwrap());
        assert!(s.due(at - 1).is_empty());
        assert_eq!(s.due(at), vec![b.cidr]);
        s.remove(&b.cidr);
        assert!(s.due(at + 1).is_empty());
        assert_eq!(s.next_expiry, PERMANENT);
    }
}
