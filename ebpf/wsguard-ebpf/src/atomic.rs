//! Atomic adds on map values. The BPF target has no compare-and-swap, so `core`'s atomic types
//! offer no `fetch_add`; the intrinsic lowers to BPF's native atomic add (`lock xadd`/fetch).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// Add `v` to `*dst` atomically and return the previous value.
///
/// Written as the instruction itself: for CPU v1/v2 with `+alu32` (what the build passes), LLVM
/// 22 selects the non-fetching `lock +=` even when the result is used, and then reads back the
/// operand it added, so every caller saw `v` instead of the old value. BPF_FETCH (kernel 5.12+)
/// is what the rate tracker's "exactly one event per window" depends on.
///
/// # Safety
/// `dst` must point to a live, aligned u32 (e.g. a field of a map value).
#[inline(always)]
pub unsafe fn fetch_add_u32(dst: *mut u32, v: u32) -> u32 {
    let mut old = u64::from(v);
    // Fixed registers, named in 32-bit form in the text: rustc checks asm operands before the
    // linker turns `alu32` on, so the `wreg` class is unavailable here.
    // SAFETY: forwarded to the caller; the instruction touches only `*dst` and `old`.
    unsafe {
        core::arch::asm!(
            "w2 = atomic_fetch_add((u32 *)(r1 + 0), w2)",
            inout("r2") old,
            in("r1") dst,
            options(nostack),
        )
    };
    // A 32-bit fetch zero-extends into the register.
    old as u32
}

/// Add `v` to `*dst` atomically.
///
/// # Safety
/// `dst` must point to a live, aligned u64 (e.g. a field of a map value).
#[inline(always)]
pub unsafe fn add_u64(dst: *mut u64, v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v) };
}

/// Set `bits` in `*dst` atomically (BPF_OR, kernel 5.12+), so a concurrent writer of other
/// bits loses nothing.
///
/// # Safety
/// `dst` must point to a live, aligned u32 (e.g. a field of a map value).
#[inline(always)]
pub unsafe fn or_u32(dst: *mut u32, bits: u32) {
    // Written as the instruction for the same reason as `fetch_add_u32`.
    // SAFETY: forwarded to the caller; the instruction touches only `*dst`.
    unsafe {
        core::arch::asm!(
            "lock *(u32 *)(r1 + 0) |= w2",
            in("r2") u64::from(bits),
            in("r1") dst,
            options(nostack),
        )
    };
}
