//! TCP resets built from a received segment: the header fields (RFC 9293 §3.5.2 for a reply)
//! and Internet checksums computed from scratch, so the kernel programs and the host tests
//! share one implementation. A RST must be exact to be accepted (RFC 5961: `SEG.SEQ ==
//! RCV.NXT`) and its checksums right (nothing offloads them for a packet built in XDP).

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Length of the TCP header of every RST built here: no options (`doff` 5).
pub const RST_LEN: usize = 20;

/// The TCP header of a RST, checksum field zero: `sport`/`dport` as they go on the wire.
#[inline(always)]
pub const fn rst_header(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> [u8; RST_LEN] {
    let s = sport.to_be_bytes();
    let d = dport.to_be_bytes();
    let q = seq.to_be_bytes();
    let a = ack.to_be_bytes();
    [
        s[0],
        s[1],
        d[0],
        d[1],
        q[0],
        q[1],
        q[2],
        q[3],
        a[0],
        a[1],
        a[2],
        a[3],
        5 << 4,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// The segment itself made a RST, for its receiver: same direction and sequence number (the
/// next in order is exactly the receiver's `RCV.NXT`), its ACK kept.
#[inline(always)]
pub const fn onward(seq: u32, ack: u32, flags: u8) -> (u32, u32, u8) {
    if flags & TCP_ACK != 0 {
        (seq, ack, TCP_RST | TCP_ACK)
    } else {
        (seq, 0, TCP_RST)
    }
}

/// The RST that answers a segment, for its sender (RFC 9293 §3.5.2): `SEQ = SEG.ACK` if it
/// carried an ACK, else `SEQ = 0, ACK = SEG.SEQ + SEG.LEN` (SYN and FIN count one each).
#[inline(always)]
pub const fn reply(seq: u32, ack: u32, flags: u8, payload_len: u32) -> (u32, u32, u8) {
    if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = payload_len
            .wrapping_add((flags & TCP_SYN != 0) as u32)
            .wrapping_add((flags & TCP_FIN != 0) as u32);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    }
}

/// Sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
const fn add_words<const N: usize>(mut sum: u32, b: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += ((b[i] as u32) << 8) | b[i + 1] as u32;
        i += 2;
    }
    if N % 2 == 1 {
        sum += (b[N - 1] as u32) << 8;
    }
    sum
}

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum of an option-less IPv4 header (its checksum field is skipped).
#[inline(always)]
pub const fn ipv4_checksum(h: &[u8; 20]) -> u16 {
    let sum = add_words(0, h) - (((h[10] as u32) << 8) | h[11] as u32);
    fold(sum)
}

/// TCP checksum of a RST over IPv4 (the header's checksum field is skipped).
#[inline(always)]
pub const fn tcp_checksum_v4(src: &[u8; 4], dst: &[u8; 4], tcp: &[u8; RST_LEN]) -> u16 {
    let mut sum = add_words(0, src);
    sum = add_words(sum, dst);
    sum += 6 + RST_LEN as u32;
    sum = add_words(sum, tcp) - (((tcp[16] as u32) << 8) | tcp[17] as u32);
    fold(sum)
}

/// TCP checksum of a RST over IPv6 (the header's checksum field is skipped).
#[inline(always)]
pub const fn tcp_checksum_v6(src: &[u8; 16], dst: &[u8; 16], tcp: &[u8; RST_LEN]) -> u16 {
    let mut sum = add_words(0, src);
    sum = add_words(sum, dst);
    sum += 6 + RST_LEN as u32;
    sum = add_words(sum, tcp) - (((tcp[16] as u32) << 8) | tcp[17] as u32);
    fold(sum)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// RFC 1071 the slow way: every byte pair of the whole buffer, checksum field included
    /// (a correct checksum makes the sum of everything 0xffff).
    fn verifies(parts: &[&[u8]]) -> bool {
        let all: Vec<u8> = parts.concat();
        let mut sum: u64 = 0;
        for c in all.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn tcp_checksums_verify() {
        let mut tcp = rst_header(40000, 80, 0xdead_beef, 0x0102_0304, TCP_RST | TCP_ACK);
        let (s4, d4) = ([198, 18, 0, 1], [198, 18, 1, 1]);
        let c = tcp_checksum_v4(&s4, &d4, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(&[&s4, &d4, &[0, 6, 0, 20], &tcp]));
        // The checksum field's old value does not matter.
        assert_eq!(tcp_checksum_v4(&s4, &d4, &tcp), c);

        let s6: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let d6: [u8; 16] = "fd00:1::ffff"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut tcp = rst_header(443, 65535, u32::MAX, 0, TCP_RST);
        let c = tcp_checksum_v6(&s6, &d6, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(&[&s6, &d6, &[0, 0, 0, 20, 0, 0, 0, 6], &tcp]));
    }

    #[test]
    fn ipv4_checksum_verifies() {
        let mut h = [
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0xaa, 0xbb, 198, 18, 0, 1, 198, 18, 1, 1,
        ];
        let c = ipv4_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(&[&h]));
    }

    #[test]
    fn header_fields() {
        let h = rst_header(0x1234, 0x0050, 7, 9, TCP_RST);
        assert_eq!(&h[..4], &[0x12, 0x34, 0, 0x50]);
        assert_eq!(u32::from_be_bytes([h[4], h[5], h[6], h[7]]), 7);
        assert_eq!(u32::from_be_bytes([h[8], h[9], h[10], h[11]]), 9);
        assert_eq!((h[12], h[13]), (0x50, TCP_RST));
        assert_eq!(&h[14..], &[0; 6], "window, checksum, urgent: zero");
    }

    #[test]
    fn reset_numbers_follow_rfc9293() {
        // With ACK: the reply takes SEQ = SEG.ACK and no ACK.
        assert_eq!(reply(100, 500, TCP_ACK, 30), (500, 0, TCP_RST));
        // Without: SEQ 0, ACK = SEG.SEQ + SEG.LEN, SYN and FIN counted.
        assert_eq!(reply(100, 0, TCP_SYN, 0), (0, 101, TCP_RST | TCP_ACK));
        assert_eq!(reply(u32::MAX, 0, TCP_FIN, 1), (0, 1, TCP_RST | TCP_ACK));
        // Onward: the segment's own numbers.
        assert_eq!(onward(100, 500, TCP_ACK), (100, 500, TCP_RST | TCP_ACK));
        assert_eq!(onward(100, 500, 0), (100, 0, TCP_RST));
    }
}
