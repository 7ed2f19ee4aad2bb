//! Per-CPU state: GDT, TSS, stacks, the shared IDT, syscall MSRs, x2APIC.

use crate::arch::{cpuid, rdmsr, rsp, wrmsr};
use crate::boot::{MAX_CPUS, STACK_SIZE};
use crate::interrupts;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

// Linux's GDT layout. It matters on PVM hosts: ring-3 selectors are used as they are with the host's GDT, where
// 0x23 is 32-bit user code, 0x2b user data and 0x33 64-bit user code.
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER32_CS: u16 = 0x20 | 3;
pub const USER_DS: u16 = 0x28 | 3;
pub const USER_CS: u16 = 0x30 | 3;
const TSS_SEL: u16 = 0x40;
const GDT_ENTRIES: usize = 10;

#[repr(C, align(16384))]
pub struct Stack(pub [u8; STACK_SIZE]);

/// Kernel stacks (TSS.RSP0 and the syscall stack), one per CPU; CPU 0 boots on its own.
#[no_mangle]
#[link_section = ".stacks"]
pub static mut KSTACKS: [Stack; MAX_CPUS] = [const { Stack([0; STACK_SIZE]) }; MAX_CPUS];
/// IST stacks for NMI and double fault.
#[link_section = ".stacks"]
static mut ISTSTACKS: [Stack; MAX_CPUS] = [const { Stack([0; STACK_SIZE]) }; MAX_CPUS];

/// Next CPU index, taken by each AP in the trampoline.
#[no_mangle]
pub static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(1);

#[repr(C, packed(4))]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap_base: u16,
}

pub const STATE_ABSENT: u32 = 0;
pub const STATE_READY: u32 = 1;
pub const STATE_LATE: u32 = 2;

/// Per-CPU data. `gs_kstack`/`gs_user_rsp` are at offsets 0 and 8: the syscall entry reaches them through
/// KERNEL_GS_BASE after `swapgs`.
#[repr(C, align(64))]
pub struct Cpu {
    pub gs_kstack: u64,
    pub gs_user_rsp: u64,
    pub apic_id: AtomicU32,
    /// STATE_*: an AP sets READY when it has checked in; the BSP marks the ones that have not as LATE.
    pub state: AtomicU32,
    pub ticks: AtomicU64,
    pub done: AtomicBool,
    pub result: crate::user::UserResult,
    pub user_cr3: u64,
    gdt: [u64; GDT_ENTRIES],
    tss: Tss,
}

const fn cpu_init() -> Cpu {
    Cpu {
        gs_kstack: 0,
        gs_user_rsp: 0,
        apic_id: AtomicU32::new(0),
        state: AtomicU32::new(STATE_ABSENT),
        ticks: AtomicU64::new(0),
        done: AtomicBool::new(false),
        result: crate::user::UserResult::ZERO,
        user_cr3: 0,
        gdt: [0; GDT_ENTRIES],
        tss: Tss {
            _r0: 0,
            rsp: [0; 3],
            _r1: 0,
            ist: [0; 7],
            _r2: 0,
            _r3: 0,
            iomap_base: 104,
        },
    }
}

pub static mut CPUS: [Cpu; MAX_CPUS] = [const { cpu_init() }; MAX_CPUS];

pub fn cpu(idx: usize) -> &'static mut Cpu {
    unsafe { &mut *core::ptr::addr_of_mut!(CPUS[idx % MAX_CPUS]) }
}

/// Index of the running CPU: stored at the lowest address of every (aligned) per-CPU stack.
pub fn current() -> usize {
    let base = rsp() & !(STACK_SIZE as u64 - 1);
    unsafe { *(base as *const u32) as usize % MAX_CPUS }
}

fn stack_top(stacks: *mut [Stack; MAX_CPUS], idx: usize) -> u64 {
    let base = unsafe { core::ptr::addr_of_mut!((*stacks)[idx]) } as u64;
    unsafe { *(base as *mut u32) = idx as u32 };
    base + STACK_SIZE as u64
}

pub fn kstack_top(idx: usize) -> u64 {
    stack_top(core::ptr::addr_of_mut!(KSTACKS), idx)
}

/// Loads this CPU's GDT, TSS and the shared IDT; sets up `syscall`; enables the x2APIC.
pub fn init(idx: usize) {
    let c = cpu(idx);
    let kstack = kstack_top(idx);
    let ist = stack_top(core::ptr::addr_of_mut!(ISTSTACKS), idx);
    c.gs_kstack = kstack;
    c.tss.rsp[0] = kstack;
    c.tss.ist[0] = ist;
    let tss = core::ptr::addr_of!(c.tss) as u64;
    c.gdt = [
        0,
        0x00cf_9a00_0000_ffff, // 0x08 kernel code32
        0x00af_9a00_0000_ffff, // 0x10 kernel code64
        0x00cf_9200_0000_ffff, // 0x18 kernel data
        0x00cf_fa00_0000_ffff, // 0x23 user code32
        0x00cf_f200_0000_ffff, // 0x2b user data
        0x00af_fa00_0000_ffff, // 0x33 user code64
        0,
        103 | (tss & 0xff_ffff) << 16 | 0x89 << 40 | (tss >> 24 & 0xff) << 56, // 0x40 TSS (low)
        tss >> 32,                                                             // TSS (high)
    ];
    let gdtr = DescPtr {
        limit: (GDT_ENTRIES * 8 - 1) as u16,
        base: core::ptr::addr_of!(c.gdt) as u64,
    };
    unsafe {
        asm!(
            "lgdt [{g}]",
            "push {cs}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "xor {t:e}, {t:e}",
            "mov fs, {t:e}",
            "mov gs, {t:e}",
            "ltr {tss:x}",
            g = in(reg) &gdtr,
            cs = in(reg) KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u32,
            tss = in(reg) TSS_SEL,
            t = out(reg) _,
        );
    }
    interrupts::load_idt();
    // syscall: STAR (kernel CS 0x10 / SS 0x18; sysret CS 0x33 / SS 0x2b), LSTAR, FMASK (IF, DF, TF, AC).
    wrmsr(
        0xc000_0081,
        ((USER32_CS as u64) << 48) | ((KERNEL_CS as u64) << 32),
    );
    wrmsr(0xc000_0082, crate::syscall::entry_address());
    wrmsr(0xc000_0084, 0x4_4700);
    wrmsr(0xc000_0101, 0); // GS_BASE (user)
    wrmsr(0xc000_0102, c as *mut Cpu as u64); // KERNEL_GS_BASE
    enable_x2apic();
    c.apic_id.store(rdmsr(0x802) as u32, Ordering::Relaxed);
}

#[repr(C, packed)]
pub struct DescPtr {
    pub limit: u16,
    pub base: u64,
}

pub fn has_x2apic() -> bool {
    cpuid(1, 0)[2] & (1 << 21) != 0
}

fn enable_x2apic() {
    let mut base = rdmsr(0x1b);
    if base & (1 << 11) == 0 {
        base |= 1 << 11;
        wrmsr(0x1b, base);
    }
    wrmsr(0x1b, base | (1 << 10));
    wrmsr(0x808, 0); // TPR
    wrmsr(0x80f, 0x100 | interrupts::SPURIOUS_VECTOR as u64); // SVR: enabled
    wrmsr(0x835, 1 << 16); // LINT0 masked (no ExtINT from the PIC)
    wrmsr(0x837, 1 << 16); // error LVT masked
}

/// APIC ID recorded at `init` (0 before it): safe to call from any handler.
pub fn apic_id_or_zero() -> u32 {
    cpu(current()).apic_id.load(Ordering::Relaxed)
}
