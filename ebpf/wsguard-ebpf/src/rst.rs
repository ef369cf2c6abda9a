//! Cutting a flow from XDP: the received segment rewritten in place into a TCP RST, either
//! onward to its receiver (the server: `XDP_PASS`, so the local stack resets its socket at
//! once) or turned around to its sender (the proxy: `XDP_TX`). The result is a bare IP header
//! (IPv4 options and IPv6 extension headers dropped), a 20-byte TCP header (TCP options and
//! the payload dropped), and both checksums computed from scratch (`wsguard_common::rst`):
//! nothing offloads them for a packet XDP builds, in native mode and generic mode alike.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_md,
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use wsguard_common::rst::{
    RST_LEN, ipv4_checksum, onward, reply, rst_header, tcp_checksum_v4, tcp_checksum_v6,
};

use crate::{
    inspect::scratch,
    parse::{L3, parse_l3, parse_tcp, ptr_at_mut},
    xdp::write_addr,
};

const IPPROTO_TCP: u8 = 6;
const TTL: u8 = 64;
/// IPv4 flags byte: Don't Fragment, no fragment offset.
const IP_DF: u8 = 0x40;

/// Make this segment a RST for its receiver: its own sequence number (the next in order is
/// exactly the receiver's `RCV.NXT`) and ACK.
#[inline(always)]
pub fn to_receiver(ctx: &XdpContext) -> Result<(), ()> {
    call(ctx, false)
}

/// Make this segment the RST that answers it (RFC 9293 §3.5.2), addressed to its sender.
#[inline(always)]
pub fn to_sender(ctx: &XdpContext) -> Result<(), ()> {
    call(ctx, true)
}

#[inline(always)]
fn call(ctx: &XdpContext, turn: bool) -> Result<(), ()> {
    if wsguard_rst(ctx.as_ptr() as *mut xdp_md, u64::from(turn)) == 1 {
        Ok(())
    } else {
        Err(())
    }
}

/// The rewrite as a global function (see `inspect::wsguard_classify`), which parses the
/// packet again: 1 done, 0 not (the packet is untouched unless its headers were already
/// rewritten, see `rewrite`).
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_rst(ctx: *mut xdp_md, turn: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Ok(l3) = parse_l3(&ctx, ctx.data_end() - ctx.data()) else {
        return 0;
    };
    let Ok(tcp) = parse_tcp(&ctx, &l3) else {
        return 0;
    };
    let done = if turn != 0 {
        let (seq, ack, flags) = reply(tcp.seq, tcp.ack, tcp.flags, tcp.payload_len as u32);
        rewrite(
            &ctx,
            &l3,
            rst_header(tcp.dport, tcp.sport, seq, ack, flags),
            true,
        )
    } else {
        let (seq, ack, flags) = onward(tcp.seq, tcp.ack, tcp.flags);
        rewrite(
            &ctx,
            &l3,
            rst_header(tcp.sport, tcp.dport, seq, ack, flags),
            false,
        )
    };
    u64::from(done.is_ok())
}

/// Write the IP header (swapped when `turn`), the RST header `hdr` right after it, and cut
/// the packet there. Every packet pointer is re-derived after each step that may move it.
#[inline(always)]
fn rewrite(ctx: &XdpContext, l3: &L3, mut hdr: [u8; RST_LEN], turn: bool) -> Result<(), ()> {
    let s = scratch().ok_or(())?;
    // Copied to map memory before anything is written: `l3` points into the packet.
    let (src, dst) = if turn {
        (l3.dst, l3.src)
    } else {
        (l3.src, l3.dst)
    };
    write_addr(l3.v6, src, &mut s.src);
    write_addr(l3.v6, dst, &mut s.dst);
    let ip_off = l3.l3_off;
    let tcp_off = if l3.v6 {
        let ip = ptr_at_mut::<[u8; 40]>(ctx, ip_off).map_err(|_| ())?;
        // SAFETY: 40 bytes bounds-checked by ptr_at_mut; nothing else aliases them.
        let ip = unsafe { &mut *ip };
        ip[4..6].copy_from_slice(&(RST_LEN as u16).to_be_bytes());
        ip[6] = IPPROTO_TCP;
        if turn {
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&s.src);
            ip[24..40].copy_from_slice(&s.dst);
        }
        let c = tcp_checksum_v6(&s.src, &s.dst, &hdr);
        hdr[16..18].copy_from_slice(&c.to_be_bytes());
        ip_off + 40
    } else {
        let ip = ptr_at_mut::<[u8; 20]>(ctx, ip_off).map_err(|_| ())?;
        // SAFETY: 20 bytes bounds-checked by ptr_at_mut; nothing else aliases them.
        let ip = unsafe { &mut *ip };
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + RST_LEN) as u16).to_be_bytes());
        ip[6] = IP_DF;
        ip[7] = 0;
        ip[9] = IPPROTO_TCP;
        if turn {
            ip[8] = TTL;
            ip[12..16].copy_from_slice(&s.src[12..16]);
            ip[16..20].copy_from_slice(&s.dst[12..16]);
        }
        ip[10] = 0;
        ip[11] = 0;
        let c = ipv4_checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let s4 = [s.src[12], s.src[13], s.src[14], s.src[15]];
        let d4 = [s.dst[12], s.dst[13], s.dst[14], s.dst[15]];
        let c = tcp_checksum_v4(&s4, &d4, &hdr);
        hdr[16..18].copy_from_slice(&c.to_be_bytes());
        ip_off + 20
    };
    let t = ptr_at_mut::<[u8; RST_LEN]>(ctx, tcp_off).map_err(|_| ())?;
    // SAFETY: RST_LEN bytes bounds-checked by ptr_at_mut (the segment's own TCP header was
    // at least that long, at or after this offset).
    unsafe { t.write_unaligned(hdr) };
    if turn {
        let eth = ptr_at_mut::<[u8; 12]>(ctx, 0).map_err(|_| ())?;
        // SAFETY: 12 bytes bounds-checked by ptr_at_mut.
        let eth = unsafe { &mut *eth };
        let mut i = 0;
        while i < 6 {
            eth.swap(i, i + 6);
            i += 1;
        }
    }
    let new_len = (tcp_off + RST_LEN) as i64;
    // From the helper, not `data_end - data`: LLVM folds that into 32-bit pointer arithmetic,
    // which the verifier refuses.
    // SAFETY: the helper only reads the context.
    let cur_len = unsafe { bpf_xdp_get_buff_len(ctx.as_ptr() as *mut _) } as i64;
    // The frame is a valid RST already: IP stacks ignore bytes past the IP length, so were the
    // helper to refuse, only the stripped bytes would still travel.
    // SAFETY: the helper checks the new length against the frame itself.
    unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, (new_len - cur_len) as i32) };
    Ok(())
}
