//! wsguard's data plane: an XDP program that drops banned sources and inspects the first request
//! of each flow on watched ports, and a TC egress program that reads the server's answer.
#![no_std]
#![no_main]
// Atomic adds on map values (see atomic.rs); this crate is only built with nightly.
#![feature(core_intrinsics)]
// The one instruction LLVM will not select for our CPU level (see atomic.rs).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod atomic;
mod ban;
mod bench;
mod clock;
mod counters;
mod flow;
mod inspect;
mod maps;
mod parse;
mod proxy;
mod rst;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
