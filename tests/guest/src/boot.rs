//! Boot path: the Xen PVH note, the 32-bit PVH entry (paging off, `ebx` = `hvm_start_info`), the boot page
//! tables, and the real-mode trampoline that application processors start in after INIT-SIPI-SIPI.
//!
//! Page tables (static, in `.data.pagetables`):
//! - `boot_pml4[0]`   → identity map of physical 0..4 GiB (2 MiB pages; only boot code and the trampoline use it)
//! - `boot_pml4[256]` → direct map: `DIRECT_MAP + phys` for physical 0..4 GiB
//! - `boot_pml4[511]` → kernel map: `KERNEL_VMA + phys` for physical 0..2 GiB
//!
//! Each CPU's own address space copies entries 256 and 511 and puts its user mappings in entry 0 and 255.

/// Kernel link address minus load address.
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// Base of the direct map of physical memory.
pub const DIRECT_MAP: u64 = 0xffff_8000_0000_0000;
/// Physical address the AP trampoline is copied to (SIPI vector `TRAMPOLINE >> 12`).
pub const TRAMPOLINE: u64 = 0x8000;
/// Size of every per-CPU stack; stacks are aligned to it (the CPU index sits at the stack's lowest address).
pub const STACK_SIZE: usize = 16384;
/// Most CPUs the guest runs on; more check-ins than this are parked.
pub const MAX_CPUS: usize = 32;

/// Pointer to physical memory through the direct map.
pub fn phys<T>(pa: u64) -> *mut T {
    (DIRECT_MAP + pa) as *mut T
}

/// Physical address of a kernel-image symbol.
pub fn kernel_phys<T>(p: *const T) -> u64 {
    p as u64 - KERNEL_VMA
}

extern "C" {
    pub static boot_pml4: [u64; 512];
    pub static ap_tramp_start: u8;
    pub static ap_tramp_end: u8;
    pub static ap_tramp_cr3: u32;
    pub static __ktext_start: u8;
    pub static __ktext_end: u8;
}

core::arch::global_asm!(
    r#"
    .set KOFF, 0xffffffff80000000
    .set TRAMP, 0x8000
    .set STACK_SIZE, 16384
    .set MAX_CPUS, 32

    /* 32-bit code, paging off: PAE, CR3 = \cr3 (an operand), EFER.LME|SCE, then CR0.PG|WP|PE. */
    .macro ENABLE_LONG_MODE cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov \cr3, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x101, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax
    mov %eax, %cr0
    .endm

    /* Xen PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", physical entry address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .boot.text, "ax", @progbits
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    mov %ebx, %esi
    lgdt boot_gdtr
    ljmp $0x08, $1f
1:  mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    /* Zero .bss (stacks live in .stacks and are not zeroed). */
    mov $(__bss_start - KOFF), %edi
    mov $(__bss_end - KOFF), %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    ENABLE_LONG_MODE $(boot_pml4-KOFF)
    ljmp $0x18, $boot64
    .size pvh_start32, . - pvh_start32

    .code64
boot64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    movabs $(KSTACKS + STACK_SIZE), %rsp
    xor %ebp, %ebp
    mov %esi, %edi
    movabs $kmain, %rax
    call *%rax
2:  pause
    jmp 2b

    .section .boot.data, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: code32 */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: code64 */
boot_gdtr:
    .word 31
    .long boot_gdt

    /* Boot page tables. */
    .section .data.pagetables, "aw", @progbits
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad pdpt_phys - KOFF + 3
    .fill 255, 8, 0
    .quad pdpt_phys - KOFF + 3
    .fill 254, 8, 0
    .quad pdpt_kernel - KOFF + 3
pdpt_phys:
    .quad pd_phys - KOFF + 0x0000 + 3
    .quad pd_phys - KOFF + 0x1000 + 3
    .quad pd_phys - KOFF + 0x2000 + 3
    .quad pd_phys - KOFF + 0x3000 + 3
    .fill 508, 8, 0
pdpt_kernel:
    .fill 510, 8, 0
    .quad pd_phys - KOFF + 0x0000 + 3
    .quad pd_phys - KOFF + 0x1000 + 3
pd_phys:
    .set addr, 0
    .rept 2048
    .quad addr + 0x83
    .set addr, addr + 0x200000
    .endr

    /* AP trampoline: copied to TRAMP at run time; SIPI starts the AP in real mode at CS=TRAMP>>4, IP=0. */
    .section .rodata.trampoline, "a", @progbits
    .balign 16
    .globl ap_tramp_start, ap_tramp_end, ap_tramp_cr3
    .code16
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(TRAMP + ap_tramp32 - ap_tramp_start)
    .code32
ap_tramp32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    ENABLE_LONG_MODE (TRAMP+ap_tramp_cr3-ap_tramp_start)
    ljmp $0x18, $(TRAMP + ap_tramp64 - ap_tramp_start)
    .code64
ap_tramp64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* CPU index: 1, 2, ... in check-in order. */
    mov $1, %eax
    movabs $AP_NEXT_INDEX, %rbx
    lock xadd %eax, (%rbx)
    cmp $MAX_CPUS, %eax
    jae 3f
    mov %eax, %edi
    mov %rax, %rsp
    shl $14, %rsp
    movabs $(KSTACKS + STACK_SIZE), %rax
    add %rax, %rsp
    xor %ebp, %ebp
    movabs $ap_main, %rax
    call *%rax
3:  pause
    jmp 3b
    .balign 8
ap_tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
ap_tramp_gdtr:
    .word 31
    .long TRAMP + ap_tramp_gdt - ap_tramp_start
    .balign 4
ap_tramp_cr3:
    .long 0
ap_tramp_end:
    .text
"#,
    options(att_syntax)
);
