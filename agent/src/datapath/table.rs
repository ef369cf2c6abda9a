//! The agent's side of `BAN_TABLE_V4` (see `wsguard_common::table`): the array mapped into
//! the agent, its slots written in place with the ordering the program's lock-free probe
//! relies on (value first and key last on a claim, key first on a release).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;
use wsguard_common::{
    maps::{BAN_MAY_PRESERVE, BanValue},
    table::{self, BanBucket, FREE, SLOTS},
};

use super::DataPathError;

/// `BAN_TABLE_V4`, mapped.
pub struct BanTable {
    /// Keeps the map alive as long as the mapping.
    _map: MapData,
    base: NonNull<BanBucket>,
    len: usize,
    buckets: u32,
    bits: u32,
}

// SAFETY: the mapping is shared memory owned by this value; every access goes through `&self`
// or `&mut self` with atomic or volatile accesses, as with the program on other CPUs.
unsafe impl Send for BanTable {}
// SAFETY: as above.
unsafe impl Sync for BanTable {}

/// Where a key sits: bucket and slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub bucket: u32,
    pub slot: usize,
}

impl Slot {
    /// A flat index, for a bitmap of slots.
    pub fn index(self) -> usize {
        self.bucket as usize * SLOTS + self.slot
    }
}

impl BanTable {
    /// Map `map` (a `BAN_TABLE_V4`: mappable, 2^n buckets of [`BanBucket`]).
    pub fn new(map: MapData) -> Result<Self, DataPathError> {
        let info = map
            .info()
            .map_err(|e| DataPathError::Other(format!("BAN_TABLE_V4: {e}")))?;
        let (buckets, size) = (info.max_entries(), info.value_size() as usize);
        if size != size_of::<BanBucket>() || !buckets.is_power_of_two() {
            return Err(DataPathError::Other(format!(
                "BAN_TABLE_V4: {buckets} buckets of {size} bytes, this build wants a power of two of {}",
                size_of::<BanBucket>()
            )));
        }
        let bits = buckets.trailing_zeros();
        if !(table::MIN_BUCKET_BITS..=table::MAX_BUCKET_BITS).contains(&bits) {
            return Err(DataPathError::Other(format!(
                "BAN_TABLE_V4: {buckets} buckets, outside what this build probes"
            )));
        }
        let page = 4096;
        let len = (buckets as usize * size).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length and the
        // map's BPF_F_MMAPABLE flag and fails otherwise.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DataPathError::Other(format!(
                "map BAN_TABLE_V4 into memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self {
            _map: map,
            base: NonNull::new(p.cast()).expect("mmap returned a null mapping"),
            len,
            buckets,
            bits,
        })
    }

    /// The table pinned at `path`.
    pub fn from_pin(path: &Path) -> Result<Self, DataPathError> {
        let map = MapData::from_pin(path)
            .map_err(|e| DataPathError::Other(format!("open {}: {e}", path.display())))?;
        Self::new(map)
    }

    /// Bucket bits (the program's `TABLE_BITS_V4`).
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Slots in the table.
    pub fn slots(&self) -> usize {
        self.buckets as usize * SLOTS
    }

    fn bucket(&self, b: u32) -> *mut BanBucket {
        assert!(b < self.buckets, "bucket {b} of {}", self.buckets);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.as_ptr().add(b as usize) }
    }

    fn key_at(&self, s: Slot) -> &AtomicU32 {
        // SAFETY: an aligned u32 inside the mapping, shared with the program, only ever
        // accessed atomically here.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.bucket(s.bucket)).keys[s.slot]) }
    }

    fn value_at(&self, s: Slot) -> *mut BanValue {
        // SAFETY: in bounds of the mapping.
        unsafe { &raw mut (*self.bucket(s.bucket)).vals[s.slot] }
    }

    /// Where `addr` is, if it is in the table.
    pub fn find(&self, addr: [u8; 4]) -> Option<Slot> {
        let key = table::key(addr);
        if key == FREE {
            return None;
        }
        (0..2).find_map(|c| {
            let bucket = table::bucket(key, self.bits, c);
            (0..SLOTS)
                .map(|slot| Slot { bucket, slot })
                .find(|s| self.key_at(*s).load(Ordering::Acquire) == key)
        })
    }

    /// The copy of `addr`'s ban in the table.
    pub fn get(&self, addr: [u8; 4]) -> Option<BanValue> {
        self.find(addr).map(|s| self.read(s))
    }

    fn read(&self, s: Slot) -> BanValue {
        let v = self.value_at(s);
        // SAFETY: aligned fields of a live slot; the counter and flags are shared with the
        // program's atomic adds and ors, so they are read atomically.
        unsafe {
            BanValue {
                expires_ns: std::ptr::read_volatile(&raw const (*v).expires_ns),
                created_ns: std::ptr::read_volatile(&raw const (*v).created_ns),
                drops: AtomicU64::from_ptr(&raw mut (*v).drops).load(Ordering::Relaxed),
                flags: AtomicU32::from_ptr(&raw mut (*v).flags).load(Ordering::Relaxed),
                _pad: 0,
            }
        }
    }

    fn write(&self, s: Slot, v: &BanValue, zero_drops: bool) {
        let p = self.value_at(s);
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::write_volatile(&raw mut (*p).expires_ns, v.expires_ns);
            std::ptr::write_volatile(&raw mut (*p).created_ns, v.created_ns);
            AtomicU32::from_ptr(&raw mut (*p).flags).store(v.flags, Ordering::Release);
            if zero_drops {
                AtomicU64::from_ptr(&raw mut (*p).drops).store(0, Ordering::Release);
            }
        }
    }

    /// Put `addr`'s ban (`v`, its drops ignored) in its slot, or in a free slot of the emptier
    /// of its two buckets; `None` if both are full (or `addr` is 0.0.0.0): the ban then lives
    /// in `BANS_V4` only. `carried`: the writer carried the ban's whole count into `BANS_V4`,
    /// so the slot's restarts at zero; otherwise (a repair) the slot keeps its count. A new
    /// slot starts at zero either way.
    pub fn put(&self, addr: [u8; 4], v: &BanValue, carried: bool) -> Option<Slot> {
        if let Some(s) = self.find(addr) {
            self.write(s, v, carried);
            return Some(s);
        }
        let key = table::key(addr);
        if key == FREE {
            return None;
        }
        let free = |b: u32| -> Vec<Slot> {
            (0..SLOTS)
                .map(|slot| Slot { bucket: b, slot })
                .filter(|s| self.key_at(*s).load(Ordering::Acquire) == FREE)
                .collect()
        };
        let (a, b) = (
            free(table::bucket(key, self.bits, 0)),
            free(table::bucket(key, self.bits, 1)),
        );
        let s = *if b.len() > a.len() { &b } else { &a }.first()?;
        self.write(s, v, true);
        self.key_at(s).store(key, Ordering::Release);
        Some(s)
    }

    /// Take `addr` out of the table, key first; its drops (not yet in `BANS_V4`) come back.
    pub fn remove(&self, addr: [u8; 4]) -> Option<u64> {
        let s = self.find(addr)?;
        self.key_at(s).store(FREE, Ordering::Release);
        Some(self.read(s).drops)
    }

    /// Every claimed slot with its address.
    pub fn occupied(&self) -> impl Iterator<Item = (Slot, [u8; 4])> + '_ {
        (0..self.buckets).flat_map(move |bucket| {
            (0..SLOTS).filter_map(move |slot| {
                let s = Slot { bucket, slot };
                let k = self.key_at(s).load(Ordering::Acquire);
                (k != FREE).then(|| (s, k.to_ne_bytes()))
            })
        })
    }

    /// Release a slot found by [`BanTable::occupied`].
    pub fn release(&self, s: Slot) {
        self.key_at(s).store(FREE, Ordering::Release);
    }
}

impl Drop for BanTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `len` bytes, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// `v`, the ban as `BANS_V4` holds it, with what the program counted in the table's copy:
/// its drops, and the flow flag the TC program may have set there.
pub fn merged(v: BanValue, in_table: Option<BanValue>) -> BanValue {
    match in_table {
        Some(t) => BanValue {
            drops: v.drops.wrapping_add(t.drops),
            flags: v.flags | (t.flags & BAN_MAY_PRESERVE),
            ..v
        },
        None => v,
    }
}
