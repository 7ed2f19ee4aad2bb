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

pub const NWORK: usize = 5;
pub const USER_HOT_A: u64 = 0;
pub const USER_HOT_B: u64 = 1;
pub const USER_COLD: u64 = 2;
pub const KERNEL_SPIN: u64 = 3;
pub const USER_WILD_STACK: u64 = 4;
pub const WORK_NAMES: [&str; NWORK] = [
    "user_hot_a",
    "user_hot_b",
    "user_cold",
    "kernel_spin",
    "user_wild_stack",
];
/// Frame-pointer values `user_wild_stack` runs with, filled in by the kernel (see `wild_frames` in main.rs).
pub const NWILD: usize = 20;

pub const SYS_WRITE: u64 = 1;
pub const SYS_EXIT: u64 = 2;
pub const SYS_KERNEL_SPIN: u64 = 3;
pub const SYS_DONE: u64 = 4;
pub const SYS_USER_MMIO_DONE: u64 = 5;

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
    /// Garbage frame pointers for `user_wild_stack` (kernel addresses among them: ring-3 code must not name any).
    pub wild: [u64; NWILD],
    /// `hostile=user-mmio`: accesses to make from ring 3 before working (0: none), in `USER_MMIO_WINDOWS` 2 MiB
    /// windows from `mmio_va`, none of them RAM; and the seed of their random numbers.
    pub mmio_accesses: u64,
    pub mmio_va: u64,
    pub mmio_seed: u64,
}

/// Windows the kernel maps for `hostile=user-mmio` (user-accessible 2 MiB pages outside RAM).
pub const USER_MMIO_WINDOWS: u64 = 16;

/// A work-function id as an index that needs no bounds check (ring-3 code cannot reach the kernel's panic).
#[inline(always)]
fn wid(id: u64) -> usize {
    (id % NWORK as u64) as usize
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
    } else if id == USER_WILD_STACK {
        user_wild_stack(ticks)
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
        let (si, sb) = (res.spent[wid(cfg.ids[i])], res.spent[wid(cfg.ids[best])]);
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
        total += res.spent[wid(cfg.ids[i])] as u128;
        wsum += cfg.weights[i] as u128;
        i += 1;
    }
    let mut i = 0usize;
    while i < n {
        let a = res.spent[wid(cfg.ids[i])] as u128 * wsum;
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
    let id = wid(cfg.ids[best % NWORK]) as u64;
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
        total += res.spent[wid(cfg.ids[i])];
        wsum += cfg.weights[i];
        i += 1;
    }
    let (s, w) = (
        res.spent[wid(cfg.ids[best % NWORK])],
        cfg.weights[best % NWORK],
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
    let mut i = 0;
    while i < NWILD {
        WILD[i].store(cfg.wild[i], Ordering::Relaxed);
        i += 1;
    }
    unsafe { sys(SYS_WRITE, STARTED.as_ptr() as u64, STARTED.len() as u64, 0) };
    if cfg.mmio_accesses != 0 {
        user_mmio_storm(cfg.mmio_accesses, cfg.mmio_va, cfg.mmio_seed);
    }
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

/// Copied from UserConfig::wild at start.
#[link_section = ".user.data"]
static WILD: [AtomicU64; NWILD] = [const { AtomicU64::new(0) }; NWILD];
/// Which wild frame `user_wild_stack` uses next (shared by all CPUs; races only change the order).
#[link_section = ".user.data"]
static WILD_NEXT: AtomicU64 = AtomicU64::new(0);

/// xorshift rounds per wild frame: about 100 µs at ring-3 speed, so each frame gets samples at 1 kHz.
const WILD_SPIN_ITERS: u64 = 100_000;
/// Fake frames in the deep chain: more than any walker's depth limit (perf's is 127).
const DEEP_FRAMES: usize = 200;

/// Spins with `rbp` = `frame` (anything at all); no memory access while it holds the garbage.
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_wild_spin(frame: u64, iters: u64) -> u64 {
    let mut x = frame | 1;
    unsafe {
        asm!(
            "push rbp",
            "mov rbp, {f}",
            "2:",
            "mov {t}, {x}",
            "shl {t}, 13",
            "xor {x}, {t}",
            "mov {t}, {x}",
            "shr {t}, 7",
            "xor {x}, {t}",
            "mov {t}, {x}",
            "shl {t}, 17",
            "xor {x}, {t}",
            "dec {n}",
            "jnz 2b",
            "pop rbp",
            f = in(reg) frame,
            n = inout(reg) iters.max(1) => _,
            x = inout(reg) x,
            t = out(reg) _,
        );
    }
    x
}

/// Overwrites its own saved frame pointer and return address with garbage, spins in a callee (whose frame chain
/// leads into the garbage), then puts both back before returning.
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_wild_frame(garbage: u64, iters: u64) -> u64 {
    let fp: u64;
    unsafe { asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags)) };
    let slots = fp as *mut u64;
    let (saved, ret) = unsafe {
        (
            core::ptr::read_volatile(slots),
            core::ptr::read_volatile(slots.add(1)),
        )
    };
    unsafe {
        core::ptr::write_volatile(slots, garbage);
        core::ptr::write_volatile(slots.add(1), garbage ^ 0x5a5a);
    }
    let r = user_plain_spin(iters);
    unsafe {
        core::ptr::write_volatile(slots, saved);
        core::ptr::write_volatile(slots.add(1), ret);
    }
    black_box(r) ^ 4
}

/// A spin with an ordinary frame (for `user_wild_frame`). The loop is in asm so the compiler does not unroll it
/// with masks that look like kernel addresses to guest_elf.rs's scan.
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_plain_spin(iters: u64) -> u64 {
    let mut x = iters | 1;
    unsafe {
        asm!(
            "2:",
            "mov {t}, {x}",
            "shl {t}, 13",
            "xor {x}, {t}",
            "mov {t}, {x}",
            "shr {t}, 7",
            "xor {x}, {t}",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iters.max(1) => _,
            x = inout(reg) x,
            t = out(reg) _,
            options(nomem, nostack),
        );
    }
    black_box(x) ^ 5
}

/// The hostile ring-3 workload: until `ticks` pass, spins with the frame pointer set to one garbage value after
/// another (unmapped, non-canonical, misaligned, kernel addresses, page tables pointing outside guest RAM), on a
/// stack frame that points to itself, at the bottom of a 200-frame chain, and with its own saved frame rewritten.
/// A frame-pointer walker sampling it must end every chain cleanly.
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_wild_stack(ticks: u64) -> u64 {
    let end = urdtsc() + ticks;
    let mut acc = 0u64;
    loop {
        let k = (WILD_NEXT.fetch_add(1, Ordering::Relaxed) % (NWILD as u64 + 3)) as usize;
        if k < NWILD {
            acc ^= user_wild_spin(WILD[k].load(Ordering::Relaxed), WILD_SPIN_ITERS);
        } else if k == NWILD {
            // A frame whose saved frame pointer is itself.
            let mut frame = core::mem::MaybeUninit::<[u64; 2]>::uninit();
            let at = frame.as_mut_ptr() as *mut u64;
            unsafe {
                core::ptr::write_volatile(at, at as u64);
                core::ptr::write_volatile(at.add(1), user_wild_stack as *const () as u64);
            }
            acc ^= user_wild_spin(black_box(at) as u64, WILD_SPIN_ITERS);
        } else if k == NWILD + 1 {
            // A chain deeper than any walker goes, every frame 16 bytes above the last. (Not zero-initialised:
            // that would call the kernel's memset.)
            let mut chain = core::mem::MaybeUninit::<[u64; 2 * DEEP_FRAMES]>::uninit();
            let at = chain.as_mut_ptr() as *mut u64;
            let mut i = 0;
            while i < DEEP_FRAMES {
                let next = if i + 1 < DEEP_FRAMES {
                    unsafe { at.add(2 * (i + 1)) as u64 }
                } else {
                    0
                };
                unsafe {
                    core::ptr::write_volatile(at.add(2 * i), next);
                    core::ptr::write_volatile(
                        at.add(2 * i + 1),
                        user_leaf as *const () as u64 + i as u64,
                    );
                }
                i += 1;
            }
            acc ^= user_wild_spin(black_box(at) as u64, WILD_SPIN_ITERS);
        } else {
            let g = WILD[(acc % NWILD as u64) as usize].load(Ordering::Relaxed);
            acc ^= user_wild_frame(g, WILD_SPIN_ITERS);
        }
        if urdtsc() >= end {
            break;
        }
    }
    acc
}

/// `hostile=user-mmio`: loads and stores of 1, 2, 4 and 8 bytes at random offsets of the MMIO windows, from ring 3.
/// Reports (loads, loads that read all-ones, TSC ticks taken) to the kernel, which prints them.
#[no_mangle]
#[inline(never)]
#[link_section = ".user.text"]
pub extern "C" fn user_mmio_storm(n: u64, va: u64, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let (mut reads, mut ones) = (0u64, 0u64);
    let t0 = urdtsc();
    let mut i = 0;
    while i < n {
        x = xorshift(x);
        let size_log = (x >> 4) & 3;
        let window = (x >> 8) % USER_MMIO_WINDOWS;
        let off = ((x >> 20) % 0x20_0000) & !((1u64 << size_log) - 1);
        let at = va + window * 0x20_0000 + off;
        let write = (x >> 6) & 1 == 1;
        unsafe {
            if write {
                if size_log == 0 {
                    core::ptr::write_volatile(at as *mut u8, x as u8);
                } else if size_log == 1 {
                    core::ptr::write_volatile(at as *mut u16, x as u16);
                } else if size_log == 2 {
                    core::ptr::write_volatile(at as *mut u32, x as u32);
                } else {
                    core::ptr::write_volatile(at as *mut u64, x);
                }
            } else {
                let all = if size_log == 0 {
                    core::ptr::read_volatile(at as *const u8) == u8::MAX
                } else if size_log == 1 {
                    core::ptr::read_volatile(at as *const u16) == u16::MAX
                } else if size_log == 2 {
                    core::ptr::read_volatile(at as *const u32) == u32::MAX
                } else {
                    // Folded to 32 bits: a 64-bit compare with -1 looks like a kernel address to guest_elf.rs.
                    let v = core::ptr::read_volatile(at as *const u64);
                    (v as u32 & (v >> 32) as u32) == black_box(u32::MAX)
                };
                reads += 1;
                ones += all as u64;
            }
        }
        i += 1;
    }
    let ticks = urdtsc() - t0;
    unsafe { sys(SYS_USER_MMIO_DONE, reads, ones, ticks) };
}
