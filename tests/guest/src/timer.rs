//! TSC calibration against PIT channel 2 (as Linux's pit_calibrate_tsc), LAPIC timer calibration against the TSC,
//! and the periodic x2APIC timer.

use crate::arch::{cpuid, inb, outb, rdmsr, rdtsc, wrmsr};
use crate::interrupts::TIMER_VECTOR;
use core::sync::atomic::{AtomicU64, Ordering};

/// Nonzero: the timer runs one-shot and the interrupt handler re-arms it with this count (`hostile=timer`), until
/// the CPU's tick count reaches STORM_TARGET or the TSC passes STORM_DEADLINE; then the handler clears it. The
/// handler decides, so the storm ends on time even when interrupts leave no room for anything else.
pub static ONESHOT_REARM: AtomicU64 = AtomicU64::new(0);
pub static STORM_TARGET: AtomicU64 = AtomicU64::new(0);
pub static STORM_DEADLINE: AtomicU64 = AtomicU64::new(0);

/// Called by the timer interrupt with the CPU's tick count (after this tick).
#[inline(always)]
pub fn storm_tick(ticks: u64) {
    let rearm = ONESHOT_REARM.load(Ordering::Relaxed);
    if rearm == 0 {
        return;
    }
    if ticks < STORM_TARGET.load(Ordering::Relaxed)
        && rdtsc() < STORM_DEADLINE.load(Ordering::Relaxed)
    {
        wrmsr(0x838, rearm);
    } else {
        ONESHOT_REARM.store(0, Ordering::Relaxed);
    }
}

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 1/CAL_DIV s, three times (the median wins).
const CAL_DIV: u64 = 50;

pub enum TscSource {
    Pit,
    Cpuid,
    Guess,
}

/// Latches and reads PIT channel 0's counter (1 port write, 2 reads).
fn pit_count() -> u64 {
    outb(0x43, 0x00);
    let lo = inb(0x40) as u64;
    let hi = inb(0x40) as u64;
    hi << 8 | lo
}

/// TSC ticks per second over one window of PIT channel 0 counting down (mode 2, reload 65536). Channel 0 works
/// with every PIT we meet (an in-kernel KVM PIT, QEMU's), while channel 2 needs the speaker port 0x61, which
/// some machines (QEMU microvm) lack. Its IRQ 0 stays masked at the PIC.
fn pit_window() -> Option<u64> {
    let target = PIT_HZ / CAL_DIV;
    let mut prev = pit_count();
    let t0 = rdtsc();
    let mut elapsed = 0u64;
    let mut polls = 0u32;
    while elapsed < target {
        let cur = pit_count();
        elapsed += prev.wrapping_sub(cur) & 0xffff;
        prev = cur;
        polls += 1;
        if polls > 200_000 {
            return None; // the counter does not move: no PIT
        }
    }
    let t1 = rdtsc();
    Some((t1 - t0) * PIT_HZ / elapsed)
}

fn median3(v: [u64; 3]) -> u64 {
    let (a, b, c) = (v[0], v[1], v[2]);
    a.max(b).min(a.min(b).max(c))
}

/// TSC frequency in Hz and where it came from.
pub fn calibrate_tsc() -> (u64, TscSource) {
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2 (rate generator), binary
    outb(0x40, 0);
    outb(0x40, 0);
    let mut v = [0u64; 3];
    let mut ok = true;
    for x in v.iter_mut() {
        match pit_window() {
            Some(hz) => *x = hz,
            None => ok = false,
        }
    }
    outb(0x43, 0x30); // channel 0 back to mode 0 (one-shot), waiting for a count: quiet
    let hz = median3(v);
    if ok && hz > 100_000_000 {
        return (hz, TscSource::Pit);
    }
    // KVM/VMware timing leaf (kHz), then the architectural leaves.
    let max_hv = cpuid(0x4000_0000, 0)[0];
    if (0x4000_0010..0x4000_0100).contains(&max_hv) {
        let khz = cpuid(0x4000_0010, 0)[0] as u64;
        if khz > 0 {
            return (khz * 1000, TscSource::Cpuid);
        }
    }
    let max = cpuid(0, 0)[0];
    if max >= 0x15 {
        let l = cpuid(0x15, 0);
        if l[0] != 0 && l[1] != 0 && l[2] != 0 {
            return (l[2] as u64 * l[1] as u64 / l[0] as u64, TscSource::Cpuid);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0)[0] as u64;
        if mhz > 0 {
            return (mhz * 1_000_000, TscSource::Cpuid);
        }
    }
    (2_000_000_000, TscSource::Guess)
}

/// Busy-waits for `ticks` TSC ticks.
pub fn delay_ticks(ticks: u64) {
    let t0 = rdtsc();
    while rdtsc() - t0 < ticks {
        crate::arch::pause();
    }
}

/// LAPIC timer input frequency (divide-by-1) in Hz, measured against the TSC (median of three windows).
pub fn calibrate_lapic(tsc_hz: u64) -> u64 {
    wrmsr(0x83e, 0xb); // divide by 1
    wrmsr(0x832, 1 << 16 | TIMER_VECTOR as u64); // masked, one-shot
    let mut v = [0u64; 3];
    for x in v.iter_mut() {
        let t0 = rdtsc();
        wrmsr(0x838, 0xffff_ffff);
        delay_ticks(tsc_hz / CAL_DIV);
        let left = rdmsr(0x839);
        let t1 = rdtsc();
        *x = (0xffff_ffff - left) * tsc_hz / (t1 - t0).max(1);
    }
    wrmsr(0x838, 0);
    median3(v)
}

/// Starts the periodic LAPIC timer at `hz` (0: off).
pub fn start(lapic_hz: u64, hz: u64) {
    if hz == 0 {
        return;
    }
    wrmsr(0x83e, 0xb);
    wrmsr(0x832, 1 << 17 | TIMER_VECTOR as u64); // periodic
    wrmsr(0x838, (lapic_hz / hz).clamp(1, 0xffff_ffff));
}

pub fn stop() {
    wrmsr(0x832, 1 << 16 | TIMER_VECTOR as u64);
    wrmsr(0x838, 0);
}
