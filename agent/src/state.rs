//! `state.json`: bans (absolute wall-clock expiry), API allowlist entries and offence history,
//! so bans survive a node reboot (pins gone) and offences keep escalating across restarts.
//!
//! Written atomically: a temp file in the same directory, fsync, rename over `state.json`,
//! fsync the directory; a crash at any point leaves the old or the new file, never a mix. A
//! file that cannot be read back (corrupt, truncated, unknown version) is moved aside and the
//! agent starts from the pinned maps: it never crash-loops and never wipes live bans.
//!
//! Version 2 (written since issue 14) groups bans that share a source, reason, origin and
//! scenario, each ban a short row `[cidr, created_ns, expires_ns|null, offenses, flags]`
//! (flags: 1 observe, 2 hard): a million imported bans are about 50 MB instead of 260 MB.
//! Both versions are read streaming, one ban at a time into a [`Sink`], so reading never holds
//! the whole file nor a second copy of every ban. The writer takes bans in chunks from a
//! callback, so the agent holds its lock per chunk and never copies every ban for a write.

use std::{
    cell::Cell,
    collections::BTreeMap,
    fmt, fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::{
    Deserialize, Serialize,
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use time::OffsetDateTime;

use crate::{
    addr::Cidr,
    model::{AllowEntry, Ban, BanSource, Mode},
    paths,
    policy::Offense,
};

/// The version this agent writes; it reads 1 and 2.
pub const VERSION: u32 = 2;
const TMP_PREFIX: &str = ".state.json.tmp-";

/// A whole state file in memory (tests, tools): it is also a [`Sink`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub bans: Vec<Ban>,
    /// API (`manual`) entries only: built-ins and config entries come from the node and config.
    pub allow: Vec<AllowEntry>,
    pub offenses: BTreeMap<Cidr, Offense>,
}

/// Where a read state file goes, piece by piece, in file order.
pub trait Sink {
    fn allow(&mut self, e: AllowEntry);
    fn offense(&mut self, c: Cidr, o: Offense);
    fn ban(&mut self, b: Ban);
}

impl Sink for State {
    fn allow(&mut self, e: AllowEntry) {
        self.allow.push(e);
    }
    fn offense(&mut self, c: Cidr, o: Offense) {
        self.offenses.insert(c, o);
    }
    fn ban(&mut self, b: Ban) {
        self.bans.push(b);
    }
}

/// What the file holds besides the bans, copied under the agent's lock.
#[derive(Debug, Default)]
pub struct Header {
    pub allow: Vec<AllowEntry>,
    pub offenses: BTreeMap<Cidr, Offense>,
}

#[derive(Debug)]
pub enum Loaded {
    Missing,
    Found,
    /// The file could not be used and was moved to `to`; the sink may hold part of it.
    MovedAside {
        to: PathBuf,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    /// The write was given up for a newer one; the old file is untouched.
    #[error("{ABANDONED}")]
    Abandoned,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |err| StateError::Io {
        what,
        path: path.to_owned(),
        err,
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(paths::STATE_FILE)
}

/// Read the state file into `sink`; `now_unix` names the file a bad one is moved to. On
/// [`Loaded::MovedAside`] the sink got part of the file: the caller throws it away.
pub fn load(dir: &Path, now_unix: i64, sink: &mut dyn Sink) -> Result<Loaded, StateError> {
    remove_stale_temps(dir);
    let p = path(dir);
    let f = match fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(io_err("cannot read", &p)(e)),
    };
    let why = match decode(io::BufReader::with_capacity(1 << 20, f), sink) {
        Ok(()) => return Ok(Loaded::Found),
        Err(why) => why,
    };
    let mut to = dir.join(format!("{}.corrupt-{now_unix}", paths::STATE_FILE));
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{}.corrupt-{now_unix}.{n}", paths::STATE_FILE));
        n += 1;
    }
    fs::rename(&p, &to).map_err(io_err("cannot move aside", &p))?;
    Ok(Loaded::MovedAside { to, why })
}

/// A whole state file from `bytes` (tests, tools).
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    let mut s = State::default();
    decode(bytes, &mut s)?;
    s.version = VERSION;
    Ok(s)
}

fn decode(r: impl io::Read, sink: &mut dyn Sink) -> Result<(), String> {
    let version = Cell::new(None);
    let mut de = serde_json::Deserializer::from_reader(r);
    let r = File {
        sink,
        version: &version,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (r, version.get()) {
        (Ok(()), Some(_)) => Ok(()),
        (Ok(()), None) => Err("not a state file: no version".into()),
        (Err(e), None) => Err(format!("not a state file: {e}")),
        (Err(e), Some(_)) => Err(format!("corrupt state file: {e}")),
    }
}

/// The top-level object, streamed: `bans` go to the sink one by one.
struct File<'a> {
    sink: &'a mut dyn Sink,
    version: &'a Cell<Option<u32>>,
}

impl<'de> DeserializeSeed<'de> for File<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for File<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a wsguard state object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        // Bans before the version (a file whose keys were sorted by some tool): kept whole
        // until the version says how to read them. The agent writes the version first.
        let mut deferred: Option<Vec<serde_json::Value>> = None;
        while let Some(k) = m.next_key::<std::borrow::Cow<'_, str>>()? {
            match &*k {
                "version" => {
                    let v: u32 = m.next_value()?;
                    if v != 1 && v != 2 {
                        return Err(A::Error::custom(format!(
                            "unknown state version {v} (this agent reads versions 1 and 2)"
                        )));
                    }
                    self.version.set(Some(v));
                }
                "allow" => {
                    for e in m.next_value::<Vec<AllowEntry>>()? {
                        self.sink.allow(e);
                    }
                }
                "offenses" => {
                    for (c, o) in m.next_value::<BTreeMap<Cidr, Offense>>()? {
                        self.sink.offense(c, o);
                    }
                }
                "bans" => match self.version.get() {
                    Some(v) => m.next_value_seed(Bans {
                        sink: &mut *self.sink,
                        grouped: v >= 2,
                    })?,
                    None => deferred = Some(m.next_value()?),
                },
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let (Some(bans), Some(v)) = (deferred, self.version.get()) {
            for b in bans {
                let r = if v >= 2 {
                    OneGroup(&mut *self.sink).deserialize(b)
                } else {
                    Ban::deserialize(b).map(|b| self.sink.ban(b))
                };
                r.map_err(A::Error::custom)?;
            }
        }
        Ok(())
    }
}

/// The `bans` list: whole [`Ban`]s (version 1) or groups (version 2), each to the sink.
struct Bans<'a> {
    sink: &'a mut dyn Sink,
    grouped: bool,
}

impl<'de> DeserializeSeed<'de> for Bans<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Bans<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of bans")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        if self.grouped {
            while s.next_element_seed(OneGroup(&mut *self.sink))?.is_some() {}
        } else {
            while let Some(b) = s.next_element::<Ban>()? {
                self.sink.ban(b);
            }
        }
        Ok(())
    }
}

struct OneGroup<'a>(&'a mut dyn Sink);

#[derive(Debug, Default, Deserialize)]
struct Meta {
    source: Option<BanSource>,
    reason: Option<String>,
    origin: Option<String>,
    scenario: Option<String>,
}

/// `[cidr, created_ns, expires_ns|null, offenses, flags]`.
#[derive(Deserialize, Serialize)]
struct Row(Cidr, i64, Option<i64>, u32, u8);

const ROW_OBSERVE: u8 = 1;
const ROW_HARD: u8 = 2;

fn at(ns: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ns(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

impl<'de> DeserializeSeed<'de> for OneGroup<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OneGroup<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a group of bans")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        let mut meta = Meta::default();
        while let Some(k) = m.next_key::<std::borrow::Cow<'_, str>>()? {
            match &*k {
                "source" => meta.source = Some(m.next_value()?),
                "reason" => meta.reason = m.next_value()?,
                "origin" => meta.origin = m.next_value()?,
                "scenario" => meta.scenario = m.next_value()?,
                "rows" => {
                    let source = meta
                        .source
                        .ok_or_else(|| A::Error::custom("rows before their source"))?;
                    m.next_value_seed(Rows {
                        sink: &mut *self.0,
                        source,
                        meta: &meta,
                    })?;
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct Rows<'a> {
    sink: &'a mut dyn Sink,
    source: BanSource,
    meta: &'a Meta,
}

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of ban rows")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        while let Some(Row(cidr, created, expires, offenses, flags)) = s.next_element()? {
            self.sink.ban(Ban {
                cidr,
                source: self.source,
                reason: self.meta.reason.clone().unwrap_or_default(),
                mode: if flags & ROW_OBSERVE != 0 {
                    Mode::Observe
                } else {
                    Mode::Enforce
                },
                hard: flags & ROW_HARD != 0,
                created_at: at(created),
                expires_at: expires.map(at),
                offenses,
                origin: self.meta.origin.clone(),
                scenario: self.meta.scenario.clone(),
            });
        }
        Ok(())
    }
}

/// Write the state atomically: `header`, then the bans `next` hands out chunk by chunk (an
/// empty chunk ends them). `abandon` is asked as the file is written: when it says yes the
/// write stops, the temp file goes and the old file stays ([`StateError::Abandoned`]), so a
/// stale write of a large file does not hold up the one that replaces it.
pub fn save(
    dir: &Path,
    header: &Header,
    next: &mut dyn FnMut() -> Vec<Ban>,
    abandon: &dyn Fn() -> bool,
) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
    let r = write_synced(&tmp, header, next, abandon);
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r?;
    let dst = path(dir);
    fs::rename(&tmp, &dst).map_err(io_err("cannot rename into", &dst))?;
    // The rename is only durable once the directory entry is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync", dir))
}

/// Write a whole [`State`] (tests, tools).
pub fn save_state(dir: &Path, s: &State, abandon: &dyn Fn() -> bool) -> Result<(), StateError> {
    let header = Header {
        allow: s.allow.clone(),
        offenses: s.offenses.clone(),
    };
    let mut chunks = s.bans.chunks(1000).map(<[Ban]>::to_vec);
    save(
        dir,
        &header,
        &mut || chunks.next().unwrap_or_default(),
        abandon,
    )
}

/// A file that fails its writes once `abandon` says so.
struct Abandonable<'a> {
    f: fs::File,
    abandon: &'a dyn Fn() -> bool,
}

impl io::Write for Abandonable<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if (self.abandon)() {
            // Not `Interrupted`: `write_all` retries those forever.
            return Err(io::Error::other(ABANDONED));
        }
        self.f.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.f.flush()
    }
}

const ABANDONED: &str = "state write abandoned";

fn same_group(a: &Ban, b: &Ban) -> bool {
    a.source == b.source && a.reason == b.reason && a.origin == b.origin && a.scenario == b.scenario
}

fn write_bans(
    w: &mut impl io::Write,
    next: &mut dyn FnMut() -> Vec<Ban>,
    abandon: &dyn Fn() -> bool,
) -> io::Result<()> {
    w.write_all(b"[")?;
    // The head of the group being written, kept across chunks.
    let mut open: Option<Ban> = None;
    loop {
        let chunk = next();
        if chunk.is_empty() || abandon() {
            break;
        }
        for b in chunk {
            match &open {
                Some(o) if same_group(o, &b) => w.write_all(b",")?,
                prev => {
                    if prev.is_some() {
                        w.write_all(b"]},")?;
                    }
                    w.write_all(b"{\"source\":")?;
                    serde_json::to_writer(&mut *w, &b.source)?;
                    w.write_all(b",\"reason\":")?;
                    serde_json::to_writer(&mut *w, &b.reason)?;
                    w.write_all(b",\"origin\":")?;
                    serde_json::to_writer(&mut *w, &b.origin)?;
                    w.write_all(b",\"scenario\":")?;
                    serde_json::to_writer(&mut *w, &b.scenario)?;
                    w.write_all(b",\"rows\":[")?;
                }
            }
            let flags = if b.mode == Mode::Observe {
                ROW_OBSERVE
            } else {
                0
            } | if b.hard { ROW_HARD } else { 0 };
            let row = Row(
                b.cidr,
                ns(b.created_at),
                b.expires_at.map(ns),
                b.offenses,
                flags,
            );
            if open.as_ref().is_none_or(|o| !same_group(o, &b)) {
                open = Some(b);
            }
            serde_json::to_writer(&mut *w, &row)?;
        }
    }
    if open.is_some() {
        w.write_all(b"]}")?;
    }
    w.write_all(b"]")
}

fn write_synced(
    tmp: &Path,
    header: &Header,
    next: &mut dyn FnMut() -> Vec<Ban>,
    abandon: &dyn Fn() -> bool,
) -> Result<(), StateError> {
    let f = fs::File::create(tmp).map_err(io_err("cannot create", tmp))?;
    // Large buffer: `abandon` is asked per buffer.
    let mut w = io::BufWriter::with_capacity(1 << 20, Abandonable { f, abandon });
    let r = (|| -> io::Result<()> {
        write!(w, "{{\"version\":{VERSION},\"allow\":")?;
        serde_json::to_writer(&mut w, &header.allow)?;
        w.write_all(b",\"offenses\":")?;
        serde_json::to_writer(&mut w, &header.offenses)?;
        w.write_all(b",\"bans\":")?;
        write_bans(&mut w, next, abandon)?;
        w.write_all(b"}")?;
        w.flush()
    })();
    if abandon() {
        return Err(StateError::Abandoned);
    }
    r.map_err(io_err("cannot write", tmp))?;
    let f = w
        .into_inner()
        .map_err(|e| io_err("cannot write", tmp)(e.into_error()))?
        .f;
    f.sync_all().map_err(io_err("cannot fsync", tmp))
}

/// Temp files left by a crash in the middle of a write.
fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AllowSource, BanSource, Mode};
    use time::macros::datetime;

    fn sample() -> State {
        let t = datetime!(2030-01-02 03:04:05 UTC);
        State {
            version: VERSION,
            bans: vec![
                Ban {
                    cidr: "198.51.100.7".parse().unwrap(),
                    source: BanSource::Kernel,
                    reason: "burst of 25 bad handshakes".into(),
                    mode: Mode::Enforce,
                    hard: false,
                    created_at: t,
                    expires_at: Some(t + time::Duration::minutes(10)),
                    offenses: 2,
                    origin: None,
                    scenario: None,
                },
                Ban {
                    cidr: "2001:db8::/64".parse().unwrap(),
                    source: BanSource::Manual,
                    reason: "ops".into(),
                    mode: Mode::Observe,
                    hard: true,
                    created_at: t,
                    expires_at: None,
                    offenses: 1,
                    origin: None,
                    scenario: None,
                },
            ],
            allow: vec![AllowEntry {
                cidr: "203.0.113.0/24".parse().unwrap(),
                source: AllowSource::Manual,
                reason: "office".into(),
            }],
            offenses: [(
                "198.51.100.7".parse().unwrap(),
                Offense { count: 2, last: t },
            )]
            .into(),
        }
    }

    fn load_all(dir: &Path, now: i64) -> (Loaded, State) {
        let mut s = State {
            version: VERSION,
            ..Default::default()
        };
        let l = load(dir, now, &mut s).unwrap();
        (l, s)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        save_state(d.path(), &sample(), &|| false).unwrap();
        match load_all(d.path(), 1) {
            (Loaded::Found, s) => assert_eq!(s, sample()),
            other => panic!("{other:?}"),
        }
        let text = fs::read_to_string(path(d.path())).unwrap();
        assert!(text.contains(r#""version":2"#), "{text}");
        assert!(
            text.contains(r#"["2001:db8::/64",1893553445000000000,null,1,3]"#),
            "a permanent observe hard ban is one short row: {text}"
        );
    }

    #[test]
    fn missing_is_empty() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(load_all(d.path(), 1).0, Loaded::Missing));
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        save_state(
            d.path(),
            &State {
                version: VERSION,
                ..Default::default()
            },
            &|| false,
        )
        .unwrap();
        save_state(d.path(), &sample(), &|| false).unwrap();
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    #[test]
    fn abandoned_write_keeps_the_old_file_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        save_state(d.path(), &sample(), &|| false).unwrap();
        let before = fs::read(path(d.path())).unwrap();
        let empty = State {
            version: VERSION,
            ..Default::default()
        };
        let r = save_state(d.path(), &empty, &|| true);
        assert!(matches!(r, Err(StateError::Abandoned)), "{r:?}");
        assert_eq!(fs::read(path(d.path())).unwrap(), before);
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    #[test]
    fn stale_temp_from_a_crash_is_removed_on_load() {
        let d = tempfile::tempdir().unwrap();
        save_state(d.path(), &sample(), &|| false).unwrap();
        fs::write(
            d.path().join(".state.json.tmp-4242"),
            b"{\"version\":1,\"ba",
        )
        .unwrap();
        assert!(matches!(load_all(d.path(), 1).0, Loaded::Found));
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    fn moved_aside(content: &[u8], why_has: &str) {
        let d = tempfile::tempdir().unwrap();
        fs::write(path(d.path()), content).unwrap();
        match load_all(d.path(), 1_700_000_000).0 {
            Loaded::MovedAside { to, why } => {
                assert_eq!(to, d.path().join("state.json.corrupt-1700000000"));
                assert!(why.contains(why_has), "{why}");
                assert_eq!(fs::read(&to).unwrap(), content, "kept for the operator");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path(d.path()).exists());
        assert!(matches!(
            load_all(d.path(), 1_700_000_001).0,
            Loaded::Missing
        ));
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        moved_aside(b"\x00\xffgarbage", "not a state file");
        moved_aside(
            br#"{"version":1,"bans":"nope","allow":[],"offenses":{}}"#,
            "corrupt",
        );
    }

    #[test]
    fn truncated_file_is_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        save_state(d.path(), &sample(), &|| false).unwrap();
        let full = fs::read(path(d.path())).unwrap();
        moved_aside(&full[..full.len() - 20], "corrupt state file");
        moved_aside(&full[..5], "not a state file");
    }

    #[test]
    fn future_version_is_moved_aside() {
        let v = State {
            version: 3,
            ..sample()
        };
        moved_aside(&serde_json::to_vec(&v).unwrap(), "unknown state version 3");
    }

    #[test]
    fn a_version_1_file_reads_the_same() {
        // What agents before issue 14 wrote: every ban a whole object.
        let v1 = serde_json::to_vec(&State {
            version: 1,
            ..sample()
        })
        .unwrap();
        assert_eq!(parse(&v1).unwrap(), sample());
    }

    #[test]
    fn bans_sharing_metadata_share_one_group_across_chunks() {
        let d = tempfile::tempdir().unwrap();
        let mut s = sample();
        let b = s.bans[0].clone();
        s.bans = (1..=2500u32)
            .map(|i| Ban {
                cidr: format!("198.18.{}.{}", i / 256, i % 256).parse().unwrap(),
                ..b.clone()
            })
            .collect();
        save_state(d.path(), &s, &|| false).unwrap();
        let text = fs::read_to_string(path(d.path())).unwrap();
        assert_eq!(text.matches("\"rows\"").count(), 1, "{}", &text[..300]);
        assert_eq!(load_all(d.path(), 1).1, s);
    }

    #[test]
    fn second_bad_file_in_the_same_second_does_not_overwrite_the_first() {
        let d = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            fs::write(path(d.path()), b"junk").unwrap();
            assert!(matches!(load_all(d.path(), 5).0, Loaded::MovedAside { .. }));
        }
        assert_eq!(
            names(d.path()),
            vec!["state.json.corrupt-5", "state.json.corrupt-5.1"]
        );
    }
}
