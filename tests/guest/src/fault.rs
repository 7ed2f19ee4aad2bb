//! `fault=MODE`: deliberate failures for the reliability tests, run on the BSP after SMP bring-up.
//!
//! | mode             | what the guest does                                              | expected end              |
//! |------------------|------------------------------------------------------------------|---------------------------|
//! | `triple`         | loads an empty IDT, executes `ud2`                               | triple fault (shutdown)   |
//! | `mmio`           | writes 0xdeadbeef to physical 0xd0000000 (unbacked), reads back  | prints both, exit 3       |
//! | `port`           | writes 0x5a to port 0x5678 (no device), reads it back            | prints both, exit 4       |
//! | `int3`           | `int3` in ring 0                                                 | #BP handler, exit 35      |
//! | `pagefault`      | ring-0 read of unmapped 0xffffc0000dead000                       | #PF handler, exit 46      |
//! | `user-pagefault` | the ring-3 worker reads unmapped 0xdead000                       | #PF handler, exit 46      |
//! | `cr3-past-ram`   | loads CR3 with the first page past the end of RAM                | the VMM's crash report    |
//! | `cr3-huge`       | loads CR3 with the highest page MAXPHYADDR allows                | the VMM's crash report    |
//! | `int3-top`       | `int3` in ring 0 at the very last byte of the address space      | #BP handler (rip=0), exit 35 |

use crate::arch::{exit, inb, outb};
use crate::boot::phys;
use crate::cmdline::Fault;
use crate::console::{println, Line};

pub const MMIO_FAULT_PA: u64 = 0xd000_0000;
pub const PORT_FAULT: u16 = 0x5678;
pub const KERNEL_FAULT_ADDR: u64 = 0xffff_c000_0dea_d000;
pub const EXIT_MMIO: u32 = 3;
pub const EXIT_PORT: u32 = 4;

/// Runs the kernel-side fault modes (never returns for them); `user-pagefault` happens in the worker.
pub fn run(f: Fault) {
    match f {
        Fault::None | Fault::UserPageFault => return,
        Fault::Triple => {
            println("guest-fault: triple: empty IDT, then ud2");
            crate::interrupts::load_empty_idt();
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        Fault::Mmio => {
            let p = phys::<u32>(MMIO_FAULT_PA);
            unsafe { core::ptr::write_volatile(p, 0xdead_beef) };
            let v = unsafe { core::ptr::read_volatile(p) };
            Line::new()
                .s("guest-fault: mmio addr=")
                .hex(MMIO_FAULT_PA)
                .s(" wrote=0xdeadbeef read=")
                .hex(v as u64)
                .print();
            exit(EXIT_MMIO);
        }
        Fault::Port => {
            outb(PORT_FAULT, 0x5a);
            let v = inb(PORT_FAULT);
            Line::new()
                .s("guest-fault: port port=")
                .hex(PORT_FAULT as u64)
                .s(" wrote=0x5a read=")
                .hex(v as u64)
                .print();
            exit(EXIT_PORT);
        }
        Fault::Int3 => {
            println("guest-fault: int3 in ring 0");
            unsafe { core::arch::asm!("int3", options(nomem, nostack)) };
        }
        Fault::Cr3PastRam | Fault::Cr3Huge => {
            let pa = if f == Fault::Cr3PastRam {
                crate::hostile::ram_end().next_multiple_of(4096)
            } else {
                (1u64 << crate::hostile::phys_bits()) - 4096
            };
            Line::new()
                .s("guest-fault: loading cr3=")
                .hex(pa)
                .s(" (outside guest RAM)")
                .print();
            // Nothing maps the next instruction any more: whatever the CPU does next, the guest cannot go on.
            unsafe { crate::arch::write_cr3(pa) };
        }
        Fault::Int3Top => {
            // Map a RAM page at the top 4 KiB of the address space (PML4[511] → PDPT[511] → a new PD → a new PT),
            // put `int3` in its last byte and jump there: the instruction after it is at address 0.
            use crate::paging::alloc_page;
            let table = |pa: u64| unsafe { &mut *phys::<[u64; 512]>(pa) };
            let pml4 = crate::arch::read_cr3() & !0xfff;
            let pdpt = table(pml4)[511] & 0x000f_ffff_ffff_f000;
            let (pd, pt, page) = (alloc_page(), alloc_page(), alloc_page());
            table(pt)[511] = page | 3;
            table(pd)[511] = pt | 3;
            table(pdpt)[511] = pd | 3;
            unsafe {
                *phys::<u8>(page + 0xfff) = 0xcc;
                crate::arch::write_cr3(crate::arch::read_cr3());
            }
            println("guest-fault: int3 at 0xffffffffffffffff in ring 0");
            unsafe { core::arch::asm!("jmp {}", in(reg) u64::MAX, options(nomem, nostack)) };
        }
        Fault::PageFault => {
            Line::new()
                .s("guest-fault: pagefault: ring-0 read of ")
                .hex(KERNEL_FAULT_ADDR)
                .print();
            let v = unsafe { core::ptr::read_volatile(KERNEL_FAULT_ADDR as *const u64) };
            Line::new()
                .s("guest-fault: pagefault: read returned ")
                .hex(v)
                .print();
        }
    }
    // A fault that did not stop the guest.
    println("guest-fault: the fault did not stop the guest");
    exit(1);
}
