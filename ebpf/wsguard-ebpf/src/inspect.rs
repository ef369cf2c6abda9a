//! Handshake inspection on watched ports (the classifier over a payload copy) and the
//! per-source bad-handshake rate.

use aya_ebpf::{
    EbpfContext as _,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use wsguard_common::{
    BadReason, Classification, Verdict,
    maps::{BurstEvent, Config, Counter, MAX_INSPECT, RateValue},
};

use crate::{
    atomic::fetch_add_u32,
    counters::{count, count_at},
    maps::{BURSTS, RATES, SCRATCH, Scratch, config},
};

/// Can this payload start a request we judge, or the PROXY header before one? HTTP methods
/// start with an upper-case letter (as PROXY v1 does), a TLS handshake record with 0x16, a
/// PROXY v2 header with 0x0D. WebSocket frames never start with any of them (0x0D would be a
/// reserved opcode), so data packets of established flows, direct or proxied, are waved
/// through without a flow lookup.
#[inline(always)]
pub fn may_start_request(first: u8) -> bool {
    first.is_ascii_uppercase() || first == 0x16 || first == V2_FIRST
}

/// The first byte of the PROXY v2 signature.
pub const V2_FIRST: u8 = wsguard_common::proxy::V2_SIG[0];

/// This CPU's scratch.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// Copy `len` payload bytes at `off` (capped at MAX_INSPECT) into the scratch buffer: the
/// number of bytes copied.
#[inline(always)]
pub fn load(ctx: &XdpContext, s: &mut Scratch, off: usize, len: usize) -> Option<usize> {
    let len = if len > MAX_INSPECT { MAX_INSPECT } else { len };
    // Through a volatile read so LLVM cannot drop the zero check as implied by the caller's: the
    // verifier, which does not see that implication, needs it before the helper call.
    // SAFETY: a read of a live local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    if len == 0 || len > MAX_INSPECT {
        return None;
    }
    // SAFETY: `buf` is MAX_INSPECT bytes of map memory and `len` is in 1..=MAX_INSPECT.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr() as *mut _,
            off as u32,
            s.buf.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(len)
}

/// Classify the `len` bytes `load` copied, exactly as a request that starts a flow.
#[inline(always)]
pub fn classify_loaded(len: usize) -> Classification {
    let v = wsguard_classify(len as u64);
    Classification {
        verdict: Verdict::from_u8(v as u8).unwrap_or(Verdict::Incomplete),
        reason: BadReason::from_u8((v >> 8) as u8),
    }
}

/// The classifier over the first `len` bytes of the scratch buffer: the verdict, and the
/// reason in bits 8..16 (0xff: none).
///
/// The flow path's heavy steps are BPF *global* functions (exported, so the BTF says so): the
/// verifier checks each once, on its own, instead of once per state of every path that
/// reaches it, which is what keeps the program inside the verifier's budget. Their interface
/// is scalars, the context and map memory: they read `Scratch` and `CONFIG` themselves.
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_classify(len: u64) -> u64 {
    let Some(s) = scratch() else {
        return Verdict::Incomplete as u64 | 0xff00;
    };
    let cfg = config();
    s.clf.reset();
    let mut lctx = LoopCtx { scratch: s };
    let n = if len > MAX_INSPECT as u64 {
        MAX_INSPECT as u32
    } else {
        len as u32
    };
    // SAFETY: `feed_byte` matches bpf_loop's callback ABI and `lctx` outlives the call.
    unsafe {
        bpf_loop(
            n,
            feed_byte as *const () as *mut c_void,
            &mut lctx as *mut LoopCtx as *mut c_void,
            0,
        )
    };
    let c = s.clf.finish(cfg.path_in_scope(s.clf.path()));
    c.verdict as u64 | (c.reason.map_or(0xff, |r| r as u64) << 8)
}

/// Count a request's verdict and, when it is bad, charge the client in `Scratch::charged`
/// (its rate and bursts). The caller puts the address there.
#[inline(always)]
pub fn charge(c: &Classification, port: u16, now: u64) {
    let code = c.verdict as u64 | (c.reason.map_or(0xff, |r| r as u64) << 8);
    wsguard_charge(code, u64::from(port), now);
}

/// [`charge`] as a global function (see [`wsguard_classify`]).
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_charge(code: u64, port: u64, now: u64) -> u64 {
    let Some(s) = scratch() else {
        return 0;
    };
    let cfg = config();
    let Some(verdict) = Verdict::from_u8(code as u8) else {
        return 0;
    };
    count_verdict(verdict);
    if let Some(reason) = BadReason::from_u8((code >> 8) as u8) {
        record_bad(&s.charged, reason, port as u16, cfg, now);
    }
    0
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
pub fn count_verdict(v: Verdict) {
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
    // Through a volatile read, so that LLVM keeps the bounds checks below: it knows a
    // BadReason is at most 5, the verifier (given it by a global function) does not.
    // SAFETY: a read of a live local.
    let r = unsafe { core::ptr::read_volatile(&(reason as usize)) };
    let count = match RATES.get_ptr_mut(client) {
        Some(rate) => {
            // SAFETY: a live map value; concurrent CPUs only race on counts, handled atomically.
            let rate = unsafe { &mut *rate };
            if now.wrapping_sub(rate.window_start_ns) >= cfg.window_ns {
                // A new window. Two CPUs may both reset; that only loses a count or two.
                rate.window_start_ns = now;
                // Volatile stores: LLVM would merge plain ones into a `memset` call, whose word
                // loop the verifier rejects on a map value.
                // SAFETY: fields of a live map value.
                unsafe {
                    core::ptr::write_volatile(&mut rate.count, 0);
                    let mut i = 0;
                    while i < wsguard_common::http::BAD_REASONS {
                        core::ptr::write_volatile(&mut rate.reasons[i], 0);
                        i += 1;
                    }
                }
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
