//! The writer's side of the kernel's ban pre-filter (`BAN_FILTER`, rules in
//! `wsguard_common::filter`): which buckets some ban covers, and the bitmap the kernel reads.
//!
//! The agent keeps a copy of the bitmap and, per bucket, how many bans of /24 (IPv4) or /64
//! (IPv6) and longer cover it, so a removal knows without a map walk whether it freed the
//! bucket. Shorter bans cover many buckets and are few: they are kept as ranges (IPv4) or a
//! count (IPv6, whose buckets are hashed, so any of them clears the whole family) and a
//! removal recomputes that family's words and writes those that changed.
//!
//! Order is the contract: bits are cleared in the kernel before the ban that needs it is
//! written, and set only after the last ban covering them is gone. A crash in between leaves
//! a bit clear that could be set (slower, never wrong); the next open rebuilds the whole
//! bitmap from the bans in the maps.

use std::{collections::HashMap, net::IpAddr, os::fd::AsFd as _};

use aya::maps::{Array, IterableMap as _, MapData};
use wsguard_common::filter::{self, FILTER_WORDS, FILTER_WORDS_PER_FAMILY};

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

pub struct Prefilter {
    /// What the kernel's map holds (or will once the dirty words are written).
    words: Vec<u64>,
    v4: HashMap<u32, u32>,
    v6: HashMap<u32, u32>,
    v4_wide: Vec<(u32, u32)>,
    v6_wide: u32,
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
        }
    }

    pub fn add_unsealed(&mut self, c: &Cidr) {
        self.count(cover(c), true);
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

    /// Whether the copy says `bit` of a family is "proven clean" (for tests and checks).
    pub fn is_clean(&self, bit: u32, v6: bool) -> bool {
        let (word, mask) = filter::slot(bit, v6);
        self.words[word as usize] & mask != 0
    }

    /// Write the words listed in `dirty` (any order, repeats allowed) to the kernel's map.
    pub fn write(
        &self,
        map: &Array<MapData, u64>,
        dirty: &mut Vec<u32>,
    ) -> Result<(), DataPathError> {
        dirty.sort_unstable();
        dirty.dedup();
        let fd = map.map().fd().as_fd();
        for keys in dirty.chunks(CHUNK) {
            let values: Vec<u64> = keys.iter().map(|k| self.words[*k as usize]).collect();
            let r = match sys::update_batch(fd, keys, &values) {
                Err(e) if e.done == 0 && sys::batch_unsupported(&e.err) => keys
                    .iter()
                    .zip(&values)
                    .try_for_each(|(k, v)| sys::update_elem(fd, k, v)),
                r => r.map_err(|e| e.err),
            };
            r.map_err(|e| DataPathError::Other(format!("write the ban pre-filter: {e}")))?;
        }
        dirty.clear();
        Ok(())
    }

    /// Write the whole bitmap (after a load or an adoption: the map may hold anything older).
    pub fn write_all(&self, map: &Array<MapData, u64>) -> Result<(), DataPathError> {
        self.write(map, &mut (0..FILTER_WORDS).collect())
    }
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
            d.is_empty() && !f.is_clean(v4("198.18.0.9"), false),
            "one ban left"
        );
        f.add(&c("198.18.0.0/15"), &mut d);
        assert!(!d.is_empty() && !f.is_clean(v4("198.19.255.1"), false));
        assert!(f.is_clean(v4("198.17.255.1"), false) && f.is_clean(v4("198.20.0.1"), false));
        d.clear();
        f.remove(&c("198.18.0.3"), &mut d);
        assert!(d.is_empty(), "still under the /15");
        f.remove(&c("198.18.0.0/15"), &mut d);
        assert!(f.is_clean(v4("198.18.0.9"), false) && f.is_clean(v4("198.19.255.1"), false));
        assert!(f.words.iter().all(|w| *w == u64::MAX), "all clean again");
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
