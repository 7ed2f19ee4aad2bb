//! `hostile=LIST`: the guest attacks its VMM, then runs its workload as usual, so the truth lines still come out.
//!
//! | mode    | what the guest does                                                                                  |
//! |---------|------------------------------------------------------------------------------------------------------|
//! | `ports` | `storm` random port accesses (in/out, 1/2/4 bytes, `rep ins`/`rep outs`), then repairs COM1/PIC/PIT    |
//! | `mmio`  | `storm` random loads/stores outside guest RAM, below and above 4 GiB, and across the end of RAM      |
//! | `timer` | LAPIC timer one-shot re-armed at ~1 µs until `irqs` interrupts or `irq_secs` seconds                  |
//! | `badpt` | every worker's page tables get entries pointing past the end of RAM and at huge physical addresses   |
//!
//! `ports`, `mmio` and `timer` run on the BSP in ring 0 after AP startup, before the workload, in that order. Each
//! prints one `guest-hostile:` line with what it did. `user_wild_stack` (a `work=` function) is the ring-3 part:
//! it runs with the frame pointer set to the values `wild_frames` gives it, the `badpt` addresses among them.

use crate::arch::{count_port_writes, cpuid, outb, rdtsc, wrmsr};
use crate::boot::{boot_pml4, phys, KERNEL_VMA};
use crate::cmdline::{memmap, Config, HOSTILE_MMIO, HOSTILE_PORTS, HOSTILE_TIMER};
use crate::console::{println, Line};
use crate::user::NWILD;
use core::arch::asm;
use core::sync::atomic::Ordering;

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut v = self.0;
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        self.0 = v;
        v.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn run(cfg: &Config, tsc_hz: u64, lapic_hz: u64) {
    if cfg.hostile & HOSTILE_PORTS != 0 {
        port_storm(cfg.storm, cfg.seed);
    }
    if cfg.hostile & HOSTILE_MMIO != 0 {
        mmio_storm(cfg.storm, cfg.seed, tsc_hz);
    }
    if cfg.hostile & HOSTILE_TIMER != 0 {
        timer_storm(cfg.irqs, cfg.irq_secs, tsc_hz, lapic_hz);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Port I/O

/// Ports with something behind them (ours or KVM's) or with history: COM1, i8042, PIT and speaker, PICs and ELCR,
/// CMOS, POST, PCI config, the debug-exit neighbourhood, COM2, the `fault=port` port, the top of the port space.
const INTERESTING_PORTS: [u16; 41] = [
    0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x60, 0x64, 0x61, 0x40, 0x41, 0x42,
    0x43, 0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x70, 0x71, 0x80, 0xcf8, 0xcfc, 0xcfe, 0xf0, 0xf1,
    0xf4, 0xf5, 0xf8, 0xfc, 0x2f8, 0x2fd, 0x5678, 0x510, 0x511, 0xfffc, 0xfffe, 0xffff,
];

/// Writes the storm leaves out: the debug-exit port (0xf4, 4 bytes wide under QEMU) would end the VM, and the
/// reset paths (i8042 pulse commands 0xf0-0xff and write-output-port 0xd1, 0xcf9, port 0x92) would reset it. A
/// guest may of course do both; that ends the VM cleanly and is tested elsewhere.
fn write_allowed(port: u16, size: u64, v: u64) -> bool {
    let mut i = 0;
    while i < size {
        let p = port as u64 + i;
        let b = (v >> (8 * i)) as u8;
        if (0xf0..=0xf7).contains(&p)
            || p == 0xcf9
            || p == 0x92
            || (p == 0x64 && (b >= 0xf0 || b == 0xd1))
        {
            return false;
        }
        i += 1;
    }
    true
}

fn pio_in(port: u16, size: u64) -> u64 {
    let v: u64;
    unsafe {
        if size == 1 {
            asm!("xor eax, eax", "in al, dx", in("dx") port, out("rax") v, options(nomem, nostack));
        } else if size == 2 {
            asm!("xor eax, eax", "in ax, dx", in("dx") port, out("rax") v, options(nomem, nostack));
        } else {
            asm!("in eax, dx", in("dx") port, out("rax") v, options(nomem, nostack));
        }
    }
    v
}

fn pio_out(port: u16, size: u64, v: u64) {
    count_port_writes(port, 1);
    unsafe {
        if size == 1 {
            asm!("out dx, al", in("dx") port, in("rax") v, options(nomem, nostack));
        } else if size == 2 {
            asm!("out dx, ax", in("dx") port, in("rax") v, options(nomem, nostack));
        } else {
            asm!("out dx, eax", in("dx") port, in("rax") v, options(nomem, nostack));
        }
    }
}

/// `rep insb/insw/insd` of `count` elements into `buf`.
fn pio_ins(port: u16, size: u64, buf: &mut [u8; 64], count: u64) {
    let p = buf.as_mut_ptr();
    unsafe {
        if size == 1 {
            asm!("cld", "rep insb", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack));
        } else if size == 2 {
            asm!("cld", "rep insw", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack));
        } else {
            asm!("cld", "rep insd", in("dx") port, inout("rdi") p => _, inout("rcx") count => _, options(nostack));
        }
    }
}

/// `rep outsb/outsw/outsd` of `count` elements from `buf`.
fn pio_outs(port: u16, size: u64, buf: &[u8; 64], count: u64) {
    count_port_writes(port, count);
    let p = buf.as_ptr();
    unsafe {
        if size == 1 {
            asm!("cld", "rep outsb", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack));
        } else if size == 2 {
            asm!("cld", "rep outsw", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack));
        } else {
            asm!("cld", "rep outsd", in("dx") port, inout("rsi") p => _, inout("rcx") count => _, options(nostack));
        }
    }
}

fn port_storm(n: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let (mut reads, mut writes, mut string_ins, mut string_outs, mut skipped, mut ones) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let r = rng.next();
        let port = if r & 3 == 0 {
            (r >> 8) as u16
        } else {
            INTERESTING_PORTS[((r >> 8) % INTERESTING_PORTS.len() as u64) as usize]
        };
        let size = [1u64, 2, 4][((r >> 24) % 3) as usize];
        let write = (r >> 28) & 1 == 1;
        let string = (r >> 29) & 7 == 0;
        let value = rng.next();
        if string {
            let count = 1 + (r >> 32) % (64 / size);
            if write {
                let mut ok = true;
                let mut i = 0;
                while i < count {
                    let mut e = 0u64;
                    let mut b = 0;
                    while b < size {
                        let byte = rng.next() as u8;
                        buf[(i * size + b) as usize] = byte;
                        e |= (byte as u64) << (8 * b);
                        b += 1;
                    }
                    ok &= write_allowed(port, size, e);
                    i += 1;
                }
                if !ok {
                    skipped += 1;
                    continue;
                }
                pio_outs(port, size, &buf, count);
                string_outs += count;
            } else {
                pio_ins(port, size, &mut buf, count);
                string_ins += count;
            }
        } else if write {
            if !write_allowed(port, size, value) {
                skipped += 1;
                continue;
            }
            pio_out(port, size, value);
            writes += 1;
        } else {
            let mask = if size == 4 {
                0xffff_ffff
            } else {
                (1u64 << (8 * size)) - 1
            };
            ones += (pio_in(port, size) & mask == mask) as u64;
            reads += 1;
        }
    }
    repair_devices();
    // The storm's COM1 data writes may have left a partial line.
    println("");
    // String I/O on a byte-wide device is one access per element: a line written with one `rep outsb`, and
    // the line status register read four times with one `rep insb` (THR empty: 0x60 each time).
    const LINE: &[u8] = b"guest-hostile: ports line written with rep outsb\n";
    let mut out = [0u8; 64];
    out[..LINE.len()].copy_from_slice(LINE);
    pio_outs(0x3f8, 1, &out, LINE.len() as u64);
    let mut lsr = [0u8; 64];
    pio_ins(0x3fd, 1, &mut lsr, 4);
    let lsr4 = u32::from_le_bytes([lsr[0], lsr[1], lsr[2], lsr[3]]);
    Line::new()
        .s("guest-hostile: ports attempts=")
        .dec(n)
        .s(" reads=")
        .dec(reads)
        .s(" writes=")
        .dec(writes)
        .s(" string_in_elems=")
        .dec(string_ins)
        .s(" string_out_elems=")
        .dec(string_outs)
        .s(" skipped=")
        .dec(skipped)
        .s(" all_ones_reads=")
        .dec(ones)
        .s(" seed=")
        .dec(seed)
        .s(" rep_insb_lsr=")
        .hex(lsr4 as u64)
        .print();
}

/// Puts back what random writes may have changed: COM1 (divisor latch, loopback, interrupts), both PICs
/// (re-initialised, every line masked, edge-triggered), PIT channel 0 (one-shot, quiet).
fn repair_devices() {
    crate::console::init();
    for (base, vector, cascade) in [(0x20u16, 0x20u8, 0x04u8), (0xa0, 0x28, 0x02)] {
        outb(base, 0x11); // ICW1: edge, cascade, ICW4 follows
        outb(base + 1, vector);
        outb(base + 1, cascade);
        outb(base + 1, 0x01); // ICW4: 8086 mode
        outb(base + 1, 0xff); // OCW1: all masked
    }
    outb(0x4d0, 0);
    outb(0x4d1, 0);
    outb(0x43, 0x30);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
}

// ---------------------------------------------------------------------------------------------------------------
// MMIO

const IOAPIC_PAGE: u64 = 0xfec0_0000;
const XAPIC_PAGE: u64 = 0xfee0_0000;
/// Where the above-4-GiB windows are mapped: PML4 entry 257, 2 MiB pages.
const WINDOW_VA: u64 = 0xffff_8080_0000_0000;
const WINDOWS: u64 = 16;
const TWO_MIB: u64 = 0x20_0000;

/// End of the highest memory-map range: everything from here up is outside guest RAM.
pub fn ram_end() -> u64 {
    memmap().iter().map(|&(a, s)| a + s).max().unwrap_or(0)
}

fn in_memmap(pa: u64, len: u64) -> bool {
    memmap().iter().any(|&(a, s)| pa < a + s && pa + len > a)
}

/// Guest-physical address width (CPUID 0x80000008), at most 52.
pub fn phys_bits() -> u64 {
    if cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 {
        ((cpuid(0x8000_0008, 0)[0] & 0xff) as u64).clamp(32, 52)
    } else {
        36
    }
}

fn mmio_read(va: u64, size: u64) -> u64 {
    unsafe {
        match size {
            1 => core::ptr::read_volatile(va as *const u8) as u64,
            2 => core::ptr::read_volatile(va as *const u16) as u64,
            4 => core::ptr::read_volatile(va as *const u32) as u64,
            _ => core::ptr::read_volatile(va as *const u64),
        }
    }
}

fn mmio_write(va: u64, size: u64, v: u64) {
    unsafe {
        match size {
            1 => core::ptr::write_volatile(va as *mut u8, v as u8),
            2 => core::ptr::write_volatile(va as *mut u16, v as u16),
            4 => core::ptr::write_volatile(va as *mut u32, v as u32),
            _ => core::ptr::write_volatile(va as *mut u64, v),
        }
    }
}

fn boot_pml4_table() -> *mut [u64; 512] {
    let va = core::ptr::addr_of!(boot_pml4) as u64;
    phys::<[u64; 512]>(va - KERNEL_VMA)
}

fn mmio_storm(n: u64, seed: u64, tsc_hz: u64) {
    let mut rng = Rng::new(seed ^ 0x6d6d_696f);
    let bits = phys_bits();
    let limit = 1u64 << bits;
    let end = ram_end();
    // Windows onto 2 MiB frames above 4 GiB (and above RAM), the last one at the very top of the physical space.
    let pdpt = crate::paging::alloc_page();
    let pd = crate::paging::alloc_page();
    let mut frames = [0u64; WINDOWS as usize];
    for (w, f) in frames.iter_mut().enumerate() {
        let lo = end.max(1 << 32).next_multiple_of(TWO_MIB);
        *f = if w as u64 == WINDOWS - 1 || lo + TWO_MIB >= limit {
            limit - TWO_MIB
        } else {
            lo + (rng.next() % ((limit - lo) / TWO_MIB)) * TWO_MIB
        };
        unsafe { (*phys::<[u64; 512]>(pd))[w] = *f | 0x83 }; // present, writable, 2 MiB
    }
    unsafe {
        (*phys::<[u64; 512]>(pdpt))[0] = pd | 3;
        (*boot_pml4_table())[257] = pdpt | 3;
    }
    let (mut low, mut high, mut reads, mut writes, mut ones) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let t0 = rdtsc();
    for _ in 0..n {
        let r = rng.next();
        let size = 1u64 << ((r >> 4) & 3);
        let va = if r & 1 == 0 {
            // Below 4 GiB through the direct map, outside every memory-map range and the APIC pages.
            let pa = (rng.next() % (1 << 32)) & !(size - 1);
            let page = pa & !0xfff;
            if in_memmap(pa, size) || page == IOAPIC_PAGE || page == XAPIC_PAGE {
                continue;
            }
            low += 1;
            crate::boot::DIRECT_MAP + pa
        } else {
            high += 1;
            WINDOW_VA + ((r >> 8) % WINDOWS) * TWO_MIB + ((rng.next() % TWO_MIB) & !(size - 1))
        };
        if (r >> 6) & 1 == 0 {
            let mask = if size == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * size)) - 1
            };
            ones += (mmio_read(va, size) & mask == mask) as u64;
            reads += 1;
        } else {
            mmio_write(va, size, rng.next());
            writes += 1;
        }
    }
    let us = (rdtsc() - t0) / (tsc_hz / 1_000_000).max(1);
    // 8-byte accesses across the end of RAM: the low bytes are RAM, the rest is nothing. A read must give the RAM
    // bytes and all-ones above them; a write of what was read changes nothing.
    let (mut straddles, mut straddle_ok) = (0u64, 0u64);
    if !in_memmap(end, 1) && end >= 8 {
        for k in 1..8u64 {
            let va = crate::boot::DIRECT_MAP + end - k;
            let ram = unsafe {
                core::ptr::read_volatile((crate::boot::DIRECT_MAP + end - 8) as *const u64)
            };
            let v = mmio_read(va, 8);
            let want = (ram >> (8 * (8 - k))) | (u64::MAX << (8 * k));
            straddle_ok += (v == want) as u64;
            mmio_write(va, 8, v);
            straddles += 1;
        }
    }
    unsafe {
        (*boot_pml4_table())[257] = 0;
        crate::arch::write_cr3(crate::arch::read_cr3());
    }
    Line::new()
        .s("guest-hostile: mmio accesses=")
        .dec(low + high)
        .s(" below_4g=")
        .dec(low)
        .s(" above_4g=")
        .dec(high)
        .s(" reads=")
        .dec(reads)
        .s(" writes=")
        .dec(writes)
        .s(" all_ones_reads=")
        .dec(ones)
        .s(" straddles=")
        .dec(straddles)
        .s(" straddle_ok=")
        .dec(straddle_ok)
        .s(" ram_end=")
        .hex(end)
        .s(" phys_bits=")
        .dec(bits)
        .s(" top_window=")
        .hex(frames[WINDOWS as usize - 1])
        .s(" us_per_access=")
        .dec(us / (low + high).max(1))
        .print();
}

/// Where `hostile=user-mmio` maps its user-accessible windows: PML4[5].
pub const USER_MMIO_VA: u64 = 5 << 39;

/// Maps `USER_MMIO_WINDOWS` 2 MiB user pages at USER_MMIO_VA: half at 0xd0000000 and up (below 4 GiB, outside
/// RAM when RAM is smaller than 3 GiB), half at 1 TiB and up.
pub fn add_user_mmio_windows(pml4: u64) {
    use crate::paging::alloc_page;
    use crate::user::USER_MMIO_WINDOWS;
    let (pdpt, pd) = (alloc_page(), alloc_page());
    unsafe {
        (*phys::<[u64; 512]>(pml4))[5] = pdpt | 7;
        (*phys::<[u64; 512]>(pdpt))[0] = pd | 7;
        for w in 0..USER_MMIO_WINDOWS {
            let half = USER_MMIO_WINDOWS / 2;
            let frame = if w < half {
                0xd000_0000 + w * TWO_MIB
            } else {
                (1 << 40) + (w - half) * TWO_MIB
            };
            (*phys::<[u64; 512]>(pd))[w as usize] = frame | 0x87; // present, writable, user, 2 MiB
        }
    }
}

/// SYS_USER_MMIO_DONE: prints what the ring-3 MMIO storm did.
pub fn user_mmio_report(reads: u64, ones: u64, ticks: u64) {
    let cfg = crate::config();
    let tsc_hz = crate::TSC_HZ.load(Ordering::Relaxed).max(1);
    let us = ticks / (tsc_hz / 1_000_000).max(1);
    Line::new()
        .s("guest-hostile: user-mmio accesses=")
        .dec(cfg.storm)
        .s(" reads=")
        .dec(reads)
        .s(" all_ones_reads=")
        .dec(ones)
        .s(" us=")
        .dec(us)
        .s(" us_per_access=")
        .dec(us / cfg.storm.max(1))
        .print();
}

// ---------------------------------------------------------------------------------------------------------------
// Timer interrupts

fn timer_storm(target: u64, secs: u64, tsc_hz: u64, lapic_hz: u64) {
    use crate::interrupts::TIMER_VECTOR;
    use crate::timer::{ONESHOT_REARM, STORM_DEADLINE, STORM_TARGET};
    let c = crate::cpu::cpu(0);
    let before = c.ticks.load(Ordering::Relaxed);
    // One-shot at ~1 µs, re-armed by the handler: KVM clamps periodic LAPIC timers to 200 µs (5 kHz), one-shots
    // not. The handler stops re-arming at the target or the deadline.
    let count = (lapic_hz / 1_000_000).max(1);
    let t0 = rdtsc();
    STORM_TARGET.store(before + target, Ordering::Relaxed);
    STORM_DEADLINE.store(t0 + secs * tsc_hz, Ordering::Relaxed);
    ONESHOT_REARM.store(count, Ordering::Relaxed);
    wrmsr(0x83e, 0xb);
    wrmsr(0x832, TIMER_VECTOR as u64);
    wrmsr(0x838, count);
    crate::arch::sti();
    // A second of grace past the deadline in case the last interrupt never comes.
    while ONESHOT_REARM.load(Ordering::Relaxed) != 0 && rdtsc() - t0 < (secs + 1) * tsc_hz {
        crate::arch::pause();
    }
    crate::arch::cli();
    let t1 = rdtsc();
    ONESHOT_REARM.store(0, Ordering::Relaxed);
    crate::timer::stop();
    // Let an interrupt that was already pending land now rather than in the workload's tick count.
    crate::arch::sti();
    crate::timer::delay_ticks(tsc_hz / 1000);
    crate::arch::cli();
    let got = c.ticks.load(Ordering::Relaxed) - before;
    c.ticks.store(before, Ordering::Relaxed);
    let ms = ((t1 - t0) / (tsc_hz / 1000).max(1)).max(1);
    Line::new()
        .s("guest-hostile: timer irqs=")
        .dec(got)
        .s(" target=")
        .dec(target)
        .s(" ms=")
        .dec(ms)
        .s(" rate_per_s=")
        .dec(got * 1000 / ms)
        .s(" oneshot_count=")
        .dec(count)
        .s(if got >= target {
            " reached=yes"
        } else {
            " reached=no"
        })
        .print();
}

// ---------------------------------------------------------------------------------------------------------------
// Page tables pointing outside RAM (`badpt`) and the wild frame pointers of `user_wild_stack`

/// User addresses whose translation runs into the bad entries `add_bad_tables` makes.
pub const BAD_PML4_PAST_RAM: u64 = 1 << 39; // PML4[1] → a "PDPT" past the end of RAM
pub const BAD_PML4_HUGE: u64 = 2 << 39; // PML4[2] → physical 0xffffffffff000 (beyond any MAXPHYADDR)
const BAD_BASE: u64 = 3 << 39; // PML4[3] → a real PDPT with bad entries:
pub const BAD_PDPT_HUGE: u64 = BAD_BASE; //   PDPT[0] → a "PD" at the highest legal physical page
pub const BAD_PDPT_1G_LEAF: u64 = BAD_BASE + (1 << 30); //   PDPT[1] → 1 GiB page at 4 TiB
const BAD_PD_BASE: u64 = BAD_BASE + (2 << 30); //   PDPT[2] → a real PD:
pub const BAD_PD_2M_LEAF: u64 = BAD_PD_BASE; //     PD[0] → 2 MiB page past the end of RAM
pub const BAD_PD_PT_PAST_RAM: u64 = BAD_PD_BASE + TWO_MIB; //     PD[1] → a "PT" past the end of RAM
const BAD_PT_BASE: u64 = BAD_PD_BASE + 2 * TWO_MIB; //     PD[2] → a real PT:
pub const BAD_PT_PAST_RAM: u64 = BAD_PT_BASE; //       PT[0] → the page past the end of RAM
pub const BAD_PT_HUGE: u64 = BAD_PT_BASE + 0x1000; //       PT[1] → physical 0xffffffffff000
/// PT[2] → the last page of RAM, PT[3] → past the end: an 8-byte frame at its last word reads, its return
/// address does not (a partial read).
pub const BAD_PT_LAST_RAM_WORD: u64 = BAD_PT_BASE + 0x2ff8;
/// PML4[4] → the PML4 itself: this address walks 4, 4, 4, 4 and lands on the PML4 as data.
pub const BAD_RECURSIVE: u64 = (4 << 39) | (4 << 30) | (4 << 21) | (4 << 12);

const HUGE_PA: u64 = 0x000f_ffff_ffff_f000;

/// Adds the `badpt` entries to a worker's PML4. The guest never touches these addresses itself; walkers that read
/// its page tables (the VMM's sampler and gdb) meet them through `user_wild_stack`'s frame pointers.
pub fn add_bad_tables(pml4: u64) {
    use crate::paging::alloc_page;
    let table = |pa: u64| unsafe { &mut *phys::<[u64; 512]>(pa) };
    let past = ram_end().next_multiple_of(TWO_MIB);
    let top = (1u64 << phys_bits()) - 0x1000;
    const PRW_US: u64 = 7;
    let pdpt = alloc_page();
    let pd = alloc_page();
    let pt = alloc_page();
    let t = table(pml4);
    t[1] = past | PRW_US;
    t[2] = HUGE_PA | PRW_US;
    t[3] = pdpt | PRW_US;
    t[4] = pml4 | PRW_US;
    let t = table(pdpt);
    t[0] = top | PRW_US;
    t[1] = (1 << 42) | PRW_US | 0x80;
    t[2] = pd | PRW_US;
    let t = table(pd);
    t[0] = past | PRW_US | 0x80;
    t[1] = past | PRW_US;
    t[2] = pt | PRW_US;
    let t = table(pt);
    t[0] = past | PRW_US;
    t[1] = HUGE_PA | PRW_US;
    t[2] = (past - 0x1000) | PRW_US;
    t[3] = past | PRW_US;
}

/// The frame pointers `user_wild_stack` spins with on CPU `idx` (given to ring 3 through UserConfig: ring-3 code
/// may not name kernel addresses itself).
pub fn wild_frames(idx: usize) -> [u64; NWILD] {
    let kstack = core::ptr::addr_of!(crate::cpu::KSTACKS) as u64
        + (idx as u64 + 1) * crate::boot::STACK_SIZE as u64;
    [
        0x4141_4141_4141_4140,             // non-canonical garbage
        kstack - 0x100,                    // this CPU's kernel stack
        crate::kmain as *const () as u64,  // kernel text
        0x0dea_d000,                       // unmapped user address
        0x40_0001,                         // misaligned
        crate::paging::USER_STACK_TOP - 8, // frame readable, return address on the unmapped page above
        0xffff_ffff_ffff_fff8,             // frame + 8 wraps to 0
        0x8000_0000_0000_0000,             // non-canonical, top bit
        BAD_PML4_PAST_RAM,
        BAD_PML4_HUGE,
        BAD_PDPT_HUGE,
        BAD_PDPT_1G_LEAF,
        BAD_PD_2M_LEAF,
        BAD_PD_PT_PAST_RAM,
        BAD_PT_PAST_RAM,
        BAD_PT_HUGE,
        BAD_PT_LAST_RAM_WORD,
        BAD_RECURSIVE,
        0xffff_8000_0000_0000 + (1 << 40), // direct-map half, unmapped
        crate::boot::DIRECT_MAP + ram_end() - 8, // the last word of RAM through the direct map
    ]
}

/// Prints the `badpt` addresses (for gdb and the tests).
pub fn print_bad_tables() {
    Line::new()
        .s("guest-hostile: badpt pml4_past_ram=")
        .hex(BAD_PML4_PAST_RAM)
        .s(" pml4_huge=")
        .hex(BAD_PML4_HUGE)
        .s(" pdpt_huge=")
        .hex(BAD_PDPT_HUGE)
        .s(" pdpt_1g_leaf=")
        .hex(BAD_PDPT_1G_LEAF)
        .print();
    Line::new()
        .s("guest-hostile: badpt pd_2m_leaf=")
        .hex(BAD_PD_2M_LEAF)
        .s(" pd_pt_past_ram=")
        .hex(BAD_PD_PT_PAST_RAM)
        .s(" pt_past_ram=")
        .hex(BAD_PT_PAST_RAM)
        .s(" pt_huge=")
        .hex(BAD_PT_HUGE)
        .s(" pt_last_ram_word=")
        .hex(BAD_PT_LAST_RAM_WORD)
        .s(" recursive=")
        .hex(BAD_RECURSIVE)
        .print();
}
