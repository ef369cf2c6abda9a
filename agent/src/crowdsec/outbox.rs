//! What this node still has to tell LAPI: bans to publish and decisions to delete, in order,
//! bounded (a full queue drops new bans and counts them; deletions are never dropped for
//! bans: they are few and undo what an operator lifted), and persisted as
//! `crowdsec-outbox.json` so a restart does not forget them.

use std::{collections::VecDeque, path::Path};

use serde::{Deserialize, Serialize};

use super::ledger::{Ms, write_atomic};
use crate::addr::Cidr;

pub const FILE: &str = "crowdsec-outbox.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Job {
    /// Publish a ban of this node.
    Ban(PushBan),
    /// Delete LAPI's decisions for an address this node lifted (`ban rm`): by id, and by
    /// value for what this node published but has not pulled back yet.
    Delete { cidr: Cidr, ids: Vec<i64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushBan {
    pub cidr: Cidr,
    pub scenario: String,
    /// The ban's reason (with the burst's counts for kernel bans).
    pub reason: String,
    /// `None`: permanent.
    pub expires: Option<Ms>,
    /// Observe bans are published as simulated.
    pub simulated: bool,
}

#[derive(Debug, Default)]
pub struct Outbox {
    /// Jobs with a sequence number, so what was sent is popped even if `ban rm` took jobs
    /// out of the queue while it was being sent.
    queue: VecDeque<(u64, Job)>,
    next: u64,
    cap: usize,
    pub dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    jobs: Vec<Job>,
}

impl Outbox {
    pub fn new(cap: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            next: 0,
            cap,
            dirty: false,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queue a ban; false (dropped) when the queue is full.
    pub fn push_ban(&mut self, b: PushBan) -> bool {
        if self.queue.len() >= self.cap {
            return false;
        }
        self.add(Job::Ban(b));
        true
    }

    fn add(&mut self, j: Job) {
        self.queue.push_back((self.next, j));
        self.next += 1;
        self.dirty = true;
    }

    /// Queue a deletion, and forget the queued bans of the same address (they were lifted).
    pub fn push_delete(&mut self, cidr: Cidr, ids: Vec<i64>) {
        self.drop_bans_of(&cidr);
        self.add(Job::Delete { cidr, ids });
    }

    pub fn drop_bans_of(&mut self, cidr: &Cidr) {
        let before = self.queue.len();
        self.queue
            .retain(|(_, j)| !matches!(j, Job::Ban(b) if b.cidr == *cidr));
        self.dirty |= self.queue.len() != before;
    }

    /// The first job, if it is a deletion; else up to `max` consecutive bans from the front.
    /// With the sequence number of the last job returned, for [`Outbox::pop_through`].
    pub fn front(&self, max: usize) -> (Front, u64) {
        let last = |n: usize| self.queue.get(n.saturating_sub(1)).map_or(0, |(s, _)| *s);
        match self.queue.front() {
            None => (Front::Empty, 0),
            Some((s, Job::Delete { cidr, ids })) => (Front::Delete(*cidr, ids.clone()), *s),
            Some((_, Job::Ban(_))) => {
                let bans: Vec<PushBan> = self
                    .queue
                    .iter()
                    .take(max)
                    .map_while(|(_, j)| match j {
                        Job::Ban(b) => Some(b.clone()),
                        Job::Delete { .. } => None,
                    })
                    .collect();
                let n = bans.len();
                (Front::Bans(bans), last(n))
            }
        }
    }

    /// Remove the jobs up to sequence number `seq` (after they were sent).
    pub fn pop_through(&mut self, seq: u64) {
        let before = self.queue.len();
        while self.queue.front().is_some_and(|(s, _)| *s <= seq) {
            self.queue.pop_front();
        }
        self.dirty |= self.queue.len() != before;
    }

    pub fn load(dir: &Path, cap: usize) -> Result<Self, String> {
        let p = dir.join(FILE);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new(cap)),
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        let f: File =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        if f.version != VERSION {
            return Err(format!("{}: unknown version {}", p.display(), f.version));
        }
        let mut o = Self::new(cap);
        // A smaller cap since the last run keeps the oldest jobs.
        for j in f.jobs.into_iter().take(cap) {
            o.add(j);
        }
        o.dirty = false;
        Ok(o)
    }

    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&File {
            version: VERSION,
            jobs: self.queue.iter().map(|(_, j)| j.clone()).collect(),
        })
        .unwrap_or_default()
    }

    pub fn save(&mut self, dir: &Path) -> std::io::Result<()> {
        let bytes = self.snapshot();
        self.dirty = false;
        write_atomic(dir, FILE, &bytes)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Front {
    Empty,
    Delete(Cidr, Vec<i64>),
    Bans(Vec<PushBan>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(a: &str) -> PushBan {
        PushBan {
            cidr: a.parse().unwrap(),
            scenario: "wsguard/bad-websocket-handshake".into(),
            reason: "r".into(),
            expires: Some(1000),
            simulated: false,
        }
    }

    #[test]
    fn bounded_ordered_and_persisted() {
        let d = tempfile::tempdir().unwrap();
        let mut o = Outbox::new(3);
        assert!(o.push_ban(ban("198.18.1.1")));
        assert!(o.push_ban(ban("198.18.1.2")));
        assert!(o.push_ban(ban("198.18.1.3")));
        assert!(!o.push_ban(ban("198.18.1.4")), "full");
        o.push_delete("198.18.1.2".parse().unwrap(), vec![9]);
        assert_eq!(o.len(), 3);
        let (f, seq) = o.front(10);
        match f {
            Front::Bans(v) => assert_eq!(v.len(), 2),
            f => panic!("{f:?}"),
        }
        o.save(d.path()).unwrap();
        // A ban lifted while the first two were being sent: popping still stops at `seq`.
        o.drop_bans_of(&"198.18.1.1".parse().unwrap());
        o.pop_through(seq);
        assert_eq!(o.len(), 1);
        let mut r = Outbox::load(d.path(), 10).unwrap();
        assert_eq!(r.len(), 3);
        let (_, seq) = r.front(10);
        r.pop_through(seq);
        assert_eq!(
            r.front(10).0,
            Front::Delete("198.18.1.2".parse().unwrap(), vec![9])
        );
        std::fs::write(d.path().join(FILE), b"[1,2").unwrap();
        assert!(Outbox::load(d.path(), 10).is_err());
    }
}
