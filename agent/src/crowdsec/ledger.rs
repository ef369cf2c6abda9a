//! Which LAPI decisions this node knows, kept apart from the policy's ban records: decision id
//! → address, expiry, origin, scenario. A ban is LAPI's when its source is `crowdsec`; the
//! ledger says which decisions hold it up, so a deleted decision removes only the ban it made
//! (and only once no other decision still holds it), and a resync can mark and sweep.
//!
//! Also here: decisions lifted on this node (`ban rm`), which a resync must not bring back;
//! addresses this node published, so deleting their LAPI copy (`wsguard ban rm` on another
//! node, `cscli decisions delete`) lifts the local ban too; and addresses where a decision
//! waits behind a local ban (it takes over when the local ban goes).
//!
//! Persisted as `crowdsec.json` in the state directory (atomic like the state file).

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::addr::Cidr;

pub const FILE: &str = "crowdsec.json";
const VERSION: u32 = 1;

/// Unix milliseconds.
pub type Ms = i64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub cidr: Cidr,
    pub expires: Ms,
    pub origin: String,
    pub scenario: String,
}

#[derive(Debug, Default)]
pub struct Ledger {
    decisions: HashMap<i64, Entry>,
    by_cidr: HashMap<Cidr, Vec<i64>>,
    /// Lifted here with `ban rm`: id → the decision's expiry.
    suppressed: HashMap<i64, Ms>,
    /// Published by this node: address → expiry of the published ban.
    pushed: HashMap<Cidr, Ms>,
    /// Decisions waiting behind a local (non-`crowdsec`) ban of the same address.
    shadowed: HashSet<Cidr>,
    /// Changed since the last save.
    pub dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    decisions: Vec<(i64, Entry)>,
    suppressed: Vec<(i64, Ms)>,
    pushed: Vec<(Cidr, Ms)>,
    shadowed: Vec<Cidr>,
}

impl Ledger {
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    pub fn get(&self, id: i64) -> Option<&Entry> {
        self.decisions.get(&id)
    }

    pub fn is_suppressed(&self, id: i64) -> bool {
        self.suppressed.contains_key(&id)
    }

    /// Record a decision (replacing what the same id said before).
    pub fn insert(&mut self, id: i64, e: Entry) {
        if let Some(old) = self.decisions.get(&id)
            && old.cidr != e.cidr
        {
            self.unlink(id, old.cidr);
        }
        let ids = self.by_cidr.entry(e.cidr).or_default();
        if !ids.contains(&id) {
            ids.push(id);
        }
        self.decisions.insert(id, e);
        self.dirty = true;
    }

    pub fn remove(&mut self, id: i64) -> Option<Entry> {
        let e = self.decisions.remove(&id)?;
        self.unlink(id, e.cidr);
        self.dirty = true;
        Some(e)
    }

    fn unlink(&mut self, id: i64, cidr: Cidr) {
        if let Some(ids) = self.by_cidr.get_mut(&cidr) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.by_cidr.remove(&cidr);
            }
        }
    }

    /// The ids recorded for `cidr`.
    pub fn ids_of(&self, cidr: &Cidr) -> Vec<i64> {
        self.by_cidr.get(cidr).cloned().unwrap_or_default()
    }

    /// The decision of `cidr` that lasts longest and is still running at `now`.
    pub fn longest(&self, cidr: &Cidr, now: Ms) -> Option<(i64, &Entry)> {
        self.by_cidr
            .get(cidr)?
            .iter()
            .filter_map(|id| self.decisions.get(id).map(|e| (*id, e)))
            .filter(|(_, e)| e.expires > now)
            .max_by_key(|(id, e)| (e.expires, *id))
    }

    /// Lift every decision of `cidr` on this node: forgotten, and ignored if LAPI sends them
    /// again (until they expire). Returns their ids.
    pub fn suppress(&mut self, cidr: &Cidr) -> Vec<i64> {
        let ids = self.ids_of(cidr);
        for id in &ids {
            if let Some(e) = self.remove(*id) {
                self.suppressed.insert(*id, e.expires);
            }
        }
        self.shadowed.remove(cidr);
        ids
    }

    pub fn mark_pushed(&mut self, cidr: Cidr, expires: Ms) {
        let e = self.pushed.entry(cidr).or_insert(expires);
        *e = (*e).max(expires);
        self.dirty = true;
    }

    pub fn was_pushed(&self, cidr: &Cidr) -> bool {
        self.pushed.contains_key(cidr)
    }

    pub fn forget_pushed(&mut self, cidr: &Cidr) {
        if self.pushed.remove(cidr).is_some() {
            self.dirty = true;
        }
    }

    pub fn set_shadowed(&mut self, cidr: Cidr, on: bool) {
        let changed = if on {
            self.shadowed.insert(cidr)
        } else {
            self.shadowed.remove(&cidr)
        };
        self.dirty |= changed;
    }

    pub fn shadowed(&self) -> Vec<Cidr> {
        self.shadowed.iter().copied().collect()
    }

    /// Every recorded id, for a resync's mark and sweep.
    pub fn ids(&self) -> Vec<i64> {
        self.decisions.keys().copied().collect()
    }

    /// Forget what expired before `now`; returns the addresses whose decisions went.
    pub fn prune(&mut self, now: Ms) -> Vec<Cidr> {
        let gone: Vec<i64> = self
            .decisions
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut cidrs = Vec::new();
        for id in gone {
            if let Some(e) = self.remove(id) {
                cidrs.push(e.cidr);
            }
        }
        let before = self.suppressed.len() + self.pushed.len();
        self.suppressed.retain(|_, e| *e > now);
        self.pushed.retain(|_, e| *e > now);
        if self.suppressed.len() + self.pushed.len() != before {
            self.dirty = true;
        }
        cidrs
    }

    pub fn load(dir: &Path) -> Result<Self, String> {
        let p = dir.join(FILE);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        let f: File =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        if f.version != VERSION {
            return Err(format!(
                "{}: unknown version {} (this agent reads {VERSION})",
                p.display(),
                f.version
            ));
        }
        let mut l = Self::default();
        for (id, e) in f.decisions {
            l.insert(id, e);
        }
        l.suppressed = f.suppressed.into_iter().collect();
        l.pushed = f.pushed.into_iter().collect();
        l.shadowed = f.shadowed.into_iter().collect();
        l.dirty = false;
        Ok(l)
    }

    /// What `save` writes, copied (under the caller's lock) so the write happens without it.
    pub fn snapshot(&self) -> Vec<u8> {
        let f = File {
            version: VERSION,
            decisions: self
                .decisions
                .iter()
                .map(|(id, e)| (*id, e.clone()))
                .collect(),
            suppressed: self.suppressed.iter().map(|(a, b)| (*a, *b)).collect(),
            pushed: self.pushed.iter().map(|(a, b)| (*a, *b)).collect(),
            shadowed: self.shadowed.iter().copied().collect(),
        };
        serde_json::to_vec(&f).unwrap_or_default()
    }
}

/// Write `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A file that cannot be read back is moved aside (never fatal: LAPI's next full answer
/// rebuilds what it held).
pub fn move_aside(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let to = dir.join(format!("{name}.corrupt-{now}"));
    std::fs::rename(dir.join(name), &to).ok().map(|()| to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(cidr: &str, expires: Ms) -> Entry {
        Entry {
            cidr: cidr.parse().unwrap(),
            expires,
            origin: "cscli".into(),
            scenario: "s".into(),
        }
    }

    #[test]
    fn longest_live_decision_per_address() {
        let mut l = Ledger::default();
        let c: Cidr = "198.18.1.1".parse().unwrap();
        l.insert(1, e("198.18.1.1", 100));
        l.insert(2, e("198.18.1.1", 300));
        l.insert(3, e("198.18.1.0/24", 900));
        assert_eq!(l.longest(&c, 0).map(|(id, _)| id), Some(2));
        assert_eq!(l.remove(2).map(|e| e.expires), Some(300));
        assert_eq!(l.longest(&c, 0).map(|(id, _)| id), Some(1));
        assert_eq!(l.longest(&c, 100), None, "expired at 100");
        assert_eq!(l.prune(100), vec![c]);
        assert!(l.ids_of(&c).is_empty());
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn suppressed_and_pushed_survive_a_reload() {
        let d = tempfile::tempdir().unwrap();
        let mut l = Ledger::default();
        let c: Cidr = "fd00::7".parse().unwrap();
        l.insert(7, e("fd00::7", 500));
        l.insert(8, e("fd00::8", 500));
        assert_eq!(l.suppress(&c), vec![7]);
        l.mark_pushed("198.18.2.2".parse().unwrap(), 400);
        l.set_shadowed("198.18.3.3".parse().unwrap(), true);
        write_atomic(d.path(), FILE, &l.snapshot()).unwrap();
        let r = Ledger::load(d.path()).unwrap();
        assert!(r.is_suppressed(7) && r.get(7).is_none());
        assert_eq!(r.get(8), Some(&e("fd00::8", 500)));
        assert!(r.was_pushed(&"198.18.2.2".parse().unwrap()));
        assert_eq!(r.shadowed(), vec!["198.18.3.3".parse::<Cidr>().unwrap()]);
        std::fs::write(d.path().join(FILE), b"{garbage").unwrap();
        assert!(Ledger::load(d.path()).is_err());
        assert!(move_aside(d.path(), FILE).is_some());
        assert!(Ledger::load(d.path()).unwrap().is_empty());
    }
}
