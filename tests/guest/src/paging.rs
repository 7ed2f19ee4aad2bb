//! Physical page allocation (a bump allocator above the user image) and each CPU's own address space.
//!
//! Every CPU gets its own PML4 (its own CR3): kernel halves (entries 256 and 511) shared with `boot_pml4`, the user
//! image mapped at USER_BASE (one 2 MiB page, physical = virtual, U bit, shared by all CPUs) and a private
//! 16 KiB user stack just below USER_STACK_TOP.

use crate::boot::{boot_pml4, phys};
use core::sync::atomic::{AtomicU64, Ordering};

pub const USER_BASE: u64 = 0x40_0000;
pub const USER_STACK_TOP: u64 = 0x7fff_ffff_f000;
pub const USER_STACK_PAGES: u64 = 4;
/// First physical byte the allocator hands out: after the user image's 2 MiB page.
pub const FREE_START: u64 = 0x60_0000;

static NEXT_FREE: AtomicU64 = AtomicU64::new(FREE_START);
/// End of the usable RAM range that holds FREE_START (set from the PVH memory map).
pub static FREE_END: AtomicU64 = AtomicU64::new(FREE_START + (32 << 20));

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// A zeroed 4 KiB physical page.
pub fn alloc_page() -> u64 {
    let pa = NEXT_FREE.fetch_add(4096, Ordering::Relaxed);
    if pa + 4096 > FREE_END.load(Ordering::Relaxed) {
        crate::console::println("guest: out of memory for page tables");
        crate::arch::exit(1);
    }
    unsafe {
        core::arch::asm!("rep stosq", inout("rcx") 512u64 => _, inout("rdi") phys::<u64>(pa) => _, in("rax") 0u64,
                         options(nostack, preserves_flags));
    }
    pa
}

fn table(pa: u64) -> &'static mut [u64; 512] {
    unsafe { &mut *phys::<[u64; 512]>(pa) }
}

/// Returns the table that `parent[index]` points to, creating it.
fn next(parent: u64, index: usize) -> u64 {
    let t = table(parent);
    if t[index] & P == 0 {
        t[index] = alloc_page() | P | RW | US;
    }
    t[index] & ADDR
}

pub struct UserSpace {
    pub cr3: u64,
    /// Physical address of the top stack page (USER_STACK_TOP - 4096).
    pub top_page: u64,
}

pub fn build_user_space() -> UserSpace {
    let pml4 = alloc_page();
    let t = table(pml4);
    let boot = unsafe { &*core::ptr::addr_of!(boot_pml4) };
    t[256] = boot[256];
    t[511] = boot[511];
    // User image: one 2 MiB page at USER_BASE.
    let pd = next(next(pml4, 0), 0);
    table(pd)[(USER_BASE >> 21) as usize] = USER_BASE | P | RW | US | PS;
    // Stack pages.
    let mut top_page = 0;
    for i in 1..=USER_STACK_PAGES {
        let va = USER_STACK_TOP - i * 4096;
        let pt = next(
            next(
                next(pml4, (va >> 39 & 511) as usize),
                (va >> 30 & 511) as usize,
            ),
            (va >> 21 & 511) as usize,
        );
        let page = alloc_page();
        table(pt)[(va >> 12 & 511) as usize] = page | P | RW | US;
        if i == 1 {
            top_page = page;
        }
    }
    if crate::config().hostile & crate::cmdline::HOSTILE_BADPT != 0 {
        crate::hostile::add_bad_tables(pml4);
    }
    if crate::config().hostile & crate::cmdline::HOSTILE_USER_MMIO != 0 {
        crate::hostile::add_user_mmio_windows(pml4);
    }
    UserSpace {
        cr3: pml4,
        top_page,
    }
}
