//! The benchmark's floors: the cheapest possible XDP programs, so `cargo xtask bench` can state
//! every path as a ratio to what BPF_PROG_TEST_RUN costs on this machine. The agent loads only
//! the programs it names, so these are never attached.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};

#[xdp]
pub fn wsguard_bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn wsguard_bench_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}
