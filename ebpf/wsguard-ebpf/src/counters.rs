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
