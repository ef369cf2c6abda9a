//! What `cargo xtask bench` measures wsguard against: the floors (the cheapest possible XDP
//! programs, what BPF_PROG_TEST_RUN itself costs on this machine), the reference (the least any
//! blocklist must do), and the real program without its hot-source verdict, to measure the
//! lookup path a repeated packet would skip. The agent loads only the programs it names, so these
//! are never attached; their maps are created with every load of the object, so they are sized to
//! cost nothing there (see `REF_BANS_V4`). The split of the lookup path into its duties
//! (`wsguard_bench_probe`, `_screened`, `_judged`) says where its cost over the reference goes.

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    macros::{map, xdp},
    maps::HashMap,
    programs::XdpContext,
};
use wsguard_common::{
    maps::{BanValue, Counter},
    table,
};

use crate::{
    ban::{Banned, host_clean, in_table, judge_unfiltered, proven_clean},
    counters::{bump, count, slot},
    maps::config,
    parse::{ETH_HLEN, L3, Unparsed, parse_l3, ptr_at},
};

/// The reference's ban maps: the kind, key, value and flags of `BANS_V4`/`BANS_V6`, so the one
/// lookup costs what wsguard's exact lookup costs. One entry in the object, without
/// preallocation: an agent load creates them (it creates every map of the object) at the cost of
/// one hash bucket each; the bench sizes them like the ban maps at load time.
#[map]
static REF_BANS_V4: HashMap<[u8; 4], BanValue> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
static REF_BANS_V6: HashMap<[u8; 16], BanValue> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Offsets of the source address in the IPv4 and IPv6 headers.
const IPV4_SRC: usize = 12;
const IPV6_SRC: usize = 8;

/// The least an XDP blocklist must do: parse Ethernet and IPv4/IPv6, look the source up once in
/// a hash map, drop on a hit. No VLANs, no options, no counters, no expiry, no allowlist.
#[xdp]
pub fn wsguard_bench_ref(ctx: XdpContext) -> u32 {
    try_ref(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_ref(ctx: &XdpContext) -> Result<u32, Unparsed> {
    // SAFETY: ptr_at checked the two bytes; unaligned, as packet headers are.
    let proto = u16::from_be(unsafe { ptr_at::<u16>(ctx, 12)?.read_unaligned() });
    let hit = match proto {
        ETH_P_IPV4 => {
            // SAFETY: ptr_at checked the 4 bytes; a byte array has no alignment. The key is read
            // in place from the packet, as wsguard's lookup reads it.
            let src: &[u8; 4] = unsafe { &*ptr_at(ctx, ETH_HLEN + IPV4_SRC)? };
            REF_BANS_V4.get_ptr(src).is_some()
        }
        ETH_P_IPV6 => {
            // SAFETY: as above, 16 bytes.
            let src: &[u8; 16] = unsafe { &*ptr_at(ctx, ETH_HLEN + IPV6_SRC)? };
            REF_BANS_V6.get_ptr(src).is_some()
        }
        _ => false,
    };
    Ok(if hit { XDP_DROP } else { XDP_PASS })
}

/// The reference's one lookup behind wsguard's own parser (VLAN tags, IPv4 options, IPv6
/// extension headers, lengths checked): how much of wsguard's cost over the reference is
/// parsing, and how much the rest of its path.
#[xdp]
pub fn wsguard_bench_parsed(ctx: XdpContext) -> u32 {
    try_parsed(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_parsed(ctx: &XdpContext) -> Result<u32, Unparsed> {
    let len = ctx.data_end() - ctx.data();
    let l3 = parse_l3(ctx, len)?;
    let hit = if l3.v6 {
        // SAFETY: parse_l3 bounds-checked 16 address bytes for IPv6.
        let src: &[u8; 16] = unsafe { &*(l3.src as *const [u8; 16]) };
        REF_BANS_V6.get_ptr(src).is_some()
    } else {
        // SAFETY: parse_l3 bounds-checked 4 address bytes for IPv4.
        let src: &[u8; 4] = unsafe { &*(l3.src as *const [u8; 4]) };
        REF_BANS_V4.get_ptr(src).is_some()
    };
    Ok(if hit { XDP_DROP } else { XDP_PASS })
}

#[xdp]
pub fn wsguard_bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// `wsguard_xdp`'s ban path up to its verdict, judging every banned packet through the ban
/// lookup. (The whole program in this variant is past the verifier's budget; a dropped packet
/// never reaches the rest.)
#[xdp]
pub fn wsguard_bench_lookup(ctx: XdpContext) -> u32 {
    try_lookup::<true, true>(&ctx).unwrap_or(XDP_PASS)
}

/// The lookup path without its drop accounting (the ban's drop count, the CPU's hot source):
/// the split's third step.
#[xdp]
pub fn wsguard_bench_judged(ctx: XdpContext) -> u32 {
    try_lookup::<true, false>(&ctx).unwrap_or(XDP_PASS)
}

/// The probe behind what the lookup path does first: the settings, the counter slots, the
/// pre-filter and the host filter; the drop counted. The split's second step.
#[xdp]
pub fn wsguard_bench_screened(ctx: XdpContext) -> u32 {
    try_lookup::<false, false>(&ctx).unwrap_or(XDP_PASS)
}

/// wsguard's parser and the inline probe of `BAN_TABLE_V4`, drop on a hit: the split's first
/// step, what stands where the reference does its hash lookup.
#[xdp]
pub fn wsguard_bench_probe(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    match parse_l3(&ctx, len) {
        Ok(l3) if tabled(&l3) => XDP_DROP,
        _ => XDP_PASS,
    }
}

/// Whether the table holds this IPv4 source.
#[inline(always)]
fn tabled(l3: &L3) -> bool {
    if l3.v6 {
        return false;
    }
    // SAFETY: parse_l3 bounds-checked 4 address bytes for IPv4.
    let src = unsafe { (l3.src as *const [u8; 4]).read_unaligned() };
    in_table(table::key(src)).is_some()
}

/// The lookup path's start as `wsguard_xdp` runs it, then the judgement (`JUDGE`, with its
/// drop accounting if `COUNT`) or, for the screen step, the table probe alone.
#[inline(always)]
fn try_lookup<const JUDGE: bool, const COUNT: bool>(ctx: &XdpContext) -> Result<u32, ()> {
    // The counter slots as `wsguard_xdp` looks them up: `passed` first, `dropped` once the
    // filters could not clear the source.
    let passed = slot(Counter::Passed);
    let len = ctx.data_end() - ctx.data();
    let Ok(l3) = parse_l3(ctx, len) else {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    };
    let cfg = config();
    if proven_clean(&l3) || host_clean(&l3, cfg) {
        bump(passed);
        return Ok(XDP_PASS);
    }
    let dropped = slot(Counter::Dropped);
    let verdict = if JUDGE {
        judge_unfiltered::<false, COUNT>(ctx, &l3, cfg)
    } else {
        tabled(&l3).then_some(Banned::Drop)
    };
    match verdict {
        Some(Banned::Drop) => {
            bump(dropped);
            Ok(XDP_DROP)
        }
        Some(Banned::Pass(c)) => {
            count(c);
            Ok(XDP_PASS)
        }
        None => {
            bump(passed);
            Ok(XDP_PASS)
        }
    }
}

#[xdp]
pub fn wsguard_bench_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}
