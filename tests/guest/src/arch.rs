//! Thin wrappers over the privileged and I/O instructions the kernel uses. Every port write goes through
//! `outb`/`outl`, which count it (`PORT_WRITES`) for the `guest-io:` line.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Every `out` instruction the guest has executed, on every CPU.
pub static PORT_WRITES: AtomicU64 = AtomicU64::new(0);
/// The part of PORT_WRITES that went to the PIT (0x40–0x43) or the PICs (0x20, 0x21, 0xa0, 0xa1): with KVM's
/// in-kernel irqchip and PIT those never reach the VMM as I/O exits.
pub static PIT_PIC_WRITES: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    count_port_writes(port, 1);
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Counts `n` port writes to `port` (any width) for the `guest-io:` line.
#[inline(always)]
pub fn count_port_writes(port: u16, n: u64) {
    PORT_WRITES.fetch_add(n, Ordering::Relaxed);
    if matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x40..=0x43) {
        PIT_PIC_WRITES.fetch_add(n, Ordering::Relaxed);
    }
}

#[inline(always)]
pub fn outl(port: u16, v: u32) {
    PORT_WRITES.fetch_add(1, Ordering::Relaxed);
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (hi as u64) << 32 | lo as u64
}

#[inline(always)]
pub fn wrmsr(msr: u32, v: u64) {
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

#[inline(always)]
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d, options(nomem, nostack, preserves_flags))
    }
    [a, b, c, d]
}

#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn read_cr3() -> u64 {
    let v: u64;
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub unsafe fn write_cr3(v: u64) {
    asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags))
}

#[inline(always)]
pub fn pause() {
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn cli() {
    unsafe { asm!("cli", options(nomem, nostack)) }
}

#[inline(always)]
pub fn sti() {
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Current stack pointer.
#[inline(always)]
pub fn rsp() -> u64 {
    let v: u64;
    unsafe { asm!("mov {}, rsp", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Exits the VM through the exit port (our VMM: exit status = `status`; QEMU's isa-debug-exit: (status << 1) | 1).
pub fn exit(status: u32) -> ! {
    outl(0xf4, status);
    // No exit device: spin (never `hlt`, so a debugger single-stepping here cannot stop on one).
    loop {
        pause();
    }
}
