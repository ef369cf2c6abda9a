//! XDP ingress: drop banned sources, preserve flows established before their ban, inspect the
//! first request of each flow on watched ports.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_ktime_get_boot_ns, bpf_xdp_load_bytes},
    macros::xdp,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use wsguard_common::maps::{
    BAN_HARD, BAN_OBSERVE, BanValue, CFG_OBSERVE, Config, Counter, FLOW_ESTABLISHED, FlowKey,
};

use crate::{
    atomic::add_u64,
    counters::count,
    inspect::{first_request, may_start_request},
    maps::{
        ALLOW_V4, ALLOW_V6, BAN_CIDRS_V4, BAN_CIDRS_V6, BANS_V4, BANS_V6, CONFIG, FLOWS, PORTS,
    },
    parse::{
        IPPROTO_TCP, L3, PROTO_MALFORMED, TCP_FIN, TCP_RST, TCP_SYN, Tcp, parse_l3, parse_tcp,
    },
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
    if let Some(ban) = find_ban(&l3, cfg) {
        match judge_banned(ctx, &l3, ban, cfg) {
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
fn now_ns() -> u64 {
    // SAFETY: helper without arguments. Boot time keeps counting in suspend, like wall time.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The live ban that covers the source: the exact address first, then the CIDR tries if they
/// hold any. An expired exact ban must not hide a live CIDR ban over the same address.
#[inline(always)]
fn find_ban<'a>(l3: &L3, cfg: &Config) -> Option<&'a mut BanValue> {
    // The clock is read only once a ban matched: the clean path never pays for it.
    let mut now = 0;
    let ptr = if l3.v6 {
        // SAFETY: parse_l3 bounds-checked 16 address bytes for IPv6.
        let src = unsafe { &*(l3.src as *const [u8; 16]) };
        live(BANS_V6.get_ptr_mut(src), &mut now).or_else(|| {
            if cfg.cidr_v6 == 0 {
                return None;
            }
            let cidr = BAN_CIDRS_V6.get(Key::new(128, *src));
            live(cidr.map(|v| v as *const _ as *mut BanValue), &mut now)
        })
    } else {
        // SAFETY: parse_l3 bounds-checked 4 address bytes for IPv4.
        let src = unsafe { &*(l3.src as *const [u8; 4]) };
        live(BANS_V4.get_ptr_mut(src), &mut now).or_else(|| {
            if cfg.cidr_v4 == 0 {
                return None;
            }
            let cidr = BAN_CIDRS_V4.get(Key::new(32, *src));
            live(cidr.map(|v| v as *const _ as *mut BanValue), &mut now)
        })
    };
    // SAFETY: map values live while the program runs; `drops` is only touched atomically.
    ptr.map(|p| unsafe { &mut *p })
}

/// `ban` unless it has expired (the agent may not have removed it yet).
#[inline(always)]
fn live(ban: Option<*mut BanValue>, now: &mut u64) -> Option<*mut BanValue> {
    let ban = ban?;
    if *now == 0 {
        *now = now_ns();
    }
    // SAFETY: a live map value, read once.
    if unsafe { (*ban).is_expired(*now) } {
        None
    } else {
        Some(ban)
    }
}

enum Banned {
    Drop,
    /// Passes, counted under this action.
    Pass(Counter),
}

#[inline(always)]
fn judge_banned(ctx: &XdpContext, l3: &L3, ban: &mut BanValue, cfg: &Config) -> Banned {
    if allowlisted(l3) {
        return Banned::Pass(Counter::Allowlisted);
    }
    let observe = ban.flags & BAN_OBSERVE != 0 || cfg.flags & CFG_OBSERVE != 0;
    if !observe && ban.flags & BAN_HARD == 0 && preserved(ctx, l3, ban) {
        // Preserved packets pass and are no drops, so the CLI's per-ban count stays honest.
        return Banned::Pass(Counter::Preserved);
    }
    // Counted for observe bans too: "would have dropped" is what the operator wants to see.
    // SAFETY: `drops` is a u64 field of a live map value, naturally aligned.
    unsafe { add_u64(&mut ban.drops, 1) };
    if observe {
        Banned::Pass(Counter::WouldDrop)
    } else {
        Banned::Drop
    }
}

#[inline(always)]
fn allowlisted(l3: &L3) -> bool {
    if l3.v6 {
        // SAFETY: the address bytes were bounds-checked by parse_l3.
        let src = unsafe { (l3.src as *const [u8; 16]).read_unaligned() };
        ALLOW_V6.get(Key::new(128, src)).is_some()
    } else {
        // SAFETY: the address bytes were bounds-checked by parse_l3.
        let src = unsafe { (l3.src as *const [u8; 4]).read_unaligned() };
        ALLOW_V4.get(Key::new(32, src)).is_some()
    }
}

/// Is this a packet of a TCP flow that was an established WebSocket (or TLS session) before
/// the ban was created? A SYN never is: it starts a new flow.
#[inline(always)]
fn preserved(ctx: &XdpContext, l3: &L3, ban: &BanValue) -> bool {
    if l3.proto != Some(IPPROTO_TCP) {
        return false;
    }
    let Ok(tcp) = parse_tcp(ctx, l3) else {
        return false;
    };
    if tcp.flags & TCP_SYN != 0 {
        return false;
    }
    let key = flow_key(l3, &tcp);
    match FLOWS.get_ptr(key) {
        // SAFETY: a live map value, read once.
        Some(flow) => unsafe {
            (*flow).state == FLOW_ESTABLISHED && (*flow).first_seen_ns < ban.created_ns
        },
        None => false,
    }
}

#[inline(always)]
fn flow_key(l3: &L3, tcp: &Tcp) -> FlowKey {
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
