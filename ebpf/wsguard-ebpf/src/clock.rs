//! A cheap `CLOCK_BOOTTIME` for the drop path. Reading the clock (`bpf_ktime_get_boot_ns`)
//! costs as much as a hash lookup on a virtual machine's TSC, while `bpf_jiffies64` is inlined
//! by the JIT: so each CPU keeps the boot time it read last and reuses it while the jiffy has
//! not changed. The result is never ahead of the real clock and at most one tick behind it, so a
//! ban expires at most one tick (1-10 ms) late.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_boot_ns};

use crate::maps::CoarseClock;

/// The exact boot time, for timestamps that are compared with each other (flows, windows).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments. Boot time keeps counting in suspend, like wall time.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The current jiffy (inlined by the JIT: no helper call).
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// Boot time, up to one tick old: for ban expiry only. `jiffies` is [`jiffies`]'s answer,
/// `c` this CPU's cache.
#[inline(always)]
pub fn coarse_now_ns(jiffies: u64, c: &mut CoarseClock) -> u64 {
    if c.jiffies != jiffies || c.boot_ns == 0 {
        c.boot_ns = now_ns();
        c.jiffies = jiffies;
    }
    c.boot_ns
}
