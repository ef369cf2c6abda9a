//! Header parsing shared by the XDP and TC programs. Every read goes through [`ptr_at`], the one
//! place that checks bounds against the packet end the verifier knows about.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags we look through (802.1Q, and QinQ's outer 802.1ad).
const MAX_VLAN: usize = 2;
/// IPv6 extension headers walked before giving up.
const MAX_EXT_HDRS: usize = 6;

pub const IPPROTO_TCP: u8 = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// The packet could not be parsed far enough; it passes and is counted `unparsed`.
pub struct Unparsed;

/// A context whose linear packet data the programs can read directly.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Result<*const T, Unparsed> {
    let start = ctx.start();
    if start + off + size_of::<T>() > ctx.end() {
        return Err(Unparsed);
    }
    Ok((start + off) as *const T)
}

/// As [`ptr_at`], for writing.
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &impl Packet, off: usize) -> Result<*mut T, Unparsed> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &impl Packet, off: usize) -> Result<T, Unparsed> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; unaligned because packet
    // headers carry no alignment guarantee.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// Where the network header starts and what it is, after looking through VLAN tags.
#[inline(always)]
fn l2(ctx: &impl Packet) -> Result<(u16, usize), Unparsed> {
    let mut proto = u16::from_be(read::<u16>(ctx, 12)?);
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = u16::from_be(read::<u16>(ctx, off + 2)?);
        off += 4;
    }
    Ok((proto, off))
}

/// The parsed network layer. Addresses are pointers into the packet (4 or 16 bytes) so the
/// clean path copies nothing before the ban lookup.
pub struct L3 {
    pub v6: bool,
    /// Where the IP header starts (after Ethernet and VLAN tags).
    pub l3_off: usize,
    pub src: *const u8,
    pub dst: *const u8,
    /// Upper-layer protocol; [`PROTO_NONE`] for a non-first fragment (no L4 header to see),
    /// [`PROTO_MALFORMED`] when the IP lengths are bad. A plain byte, not an `Option`: LLVM
    /// leaves the payload of a `None` undefined, and the verifier refuses a spilled register
    /// that was never written.
    pub proto: u8,
    pub l4_off: usize,
    /// End of the IP payload (offset from the packet start), from the IP length fields.
    pub l4_end: usize,
}

impl L3 {
    /// The source address as the 16-byte key the flow and rate maps use.
    #[inline(always)]
    pub fn src16(&self) -> [u8; 16] {
        addr16(self.v6, self.src)
    }
    #[inline(always)]
    pub fn dst16(&self) -> [u8; 16] {
        addr16(self.v6, self.dst)
    }
}

impl L3 {
    /// This L3 as two scalars, for a call to a BPF subprogram ([`L3::unpack`] on the other
    /// side). Passing a reference would make the caller keep the struct in stack memory, a
    /// store per field on every packet, the clean ones included; scalars stay in registers.
    #[inline(always)]
    pub fn pack(&self) -> (u64, u64) {
        let proto = u64::from(self.proto);
        (
            self.l3_off as u64 | u64::from(self.v6) << 16 | proto << 24,
            self.l4_off as u64 | (self.l4_end as u64) << 32,
        )
    }

    /// The L3 that [`L3::pack`] made of this packet, its address pointers bounds-checked again.
    #[inline(always)]
    pub fn unpack(ctx: &impl Packet, a: u64, b: u64) -> Result<L3, Unparsed> {
        let l3_off = (a & 0xffff) as usize;
        let v6 = (a >> 16) & 1 != 0;
        let proto = (a >> 24) as u8;
        // Source and destination are contiguous in both headers.
        let src = if v6 {
            ptr_at::<[u8; 32]>(ctx, l3_off + 8)? as *const u8
        } else {
            ptr_at::<[u8; 8]>(ctx, l3_off + 12)? as *const u8
        };
        Ok(L3 {
            v6,
            l3_off,
            src,
            // SAFETY: inside the bytes ptr_at checked.
            dst: unsafe { src.add(if v6 { 16 } else { 4 }) },
            proto,
            l4_off: (b & 0xffff_ffff) as usize,
            l4_end: (b >> 32) as usize,
        })
    }
}

#[inline(always)]
fn addr16(v6: bool, p: *const u8) -> [u8; 16] {
    // SAFETY: `parse_l3` only builds L3 values whose address pointers were bounds-checked for
    // 16 (IPv6) or 4 (IPv4) bytes.
    unsafe {
        if v6 {
            (p as *const [u8; 16]).read_unaligned()
        } else {
            wsguard_common::maps::v4_mapped((p as *const [u8; 4]).read_unaligned())
        }
    }
}

/// Parse L2 and L3 far enough to know a valid source address. `len` is the packet length
/// (data_end - data for XDP, skb->len for TC).
#[inline(always)]
pub fn parse_l3(ctx: &impl Packet, len: usize) -> Result<L3, Unparsed> {
    let (proto, off) = l2(ctx)?;
    match proto {
        ETH_P_IPV4 => parse_v4(ctx, off, len),
        ETH_P_IPV6 => parse_v6(ctx, off, len),
        _ => Err(Unparsed),
    }
}

#[inline(always)]
fn parse_v4(ctx: &impl Packet, off: usize, len: usize) -> Result<L3, Unparsed> {
    // One check for the fixed header, before the variable-length options: the verifier only
    // trusts reads through the pointer it saw checked.
    let h = ptr_at::<[u8; 20]>(ctx, off)?;
    // SAFETY: the 20 bytes were bounds-checked by ptr_at.
    let h = unsafe { &*h };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Unparsed);
    }
    // The options, too, must be inside the packet.
    ptr_at::<u8>(ctx, off + ihl - 1)?;
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let l3 = L3 {
        v6: false,
        l3_off: off,
        src: h[12..16].as_ptr(),
        dst: h[16..20].as_ptr(),
        // Fragment offset != 0: a later fragment, no transport header in it.
        proto: if frag & 0x1fff != 0 { PROTO_NONE } else { h[9] },
        l4_off: off + ihl,
        l4_end: off + tot_len,
    };
    if tot_len < ihl || l3.l4_end > len {
        // The source address is valid (the caller still checks bans), the rest is not.
        return Ok(L3 {
            proto: PROTO_MALFORMED,
            l4_end: l3.l4_off,
            ..l3
        });
    }
    Ok(l3)
}

#[inline(always)]
fn parse_v6(ctx: &impl Packet, off: usize, len: usize) -> Result<L3, Unparsed> {
    let h = ptr_at::<[u8; 40]>(ctx, off)?;
    // SAFETY: the 40 bytes were bounds-checked by ptr_at.
    let h = unsafe { &*h };
    if h[0] >> 4 != 6 {
        return Err(Unparsed);
    }
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
    let mut next = h[6];
    let mut l4_off = off + 40;
    let mut l3 = L3 {
        v6: true,
        l3_off: off,
        src: h[8..24].as_ptr(),
        dst: h[24..40].as_ptr(),
        proto: PROTO_NONE,
        l4_off,
        l4_end: l4_off + payload_len,
    };
    if l3.l4_end > len {
        l3.proto = PROTO_MALFORMED;
        return Ok(l3);
    }
    let mut walked = 0;
    while walked < MAX_EXT_HDRS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Ok(h) = read::<[u8; 2]>(ctx, l4_off) else {
                    l3.proto = PROTO_MALFORMED;
                    return Ok(l3);
                };
                next = h[0];
                l4_off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let Ok(h) = read::<[u8; 2]>(ctx, l4_off) else {
                    l3.proto = PROTO_MALFORMED;
                    return Ok(l3);
                };
                next = h[0];
                l4_off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let Ok(h) = read::<[u8; 4]>(ctx, l4_off) else {
                    l3.proto = PROTO_MALFORMED;
                    return Ok(l3);
                };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    // A later fragment: what follows is the middle of the datagram, not a
                    // header. Stop here; its source is still known.
                    return Ok(l3);
                }
                next = h[0];
                l4_off += 8;
            }
            _ => break,
        }
        walked += 1;
    }
    if is_ext_header(next) || l4_off > l3.l4_end {
        // Chain longer than the walk budget, or past the end: the L4 header is not ours to see.
        l3.proto = PROTO_MALFORMED;
        return Ok(l3);
    }
    l3.l4_off = l4_off;
    l3.proto = next;
    Ok(l3)
}

/// Still an extension header once the walk budget is spent: the chain is longer than we look.
#[inline(always)]
fn is_ext_header(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT | NEXTHDR_AUTH
    )
}

/// The transport layer of a TCP packet.
pub struct Tcp {
    /// Host order.
    pub sport: u16,
    pub dport: u16,
    /// Host order.
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_off: usize,
    pub payload_len: usize,
}

/// `l3.proto` of an L3 whose own lengths were bad; that is unparsed too. (A real protocol 255,
/// "reserved", is taken for it.)
pub const PROTO_MALFORMED: u8 = 0xff;
/// `l3.proto` of a packet without a transport header to see: a non-first fragment. (A real
/// protocol 254, for experiments, passes the same way: neither has a TCP header.)
pub const PROTO_NONE: u8 = 0xfe;

#[inline(always)]
pub fn parse_tcp(ctx: &impl Packet, l3: &L3) -> Result<Tcp, Unparsed> {
    let hdr: [u8; 14] = read(ctx, l3.l4_off)?;
    let doff = ((hdr[12] >> 4) as usize) * 4;
    if doff < 20 {
        return Err(Unparsed);
    }
    let payload_off = l3.l4_off + doff;
    if payload_off > l3.l4_end {
        return Err(Unparsed);
    }
    Ok(Tcp {
        sport: u16::from_be_bytes([hdr[0], hdr[1]]),
        dport: u16::from_be_bytes([hdr[2], hdr[3]]),
        seq: u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
        ack: u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
        flags: hdr[13],
        payload_off,
        payload_len: l3.l4_end - payload_off,
    })
}
