use wsguard_common::maps::Counter;

use crate::maps::COUNTERS;

/// Bump a global per-CPU counter: no atomics needed, the agent sums the CPUs.
#[inline(always)]
pub fn count(c: Counter) {
    count_at(c as u32);
}

#[inline(always)]
pub fn count_at(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a live map; only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

/// A counter's slot, looked up ahead of the work whose outcome it counts, for [`bump`]: the
/// lookup then overlaps that work instead of following it on the packet's critical path (about
/// 1 ns a packet on the clean path, `cargo xtask bench`).
#[inline(always)]
pub fn slot(c: Counter) -> Option<*mut u64> {
    COUNTERS.get_ptr_mut(c as u32)
}

#[inline(always)]
pub fn bump(slot: Option<*mut u64>) {
    if let Some(p) = slot {
        // SAFETY: per-CPU slot of a live map; only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}
