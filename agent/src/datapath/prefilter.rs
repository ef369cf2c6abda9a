//! The writer's side of the kernel's ban pre-filter (`BAN_FILTER`, rules in
//! `wsguard_common::filter`): which buckets some ban covers, and the bitmap the kernel reads;
//! and of its host filter (`HOST_FILTER`), which exact IPv4 bans share an address's low 24
//! bits.
//!
//! The agent keeps a copy of the bitmap and, per bucket, how many bans of /24 (IPv4) or /64
//! (IPv6) and longer cover it, so a removal knows without a map walk whether it freed the
//! bucket. Shorter bans cover many buckets and are few: they are kept as ranges (IPv4) or a
//! count (IPv6, whose buckets are hashed, so any of them clears the whole family) and a
//! removal recomputes that family's words and writes those that changed. Host-filter bits
//! are counted in two bits each (4 MiB, touched only where bans are): three bans on one bit
//! pin it "maybe" until the next open recounts (slower for that bit, never wrong; at a million
//! bans spread over the 2^24 bits, a few hundred).
//!
//! Order is the contract: bits are cleared in the kernel before the ban that needs it is
//! written, and set only after the last ban covering them is gone. A crash in between leaves
//! a bit clear that could be set (slower, never wrong); the next open rebuilds the whole
//! bitmap from the bans in the maps.

use std::{collections::HashMap, net::IpAddr, os::fd::AsFd as _};

use aya::maps::{Array, IterableMap as _, MapData};
use wsguard_common::filter::{
    self, FILTER_WORDS, FILTER_WORDS_PER_FAMILY, HOST_FILTER_BITS, HOST_FILTER_WORDS,
};

use super::{DataPathError, sys};
use crate::addr::Cidr;

/// Words per `BPF_MAP_UPDATE_BATCH` (12 bytes each with the key: about 100 KiB).
const CHUNK: usize = 8192;
const PER_FAMILY: usize = FILTER_WORDS_PER_FAMILY as usize;

/// The buckets a ban covers.
#[derive(Clone, Copy)]
enum Cover {
    V4(u32),
    /// IPv4 shorter than /24: `first..first + count`.
    V4Wide(u32, u32),
    V6(u32),
    /// IPv6 shorter than /64: every IPv6 bucket, as far as the hashed filter can tell.
    V6Wide,
}

fn cover(c: &Cidr) -> Cover {
    let prefix = u32::from(c.prefix_len());
    match c.addr() {
        IpAddr::V4(a) => match filter::v4_cidr_bits(a.octets(), prefix) {
            (first, 1) => Cover::V4(first),
            (first, n) => Cover::V4Wide(first, n),
        },
        IpAddr::V6(a) => filter::v6_cidr_bit(&a.octets(), prefix).map_or(Cover::V6Wide, Cover::V6),
    }
}

/// Saturated: the count of a host bit stops here and never goes down.
const HOST_SATURATED: u8 = 3;

/// Exact IPv4 bans per host-filter bit, two bits each.
struct HostCounts(Vec<u8>);

impl HostCounts {
    fn new() -> Self {
        // Zeroed by the allocator: pages are touched only where a ban is counted.
        Self(vec![0; (HOST_FILTER_BITS / 4) as usize])
    }

    fn get(&self, bit: u32) -> u8 {
        (self.0[(bit / 4) as usize] >> ((bit % 4) * 2)) & 3
    }

    fn set(&mut self, bit: u32, n: u8) {
        let (byte, shift) = (&mut self.0[(bit / 4) as usize], (bit % 4) * 2);
        *byte = (*byte & !(3 << shift)) | (n << shift);
    }

    /// Word `word` of the kernel's host filter: a bit set where no ban is counted.
    fn word(&self, word: u32) -> u64 {
        let bytes = &self.0[(word * 16) as usize..(word * 16 + 16) as usize];
        let mut w = 0u64;
        for (i, b) in bytes.iter().enumerate() {
            for j in 0..4 {
                if (b >> (j * 2)) & 3 == 0 {
                    w |= 1 << (i * 4 + j);
                }
            }
        }
        w
    }
}

/// The host-filter bit of an exact IPv4 ban; `None` for any other.
fn host_bit(c: &Cidr) -> Option<u32> {
    match c.addr() {
        IpAddr::V4(a) if c.is_host() => Some(filter::host_bit(a.octets())),
        _ => None,
    }
}

/// `dirty` holds BAN_FILTER word indexes, and host-filter words offset by this.
const HOST_BASE: u32 = FILTER_WORDS;

pub struct Prefilter {
    /// What the kernel's map holds (or will once the dirty words are written).
    words: Vec<u64>,
    v4: HashMap<u32, u32>,
    v6: HashMap<u32, u32>,
    v4_wide: Vec<(u32, u32)>,
    v6_wide: u32,
    hosts: HostCounts,
}

impl Prefilter {
    /// The bitmap for exactly `bans` (write it with [`Prefilter::write_all`]).
    #[cfg(test)]
    pub fn new<'a>(bans: impl IntoIterator<Item = &'a Cidr>) -> Self {
        let mut f = Self::empty();
        for c in bans {
            f.add_unsealed(c);
        }
        f.seal();
        f
    }

    /// Built ban by ban ([`Prefilter::add_unsealed`], then [`Prefilter::seal`]), for a walk of
    /// the maps that never holds every ban.
    pub fn empty() -> Self {
        Self {
            words: Vec::new(),
            v4: HashMap::new(),
            v6: HashMap::new(),
            v4_wide: Vec::new(),
            v6_wide: 0,
            hosts: HostCounts::new(),
        }
    }

    pub fn add_unsealed(&mut self, c: &Cidr) {
        self.count(cover(c), true);
        self.count_host(c, true);
    }

    /// Count an exact IPv4 ban in (or out of) its host bit: whether the bit's "no exact ban"
    /// changed.
    fn count_host(&mut self, c: &Cidr, add: bool) -> Option<u32> {
        let bit = host_bit(c)?;
        let n = self.hosts.get(bit);
        let next = match (add, n) {
            (true, HOST_SATURATED) | (false, HOST_SATURATED) | (false, 0) => return None,
            (true, n) => n + 1,
            (false, n) => n - 1,
        };
        self.hosts.set(bit, next);
        (n == 0 || next == 0).then_some(bit)
    }

    fn host_dirty(bit: u32, dirty: &mut Vec<u32>) {
        dirty.push(HOST_BASE + filter::host_slot(bit).0);
    }

    /// Compute the bitmap from what was added.
    pub fn seal(&mut self) {
        let mut words = self.family(false);
        words.extend(self.family(true));
        self.words = words;
    }

    fn count(&mut self, cover: Cover, add: bool) {
        let step = |m: &mut HashMap<u32, u32>, b: u32| {
            if add {
                *m.entry(b).or_default() += 1;
            } else if let Some(n) = m.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&b);
                }
            }
        };
        match cover {
            Cover::V4(b) => step(&mut self.v4, b),
            Cover::V6(b) => step(&mut self.v6, b),
            Cover::V4Wide(first, n) if add => self.v4_wide.push((first, n)),
            Cover::V4Wide(first, n) => {
                if let Some(i) = self.v4_wide.iter().position(|r| *r == (first, n)) {
                    self.v4_wide.swap_remove(i);
                }
            }
            Cover::V6Wide if add => self.v6_wide += 1,
            Cover::V6Wide => self.v6_wide = self.v6_wide.saturating_sub(1),
        }
    }

    /// One family's words as the counted bans say they should be.
    fn family(&self, v6: bool) -> Vec<u64> {
        let mut w = vec![u64::MAX; PER_FAMILY];
        if v6 {
            if self.v6_wide > 0 {
                w.fill(0);
            } else {
                for b in self.v6.keys() {
                    clear_range(&mut w, *b, 1);
                }
            }
        } else {
            for b in self.v4.keys() {
                clear_range(&mut w, *b, 1);
            }
            for (first, n) in &self.v4_wide {
                clear_range(&mut w, *first, *n);
            }
        }
        w
    }

    /// Count a new ban and clear the bits it needs; the words to write (before the ban) are
    /// pushed to `dirty`.
    pub fn add(&mut self, c: &Cidr, dirty: &mut Vec<u32>) {
        if let Some(bit) = self.count_host(c, true) {
            Self::host_dirty(bit, dirty);
        }
        let cv = cover(c);
        self.count(cv, true);
        let (base, first, n) = match cv {
            Cover::V4(b) => (0, b, 1),
            Cover::V4Wide(first, n) => (0, first, n),
            Cover::V6(b) => (PER_FAMILY, b, 1),
            Cover::V6Wide => (PER_FAMILY, 0, filter::FILTER_BITS_PER_FAMILY),
        };
        let fam = &mut self.words[base..base + PER_FAMILY];
        for (i, w) in range_masks(first, n) {
            if fam[i] & w != 0 {
                fam[i] &= !w;
                dirty.push((base + i) as u32);
            }
        }
    }

    /// Uncount a removed ban and set the bits no ban covers any more; the words to write
    /// (after the removal) are pushed to `dirty`.
    pub fn remove(&mut self, c: &Cidr, dirty: &mut Vec<u32>) {
        if let Some(bit) = self.count_host(c, false) {
            Self::host_dirty(bit, dirty);
        }
        let cv = cover(c);
        self.count(cv, false);
        match cv {
            Cover::V4(b) => {
                let wide = self.v4_wide.iter().any(|(f, n)| (*f..f + n).contains(&b));
                if !self.v4.contains_key(&b) && !wide {
                    self.set_bit(b, false, dirty);
                }
            }
            Cover::V6(b) => {
                if !self.v6.contains_key(&b) && self.v6_wide == 0 {
                    self.set_bit(b, true, dirty);
                }
            }
            Cover::V4Wide(..) => self.refresh(false, dirty),
            Cover::V6Wide => self.refresh(true, dirty),
        }
    }

    fn set_bit(&mut self, bit: u32, v6: bool, dirty: &mut Vec<u32>) {
        let (word, mask) = filter::slot(bit, v6);
        let w = &mut self.words[word as usize];
        if *w & mask == 0 {
            *w |= mask;
            dirty.push(word);
        }
    }

    /// Recompute one family (after a wide ban went) and mark the words that changed.
    fn refresh(&mut self, v6: bool, dirty: &mut Vec<u32>) {
        let base = if v6 { PER_FAMILY } else { 0 };
        for (i, w) in self.family(v6).into_iter().enumerate() {
            if self.words[base + i] != w {
                self.words[base + i] = w;
                dirty.push((base + i) as u32);
            }
        }
    }

    /// Whether the copy says no exact IPv4 ban has host-filter bit `bit` (for tests).
    #[cfg(test)]
    pub fn host_is_clean(&self, bit: u32) -> bool {
        self.hosts.get(bit) == 0
    }

    /// Whether the copy says `bit` of a family is "proven clean" (for tests and checks).
    pub fn is_clean(&self, bit: u32, v6: bool) -> bool {
        let (word, mask) = filter::slot(bit, v6);
        self.words[word as usize] & mask != 0
    }

    /// Write the words listed in `dirty` (any order, repeats allowed) to the kernel's maps:
    /// the pre-filter's to `map`, the host filter's to `hosts`.
    pub fn write(
        &self,
        map: &Array<MapData, u64>,
        hosts: &Array<MapData, u64>,
        dirty: &mut Vec<u32>,
    ) -> Result<(), DataPathError> {
        dirty.sort_unstable();
        dirty.dedup();
        let split = dirty.partition_point(|k| *k < HOST_BASE);
        let (filter_keys, host_keys) = dirty.split_at_mut(split);
        write_words(
            map,
            filter_keys,
            |k| self.words[k as usize],
            "ban pre-filter",
        )?;
        for k in host_keys.iter_mut() {
            *k -= HOST_BASE;
        }
        write_words(hosts, host_keys, |k| self.hosts.word(k), "host filter")?;
        dirty.clear();
        Ok(())
    }

    /// Write both bitmaps whole (after a load or an adoption: the maps may hold anything
    /// older).
    pub fn write_all(
        &self,
        map: &Array<MapData, u64>,
        hosts: &Array<MapData, u64>,
    ) -> Result<(), DataPathError> {
        self.write(
            map,
            hosts,
            &mut (0..HOST_BASE + HOST_FILTER_WORDS).collect(),
        )
    }
}

/// Empty the kernel's host filter (every bit "look up"), before a program of this build
/// starts reading a pinned one that another build may have left stale: a build from before
/// the host filter never kept it in step with its bans.
pub fn clear_host_filter(map: &Array<MapData, u64>) -> Result<(), DataPathError> {
    let keys: Vec<u32> = (0..HOST_FILTER_WORDS).collect();
    write_words(map, &keys, |_| 0, "host filter")
}

/// Write words `keys` of `map`, their values from `value`, in batches.
fn write_words(
    map: &Array<MapData, u64>,
    keys: &[u32],
    value: impl Fn(u32) -> u64,
    what: &str,
) -> Result<(), DataPathError> {
    let fd = map.map().fd().as_fd();
    for keys in keys.chunks(CHUNK) {
        let values: Vec<u64> = keys.iter().map(|k| value(*k)).collect();
        let r = match sys::update_batch(fd, keys, &values) {
            Err(e) if e.done == 0 && sys::batch_unsupported(&e.err) => keys
                .iter()
                .zip(&values)
                .try_for_each(|(k, v)| sys::update_elem(fd, k, v)),
            r => r.map_err(|e| e.err),
        };
        r.map_err(|e| DataPathError::Other(format!("write the {what}: {e}")))?;
    }
    Ok(())
}

/// The words and masks of bits `first..first + n` of a family (`n` a power of two and
/// `first` a multiple of it, as CIDR ranges are).
fn range_masks(first: u32, n: u32) -> impl Iterator<Item = (usize, u64)> {
    let (lo, hi) = (first as usize / 64, (first + n).div_ceil(64) as usize);
    let mask = if n >= 64 {
        u64::MAX
    } else {
        ((1u64 << n) - 1) << (first & 63)
    };
    (lo..hi).map(move |i| (i, mask))
}

fn clear_range(w: &mut [u64], first: u32, n: u32) {
    for (i, m) in range_masks(first, n) {
        w[i] &= !m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> u32 {
        let a: std::net::Ipv4Addr = s.parse().unwrap();
        filter::v4_bit(a.octets())
    }

    #[test]
    fn counts_buckets_and_wide_ranges() {
        let mut f = Prefilter::new(&[c("198.18.0.2"), c("198.18.0.3")]);
        let mut d = Vec::new();
        assert!(!f.is_clean(v4("198.18.0.9"), false));
        assert!(f.is_clean(v4("198.18.1.9"), false));
        f.remove(&c("198.18.0.2"), &mut d);
        assert!(
            d.iter().all(|k| *k >= HOST_BASE) && !f.is_clean(v4("198.18.0.9"), false),
            "one ban left in the bucket"
        );
        f.add(&c("198.18.0.0/15"), &mut d);
        assert!(!d.is_empty() && !f.is_clean(v4("198.19.255.1"), false));
        assert!(f.is_clean(v4("198.17.255.1"), false) && f.is_clean(v4("198.20.0.1"), false));
        d.clear();
        f.remove(&c("198.18.0.3"), &mut d);
        assert!(
            d.iter().all(|k| *k >= HOST_BASE),
            "the bucket is still under the /15"
        );
        f.remove(&c("198.18.0.0/15"), &mut d);
        assert!(f.is_clean(v4("198.18.0.9"), false) && f.is_clean(v4("198.19.255.1"), false));
        assert!(f.words.iter().all(|w| *w == u64::MAX), "all clean again");
    }

    #[test]
    fn host_bits_count_exact_v4_bans_and_saturate() {
        let bit = |s: &str| filter::host_bit(s.parse::<std::net::Ipv4Addr>().unwrap().octets());
        let mut f = Prefilter::new(&[c("198.18.0.2"), c("10.18.0.2"), c("198.18.0.0/24")]);
        assert!(
            !f.host_is_clean(bit("198.18.0.2")),
            "two bans share the bit"
        );
        assert!(
            f.host_is_clean(bit("198.18.0.3")),
            "a CIDR ban has no host bit"
        );
        let mut d = Vec::new();
        f.remove(&c("198.18.0.2"), &mut d);
        assert!(
            !f.host_is_clean(bit("198.18.0.2")) && d.is_empty(),
            "one left"
        );
        f.remove(&c("10.18.0.2"), &mut d);
        assert!(f.host_is_clean(bit("198.18.0.2")));
        let (word, mask) = filter::host_slot(bit("198.18.0.2"));
        assert!(d.contains(&(HOST_BASE + word)));
        assert_eq!(f.hosts.word(word) & mask, mask, "the word the kernel gets");
        assert_eq!(f.hosts.word(word).count_zeros(), 0);
        // Three bans pin the bit: no removal frees it before the next open recounts.
        for a in ["1.18.0.9", "2.18.0.9", "3.18.0.9", "4.18.0.9"] {
            f.add(&c(a), &mut d);
        }
        for a in ["1.18.0.9", "2.18.0.9", "3.18.0.9", "4.18.0.9"] {
            f.remove(&c(a), &mut d);
        }
        assert!(!f.host_is_clean(bit("1.18.0.9")), "saturated");
        d.clear();
        f.add(&c("fd00::9"), &mut d);
        assert!(
            d.iter().all(|k| *k < HOST_BASE),
            "IPv6 bans have no host bit"
        );
    }

    #[test]
    fn a_short_v6_ban_clears_the_family() {
        let mut f = Prefilter::new(&[c("fd00:1::1")]);
        let mut d = Vec::new();
        f.add(&c("fd00:2::/48"), &mut d);
        assert!(f.words[PER_FAMILY..].iter().all(|w| *w == 0));
        assert!(f.words[..PER_FAMILY].iter().all(|w| *w == u64::MAX));
        f.remove(&c("fd00:2::/48"), &mut d);
        let b = filter::v6_bit(&"fd00:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert!(!f.is_clean(b, true));
        assert_eq!(
            f.words[PER_FAMILY..]
                .iter()
                .map(|w| w.count_zeros())
                .sum::<u32>(),
            1
        );
    }
}
