//! The exact IPv4 ban table (`BAN_TABLE_V4`): the exact IPv4 bans again, in a flat array the
//! XDP program probes inline, so a banned source costs two bucket reads instead of a BPF hash
//! lookup (hashing, bucket walk, key compare: the largest single cost of the drop path).
//!
//! `BANS_V4` stays the record of every exact IPv4 ban; the table holds the same bans where they
//! fit. Each ban has two candidate buckets ([`bucket`] with choice 0 and 1) of [`SLOTS`] slots;
//! the writer puts it in a free slot of the emptier one, and a ban whose two buckets are full
//! lives in `BANS_V4` only. While every exact IPv4 ban is in the table, the writer sets
//! [`crate::maps::CFG_V4_TABLE`] and the program trusts a miss in the table; without the bit it
//! looks `BANS_V4` up after a miss, so a table nobody fills is merely slow, never wrong.
//!
//! Writes and reads share the memory without a lock (the agent maps the array):
//! - a slot is claimed by writing its value first and its key last, one aligned 32-bit store;
//!   it is freed by clearing the key first. A reader that sees the key sees the value;
//! - the program probes every slot of both buckets, with no early stop at a free slot, so a
//!   freed slot needs no tombstone;
//! - key 0 (0.0.0.0) marks a free slot, so a ban of 0.0.0.0 lives in `BANS_V4` only.
//!
//! Drops: the program counts a ban's drops in whichever copy it found, so a ban's count is the
//! sum of both copies. The writer carries that sum into `BANS_V4` on every write of the ban
//! and zeroes the slot's count.

use crate::maps::BanValue;

/// Slots per bucket.
pub const SLOTS: usize = 4;

/// One bucket: the keys first (one read answers "is it here"), then their values.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BanBucket {
    /// [`key`] of the slot's address, or [`FREE`].
    pub keys: [u32; SLOTS],
    pub vals: [BanValue; SLOTS],
}

/// The key of a free slot.
pub const FREE: u32 = 0;

/// Most bucket bits: 2^20 buckets, 4M slots (144 MiB). Past 4M bans, more and more overflow
/// to `BANS_V4`.
pub const MAX_BUCKET_BITS: u32 = 20;
/// Fewest bucket bits: the shift in [`bucket`] stays below 32.
pub const MIN_BUCKET_BITS: u32 = 1;

/// Bucket bits for a cap of `max_bans` bans: one slot per ban, rounded up to a power of two
/// (36 MiB at the default 1M). Two choices of four slots leave almost no ban without a slot
/// up to three quarters of that, and about 6% of random bans at a full cap (those live in
/// `BANS_V4` only). Two slots per ban would leave almost none at a full cap, but its 72 MiB
/// at 1M does not fit the DaemonSet's memory limit next to everything else.
pub const fn bucket_bits(max_bans: u32) -> u32 {
    let mut bits = MIN_BUCKET_BITS;
    while bits < MAX_BUCKET_BITS && ((SLOTS as u64) << bits) < max_bans as u64 {
        bits += 1;
    }
    bits
}

/// The table key of an IPv4 address: its four bytes as the program loads them from the packet
/// (native byte order), so the kernel needs no byte swap.
#[inline(always)]
pub const fn key(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

/// Multipliers of the two choices: odd, and far apart, so the two buckets of a key are
/// independent.
const MUL: [u32; 2] = [0x9e37_79b1, 0x85eb_ca77];

/// Bucket `choice` (0 or 1) of `key` in a table of 2^`bits` buckets: the top bits of a
/// multiplicative hash.
#[inline(always)]
pub const fn bucket(key: u32, bits: u32, choice: usize) -> u32 {
    key.wrapping_mul(MUL[choice & 1]) >> (32 - bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_padding() {
        assert_eq!(
            core::mem::size_of::<BanBucket>(),
            4 * SLOTS + SLOTS * core::mem::size_of::<BanValue>()
        );
        assert_eq!(core::mem::size_of::<BanBucket>(), 144);
    }

    #[test]
    fn bits_grow_with_the_cap_and_stay_in_range() {
        assert_eq!(bucket_bits(0), MIN_BUCKET_BITS);
        assert_eq!(bucket_bits(1), MIN_BUCKET_BITS);
        assert_eq!(bucket_bits(8), 1);
        assert_eq!(bucket_bits(9), 2);
        assert_eq!(bucket_bits(1_000_000), 18);
        assert_eq!(bucket_bits(1 << 20), 18);
        assert_eq!(bucket_bits((1 << 20) + 1), 19);
        assert_eq!(bucket_bits(u32::MAX), MAX_BUCKET_BITS);
        for max in [1, 7, 1000, 65_536, 1_000_000, u32::MAX] {
            let bits = bucket_bits(max);
            assert!((MIN_BUCKET_BITS..=MAX_BUCKET_BITS).contains(&bits));
            if bits < MAX_BUCKET_BITS {
                assert!((SLOTS as u64) << bits >= u64::from(max), "{max}");
            }
        }
    }

    #[test]
    fn buckets_are_in_range_and_the_choices_differ() {
        for bits in MIN_BUCKET_BITS..=MAX_BUCKET_BITS {
            for k in [1u32, 2, 0x0a00_0001, 0xffff_ffff, 0x1234_5678] {
                assert!(bucket(k, bits, 0) < 1 << bits);
                assert!(bucket(k, bits, 1) < 1 << bits);
                assert_eq!(bucket(k, bits, 0), bucket(k, bits, 2));
            }
        }
        let differ = (1u32..1000)
            .filter(|k| bucket(*k, 18, 0) != bucket(*k, 18, 1))
            .count();
        assert!(differ > 990, "{differ}");
    }

    /// Two choices of four slots: consecutive addresses (a scan of a range) filling three
    /// quarters of the slots never overflow, a pseudo-random spread over half the slots barely
    /// does, and at one ban per slot most bans still find one.
    #[test]
    fn few_bans_overflow_at_the_sizes_the_cap_gives() {
        fn overflow(n: u32, bits: u32, addr: impl Fn(u32) -> [u8; 4]) -> u32 {
            let mut fill = [0u8; 1 << 14];
            let mut over = 0;
            for i in 0..n {
                let k = key(addr(i));
                let (a, b) = (bucket(k, bits, 0) as usize, bucket(k, bits, 1) as usize);
                let pick = if fill[b] < fill[a] { b } else { a };
                if usize::from(fill[pick]) == SLOTS {
                    over += 1;
                } else {
                    fill[pick] += 1;
                }
            }
            over
        }
        let bits = 14;
        let slots = (SLOTS as u32) << bits;
        assert_eq!(
            overflow(slots / 4 * 3, bits, |i| (0x0a00_0000 + i).to_be_bytes()),
            0
        );
        let spread = |i: u32| (i.wrapping_mul(0x2545_f491) ^ 0x5bd1_e995).to_be_bytes();
        assert!(overflow(slots / 2, bits, spread) <= slots / 1000);
        assert!(overflow(slots, bits, spread) <= slots / 10);
    }
}
