//! Handshake inspection on watched ports and the per-source bad-handshake rate.

use aya_ebpf::{
    EbpfContext as _,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use wsguard_common::{
    BadReason, Verdict,
    maps::{
        BurstEvent, Config, Counter, FLOW_HANDSHAKE, FlowKey, FlowValue, MAX_INSPECT, RateValue,
    },
};

use crate::{
    atomic::fetch_add_u32,
    counters::{count, count_at},
    maps::{BURSTS, FLOWS, RATES, SCRATCH, Scratch},
    parse::{L3, Tcp},
};

/// Can this payload start a request we judge? HTTP methods start with an upper-case letter and
/// a TLS handshake record with 0x16. WebSocket frames never start with either, so data packets
/// of established flows are waved through without a flow lookup.
#[inline(always)]
pub fn may_start_request(first: u8) -> bool {
    first.is_ascii_uppercase() || first == 0x16
}

/// Inspect the first request of a flow: classify it, remember the flow, count the verdict and
/// feed bad ones into the rate tracker.
#[inline(always)]
pub fn first_request(ctx: &XdpContext, l3: &L3, tcp: &Tcp, cfg: &Config, now: u64) {
    let key = FlowKey {
        client: l3.src16(),
        server: l3.dst16(),
        client_port: tcp.sport.to_be(),
        server_port: tcp.dport.to_be(),
    };
    if FLOWS.get_ptr(key).is_some() {
        // Not the first request (keep-alive, pipelining, or a retransmission): judged already.
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let scratch = unsafe { &mut *scratch };
    let len = if tcp.payload_len > MAX_INSPECT {
        MAX_INSPECT
    } else {
        tcp.payload_len
    };
    // Through a volatile read so LLVM cannot drop the zero check as implied by the caller's: the
    // verifier, which does not see that implication, needs it before the helper call.
    // SAFETY: a read of a live local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    if len == 0 || len > MAX_INSPECT {
        return;
    }
    // SAFETY: `buf` is MAX_INSPECT bytes of map memory and `len` is in 1..=MAX_INSPECT.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr() as *mut _,
            tcp.payload_off as u32,
            scratch.buf.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if rc != 0 {
        return;
    }
    scratch.clf.reset();
    let mut lctx = LoopCtx { scratch };
    // SAFETY: `feed_byte` matches bpf_loop's callback ABI and `lctx` outlives the call.
    unsafe {
        bpf_loop(
            len as u32,
            feed_byte as *const () as *mut c_void,
            &mut lctx as *mut LoopCtx as *mut c_void,
            0,
        )
    };
    let c = scratch.clf.finish(cfg.path_in_scope(scratch.clf.path()));
    let flow = FlowValue {
        first_seen_ns: now,
        verdict: c.verdict as u8,
        reason: c.reason.map_or(0, |r| r as u8),
        state: FLOW_HANDSHAKE,
        _pad: [0; 5],
    };
    let _ = FLOWS.insert(key, flow, 0);
    count_verdict(c.verdict);
    if let Some(reason) = c.reason {
        record_bad(&key.client, reason, tcp.dport, cfg, now);
    }
}

/// What `feed_byte` needs; passed through bpf_loop's context pointer.
struct LoopCtx {
    scratch: *mut Scratch,
}

/// One classifier step per bpf_loop iteration. The verifier checks this callback once, not
/// once per byte, which keeps a 1024-byte inspection far inside its instruction budget.
extern "C" fn feed_byte(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the LoopCtx that `first_request` passed to bpf_loop.
    let scratch = unsafe { &mut *(*(ctx as *mut LoopCtx)).scratch };
    let Some(b) = scratch.buf.get(index as usize).copied() else {
        return 1;
    };
    // 1 stops the loop: the verdict can no longer change.
    i64::from(scratch.clf.step(b))
}

#[inline(always)]
fn count_verdict(v: Verdict) {
    count(match v {
        Verdict::Valid => Counter::HsValid,
        Verdict::Bad => Counter::HsBad,
        Verdict::Incomplete => Counter::HsIncomplete,
        Verdict::Tls => Counter::HsTls,
        Verdict::Ignored => Counter::HsIgnored,
    });
}

/// Count a bad handshake against `client` and emit one burst event when it reaches the
/// threshold within the window. The kernel never bans by itself: the agent decides.
#[inline(always)]
pub fn record_bad(client: &[u8; 16], reason: BadReason, port: u16, cfg: &Config, now: u64) {
    count_at(Counter::BadReason0 as u32 + reason as u32);
    let r = reason as usize;
    let count = match RATES.get_ptr_mut(client) {
        Some(rate) => {
            // SAFETY: a live map value; concurrent CPUs only race on counts, handled atomically.
            let rate = unsafe { &mut *rate };
            if now.wrapping_sub(rate.window_start_ns) >= cfg.window_ns {
                // A new window. Two CPUs may both reset; that only loses a count or two.
                rate.window_start_ns = now;
                rate.count = 0;
                rate.reasons = [0; wsguard_common::http::BAD_REASONS];
            }
            rate.port = port;
            if r < rate.reasons.len() {
                // SAFETY: a u32 field of a live map value.
                unsafe { fetch_add_u32(&mut rate.reasons[r], 1) };
            }
            // SAFETY: a u32 field of a live map value.
            let before = unsafe { fetch_add_u32(&mut rate.count, 1) };
            before + 1
        }
        None => {
            let mut fresh = RateValue {
                window_start_ns: now,
                count: 1,
                port,
                ..Default::default()
            };
            if r < fresh.reasons.len() {
                fresh.reasons[r] = 1;
            }
            let _ = RATES.insert(client, fresh, 0);
            1
        }
    };
    // Exactly one fetch_add returns the threshold, so one event per source per window.
    if count == cfg.threshold {
        emit_burst(client);
    }
}

#[inline(always)]
fn emit_burst(client: &[u8; 16]) {
    let Some(rate) = RATES.get_ptr(client) else {
        return;
    };
    // SAFETY: a live map value, read once.
    let rate = unsafe { &*rate };
    match BURSTS.reserve::<BurstEvent>(0) {
        Some(mut entry) => {
            entry.write(BurstEvent {
                addr: *client,
                window_start_ns: rate.window_start_ns,
                count: rate.count,
                reasons: rate.reasons,
                port: rate.port,
                _pad: 0,
            });
            entry.submit(0);
        }
        None => count(Counter::EventsLost),
    }
}
