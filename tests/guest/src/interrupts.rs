//! IDT, exception stubs and handlers, the LAPIC timer interrupt.
//!
//! Every exception prints one `guest-exception` line (vector, name, RIP, error code, CR2, CS, RSP) and exits with
//! status 32 + vector.

use crate::arch::{read_cr2, wrmsr};
use crate::console::Line;
use crate::cpu;
use core::sync::atomic::Ordering;

pub const TIMER_VECTOR: u8 = 0x40;
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Exit status for an exception: EXCEPTION_EXIT_BASE + vector.
pub const EXCEPTION_EXIT_BASE: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    _r: u32,
}

static mut IDT: [Gate; 256] = [Gate {
    off_lo: 0,
    sel: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    _r: 0,
}; 256];

extern "C" {
    static exception_stubs: [u64; 32];
    fn timer_entry();
    fn spurious_entry();
}

fn set_gate(v: usize, handler: u64, ist: u8, dpl: u8) {
    unsafe {
        IDT[v] = Gate {
            off_lo: handler as u16,
            sel: cpu::KERNEL_CS,
            ist,
            attr: 0x8e | dpl << 5, // present, 64-bit interrupt gate
            off_mid: (handler >> 16) as u16,
            off_hi: (handler >> 32) as u32,
            _r: 0,
        };
    }
}

/// Fills the IDT (once, on the BSP).
pub fn build_idt() {
    let stubs = unsafe { &*core::ptr::addr_of!(exception_stubs) };
    for (v, &stub) in stubs.iter().enumerate() {
        // NMI and double fault on IST1; #BP callable from ring 3 (int3 in user code reaches the handler).
        let ist = if v == 2 || v == 8 { 1 } else { 0 };
        let dpl = if v == 3 { 3 } else { 0 };
        set_gate(v, stub, ist, dpl);
    }
    set_gate(TIMER_VECTOR as usize, timer_entry as *const () as u64, 0, 0);
    set_gate(
        SPURIOUS_VECTOR as usize,
        spurious_entry as *const () as u64,
        0,
        0,
    );
    set_gate(
        crate::syscall::SYSCALL_VECTOR,
        crate::syscall::int80_address(),
        0,
        3,
    );
}

pub fn load_idt() {
    let p = cpu::DescPtr {
        limit: (256 * 16 - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &p, options(nostack)) };
}

/// Loads an empty IDT: the next exception becomes a triple fault.
pub fn load_empty_idt() {
    let p = cpu::DescPtr { limit: 0, base: 0 };
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &p, options(nostack)) };
}

/// Saved state, in the order exc_common pushes it (lowest address first).
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// Called by every exception stub. Returns only for an `int 0x80` that the host turned into #UD (PVM: "INT n"
/// from ring 3 raises #UD there): that is a system call, handled here, and execution resumes after it.
#[no_mangle]
extern "C" fn exception_handler(f: &mut Frame) {
    if f.vector == 6 && f.cs & 3 == 3 && is_int80(f.rip) {
        f.rip += 2;
        f.rax = crate::syscall::syscall_dispatch(f.rdi, f.rsi, f.rdx, f.rax);
        return;
    }
    report(f)
}

fn is_int80(rip: u64) -> bool {
    let (lo, hi) = (
        crate::paging::USER_BASE,
        crate::paging::USER_BASE + 0x20_0000 - 2,
    );
    rip >= lo && rip <= hi && unsafe { core::ptr::read_unaligned(rip as *const u16) } == 0x80cd
}

fn report(f: &Frame) -> ! {
    let v = (f.vector & 31) as usize;
    let mut l = Line::new();
    l.s("guest-exception cpu")
        .dec(cpu::apic_id_or_zero() as u64);
    l.s(": vector=").dec(f.vector).s(" ").s(NAMES[v]);
    l.s(" rip=")
        .hex(f.rip)
        .s(" error=")
        .hex(f.error)
        .s(" cr2=")
        .hex(read_cr2());
    l.s(" cs=")
        .hex(f.cs)
        .s(" rsp=")
        .hex(f.rsp)
        .s(" rflags=")
        .hex(f.rflags);
    l.print();
    crate::arch::exit(EXCEPTION_EXIT_BASE + v as u32)
}

#[no_mangle]
extern "C" fn timer_interrupt() {
    let ticks = cpu::cpu(cpu::current())
        .ticks
        .fetch_add(1, Ordering::Relaxed);
    crate::timer::storm_tick(ticks + 1);
    wrmsr(0x80b, 0); // EOI
}

core::arch::global_asm!(
    r#"
    .text
    .macro EXC vec, err
    .balign 16
exc_\vec:
    .if \err == 0
    push $0
    .endif
    push $\vec
    jmp exc_common
    .endm

    EXC 0,0
    EXC 1,0
    EXC 2,0
    EXC 3,0
    EXC 4,0
    EXC 5,0
    EXC 6,0
    EXC 7,0
    EXC 8,1
    EXC 9,0
    EXC 10,1
    EXC 11,1
    EXC 12,1
    EXC 13,1
    EXC 14,1
    EXC 15,0
    EXC 16,0
    EXC 17,1
    EXC 18,0
    EXC 19,0
    EXC 20,0
    EXC 21,1
    EXC 22,0
    EXC 23,0
    EXC 24,0
    EXC 25,0
    EXC 26,0
    EXC 27,0
    EXC 28,0
    EXC 29,1
    EXC 30,1
    EXC 31,0

exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    cld
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    xor %ebp, %ebp
    call exception_handler
    /* Returned: a system call that came in as #UD. */
    cli
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .balign 16
    .globl timer_entry
timer_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    cld
    call timer_interrupt
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    .balign 16
    .globl spurious_entry
spurious_entry:
    iretq

    .section .rodata.exception_stubs, "a", @progbits
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\v
    .endr
    .text
"#,
    options(att_syntax)
);
