//! CPU discovery and application-processor startup.
//!
//! Expected CPU count, first source that answers: `cpus=N` on the command line; the ACPI MADT (RSDP from
//! `hvm_start_info.rsdp_paddr` or found in 0xE0000–0xFFFFF); the MP table (`_MP_` floating pointer in the EBDA,
//! the last KiB below 640 KiB, or 0xF0000–0xFFFFF). APs are started the way firmware does: x2APIC
//! INIT, 10 ms, SIPI, 200 µs, SIPI, all broadcast to all-excluding-self through ICR (MSR 0x830), with the
//! real-mode trampoline at physical 0x8000. The BSP then waits for the expected number of check-ins (at most 2 s),
//! or, with no count known, until no AP has checked in for 200 ms.

use crate::arch::{rdtsc, wrmsr};
use crate::boot::{
    ap_tramp_cr3, ap_tramp_end, ap_tramp_start, boot_pml4, kernel_phys, phys, MAX_CPUS, TRAMPOLINE,
};
use crate::cpu::{self, STATE_ABSENT, STATE_LATE, STATE_READY};
use crate::timer::delay_ticks;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
pub static GO: AtomicBool = AtomicBool::new(false);

pub enum CountSource {
    Cmdline,
    MpTable,
    Madt,
    None,
}

impl CountSource {
    pub fn name(&self) -> &'static str {
        match self {
            CountSource::Cmdline => "cmdline",
            CountSource::MpTable => "mptable",
            CountSource::Madt => "acpi-madt",
            CountSource::None => "check-in timeout",
        }
    }
}

fn rd8(pa: u64) -> u8 {
    unsafe { core::ptr::read_volatile(phys::<u8>(pa)) }
}
fn rd16(pa: u64) -> u16 {
    unsafe { core::ptr::read_unaligned(phys::<u16>(pa)) }
}
fn rd32(pa: u64) -> u32 {
    unsafe { core::ptr::read_unaligned(phys::<u32>(pa)) }
}
fn rd64(pa: u64) -> u64 {
    unsafe { core::ptr::read_unaligned(phys::<u64>(pa)) }
}

fn checksum_ok(pa: u64, len: u64) -> bool {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(rd8(pa + i));
    }
    s == 0
}

/// Finds a 16-byte-aligned `sig` (4 or 8 bytes) in [start, end) whose first `csum_len` bytes sum to zero.
fn scan(start: u64, end: u64, sig: u64, sig_len: u32, csum_len: u64) -> Option<u64> {
    let mask = if sig_len == 8 { u64::MAX } else { 0xffff_ffff };
    let mut pa = start & !15;
    while pa + 16 <= end {
        if rd64(pa) & mask == sig && checksum_ok(pa, csum_len) {
            return Some(pa);
        }
        pa += 16;
    }
    None
}

/// Enabled processors in the MP table.
fn mptable_cpus() -> Option<u32> {
    const MP: u64 = 0x5f50_4d5f; // "_MP_"
    let ebda = (rd16(0x40e) as u64) << 4;
    let fp = (if (0x8_0000..0xa_0000).contains(&ebda) {
        scan(ebda, ebda + 1024, MP, 4, 16)
    } else {
        None
    })
    .or_else(|| scan(0x9_fc00, 0xa_0000, MP, 4, 16))
    .or_else(|| scan(0xf_0000, 0x10_0000, MP, 4, 16))?;
    let table = rd32(fp + 4) as u64;
    if table == 0 || rd32(table) != 0x504d_4350 {
        return None; // "PCMP"
    }
    let count = rd16(table + 34) as u64;
    let mut e = table + 44;
    let mut cpus = 0;
    for _ in 0..count.min(1024) {
        match rd8(e) {
            0 => {
                if rd8(e + 3) & 1 != 0 {
                    cpus += 1;
                }
                e += 20;
            }
            _ => e += 8,
        }
    }
    (cpus > 0).then_some(cpus)
}

/// Enabled processors (local APIC and x2APIC entries) in the ACPI MADT.
fn madt_cpus(rsdp_hint: u64) -> Option<u32> {
    const RSDP: u64 = 0x2052_5450_2044_5352; // "RSD PTR "
    let rsdp = if rsdp_hint != 0 && rd64(rsdp_hint) == RSDP {
        rsdp_hint
    } else {
        scan(0xe_0000, 0x10_0000, RSDP, 8, 20)?
    };
    let (root, entry) = if rd8(rsdp + 15) >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8)
    } else {
        (rd32(rsdp + 16) as u64, 4)
    };
    if root == 0 || root >= 0x1_0000_0000 {
        return None;
    }
    let len = rd32(root + 4) as u64;
    let mut p = root + 36;
    while p + entry <= root + len.min(4096) {
        let t = if entry == 8 { rd64(p) } else { rd32(p) as u64 };
        p += entry;
        if t == 0 || t >= 0x1_0000_0000 || rd32(t) != 0x4349_5041 {
            continue; // not "APIC"
        }
        let end = t + (rd32(t + 4) as u64).min(65536);
        let mut e = t + 44;
        let mut cpus = 0;
        while e + 2 <= end {
            let (ty, l) = (rd8(e), rd8(e + 1) as u64);
            if l < 2 {
                break;
            }
            if (ty == 0 && rd32(e + 4) & 1 != 0) || (ty == 9 && rd32(e + 8) & 1 != 0) {
                cpus += 1;
            }
            e += l;
        }
        return (cpus > 0).then_some(cpus);
    }
    None
}

pub fn expected_cpus(cmdline_cpus: u64, rsdp: u64) -> (u32, CountSource) {
    if cmdline_cpus > 0 {
        return (
            cmdline_cpus.min(MAX_CPUS as u64) as u32,
            CountSource::Cmdline,
        );
    }
    // The MADT first: firmware such as SeaBIOS writes an MP table listing only the CPUs it managed to wake itself,
    // while QEMU writes the MADT from its own configuration.
    if let Some(n) = madt_cpus(rsdp) {
        return (n, CountSource::Madt);
    }
    if let Some(n) = mptable_cpus() {
        return (n, CountSource::MpTable);
    }
    (0, CountSource::None)
}

/// Starts the APs and waits for them; returns the number of CPUs taking part (BSP included). APs that check in
/// after that are parked.
pub fn start_aps(expected: u32, tsc_hz: u64) -> u32 {
    if expected == 1 {
        mark_late();
        return 1;
    }
    // Trampoline to 0x8000, with the boot page tables (identity map below 4 GiB) for its CR3.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, phys::<u8>(TRAMPOLINE), len);
        let cr3_off = core::ptr::addr_of!(ap_tramp_cr3) as u64 - start as u64;
        *phys::<u32>(TRAMPOLINE + cr3_off) = kernel_phys(core::ptr::addr_of!(boot_pml4)) as u32;
    }
    let ms = tsc_hz / 1000;
    // ICR: destination shorthand all-excluding-self (0b11 << 18), level assert; INIT (0x500), SIPI (0x600 | page).
    wrmsr(0x830, 0xc_4500);
    delay_ticks(10 * ms);
    let sipi = 0xc_4600 | (TRAMPOLINE >> 12);
    wrmsr(0x830, sipi);
    delay_ticks(ms / 5);
    wrmsr(0x830, sipi);
    let t0 = rdtsc();
    let mut last = t0;
    let mut seen = 0;
    loop {
        let n = CHECKED_IN.load(Ordering::Acquire);
        let now = rdtsc();
        if n != seen {
            seen = n;
            last = now;
        }
        if expected > 0 && (n + 1 >= expected || now - t0 > 2000 * ms) {
            break;
        }
        if expected == 0 && (now - last > 200 * ms || now - t0 > 5000 * ms) {
            break;
        }
        crate::arch::pause();
    }
    mark_late();
    1 + (1..MAX_CPUS)
        .filter(|&i| cpu::cpu(i).state.load(Ordering::Acquire) == STATE_READY)
        .count() as u32
}

/// Marks every slot whose AP has not checked in: such an AP parks when it arrives.
fn mark_late() {
    for i in 1..MAX_CPUS {
        let _ = cpu::cpu(i).state.compare_exchange(
            STATE_ABSENT,
            STATE_LATE,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// Called by an AP once it is set up: true if it takes part.
pub fn check_in(idx: usize) -> bool {
    let ok = cpu::cpu(idx)
        .state
        .compare_exchange(
            STATE_ABSENT,
            STATE_READY,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok();
    if ok {
        CHECKED_IN.fetch_add(1, Ordering::Release);
    }
    ok
}
