//! Ring-3 code and data, linked at 0x400000 (section `.user*`, mapped with the U bit in every CPU's address space).
//!
//! Nothing here may call into the kernel image (it is not mapped for ring 3; the link fails on such a reference
//! because the kernel lies more than 2 GiB away): no panics, no `core` calls, no strings outside `.user.rodata`.
//!
//! The worker runs the configured functions in TSC-timed slices, always picking the function furthest below its
//! weighted share, so each function's share of the measured time converges to its weight.

use core::arch::asm;
use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};

pub const NWORK: usize = 4;
pub const USER_HOT_A: u64 = 0;
pub const USER_HOT_B: u64 = 1;
pub const USER_COLD: u64 = 2;
pub const KERNEL_SPIN: u64 = 3;
pub const WORK_NAMES: [&str; NWORK] = ["user_hot_a", "user_hot_b", "user_cold", "kernel_spin"];

pub const SYS_WRITE: u64 = 1;
pub const SYS_EXIT: u64 = 2;
pub const SYS_KERNEL_SPIN: u64 = 3;
pub const SYS_DONE: u64 = 4;

/// Iterations of the xorshift step per `user_leaf` call (about 2 µs).
const USER_LEAF_ITERS: u32 = 2000;
/// Iterations per inner round of `user_hot_b` / `user_cold` between TSC checks.
const USER_FLAT_ITERS: u32 = 2000;

/// Written by the kernel on the worker's stack page; its address is the worker's first argument.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserConfig {
    pub cpu: u64,
    /// Length of the run in TSC ticks, and of one slice.
    pub run_ticks: u64,
    pub slice_ticks: u64,
    /// Entries used in `ids`/`weights`, in command-line order.
    pub n: u64,
    pub ids: [u64; NWORK],
    pub weights: [u64; NWORK],
    /// Nonzero: fault in ring 3 (read an unmapped address) before working.
    pub fault: u64,
    /// Nonzero: enter the kernel with `int 0x80` instead of `syscall`.
    pub int80: u64,
}

/// Per-function totals, indexed by function id; passed back with SYS_DONE.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserResult {
    pub spent: [u64; NWORK],
    pub slices: [u64; NWORK],
}

impl UserResult {
    pub const ZERO: UserResult = UserResult {
        spent: [0; NWORK],
        slices: [0; NWORK],
    };
}

#[no_mangle]
#[link_section = ".user.data"]
pub static user_counter: AtomicU64 = AtomicU64::new(0);

/// Set from UserConfig::int80 at start: which instruction `sys` uses.
#[link_section = ".user.data"]
static USE_INT80: AtomicU64 = AtomicU64::new(0);

#[link_section = ".user.rodata"]
static STARTED: [u8; 27] = *b"guest-user: worker started\n";

/// Address that `fault=user-pagefault` reads: nothing is mapped there.
pub const USER_FAULT_ADDR: u64 = 0x0dea_d000;

#[inline(always)]
fn urdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

/// A system call: number in rax, up to three arguments, through `syscall` or `int 0x80`; the kernel may clobber
/// every caller-saved register.
#[inline(always)]
unsafe fn sys(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let r: u64;
    if USE_INT80.load(Ordering::Relaxed) != 0 {
        asm!("int 0x80",
             inlateout("rax") nr => r, inlateout("rdi") a0 => _, inlateout("rsi") a1 => _, inlateout("rdx") a2 => _,
             lateout("rcx") _, lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _);
    } else {
        asm!("syscall",
             inlateout("rax") nr => r, inlateout("rdi") a0 => _, inlateout("rsi") a1 => _, inlateout("rdx") a2 => _,
             lateout("rcx") _, lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
             options(nostack));
    }
    r
}

#[inline(always)]
fn xorshift(mut v: u64) -> u64 {
    v ^= v << 13;
    v ^= v >> 7;
    v ^ (v << 17)
}

#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_leaf(seed: u64) -> u64 {
    let mut v = seed | 1;
    let n = black_box(USER_LEAF_ITERS);
    let mut i = 0;
    while i < n {
        v = xorshift(v);
        i += 1;
    }
    user_counter.fetch_add(1, Ordering::Relaxed);
    v
}

#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_stage2(x: u64) -> u64 {
    let r = user_leaf(x.wrapping_mul(3));
    black_box(r) ^ 2 // work after the call: no tail call, so the frame stays on the chain
}

#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_stage1(x: u64) -> u64 {
    let r = user_stage2(x.wrapping_add(1));
    black_box(r) ^ 1
}

/// Hot function with a call chain: its time is spent in `user_leaf` (user_hot_a → user_stage1 → user_stage2 →
/// user_leaf).
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_hot_a(ticks: u64) -> u64 {
    let end = urdtsc() + ticks;
    let mut acc = 0u64;
    loop {
        acc = user_stage1(acc);
        if urdtsc() >= end {
            break;
        }
    }
    acc
}

/// Rounds of USER_FLAT_ITERS applications of `step`, `user_counter` bumped after each, until `ticks` have passed.
/// Always inlined, so the time shows up in the calling function's own body.
#[inline(always)]
fn flat_rounds(ticks: u64, mut v: u64, step: impl Fn(u64) -> u64) -> u64 {
    let end = urdtsc() + ticks;
    loop {
        let n = black_box(USER_FLAT_ITERS);
        let mut i = 0;
        while i < n {
            v = step(v);
            i += 1;
        }
        user_counter.fetch_add(1, Ordering::Relaxed);
        if urdtsc() >= end {
            break;
        }
    }
    v
}

/// Hot function that spends its time in its own body (xorshift rounds).
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_hot_b(ticks: u64) -> u64 {
    flat_rounds(ticks, 0x9e37_79b9_7f4a_7c15, xorshift)
}

/// The cold function: same shape as `user_hot_b`, different arithmetic (LCG rounds).
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_cold(ticks: u64) -> u64 {
    flat_rounds(ticks, 12345, |v| {
        v.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    })
}

/// Runs `kernel_spin` in ring 0 for `ticks` (through SYS_KERNEL_SPIN).
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_enter_kernel_spin(ticks: u64) -> u64 {
    let r = unsafe { sys(SYS_KERNEL_SPIN, ticks, 0, 0) };
    black_box(r) ^ 3
}

#[inline(never)]
#[link_section = ".user.text"]
fn run_one(id: u64, ticks: u64) -> u64 {
    if id == USER_HOT_A {
        user_hot_a(ticks)
    } else if id == USER_HOT_B {
        user_hot_b(ticks)
    } else if id == KERNEL_SPIN {
        user_enter_kernel_spin(ticks)
    } else {
        user_cold(ticks)
    }
}

/// Index (into cfg.ids) of the entry furthest below its weighted share: smallest spent/weight.
#[inline(always)]
fn pick(cfg: &UserConfig, res: &UserResult, n: usize) -> usize {
    let mut best = 0usize;
    let mut i = 1usize;
    while i < n {
        let (si, sb) = (
            res.spent[(cfg.ids[i] & 3) as usize],
            res.spent[(cfg.ids[best] & 3) as usize],
        );
        if (si as u128) * (cfg.weights[best] as u128) < (sb as u128) * (cfg.weights[i] as u128) {
            best = i;
        }
        i += 1;
    }
    best
}

/// True when every entry's share of the measured time is within 1/`inv_tol` of its weight's share
/// (500: 0.2 points).
#[inline(always)]
fn balanced(cfg: &UserConfig, res: &UserResult, n: usize, inv_tol: u128) -> bool {
    let (mut total, mut wsum) = (0u128, 0u128);
    let mut i = 0usize;
    while i < n {
        total += res.spent[(cfg.ids[i] & 3) as usize] as u128;
        wsum += cfg.weights[i] as u128;
        i += 1;
    }
    let mut i = 0usize;
    while i < n {
        let a = res.spent[(cfg.ids[i] & 3) as usize] as u128 * wsum;
        let b = cfg.weights[i] as u128 * total;
        let dev = a.abs_diff(b);
        if dev * inv_tol > total * wsum {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn run_slice(cfg: &UserConfig, res: &mut UserResult, best: usize, ticks: u64) {
    let id = cfg.ids[best & 3] & 3;
    let t0 = urdtsc();
    black_box(run_one(id, ticks));
    let t1 = urdtsc();
    res.spent[id as usize] += t1 - t0;
    res.slices[id as usize] += 1;
}

/// TSC ticks entry `best` needs to reach its share: x with (s + x) / (T + x) = w / W.
/// (u64 suffices: weights are at most 10,000 and runs at most 3600 s: W·s stays below 2^60.)
#[inline(always)]
fn deficit(cfg: &UserConfig, res: &UserResult, n: usize, best: usize) -> u64 {
    let (mut total, mut wsum) = (0u64, 0u64);
    let mut i = 0usize;
    while i < n {
        total += res.spent[(cfg.ids[i] & 3) as usize];
        wsum += cfg.weights[i];
        i += 1;
    }
    let (s, w) = (
        res.spent[(cfg.ids[best & 3] & 3) as usize],
        cfg.weights[best & 3],
    );
    if wsum <= w || w * total <= s * wsum {
        return 0;
    }
    (w * total - s * wsum) / (wsum - w)
}

/// Ring-3 entry of every CPU's worker: `cfg` points into the worker's stack page.
///
/// Runs slices until `run_ticks` have passed, then, since a preempted vCPU can stretch any slice, keeps running
/// slices of the entry furthest behind, sized to its deficit, until all shares are within 0.2 points (for at
/// most 1/4 of the run more; then within 0.5 points, for at most 1/2).
#[no_mangle]
#[link_section = ".user.text"]
pub extern "C" fn user_main(cfg: &UserConfig) -> ! {
    USE_INT80.store(cfg.int80, Ordering::Relaxed);
    unsafe { sys(SYS_WRITE, STARTED.as_ptr() as u64, STARTED.len() as u64, 0) };
    if cfg.fault != 0 {
        let v = unsafe { core::ptr::read_volatile(USER_FAULT_ADDR as *const u64) };
        unsafe { sys(SYS_EXIT, v, 0, 0) };
    }
    let n = if cfg.n as usize > NWORK {
        NWORK
    } else {
        cfg.n as usize
    };
    let mut res = UserResult {
        spent: [0; NWORK],
        slices: [0; NWORK],
    };
    let start = urdtsc();
    let end = start + cfg.run_ticks;

    loop {
        let now = urdtsc();
        if now >= end || n == 0 {
            break;
        }
        let left = end - now;
        let best = pick(cfg, &res, n);
        run_slice(
            cfg,
            &mut res,
            best,
            if left < cfg.slice_ticks {
                left
            } else {
                cfg.slice_ticks
            },
        );
    }
    if n > 0 {
        loop {
            // 0.2 points for up to 1/4 of the run more, then 0.5 points for up to 1/2.
            let late = urdtsc() - end;
            let inv_tol = if late < cfg.run_ticks / 4 {
                500
            } else if late < cfg.run_ticks / 2 {
                200
            } else {
                break;
            };
            if balanced(cfg, &res, n, inv_tol) {
                break;
            }
            let best = pick(cfg, &res, n);
            let need = deficit(cfg, &res, n, best);
            let min = cfg.slice_ticks / 16 + 1;
            run_slice(
                cfg,
                &mut res,
                best,
                if need < min {
                    min
                } else if need > cfg.slice_ticks {
                    cfg.slice_ticks
                } else {
                    need
                },
            );
        }
    }
    unsafe { sys(SYS_DONE, &res as *const UserResult as u64, 0, 0) };
    loop {
        core::hint::spin_loop();
    }
}
