//! Ring-0 workload: `kernel_spin` → `kernel_stage1` → `kernel_stage2` → `kernel_leaf`. Small per iteration: CPL0
//! code is interpreted by KVM's emulator on PVM hosts (~1000× slower than ring 3).

use crate::arch::rdtsc;
use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

#[no_mangle]
pub static kernel_counter: AtomicU64 = AtomicU64::new(0);

const KERNEL_LEAF_ITERS: u32 = 24;

#[no_mangle]
#[inline(never)]
pub extern "C" fn kernel_leaf(seed: u64) -> u64 {
    let mut v = seed | 1;
    let n = black_box(KERNEL_LEAF_ITERS);
    let mut i = 0;
    while i < n {
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        i += 1;
    }
    kernel_counter.fetch_add(1, Ordering::Relaxed);
    v
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn kernel_stage2(x: u64) -> u64 {
    let r = kernel_leaf(x.wrapping_mul(3));
    black_box(r) ^ 2
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn kernel_stage1(x: u64) -> u64 {
    let r = kernel_stage2(x.wrapping_add(1));
    black_box(r) ^ 1
}

/// Spins in ring 0 for `ticks` TSC ticks (measured with the TSC as ring 0 sees it).
#[no_mangle]
#[inline(never)]
pub extern "C" fn kernel_spin(ticks: u64) -> u64 {
    let end = rdtsc() + ticks;
    let mut acc = 0u64;
    loop {
        acc = kernel_stage1(acc);
        if rdtsc() >= end {
            break;
        }
    }
    acc
}
