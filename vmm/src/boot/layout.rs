//! Guest physical memory layout used at boot. Everything the VMM writes lives below 1 MiB, away from the kernel.

/// GDT for the 64-bit Linux boot protocol (__BOOT_CS = 0x10, __BOOT_DS = 0x18).
pub const GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6e00;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for the 64-bit boot protocol: PML4, PDPT, then four page directories (4 GiB of 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Initial stack for the 64-bit boot protocol (grows down from here).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// MP floating pointer and configuration table, in the EBDA where firmware puts them.
pub const MPTABLE_START: u64 = 0x9fc00;
pub const EBDA_START: u64 = 0x9fc00;
/// BIOS data area words firmware fills: the EBDA segment and the base memory size in KiB (what MP-table scanners read).
pub const BDA_EBDA_SEGMENT: u64 = 0x40e;
pub const BDA_BASE_MEMORY_KIB: u64 = 0x413;
/// ACPI tables, RSDP first, in the BIOS area where OSes scan for it (0xE0000–0xFFFFF).
pub const ACPI_START: u64 = 0xe0000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of high memory: kernels load at or above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: RAM above this moves to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Local APIC and I/O APIC (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Guest RAM ranges for `mem_size` bytes, split around the 32-bit MMIO hole.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}
