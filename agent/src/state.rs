//! `state.json`: bans (absolute wall-clock expiry), API allowlist entries and offence history,
//! so bans survive a node reboot (pins gone) and offences keep escalating across restarts.
//!
//! Written atomically: a temp file in the same directory, fsync, rename over `state.json`,
//! fsync the directory; a crash at any point leaves the old or the new file, never a mix. A
//! file that cannot be read back (corrupt, truncated, unknown version) is moved aside and the
//! agent starts from the pinned maps: it never crash-loops and never wipes live bans.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize, Serializer};

use crate::{
    addr::Cidr,
    model::{AllowEntry, Ban},
    paths,
    policy::Offense,
};

pub const VERSION: u32 = 1;
const TMP_PREFIX: &str = ".state.json.tmp-";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub bans: Vec<Ban>,
    /// API (`manual`) entries only: built-ins and config entries come from the node and config.
    pub allow: Vec<AllowEntry>,
    pub offenses: BTreeMap<Cidr, Offense>,
}

/// What the agent writes: the same file as [`State`], its bans shared with the policy (a
/// snapshot of 1M bans is 1M pointers, not 1M copies).
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub version: u32,
    #[serde(serialize_with = "shared_bans")]
    pub bans: Vec<Arc<Ban>>,
    pub allow: Vec<AllowEntry>,
    pub offenses: BTreeMap<Cidr, Offense>,
}

fn shared_bans<S: Serializer>(bans: &[Arc<Ban>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(bans.iter().map(|b| &**b))
}

#[derive(Debug)]
pub enum Loaded {
    Missing,
    Found(State),
    /// The file could not be used and was moved to `to`.
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

/// Read the state file; `now_unix` names the file a bad one is moved to.
pub fn load(dir: &Path, now_unix: i64) -> Result<Loaded, StateError> {
    remove_stale_temps(dir);
    let p = path(dir);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(io_err("cannot read", &p)(e)),
    };
    let why = match decode(&bytes) {
        Ok(s) => return Ok(Loaded::Found(s)),
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

fn decode(bytes: &[u8]) -> Result<State, String> {
    #[derive(Deserialize)]
    struct Probe {
        version: u32,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state file: {e}"))?;
    if probe.version != VERSION {
        return Err(format!(
            "unknown state version {} (this agent reads version {VERSION})",
            probe.version
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("corrupt state file: {e}"))
}

/// Write `state` atomically. `abandon` is asked as the file is written: when it says yes the
/// write stops, the temp file goes and the old file stays ([`StateError::Abandoned`]), so a
/// stale write of a quarter-gigabyte file does not hold up the one that replaces it.
pub fn save(
    dir: &Path,
    state: &impl Serialize,
    abandon: &dyn Fn() -> bool,
) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
    let r = write_synced(&tmp, state, abandon);
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

fn write_synced(
    tmp: &Path,
    state: &impl Serialize,
    abandon: &dyn Fn() -> bool,
) -> Result<(), StateError> {
    let f = fs::File::create(tmp).map_err(io_err("cannot create", tmp))?;
    // Large buffer: a 1M-ban file is a quarter gigabyte (and `abandon` is asked per buffer).
    let mut w = io::BufWriter::with_capacity(1 << 20, Abandonable { f, abandon });
    let r = serde_json::to_writer(&mut w, state)
        .map_err(io::Error::other)
        .and_then(|()| w.flush());
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
        save(d.path(), &sample(), &|| false).unwrap();
        match load(d.path(), 1).unwrap() {
            Loaded::Found(s) => assert_eq!(s, sample()),
            other => panic!("{other:?}"),
        }
        let text = fs::read_to_string(path(d.path())).unwrap();
        assert!(text.contains(r#""version":1"#) && text.contains(r#""expires_at":null"#));
    }

    #[test]
    fn missing_is_empty() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(load(d.path(), 1).unwrap(), Loaded::Missing));
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        save(
            d.path(),
            &State {
                version: VERSION,
                ..Default::default()
            },
            &|| false,
        )
        .unwrap();
        save(d.path(), &sample(), &|| false).unwrap();
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    #[test]
    fn abandoned_write_keeps_the_old_file_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), &sample(), &|| false).unwrap();
        let before = fs::read(path(d.path())).unwrap();
        let empty = State {
            version: VERSION,
            ..Default::default()
        };
        let r = save(d.path(), &empty, &|| true);
        assert!(matches!(r, Err(StateError::Abandoned)), "{r:?}");
        assert_eq!(fs::read(path(d.path())).unwrap(), before);
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    #[test]
    fn stale_temp_from_a_crash_is_removed_on_load() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), &sample(), &|| false).unwrap();
        fs::write(
            d.path().join(".state.json.tmp-4242"),
            b"{\"version\":1,\"ba",
        )
        .unwrap();
        assert!(matches!(load(d.path(), 1).unwrap(), Loaded::Found(_)));
        assert_eq!(names(d.path()), vec!["state.json"]);
    }

    fn moved_aside(content: &[u8], why_has: &str) {
        let d = tempfile::tempdir().unwrap();
        fs::write(path(d.path()), content).unwrap();
        match load(d.path(), 1_700_000_000).unwrap() {
            Loaded::MovedAside { to, why } => {
                assert_eq!(to, d.path().join("state.json.corrupt-1700000000"));
                assert!(why.contains(why_has), "{why}");
                assert_eq!(fs::read(&to).unwrap(), content, "kept for the operator");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path(d.path()).exists());
        assert!(matches!(
            load(d.path(), 1_700_000_001).unwrap(),
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
        let full = serde_json::to_vec(&sample()).unwrap();
        moved_aside(&full[..full.len() / 2], "not a state file");
    }

    #[test]
    fn future_version_is_moved_aside() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["version"] = 2.into();
        moved_aside(&serde_json::to_vec(&v).unwrap(), "unknown state version 2");
    }

    #[test]
    fn second_bad_file_in_the_same_second_does_not_overwrite_the_first() {
        let d = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            fs::write(path(d.path()), b"junk").unwrap();
            assert!(matches!(
                load(d.path(), 5).unwrap(),
                Loaded::MovedAside { .. }
            ));
        }
        assert_eq!(
            names(d.path()),
            vec!["state.json.corrupt-5", "state.json.corrupt-5.1"]
        );
    }
}
