//! The ban pre-filter (`BAN_FILTER`): one "proven clean" bit per IPv4 /24 and per hashed IPv6
//! /64, so the clean path of the XDP program costs an array read instead of the exact-hash and
//! CIDR-trie lookups.
//!
//! A set bit means "no ban, exact or CIDR, covers any address of this bucket": the program then
//! skips every ban lookup. A clear bit means "maybe banned": the full lookups run. A fresh map
//! is all zeros, so a filter nobody filled is merely slow, never wrong; whoever writes bans
//! keeps it in step:
//! - before inserting a ban, clear the bits of every bucket it covers;
//! - after removing one, set a bucket's bit again only when no remaining ban covers it.
//!
//! An IPv6 CIDR shorter than /64 covers buckets all over the table; while one exists, leave
//! every IPv6 bit clear ([`v6_cidr_bit`] returns `None` for it).
//!
//! Layout: `FILTER_WORDS` u64 words; IPv4 bits in the first [`FILTER_WORDS_PER_FAMILY`] words,
//! IPv6 bits in the next. Bit `b` of a family is bit `b & 63` of word `b >> 6`.
//!
//! The host filter (`HOST_FILTER`) answers for the clean neighbours of an exact IPv4 ban, whose
//! /24 is not proven clean: one bit per value of an address's low 24 bits ([`host_bit`]), set
//! when no exact IPv4 ban has those bits. Within one /24 the low 8 bits differ, so the bans of
//! an address's own /24 never share its bit; only an exact ban in another /24 with the same
//! low 24 bits does. It speaks for exact bans only: the program believes it only while no
//! IPv4 CIDR ban exists (`Config::cidr_v4 == 0`). The same ordering rules apply.

/// Buckets per address family: 2^24 (every IPv4 /24).
pub const FILTER_BITS_PER_FAMILY: u32 = 1 << 24;
/// Words per address family (2 MiB each).
pub const FILTER_WORDS_PER_FAMILY: u32 = FILTER_BITS_PER_FAMILY / 64;
/// Entries of the `BAN_FILTER` array.
pub const FILTER_WORDS: u32 = 2 * FILTER_WORDS_PER_FAMILY;

/// Bits of the host filter: every value of an IPv4 address's low 24 bits.
pub const HOST_FILTER_BITS: u32 = 1 << 24;
/// Entries of the `HOST_FILTER` array (2 MiB).
pub const HOST_FILTER_WORDS: u32 = HOST_FILTER_BITS / 64;

/// The host-filter bit of an IPv4 address: its low 24 bits.
#[inline(always)]
pub const fn host_bit(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) & (HOST_FILTER_BITS - 1)
}

/// Word index and mask of host-filter bit `bit`.
#[inline(always)]
pub const fn host_slot(bit: u32) -> (u32, u64) {
    ((bit & (HOST_FILTER_BITS - 1)) >> 6, 1u64 << (bit & 63))
}

/// The bucket of an IPv4 address: its /24.
#[inline(always)]
pub const fn v4_bit(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr) >> 8
}

/// The bucket of an IPv6 address: a multiplicative hash of its /64 (the part an attacker
/// usually cannot leave), folded to 24 bits.
#[inline(always)]
pub const fn v6_bit(addr: &[u8; 16]) -> u32 {
    let hi = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    (hi.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as u32
}

/// Word index and mask of bucket `bit` of a family.
#[inline(always)]
pub const fn slot(bit: u32, v6: bool) -> (u32, u64) {
    let base = if v6 { FILTER_WORDS_PER_FAMILY } else { 0 };
    (
        base + ((bit & (FILTER_BITS_PER_FAMILY - 1)) >> 6),
        1u64 << (bit & 63),
    )
}

/// The buckets an IPv4 ban covers, as `first..first + count` (one for /24 and longer).
pub const fn v4_cidr_bits(addr: [u8; 4], prefix: u32) -> (u32, u32) {
    if prefix >= 24 {
        return (v4_bit(addr), 1);
    }
    let count = 1u32 << (24 - prefix);
    (v4_bit(addr) & !(count - 1), count)
}

/// The bucket an IPv6 ban covers, or `None` when it is shorter than /64 (see the module docs).
pub const fn v6_cidr_bit(addr: &[u8; 16], prefix: u32) -> Option<u32> {
    if prefix < 64 {
        None
    } else {
        Some(v6_bit(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_buckets_are_slash_24s() {
        assert_eq!(v4_bit([198, 18, 7, 1]), v4_bit([198, 18, 7, 254]));
        assert_ne!(v4_bit([198, 18, 7, 1]), v4_bit([198, 18, 8, 1]));
        assert_eq!(
            v4_cidr_bits([198, 18, 7, 9], 32),
            (v4_bit([198, 18, 7, 0]), 1)
        );
        assert_eq!(
            v4_cidr_bits([198, 18, 7, 9], 24),
            (v4_bit([198, 18, 7, 0]), 1)
        );
        assert_eq!(
            v4_cidr_bits([198, 18, 7, 9], 16),
            (v4_bit([198, 18, 0, 0]), 256)
        );
        assert_eq!(
            v4_cidr_bits([255, 1, 2, 3], 1),
            (v4_bit([128, 0, 0, 0]), 1 << 23)
        );
    }

    #[test]
    fn v6_buckets_are_hashed_slash_64s() {
        let a = [0xfd, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut b = a;
        b[15] = 0xff;
        b[9] = 0x42;
        assert_eq!(v6_bit(&a), v6_bit(&b), "same /64");
        assert!(v6_bit(&a) < FILTER_BITS_PER_FAMILY);
        assert_eq!(v6_cidr_bit(&a, 64), Some(v6_bit(&a)));
        assert_eq!(v6_cidr_bit(&a, 48), None);
    }

    #[test]
    fn host_bits_tell_apart_every_address_of_a_slash_24() {
        let mut bits = [0u32; 256];
        for (d, b) in bits.iter_mut().enumerate() {
            *b = host_bit([198, 18, 7, d as u8]);
        }
        bits.sort_unstable();
        assert!(bits.windows(2).all(|w| w[0] != w[1]), "256 distinct bits");
        // Only another /24's address with the same low 24 bits shares one.
        assert_eq!(host_bit([198, 18, 7, 9]), host_bit([10, 18, 7, 9]));
        assert_ne!(host_bit([198, 18, 7, 9]), host_bit([198, 19, 7, 9]));
        assert_eq!(host_slot(host_bit([0, 0, 0, 65])), (1, 2));
        assert_eq!(host_slot(HOST_FILTER_BITS - 1).0, HOST_FILTER_WORDS - 1);
    }

    #[test]
    fn slots_split_the_families() {
        assert_eq!(slot(0, false), (0, 1));
        assert_eq!(slot(65, false), (1, 2));
        assert_eq!(
            slot(FILTER_BITS_PER_FAMILY - 1, false).0,
            FILTER_WORDS_PER_FAMILY - 1
        );
        assert_eq!(slot(0, true), (FILTER_WORDS_PER_FAMILY, 1));
        assert_eq!(slot(FILTER_BITS_PER_FAMILY - 1, true).0, FILTER_WORDS - 1);
    }
}
