//! `syscall` entry (LSTAR) and dispatch. Calls: rax = number, rdi/rsi/rdx = arguments, rax = result; every
//! caller-saved register may be clobbered.
//!
//! | nr | name            | arguments     | effect                                                       |
//! |----|-----------------|---------------|--------------------------------------------------------------|
//! | 1  | write           | ptr, len      | bytes to COM1 (user memory only)                              |
//! | 2  | exit            | status        | exits the VM with `status`                                   |
//! | 3  | kernel_spin     | ticks         | runs `kernel_spin(ticks)` in ring 0, interrupts enabled      |
//! | 4  | done            | &UserResult   | the worker has finished: records the result, never returns    |
//! | 5  | user_mmio_done  | reads, ones, ticks | `hostile=user-mmio` finished: prints its line             |

use crate::arch::{cli, sti};
use crate::user::{UserResult, SYS_DONE, SYS_EXIT, SYS_KERNEL_SPIN, SYS_USER_MMIO_DONE, SYS_WRITE};

extern "C" {
    fn syscall_entry();
    fn int80_entry();
}

pub const SYSCALL_VECTOR: usize = 0x80;

/// LSTAR target.
pub fn entry_address() -> u64 {
    syscall_entry as *const () as u64
}

/// IDT entry for `int 0x80` (DPL 3).
pub fn int80_address() -> u64 {
    int80_entry as *const () as u64
}

core::arch::global_asm!(
    r#"
    .text
    .balign 16
    .globl syscall_entry
syscall_entry:
    swapgs
    mov %rsp, %gs:8
    mov %gs:0, %rsp
    pushq %gs:8
    push %r11
    push %rcx
    push %rbp
    xor %ebp, %ebp
    mov %rax, %rcx
    call syscall_dispatch
    cli
    pop %rbp
    pop %rcx
    pop %r11
    pop %rsp
    swapgs
    sysretq

    /* int 0x80: the CPU has switched to TSS.RSP0 and pushed SS, RSP, RFLAGS, CS, RIP. */
    .balign 16
    .globl int80_entry
int80_entry:
    push %rbp
    xor %ebp, %ebp
    mov %rax, %rcx
    call syscall_dispatch
    cli
    pop %rbp
    iretq
"#,
    options(att_syntax)
);

fn user_range_ok(ptr: u64, len: u64) -> bool {
    let (lo, hi) = (crate::paging::USER_BASE, crate::paging::USER_STACK_TOP);
    ptr >= lo && len <= hi - lo && ptr <= hi - len
}

#[no_mangle]
pub extern "C" fn syscall_dispatch(a0: u64, a1: u64, _a2: u64, nr: u64) -> u64 {
    match nr {
        SYS_WRITE => {
            if !user_range_ok(a0, a1) {
                return u64::MAX;
            }
            crate::console::write_bytes(unsafe {
                core::slice::from_raw_parts(a0 as *const u8, a1 as usize)
            });
            a1
        }
        SYS_EXIT => crate::arch::exit(a0 as u32),
        SYS_KERNEL_SPIN => {
            sti();
            let r = crate::workload::kernel_spin(a0);
            cli();
            r
        }
        SYS_USER_MMIO_DONE => {
            crate::hostile::user_mmio_report(a0, a1, _a2);
            0
        }
        SYS_DONE => {
            let res = if user_range_ok(a0, core::mem::size_of::<UserResult>() as u64) {
                unsafe { core::ptr::read_unaligned(a0 as *const UserResult) }
            } else {
                UserResult::ZERO
            };
            crate::worker_done(res)
        }
        _ => u64::MAX,
    }
}
