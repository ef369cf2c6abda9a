//! Read positions of followed files, kept across restarts so no line is read twice: one small
//! JSON file per log source, replaced atomically (write, fsync, rename).

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Identifies the content a file started with, so a recycled inode or a truncated-and-rewritten
/// file is not mistaken for the one the offset belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How many leading bytes were hashed (at most `FINGERPRINT_LEN`; 0: empty file).
    pub len: u32,
    pub hash: u64,
}

pub const FINGERPRINT_LEN: usize = 256;

impl Fingerprint {
    pub fn of(head: &[u8]) -> Self {
        // FNV-1a: tiny, stable across versions (unlike std's hasher), good enough to tell files
        // apart.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in head {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            len: head.len() as u32,
            hash: h,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffset {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// Bytes consumed: the end of the last complete line handed on.
    pub offset: u64,
    pub fingerprint: Fingerprint,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offsets {
    pub files: Vec<FileOffset>,
}

/// `Ok(None)`: no state yet (first start).
pub fn load(path: &Path) -> io::Result<Option<Offsets>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn save(path: &Path, offsets: &Offsets) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(offsets).map_err(io::Error::other)?)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("offsets_x.json");
        assert_eq!(load(&p).unwrap(), None);
        let o = Offsets {
            files: vec![FileOffset {
                path: "/var/log/a.log".into(),
                dev: 1,
                ino: 2,
                offset: 3,
                fingerprint: Fingerprint::of(b"first line\n"),
            }],
        };
        save(&p, &o).unwrap();
        assert_eq!(load(&p).unwrap(), Some(o));
        fs::write(&p, "{not json").unwrap();
        assert_eq!(load(&p).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_ne!(Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        assert_ne!(Fingerprint::of(b""), Fingerprint::of(b"a"));
    }
}
