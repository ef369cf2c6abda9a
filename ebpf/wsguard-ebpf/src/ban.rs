//! Ban lookup and judgement on the XDP path: which live ban covers a source, whether the
//! allowlist or a preserved flow overrides it, the per-ban drop counter, and the per-CPU hot
//! source that lets a flood from one banned source skip the lookup.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use wsguard_common::{
    filter::{host_bit, host_slot, slot, v4_bit, v6_bit},
    maps::{
        BAN_HARD, BAN_MAY_PRESERVE, BAN_NOT_ALLOWLISTED, BAN_OBSERVE, BanValue, CFG_OBSERVE,
        CFG_V4_TABLE, Config, Counter, FLOW_ESTABLISHED,
    },
    table::{self, SLOTS},
};

use crate::{
    atomic::add_u64,
    clock::{coarse_now_ns, jiffies},
    maps::{
        ALLOW_V4, ALLOW_V6, BAN_CIDRS_V4, BAN_CIDRS_V6, BAN_FILTER, BAN_TABLE_V4, BANS_V4, BANS_V6,
        CoarseClock, FLOWS, HOST_FILTER, HOT_BAN, HotBan, PORTS, V4_TAG, config, table_bits_v4,
    },
    parse::{IPPROTO_TCP, L3, TCP_SYN, parse_tcp},
    xdp::flow_key,
};

/// A ban's own shared drop counter is exact up to here; past it (a hot attacker), each CPU
/// adds its drops in batches so that many CPUs do not fight over one cache line.
const HOT_DROPS: u64 = 1024;
/// Drops a CPU holds back for a hot ban before adding them to the shared counter.
const DROP_BATCH: u64 = 64;

pub enum Banned {
    Drop,
    /// Passes, counted under this action.
    Pass(Counter),
}

/// The held verdict's common case, for the XDP entry to take without a call into its judging
/// subprogram: this CPU holds an enforced drop verdict for this very source in this jiffy
/// (see [`judge_unfiltered`]), the ban cannot have a flow to preserve (hard, or no `BAN_MAY_PRESERVE`),
/// and the drop does not fill a batch. Then the drop is counted in the batch and true comes
/// back; anything else (preserve check, batch flush, no held verdict) is false, and the caller
/// judges the source in full, which sees the same state and does the rest.
#[inline(always)]
pub fn held_drop(l3: &L3, cfg: &Config) -> bool {
    let Some(hot) = HOT_BAN.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let hot = unsafe { &mut *hot };
    let no_flow = hot.flags & BAN_HARD != 0 || hot.flags & BAN_MAY_PRESERVE == 0;
    if hot.held != 0
        && no_flow
        && hot.count + 1 < DROP_BATCH
        && hot.jiffies == jiffies()
        && hot.cfg_flags == cfg.flags
        && hot.src == src_words(l3)
    {
        hot.count += 1;
        return true;
    }
    false
}

/// What happens to a packet from this source, once the pre-filter and the host filter
/// ([`proven_clean`], [`host_clean`]) could not clear it: `None` if no live ban covers it.
///
/// The pre-filter answers for most clean sources with one array read, the host filter for the
/// clean neighbours of exact IPv4 bans with a second. A hot banned source
/// (past `HOT_DROPS` drops, enforced, not allowlisted) that this CPU already dropped in the
/// current jiffy is judged from the verdict held in `HOT_BAN`, without the ban lookup, while
/// `Config::flags` is unchanged: the agent bumps its generation bits when it removes a ban or
/// adds an allowlist entry, so those reach the source at its next packet; a change the agent
/// does not announce (a ban's own flags, expiry) reaches it at most one jiffy late, as expiry
/// already does (see clock.rs). Everything else looks the ban up.
///
/// `HOLD` false never uses a held verdict: the benchmark's measure of the lookup path. `COUNT`
/// false leaves out the drop accounting (the ban's count, the CPU's hot source): the
/// benchmark's split of that path into its duties.
#[inline(always)]
pub fn judge_unfiltered<const HOLD: bool, const COUNT: bool>(
    ctx: &XdpContext,
    l3: &L3,
    cfg: &Config,
) -> Option<Banned> {
    // The per-CPU slot always exists; were it missing, failing open is the rule.
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let hot = unsafe { &mut *HOT_BAN.get_ptr_mut(0)? };
    let now_j = jiffies();
    let src = src_words(l3);
    if HOLD && hot.held != 0 && hot.jiffies == now_j && hot.src == src && hot.cfg_flags == cfg.flags
    {
        return Some(judge_hot(ctx, l3, hot));
    }
    // SAFETY: map values live while the program runs; `drops` is only touched atomically.
    let ban = unsafe { &mut *lookup_live(l3.v6, l3.src, cfg, now_j, hot)? };
    Some(judge_banned::<COUNT>(ctx, l3, ban, cfg, now_j, src, hot))
}

/// The held verdict: an enforced ban, so drop unless the flow is preserved.
#[inline(always)]
fn judge_hot(ctx: &XdpContext, l3: &L3, hot: &mut HotBan) -> Banned {
    if hot.flags & BAN_HARD == 0 && preserved(ctx, l3, hot.created_ns, hot.flags) {
        return Banned::Pass(Counter::Preserved);
    }
    hot.count += 1;
    if hot.count >= DROP_BATCH {
        flush(hot);
        hot.count = 0;
    }
    Banned::Drop
}

/// Whether the pre-filter says no ban covers the source's bucket.
#[inline(always)]
pub fn proven_clean(l3: &L3) -> bool {
    let bit = if l3.v6 {
        // SAFETY: parse_l3 bounds-checked 16 address bytes for IPv6.
        v6_bit(unsafe { &*(l3.src as *const [u8; 16]) })
    } else {
        // SAFETY: parse_l3 bounds-checked 4 address bytes for IPv4.
        v4_bit(unsafe { (l3.src as *const [u8; 4]).read_unaligned() })
    };
    let (word, mask) = slot(bit, l3.v6);
    BAN_FILTER.get(word).is_some_and(|w| *w & mask != 0)
}

/// Whether no ban can cover this IPv4 source although its /24 holds one: no exact ban has its
/// low 24 bits and no IPv4 CIDR ban exists (the host filter speaks for exact bans only).
#[inline(always)]
pub fn host_clean(l3: &L3, cfg: &Config) -> bool {
    if l3.v6 || cfg.cidr_v4 != 0 {
        return false;
    }
    // SAFETY: parse_l3 bounds-checked 4 address bytes for IPv4.
    let (word, mask) = host_slot(host_bit(unsafe {
        (l3.src as *const [u8; 4]).read_unaligned()
    }));
    HOST_FILTER.get(word).is_some_and(|w| *w & mask != 0)
}

/// The live ban of `src` (4 or 16 readable bytes, as `v6` says), exact first, then CIDR. An
/// expired exact ban must not hide a live CIDR ban over the same address.
#[inline(always)]
fn lookup_live(
    v6: bool,
    src: *const u8,
    cfg: &Config,
    now_j: u64,
    hot: &mut HotBan,
) -> Option<*mut BanValue> {
    // The clock is read only once a ban matched, and only for bans that expire.
    let mut now = 0;
    if v6 {
        // SAFETY: the caller guarantees 16 readable bytes.
        let src = unsafe { &*(src as *const [u8; 16]) };
        live(BANS_V6.get_ptr_mut(src), &mut now, now_j, &mut hot.clock).or_else(|| {
            if cfg.cidr_v6 == 0 {
                return None;
            }
            let cidr = BAN_CIDRS_V6.get(Key::new(128, *src));
            live(
                cidr.map(|v| v as *const _ as *mut BanValue),
                &mut now,
                now_j,
                &mut hot.clock,
            )
        })
    } else {
        // SAFETY: the caller guarantees 4 readable bytes.
        let src = unsafe { &*(src as *const [u8; 4]) };
        let exact = in_table(table::key(*src)).or_else(|| {
            if cfg.flags & CFG_V4_TABLE != 0 {
                return None;
            }
            BANS_V4.get_ptr_mut(src)
        });
        live(exact, &mut now, now_j, &mut hot.clock).or_else(|| {
            if cfg.cidr_v4 == 0 {
                return None;
            }
            let cidr = BAN_CIDRS_V4.get(Key::new(32, *src));
            live(
                cidr.map(|v| v as *const _ as *mut BanValue),
                &mut now,
                now_j,
                &mut hot.clock,
            )
        })
    }
}

/// The slot of `key` in `BAN_TABLE_V4`: every slot of both buckets, no early stop at a free
/// one (a freed slot leaves no tombstone; see `wsguard_common::table`).
#[inline(always)]
pub fn in_table(key: u32) -> Option<*mut BanValue> {
    if key == table::FREE {
        return None;
    }
    let bits = table_bits_v4();
    for choice in 0..2 {
        // A bucket past the end (a table smaller than its bits say) is a miss.
        let Some(b) = BAN_TABLE_V4.get_ptr_mut(table::bucket(key, bits, choice)) else {
            continue;
        };
        // SAFETY: a live map value; slots are claimed key last and freed key first.
        let b = unsafe { &mut *b };
        for i in 0..SLOTS {
            if b.keys[i] == key {
                return Some(&mut b.vals[i] as *mut BanValue);
            }
        }
    }
    None
}

/// How a live ban covers the real client a PROXY header named.
pub enum ClientBan {
    /// Enforced: cut the flow.
    Enforced,
    /// Observe ban or observe mode: count what would have been cut.
    Observed,
    /// Banned, but the allowlist wins.
    Allowlisted,
}

/// The ban of the client in `Scratch::client`, the flow counted on it as one drop (or would-be
/// drop) when it is enforced or observed.
#[inline(always)]
pub fn scratch_client_ban() -> Option<ClientBan> {
    match wsguard_client_ban() {
        1 => Some(ClientBan::Enforced),
        2 => Some(ClientBan::Observed),
        3 => Some(ClientBan::Allowlisted),
        _ => None,
    }
}

/// [`scratch_client_ban`] as a global function (see `inspect::wsguard_classify`): 0 no ban,
/// 1 enforced, 2 observed, 3 allowlisted.
#[unsafe(no_mangle)]
pub extern "C" fn wsguard_client_ban() -> u64 {
    let Some(s) = crate::inspect::scratch() else {
        return 0;
    };
    let cfg = config();
    let v6 = s.client.v6;
    match client_ban(&s.client.addr, v6, cfg) {
        None => 0,
        Some((ban, allowlisted, observed)) => {
            if allowlisted {
                return 3;
            }
            // SAFETY: `drops` is a u64 field of a live map value, naturally aligned.
            unsafe { add_u64(&mut (*ban).drops, 1) };
            if observed { 2 } else { 1 }
        }
    }
}

/// The ban that covers a PROXY flow's real client (16 bytes, IPv4-mapped for IPv4), if any:
/// the same pre-filter, exact and CIDR lookups, expiry and allowlist as for a packet's source.
/// Runs once per flow, at its header.
#[inline(always)]
fn client_ban(addr: &[u8; 16], v6: bool, cfg: &Config) -> Option<(*mut BanValue, bool, bool)> {
    let mut a4 = [0u8; 4];
    a4.copy_from_slice(&addr[12..16]);
    let bit = if v6 { v6_bit(addr) } else { v4_bit(a4) };
    let (word, mask) = slot(bit, v6);
    if BAN_FILTER.get(word).is_some_and(|w| *w & mask != 0) {
        return None;
    }
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let hot = unsafe { &mut *HOT_BAN.get_ptr_mut(0)? };
    let p = if v6 { addr.as_ptr() } else { a4.as_ptr() };
    let ban = lookup_live(v6, p, cfg, jiffies(), hot)?;
    // SAFETY: a live map value, read once.
    let flags = unsafe { (*ban).flags };
    let allowed = || {
        if v6 {
            ALLOW_V6.get(Key::new(128, *addr)).is_some()
        } else {
            ALLOW_V4.get(Key::new(32, a4)).is_some()
        }
    };
    if flags & BAN_NOT_ALLOWLISTED == 0 && allowed() {
        return Some((ban, true, false));
    }
    Some((
        ban,
        false,
        flags & BAN_OBSERVE != 0 || cfg.flags & CFG_OBSERVE != 0,
    ))
}

/// The live ban of `addr` (4 or 16 readable bytes, as `v6` says), for the TC program.
#[inline(always)]
pub fn live_ban(v6: bool, addr: *const u8, cfg: &Config) -> Option<*mut BanValue> {
    // SAFETY: this CPU's slot; XDP and TC never run interleaved on one CPU.
    let hot = unsafe { &mut *HOT_BAN.get_ptr_mut(0)? };
    lookup_live(v6, addr, cfg, jiffies(), hot)
}

/// `ban` unless it has expired (the agent may not have removed it yet).
#[inline(always)]
fn live(
    ban: Option<*mut BanValue>,
    now: &mut u64,
    now_j: u64,
    clock: &mut CoarseClock,
) -> Option<*mut BanValue> {
    let ban = ban?;
    // SAFETY: a live map value, read once.
    let expires = unsafe { (*ban).expires_ns };
    if expires == 0 {
        return Some(ban);
    }
    if *now == 0 {
        *now = coarse_now_ns(now_j, clock);
    }
    if expires <= *now { None } else { Some(ban) }
}

#[inline(always)]
fn judge_banned<const COUNT: bool>(
    ctx: &XdpContext,
    l3: &L3,
    ban: &mut BanValue,
    cfg: &Config,
    now_j: u64,
    src: [u64; 2],
    hot: &mut HotBan,
) -> Banned {
    if ban.flags & BAN_NOT_ALLOWLISTED == 0 && allowlisted(l3) {
        return Banned::Pass(Counter::Allowlisted);
    }
    let observe = ban.flags & BAN_OBSERVE != 0 || cfg.flags & CFG_OBSERVE != 0;
    if !observe && ban.flags & BAN_HARD == 0 && preserved(ctx, l3, ban.created_ns, ban.flags) {
        // Preserved packets pass and are no drops, so the CLI's per-ban count stays honest.
        return Banned::Pass(Counter::Preserved);
    }
    // Counted for observe bans too: "would have dropped" is what the operator wants to see.
    if COUNT {
        count_drop(ban, !observe, cfg.flags, now_j, src, hot);
    }
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
/// the ban (created at `created_ns`, with `flags`) was created? A SYN never is: it starts a
/// new flow. A ban without `BAN_MAY_PRESERVE` covers no such flow: no lookup.
#[inline(always)]
fn preserved(ctx: &XdpContext, l3: &L3, created_ns: u64, flags: u32) -> bool {
    if flags & BAN_MAY_PRESERVE == 0 || l3.proto != IPPROTO_TCP {
        return false;
    }
    let Ok(tcp) = parse_tcp(ctx, l3) else {
        return false;
    };
    // Flows are only tracked on watched ports: elsewhere the flow lookup (the costliest step
    // of this path) cannot find anything.
    if tcp.flags & TCP_SYN != 0 || !PORTS.get(tcp.dport as u32).is_some_and(|w| *w != 0) {
        return false;
    }
    match FLOWS.get_ptr(flow_key(l3, &tcp)) {
        // SAFETY: a live map value, read once.
        Some(flow) => unsafe {
            (*flow).state == FLOW_ESTABLISHED && (*flow).first_seen_ns < created_ns
        },
        None => false,
    }
}

/// Count one drop against `ban` (of source `src`; `enforced`: a real drop, not observe).
/// Exact (one shared atomic add) until the ban is hot, and for the first drop of every run of
/// one source on this CPU; then this CPU holds the source in `HOT_BAN`, with the ban's verdict
/// for this jiffy when it is enforced, batches the run's drops and adds them every
/// `DROP_BATCH`, or as soon as it drops another source. The shared counter then lags by less
/// than `DROP_BATCH` per CPU, invisible on counts past `HOT_DROPS`: that is what keeps one
/// attacker spread over every CPU from turning its counter's cache line into the slowest part
/// of the path. A run's first drop holds nothing back: held back, it would be handed over at
/// the next drop of another source, at the cost of a second ban lookup, which banned sources
/// interleaving on one CPU (a spread flood) would pay at every packet.
#[inline(always)]
fn count_drop(
    ban: &mut BanValue,
    enforced: bool,
    cfg_flags: u32,
    now_j: u64,
    src: [u64; 2],
    hot: &mut HotBan,
) {
    // SAFETY: a racy read of a live u64 only shifts the moment batching starts.
    let is_hot = unsafe { core::ptr::read_volatile(&ban.drops) } >= HOT_DROPS;
    let again = hot.src == src;
    if !again && hot.count != 0 {
        flush(hot);
        hot.count = 0;
    }
    if is_hot && again && hot.count + 1 < DROP_BATCH {
        // Held back; the run's next drops cost no shared write until DROP_BATCH.
        hot.count += 1;
    } else {
        // SAFETY: `drops` is a u64 field of a live map value, naturally aligned.
        unsafe { add_u64(&mut ban.drops, hot.count + 1) };
        hot.count = 0;
    }
    hot.src = src;
    hot.held = u32::from(is_hot && enforced);
    // Valid while the jiffy its expiry was judged in lasts.
    hot.jiffies = now_j;
    hot.created_ns = ban.created_ns;
    hot.flags = ban.flags;
    hot.cfg_flags = cfg_flags;
}

/// The source as `HotBan::src` holds it: two word loads, no byte shuffling.
#[inline(always)]
fn src_words(l3: &L3) -> [u64; 2] {
    // SAFETY: parse_l3 bounds-checked 16 (IPv6) or 4 (IPv4) address bytes.
    unsafe {
        if l3.v6 {
            let p = l3.src as *const [u64; 2];
            p.read_unaligned()
        } else {
            [V4_TAG, u64::from((l3.src as *const u32).read_unaligned())]
        }
    }
}

/// Add the held-back drops to the ban that covers their source now (gone: nothing to do).
#[inline(always)]
fn flush(hot: &mut HotBan) {
    let v6 = hot.src[0] != V4_TAG;
    let words = hot.src;
    let v4 = hot.src[1] as u32;
    let p = if v6 {
        words.as_ptr() as *const u8
    } else {
        &v4 as *const u32 as *const u8
    };
    let count = hot.count;
    if let Some(ban) = lookup_live(v6, p, config(), jiffies(), hot) {
        // SAFETY: `drops` is a u64 field of a live map value, naturally aligned.
        unsafe { add_u64(&mut (*ban).drops, count) };
    }
}
