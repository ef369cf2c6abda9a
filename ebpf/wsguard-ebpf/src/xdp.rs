//! XDP ingress: drop banned sources, preserve flows established before their ban, inspect the
//! first request of each flow on watched ports (after its PROXY header, from trusted senders),
//! cut the flows of banned clients behind a proxy.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        xdp_md,
    },
    helpers::generated::bpf_xdp_load_bytes,
    macros::xdp,
    programs::XdpContext,
};
use wsguard_common::maps::{CFG_CUT_PENDING, Config, Counter, FlowKey};

use crate::{
    ban::{Banned, held_drop, host_clean, judge_unfiltered, proven_clean},
    counters::{bump, count, count_at, slot},
    flow::{on_packet, pack},
    inspect::{may_start_request, scratch},
    maps::{FLOWS, PORTS, config},
    parse::{IPPROTO_TCP, L3, PROTO_MALFORMED, TCP_FIN, TCP_RST, Tcp, parse_l3, parse_tcp},
};

#[xdp]
pub fn wsguard_xdp(ctx: XdpContext) -> u32 {
    // Fail open: anything we cannot handle passes.
    try_wsguard_xdp(&ctx).unwrap_or(XDP_PASS)
}

/// `judge_source`'s answer for a drop; otherwise the counter of a pass, 0 for no ban.
const DROPPED: u64 = 1 << 32;

#[inline(always)]
fn try_wsguard_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    // Most packets end as `passed`; its slot is looked up first, before the parse, whose work
    // then hides the lookup (see `counters::slot`: looked up at the end, it cost every clean
    // path about 1 ns). A drop pays for it unused.
    let passed = slot(Counter::Passed);
    let len = ctx.data_end() - ctx.data();
    let Ok(l3) = parse_l3(ctx, len) else {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    };
    let cfg = config();
    let mut action = Counter::Passed as u32;
    // Before the held verdict: the clean neighbours of a ban are many more than hot sources.
    if !proven_clean(&l3) && !host_clean(&l3, cfg) {
        let dropped = slot(Counter::Dropped);
        if held_drop(&l3, cfg) {
            bump(dropped);
            return Ok(XDP_DROP);
        }
        let (a, b) = l3.pack();
        match judge_source(ctx.as_ptr() as *mut xdp_md, a, b, cfg) {
            0 => {}
            DROPPED => {
                bump(dropped);
                return Ok(XDP_DROP);
            }
            c => action = c as u32,
        }
    }
    // A non-first fragment (PROTO_NONE) passes like any other transport but TCP.
    let proto = l3.proto;
    if proto == PROTO_MALFORMED {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    }
    if proto == IPPROTO_TCP {
        let Ok(tcp) = parse_tcp(ctx, &l3) else {
            count(Counter::Unparsed);
            return Ok(XDP_PASS);
        };
        if needs_flow(ctx, &tcp, cfg) {
            let (a, b) = l3.pack();
            let fate = flow_path(ctx.as_ptr() as *mut xdp_md, a, b);
            if fate != 0 {
                // The packet may have been rewritten: `l3` and `tcp` are stale from here.
                count_at(fate as u32);
                return Ok((fate >> 32) as u32);
            }
        }
    }
    if action == Counter::Passed as u32 {
        bump(passed);
    } else {
        count_at(action);
    }
    Ok(XDP_PASS)
}

/// The source's ban, past the pre-filter: 0 none, [`DROPPED`], or the counter of a pass.
///
/// This and [`flow_path`] are real BPF subprograms, not inlined: each has its own stack frame,
/// so the drop path's and the flow path's locals do not add up in one frame past the 512-byte
/// limit (the verifier bounds the frames of a call chain, not their sum over the program).
/// They take the L3 packed in scalars (`L3::pack`), so the clean path keeps it in registers,
/// and answer with one 64-bit scalar: the BPF ABI returns no aggregate (and a 32-bit return
/// value came back with its upper half undefined to the caller's comparison).
#[inline(never)]
fn judge_source(ctx: *mut xdp_md, a: u64, b: u64, cfg: &Config) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Ok(l3) = L3::unpack(&ctx, a, b) else {
        return 0;
    };
    match judge_unfiltered::<true, true>(&ctx, &l3, cfg) {
        None => 0,
        Some(Banned::Drop) => DROPPED,
        Some(Banned::Pass(c)) => c as u64,
    }
}

/// Whether this packet on a watched port has anything to do with its flow entry: a FIN or RST
/// (the entry goes), a payload that may start a request or a PROXY header, or any packet while
/// cut marks are pending. Everything else (WebSocket data of established flows, direct or
/// proxied, bare ACKs) passes here with one array read and no lookup.
#[inline(always)]
fn needs_flow(ctx: &XdpContext, tcp: &Tcp, cfg: &Config) -> bool {
    if !PORTS.get(tcp.dport as u32).is_some_and(|w| *w != 0) {
        return false;
    }
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 || cfg.flags & CFG_CUT_PENDING != 0 {
        return true;
    }
    tcp.payload_len != 0 && may_start_request(first_byte(ctx, tcp))
}

/// The flow part of a packet `needs_flow` selected: 0 passes, else `action << 32 | counter`.
#[inline(never)]
fn flow_path(ctx: *mut xdp_md, a: u64, b: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Ok(l3) = L3::unpack(&ctx, a, b) else {
        return 0;
    };
    let Ok(tcp) = parse_tcp(&ctx, &l3) else {
        return 0;
    };
    let (l3, tcp) = (&l3, &tcp);
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        if let Some(s) = scratch() {
            write_key(l3, tcp, &mut s.key);
            // By reference: by value the key would be copied to the stack.
            #[allow(clippy::needless_borrows_for_generic_args)]
            let _ = FLOWS.remove(&s.key);
        }
        return 0;
    }
    let first = if tcp.payload_len == 0 {
        0
    } else {
        first_byte(&ctx, tcp)
    };
    pack(on_packet(&ctx, l3, tcp, first))
}

/// Write this packet's flow key into `k` (map memory): the address bytes go from the packet to
/// memory, never through sixteen registers each (see `Scratch`).
#[inline(always)]
pub fn write_key(l3: &L3, tcp: &Tcp, k: &mut FlowKey) {
    write_addr(l3.v6, l3.src, &mut k.client);
    write_addr(l3.v6, l3.dst, &mut k.server);
    k.client_port = tcp.sport.to_be();
    k.server_port = tcp.dport.to_be();
}

/// An address of the packet (`v6`: 16 bytes at `p`, else 4) as the 16 bytes the maps key it by.
#[inline(always)]
pub fn write_addr(v6: bool, p: *const u8, out: &mut [u8; 16]) {
    let o = out.as_mut_ptr();
    // SAFETY: `parse_l3` bounds-checked 16 (IPv6) or 4 (IPv4) bytes at `p`; `out` is 16 bytes.
    unsafe {
        if v6 {
            core::ptr::copy_nonoverlapping(p, o, 16);
        } else {
            // `::ffff:a.b.c.d`, the prefix as volatile words (not a `memset` call).
            (o as *mut [u8; 8]).write_volatile([0; 8]);
            (o.add(8) as *mut [u8; 4]).write_volatile([0, 0, 0xff, 0xff]);
            core::ptr::copy_nonoverlapping(p, o.add(12), 4);
        }
    }
}

#[inline(always)]
pub fn flow_key(l3: &L3, tcp: &Tcp) -> FlowKey {
    FlowKey {
        client: l3.src16(),
        server: l3.dst16(),
        client_port: tcp.sport.to_be(),
        server_port: tcp.dport.to_be(),
    }
}

/// The first payload byte, or 0 if it cannot be read.
#[inline(always)]
fn first_byte(ctx: &XdpContext, tcp: &Tcp) -> u8 {
    // Two bytes, not one: after a variable offset the verifier grants no range to a 1-byte
    // check (LLVM turns `p + 1 > end` into `p >= end`).
    if let Ok(head) = crate::parse::ptr_at::<[u8; 2]>(ctx, tcp.payload_off) {
        // SAFETY: bounds-checked by ptr_at.
        return unsafe { (*head)[0] };
    }
    // A 1-byte first segment (rare) still starts a request: judging it (incomplete) records the
    // flow, so the rest of the request is not taken for a new first request (`ET / ...`).
    let mut b = 0u8;
    // SAFETY: one writable byte; the helper checks the packet bounds itself.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr() as *mut _,
            tcp.payload_off as u32,
            &mut b as *mut u8 as *mut _,
            1,
        )
    };
    if rc == 0 { b } else { 0 }
}
