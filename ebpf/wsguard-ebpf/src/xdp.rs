//! XDP ingress: drop banned sources, preserve flows established before their ban, inspect the
//! first request of each flow on watched ports.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_load_bytes,
    macros::xdp,
    programs::XdpContext,
};
use wsguard_common::maps::{Config, Counter, FlowKey};

use crate::{
    ban::{Banned, judge},
    clock::now_ns,
    counters::count,
    inspect::{first_request, may_start_request},
    maps::{CONFIG, FLOWS, PORTS},
    parse::{IPPROTO_TCP, L3, PROTO_MALFORMED, TCP_FIN, TCP_RST, Tcp, parse_l3, parse_tcp},
};

#[xdp]
pub fn wsguard_xdp(ctx: XdpContext) -> u32 {
    // Fail open: anything we cannot handle passes.
    try_wsguard_xdp(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_wsguard_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let len = ctx.data_end() - ctx.data();
    let Ok(l3) = parse_l3(ctx, len) else {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    };
    let cfg = CONFIG.get(0).ok_or(())?;
    let mut action = Counter::Passed;
    if let Some(verdict) = judge::<true>(ctx, &l3, cfg) {
        match verdict {
            Banned::Drop => {
                count(Counter::Dropped);
                return Ok(XDP_DROP);
            }
            Banned::Pass(c) => action = c,
        }
    }
    let Some(proto) = l3.proto else {
        count(action);
        return Ok(XDP_PASS);
    };
    if proto == PROTO_MALFORMED {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    }
    if proto == IPPROTO_TCP {
        let Ok(tcp) = parse_tcp(ctx, &l3) else {
            count(Counter::Unparsed);
            return Ok(XDP_PASS);
        };
        on_watched_port(ctx, &l3, &tcp, cfg);
    }
    count(action);
    Ok(XDP_PASS)
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

#[inline(always)]
fn on_watched_port(ctx: &XdpContext, l3: &L3, tcp: &Tcp, cfg: &Config) {
    let watched = PORTS.get(tcp.dport as u32).is_some_and(|w| *w != 0);
    if !watched {
        return;
    }
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        let _ = FLOWS.remove(flow_key(l3, tcp));
        return;
    }
    if tcp.payload_len == 0 {
        return;
    }
    if may_start_request(first_byte(ctx, tcp)) {
        first_request(ctx, l3, tcp, cfg, now_ns());
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
