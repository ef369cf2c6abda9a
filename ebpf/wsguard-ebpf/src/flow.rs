//! A payload packet on a watched port: the first request of its flow (after the PROXY header a
//! trusted sender puts before it, naming the real client), the request that follows a header
//! that came alone, and the packets of flows cut because their real client is banned.
//!
//! Who is charged for a bad request: the real client behind a trusted sender; the sender itself
//! when it is not trusted (its header is not believed); nobody for the trusted sender's own
//! connections (LOCAL/UNKNOWN, a header naming a trusted sender), malformed or missing headers,
//! or any header while no sender is trusted (`CFG_PROXY_TRUST` clear: never judged at all).
//!
//! The key, the value being recorded and the header's client live in this CPU's `Scratch`, not
//! on the stack (see there why), passed by reference to the map helpers (by value they would be
//! copied to the stack: hence the clippy allowances). The heavy steps are BPF global functions
//! (see `inspect::wsguard_classify`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        xdp_md,
    },
    programs::XdpContext,
};
use wsguard_common::{
    Verdict,
    maps::{
        CFG_OBSERVE, CFG_PROXY_TRUST, Config, Counter, FLOW_HANDSHAKE, FlowValue, PROXY_AWAITING,
        PROXY_CLIENT, PROXY_CUT, PROXY_CUT_PENDING, PROXY_LOCAL, PROXY_MALFORMED, PROXY_MISSING,
        PROXY_NONE, PROXY_UNCONFIGURED, PROXY_UNTRUSTED, RST_BURST, RST_INTERVAL_NS,
    },
    proxy::{ProxyResult, Version},
};

use crate::{
    ban::{ClientBan, scratch_client_ban},
    clock::now_ns,
    counters::count,
    inspect::{V2_FIRST, charge, classify_loaded, load, may_start_request, scratch},
    maps::{FLOWS, Scratch, config},
    parse::{L3, TCP_SYN, Tcp, parse_l3, parse_tcp},
    proxy::{self, Parsed},
    rst,
    xdp::write_key,
};

/// What becomes of a packet that does not simply pass: the XDP action and the counter it is
/// counted under instead of the caller's.
pub type Fate = Option<(u32, Counter)>;

/// Sequence numbers past the one a flow was cut at that still belong to it (a retransmission,
/// or data in flight). A reused 4-tuple starts elsewhere (a random ISN): its entry is stale.
const CUT_WINDOW: u32 = 1 << 20;

/// A packet on a watched port that may start a request (`first` is its first payload byte), or
/// any packet while cut marks are pending.
#[inline(always)]
pub fn on_packet(ctx: &XdpContext, l3: &L3, tcp: &Tcp, first: u8) -> Fate {
    let s = scratch()?;
    write_key(l3, tcp, &mut s.key);
    #[allow(clippy::needless_borrows_for_generic_args)]
    let flow = FLOWS.get_ptr_mut(&s.key);
    if let Some(flow) = flow {
        // SAFETY: a live map value; the flow's own packets are its only writers, bar the TC
        // program's `state` and the agent's marks.
        let flow = unsafe { &mut *flow };
        if flow.proxy == PROXY_NONE {
            // Judged already (keep-alive, pipelining, a retransmission): the common case.
            return None;
        }
        let fate = wsguard_known_flow(ctx.as_ptr() as *mut xdp_md, flow);
        if fate != STALE {
            return unpack(fate);
        }
        // A stale entry of a reused 4-tuple: this is a new flow.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = FLOWS.remove(&s.key);
    }
    if tcp.payload_len == 0 || !may_start_request(first) {
        return None;
    }
    unpack(wsguard_first_payload(ctx.as_ptr() as *mut xdp_md))
}

/// `known`'s answer for a stale entry; other answers are packed fates.
const STALE: u64 = u64::MAX;

/// A fate as one scalar, for the subprograms (0 is `None`).
#[inline(always)]
pub fn pack(fate: Fate) -> u64 {
    match fate {
        Some((action, counter)) => (u64::from(action) << 32) | counter as u64,
        None => 0,
    }
}

#[inline(always)]
fn unpack(v: u64) -> Fate {
    if v == 0 {
        return None;
    }
    let c = v as u32;
    // Only these counters are ever packed.
    let counter = if c == Counter::Reset as u32 {
        Counter::Reset
    } else if c == Counter::WouldDrop as u32 {
        Counter::WouldDrop
    } else if c == Counter::Allowlisted as u32 {
        Counter::Allowlisted
    } else {
        Counter::Dropped
    };
    Some(((v >> 32) as u32, counter))
}

/// The packet `ctx` holds, parsed again, and the settings: what a global function starts from.
#[inline(always)]
fn reparse(ctx: &XdpContext) -> Option<(L3, Tcp, &'static Config)> {
    let l3 = parse_l3(ctx, ctx.data_end() - ctx.data()).ok()?;
    let tcp = parse_tcp(ctx, &l3).ok()?;
    Some((l3, tcp, config()))
}

/// A packet of a flow whose PROXY header was read (`flow` is its entry).
///
/// This and [`wsguard_first_payload`] are BPF *global* functions (exported, so the BTF says
/// so): the verifier checks each once, on its own, instead of once per state of every caller
/// path that reaches it, which is what keeps the program inside the verifier's budget. The
/// price is their interface: the context and map memory only, so they parse the packet again
/// (a handful of bounds checks on paths taken once per flow) and find the flow key in
/// `Scratch`, where the caller left it.
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_known_flow(ctx: *mut xdp_md, flow: *mut FlowValue) -> u64 {
    let ctx = XdpContext::new(ctx);
    if flow.is_null() {
        return 0;
    }
    // SAFETY: the caller's live FLOWS value (non-null, checked).
    let flow = unsafe { &mut *flow };
    let Some((_, tcp, cfg)) = reparse(&ctx) else {
        return 0;
    };
    known(&ctx, &tcp, cfg, flow)
}

#[inline(always)]
fn known(ctx: &XdpContext, tcp: &Tcp, cfg: &Config, flow: &mut FlowValue) -> u64 {
    let p = flow.proxy;
    if p == PROXY_CUT {
        if tcp.flags & TCP_SYN != 0 || tcp.seq.wrapping_sub(flow.next_seq) >= CUT_WINDOW {
            return STALE;
        }
        return pack(Some(answer_cut(ctx, flow)));
    }
    if p == PROXY_CUT_PENDING {
        if tcp.flags & TCP_SYN != 0 {
            return STALE;
        }
        return pack(cut_marked(ctx, tcp, cfg, flow));
    }
    if p & PROXY_AWAITING != 0 && tcp.payload_len != 0 && tcp.seq == flow.next_seq {
        awaited_request(ctx, tcp, flow);
    }
    // Otherwise judged already (keep-alive, pipelining, a retransmission) or never judged.
    0
}

/// A packet of a cut flow: answered with a RST to its sender, the proxy (at most
/// `RST_BURST` at once, then one per `RST_INTERVAL_NS`), else dropped. The caller never
/// gets here with a RST (those remove the flow), so a RST is never answered.
#[inline(always)]
fn answer_cut(ctx: &XdpContext, flow: &mut FlowValue) -> (u32, Counter) {
    let now = now_ns();
    if (flow.rsts < RST_BURST || now.wrapping_sub(flow.rst_ns) >= RST_INTERVAL_NS)
        && rst::to_sender(ctx).is_ok()
    {
        flow.rsts = flow.rsts.saturating_add(1);
        flow.rst_ns = now;
        return (XDP_TX, Counter::Dropped);
    }
    (XDP_DROP, Counter::Dropped)
}

/// Cut a flow here: this segment becomes a RST towards the server, whose socket goes at once
/// (nginx never reads the request); the flow's next packets get `answer_cut`.
#[inline(always)]
fn cut(ctx: &XdpContext, tcp: &Tcp, flow: &mut FlowValue) -> (u32, Counter) {
    flow.proxy = PROXY_CUT;
    flow.next_seq = tcp.seq;
    match rst::to_receiver(ctx) {
        Ok(()) => (XDP_PASS, Counter::Reset),
        Err(()) => (XDP_DROP, Counter::Dropped),
    }
}

/// A flow the agent marked for a hard ban of its real client (`cut_flows`).
#[inline(always)]
fn cut_marked(ctx: &XdpContext, tcp: &Tcp, cfg: &Config, flow: &mut FlowValue) -> Fate {
    if cfg.flags & CFG_OBSERVE != 0 {
        // Observe mode cuts nothing: the mark goes, what it would have done is counted.
        flow.proxy = PROXY_CLIENT;
        return Some((XDP_PASS, Counter::WouldDrop));
    }
    Some(cut(ctx, tcp, flow))
}

/// The segment a header that came alone announced (`next_seq`): the request, judged now.
#[inline(always)]
fn awaited_request(ctx: &XdpContext, tcp: &Tcp, flow: &mut FlowValue) {
    let Some(s) = scratch() else {
        return;
    };
    let Some(len) = load(ctx, s, tcp.payload_off, tcp.payload_len) else {
        return;
    };
    let c = classify_loaded(len);
    flow.verdict = c.verdict as u8;
    flow.reason = c.reason.map_or(0, |r| r as u8);
    flow.proxy &= !PROXY_AWAITING;
    s.charged = if flow.proxy == PROXY_CLIENT {
        flow.real_client
    } else {
        s.key.client
    };
    charge(&c, tcp.dport, now_ns());
}

/// Start the value to record in `s.flow`: word stores, so that LLVM does not merge the zeros
/// into a `memset` call.
#[inline(always)]
fn init_flow(f: &mut FlowValue, now: u64, verdict: Verdict, proxy: u8) {
    let w = f as *mut FlowValue as *mut u64;
    let mut i = 0;
    while i < size_of::<FlowValue>() / 8 {
        // SAFETY: FlowValue is 8-aligned, a whole number of words, and all-zero is valid.
        unsafe { w.add(i).write_volatile(0) };
        i += 1;
    }
    f.first_seen_ns = now;
    f.verdict = verdict as u8;
    f.state = FLOW_HANDSHAKE;
    f.proxy = proxy;
}

#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
fn record(s: &Scratch) {
    let _ = FLOWS.insert(&s.key, &s.flow, 0);
}

/// The first payload of a flow: its PROXY header if the sender may send one, then its request.
/// A global function, as [`wsguard_known_flow`].
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_first_payload(ctx: *mut xdp_md) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Some((l3, tcp, cfg)) = reparse(&ctx) else {
        return 0;
    };
    pack(first_payload_at(&ctx, &l3, &tcp, cfg))
}

#[inline(always)]
fn first_payload_at(ctx: &XdpContext, l3: &L3, tcp: &Tcp, cfg: &Config) -> Fate {
    let s = scratch()?;
    let len = load(ctx, s, tcp.payload_off, tcp.payload_len)?;
    let first = s.buf[0];
    let now = now_ns();
    let configured = cfg.flags & CFG_PROXY_TRUST != 0;
    if configured && proxy::trusted(&s.key.client, l3.v6) {
        let (state, counter) = match proxy::header(len) {
            Parsed::Client => return client_header(ctx, tcp, s, now),
            Parsed::Absent => (PROXY_MISSING, Counter::ProxyMissing),
            Parsed::Local(v, _) => (PROXY_LOCAL, Counter::proxy(v, ProxyResult::Local)),
            Parsed::Malformed(v) => (PROXY_MALFORMED, Counter::proxy(v, ProxyResult::Malformed)),
        };
        count(counter);
        init_flow(&mut s.flow, now, Verdict::Ignored, state);
        record(s);
        return None;
    }
    if first == b'P' || first == V2_FIRST {
        let valid = match proxy::header(len) {
            Parsed::Client => Some((s.client.version, s.client.len)),
            Parsed::Local(v, hlen) => Some((v, hlen)),
            _ => None,
        };
        if let Some((version, hlen)) = valid {
            untrusted_header(ctx, tcp, s, version, hlen, configured, now);
            return None;
        }
        if first == V2_FIRST {
            // No header after all, and no request starts with it: as for any such payload.
            return None;
        }
    }
    // A direct flow (v1 parsing reads the copy, it does not change it).
    let c = classify_loaded(len);
    init_flow(&mut s.flow, now, c.verdict, PROXY_NONE);
    s.flow.reason = c.reason.map_or(0, |r| r as u8);
    record(s);
    s.charged = s.key.client;
    charge(&c, tcp.dport, now);
    None
}

/// A valid header from a sender that is not trusted: counted and noted; with no list
/// configured the flow is never judged, otherwise the sender is the client, judged on what
/// follows the header.
#[inline(always)]
fn untrusted_header(
    ctx: &XdpContext,
    tcp: &Tcp,
    s: &mut Scratch,
    version: Version,
    hlen: u16,
    configured: bool,
    now: u64,
) {
    count(Counter::proxy(version, ProxyResult::Untrusted));
    proxy::note_sender(version, configured, now);
    if !configured {
        init_flow(&mut s.flow, now, Verdict::Ignored, PROXY_UNCONFIGURED);
        record(s);
        return;
    }
    init_flow(&mut s.flow, now, Verdict::Incomplete, PROXY_UNTRUSTED);
    s.charged = s.key.client;
    after_header(ctx, tcp, s, hlen, now);
}

/// A trusted sender's header named `s.client`: cut the flow if it is banned, else judge the
/// request after the header against it.
#[inline(always)]
fn client_header(ctx: &XdpContext, tcp: &Tcp, s: &mut Scratch, now: u64) -> Fate {
    let version = s.client.version;
    if proxy::trusted(&s.client.addr, s.client.v6) {
        // A trusted sender named as the client: the proxy's own connection, never charged.
        count(Counter::proxy(version, ProxyResult::Local));
        init_flow(&mut s.flow, now, Verdict::Ignored, PROXY_LOCAL);
        record(s);
        return None;
    }
    count(Counter::proxy(version, ProxyResult::Client));
    init_flow(&mut s.flow, now, Verdict::Incomplete, PROXY_CLIENT);
    s.flow.real_client = s.client.addr;
    s.flow.real_port = s.client.port;
    // Counted on the ban as one drop when enforced or observed: the flow is one.
    let fate = match scratch_client_ban() {
        Some(ClientBan::Enforced) => {
            s.flow.verdict = Verdict::Ignored as u8;
            s.flow.proxy = PROXY_CUT;
            s.flow.next_seq = tcp.seq;
            record(s);
            return Some(match rst::to_receiver(ctx) {
                Ok(()) => (XDP_PASS, Counter::Reset),
                Err(()) => (XDP_DROP, Counter::Dropped),
            });
        }
        Some(ClientBan::Observed) => Some((XDP_PASS, Counter::WouldDrop)),
        Some(ClientBan::Allowlisted) => Some((XDP_PASS, Counter::Allowlisted)),
        None => None,
    };
    let hlen = s.client.len;
    s.charged = s.client.addr;
    after_header(ctx, tcp, s, hlen, now);
    fate
}

/// Judge the request after a header of `hlen` bytes against `s.charged` and record
/// `s.flow`. When the header filled the segment, the flow awaits the request at the next
/// sequence number instead.
#[inline(always)]
fn after_header(ctx: &XdpContext, tcp: &Tcp, s: &mut Scratch, hlen: u16, now: u64) {
    let hlen = hlen as usize;
    if hlen >= tcp.payload_len {
        s.flow.proxy |= PROXY_AWAITING;
        s.flow.next_seq = tcp.seq.wrapping_add(hlen as u32);
        record(s);
        return;
    }
    // The request gets its own MAX_INSPECT bytes, as one that starts a flow.
    let Some(len) = load(ctx, s, tcp.payload_off + hlen, tcp.payload_len - hlen) else {
        record(s);
        return;
    };
    let c = classify_loaded(len);
    s.flow.verdict = c.verdict as u8;
    s.flow.reason = c.reason.map_or(0, |r| r as u8);
    record(s);
    charge(&c, tcp.dport, now);
}
