//! The benchmark's floors: the cheapest possible XDP programs, so `cargo xtask bench` can state
//! every path as a ratio to what BPF_PROG_TEST_RUN costs on this machine, and the real program
//! without its hot-source verdict, to measure the lookup path a repeated packet would skip.
//! The agent loads only the programs it names, so these are never attached.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use wsguard_common::maps::Counter;

use crate::{
    ban::{Banned, judge},
    counters::count,
    maps::CONFIG,
    parse::parse_l3,
};

#[xdp]
pub fn wsguard_bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// `wsguard_xdp`'s ban path up to its verdict, judging every banned packet through the ban
/// lookup. (The whole program in this variant is past the verifier's budget; a dropped packet
/// never reaches the rest.)
#[xdp]
pub fn wsguard_bench_lookup(ctx: XdpContext) -> u32 {
    try_lookup(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_lookup(ctx: &XdpContext) -> Result<u32, ()> {
    let len = ctx.data_end() - ctx.data();
    let Ok(l3) = parse_l3(ctx, len) else {
        count(Counter::Unparsed);
        return Ok(XDP_PASS);
    };
    let cfg = CONFIG.get(0).ok_or(())?;
    let action = match judge::<false>(ctx, &l3, cfg) {
        Some(Banned::Drop) => {
            count(Counter::Dropped);
            return Ok(XDP_DROP);
        }
        Some(Banned::Pass(c)) => c,
        None => Counter::Passed,
    };
    count(action);
    Ok(XDP_PASS)
}

#[xdp]
pub fn wsguard_bench_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}
