//! The one guest page walker and guest-virtual memory reader of the project.
//!
//! gdb memory access, the sampler's stack walker and crash reports all translate guest virtual addresses here, in
//! software, from guest memory alone: no vCPU ioctl (each costs ~12 µs on PVM hosts), and it works while the vCPU runs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of an entry (bits 12..51).
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    #[error("guest virtual address {gva:#x} is not mapped (level {level} entry not present)")]
    NotPresent { gva: u64, level: u8 },
    #[error("guest virtual address {gva:#x} is non-canonical")]
    NonCanonical { gva: u64 },
    #[error("page-table entry for {gva:#x} points outside guest RAM (guest physical {gpa:#x})")]
    OutsideRam { gva: u64, gpa: u64 },
    #[error("guest paging mode is not supported (32-bit paging without PAE)")]
    UnsupportedMode,
}

/// What the walker needs to know of a vCPU: enough to pick the paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingContext {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingContext {
    pub fn from_regs(regs: &crate::GuestRegisters) -> Self {
        PagingContext {
            cr0: regs.cr0,
            cr3: regs.cr3,
            cr4: regs.cr4,
            efer: regs.efer,
        }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
}

impl Translation {
    /// Bytes from the translated address to the end of its page.
    pub fn bytes_left_in_page(&self) -> u64 {
        self.page_size - (self.gpa & (self.page_size - 1))
    }
}

/// Translates one guest virtual address by walking the guest's page tables in guest memory.
pub fn translate(
    mem: &GuestMemoryMmap,
    ctx: &PagingContext,
    gva: u64,
) -> Result<Translation, PagingError> {
    if ctx.cr0 & CR0_PG == 0 {
        return Ok(Translation {
            gpa: gva,
            page_size: 4096,
            writable: true,
            user: true,
            executable: true,
        });
    }
    if ctx.cr4 & CR4_PAE == 0 {
        return Err(PagingError::UnsupportedMode);
    }
    let long_mode = ctx.efer & EFER_LMA != 0;
    let (levels, top_shift) = if !long_mode {
        (3u8, 30u32)
    } else if ctx.cr4 & CR4_LA57 != 0 {
        (5, 48)
    } else {
        (4, 39)
    };
    if long_mode {
        let va_bits = top_shift + 9;
        let sign = (gva as i64) >> (va_bits - 1);
        if sign != 0 && sign != -1 {
            return Err(PagingError::NonCanonical { gva });
        }
    }
    // PAE (legacy 3-level) tables start 32-byte aligned; long-mode tables page aligned.
    let mut table = if long_mode {
        ctx.cr3 & PTE_ADDR_MASK
    } else {
        ctx.cr3 & 0xffff_ffe0
    };
    let (mut writable, mut user, mut executable) = (true, true, true);
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level as u32 - 1);
        let index_mask = if !long_mode && level == 3 { 0x3 } else { 0x1ff };
        let index = (gva >> shift) & index_mask;
        let entry_gpa = table + index * 8;
        let entry: u64 =
            mem.read_obj(GuestAddress(entry_gpa))
                .map_err(|_| PagingError::OutsideRam {
                    gva,
                    gpa: entry_gpa,
                })?;
        if entry & PTE_PRESENT == 0 {
            return Err(PagingError::NotPresent { gva, level });
        }
        // Legacy PAE PDPTEs carry no R/W, U/S or NX bits.
        if long_mode || level != 3 {
            writable &= entry & PTE_WRITABLE != 0;
            user &= entry & PTE_USER != 0;
            executable &= entry & PTE_NX == 0;
        }
        let is_leaf =
            level == 1 || ((level == 2 || (level == 3 && long_mode)) && entry & PTE_PAGE_SIZE != 0);
        if is_leaf {
            let page_size = 1u64 << shift;
            let frame = entry & PTE_ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                gpa: frame | (gva & (page_size - 1)),
                page_size,
                writable,
                user,
                executable,
            });
        }
        table = entry & PTE_ADDR_MASK;
    }
    unreachable!("the last level is always a leaf")
}

/// Reads guest virtual memory into `buf`, page by page. Returns how many leading bytes were read: a read that runs
/// into an unmapped page (or a page outside guest RAM) returns the readable prefix; 0 means nothing was readable.
pub fn read_virt(mem: &GuestMemoryMmap, ctx: &PagingContext, gva: u64, buf: &mut [u8]) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let Ok(t) = translate(mem, ctx, gva.wrapping_add(done as u64)) else {
            break;
        };
        let chunk = (buf.len() - done).min(t.bytes_left_in_page() as usize);
        if mem
            .read_slice(&mut buf[done..done + chunk], GuestAddress(t.gpa))
            .is_err()
        {
            break;
        }
        done += chunk;
    }
    done
}

/// Writes guest virtual memory (ignoring the guest's write-protection, as a debugger does). Returns the written prefix.
pub fn write_virt(mem: &GuestMemoryMmap, ctx: &PagingContext, gva: u64, data: &[u8]) -> usize {
    let mut done = 0usize;
    while done < data.len() {
        let Ok(t) = translate(mem, ctx, gva.wrapping_add(done as u64)) else {
            break;
        };
        let chunk = (data.len() - done).min(t.bytes_left_in_page() as usize);
        if mem
            .write_slice(&data[done..done + chunk], GuestAddress(t.gpa))
            .is_err()
        {
            break;
        }
        done += chunk;
    }
    done
}

/// Reads one little-endian u64 at a guest virtual address, or None if any byte of it is unreadable.
pub fn read_virt_u64(mem: &GuestMemoryMmap, ctx: &PagingContext, gva: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    (read_virt(mem, ctx, gva, &mut b) == 8).then(|| u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PTE_PRESENT | PTE_WRITABLE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }
    fn put(m: &GuestMemoryMmap, gpa: u64, v: u64) {
        m.write_obj(v, GuestAddress(gpa)).unwrap();
    }
    fn lm(cr3: u64, la57: bool) -> PagingContext {
        PagingContext {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE | if la57 { CR4_LA57 } else { 0 },
            efer: EFER_LMA | (1 << 8),
        }
    }

    #[test]
    fn four_level_4k_2m_1g_pages() {
        let m = mem();
        // PML4 at 0x1000; higher-half 0xffff_8000_0000_0000 → PDPT 0x2000.
        put(&m, 0x1000 + 256 * 8, 0x2000 | P);
        put(&m, 0x2000, 0x4000_0000 | P | PTE_PAGE_SIZE); // 1G page → gpa 1 GiB (outside RAM: fine to translate)
        put(&m, 0x2000 + 8, 0x3000 | P); // PD
        put(&m, 0x3000, 0x20_0000 | P | PTE_PAGE_SIZE | PTE_USER); // 2M page
        put(&m, 0x3000 + 8, 0x5000 | P); // PT
        put(&m, 0x5000 + 3 * 8, 0x7000 | P | PTE_NX);
        let ctx = lm(0x1000, false);
        let base = 0xffff_8000_0000_0000u64;
        let t = translate(&m, &ctx, base + 0x1234_5678).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x4000_0000 + 0x1234_5678, 1 << 30));
        let t = translate(&m, &ctx, base + (1 << 30) + 0x12_3456).unwrap();
        assert_eq!((t.gpa, t.page_size, t.user), (0x32_3456, 2 << 20, false));
        let t = translate(&m, &ctx, base + (1 << 30) + (2 << 20) + 0x3abc).unwrap();
        assert_eq!((t.gpa, t.page_size, t.executable), (0x7abc, 4096, false));
        assert_eq!(
            translate(&m, &ctx, base + (1 << 30) + (2 << 20) + 0x4000),
            Err(PagingError::NotPresent {
                gva: base + (1 << 30) + (2 << 20) + 0x4000,
                level: 1
            })
        );
        assert!(matches!(
            translate(&m, &ctx, 0x0000_8000_0000_0000),
            Err(PagingError::NonCanonical { .. })
        ));
    }

    #[test]
    fn five_level_paging() {
        let m = mem();
        let gva = 0xff00_0000_0000_1000u64; // PML5 index 510
        put(&m, 0x1000 + ((gva >> 48) & 0x1ff) * 8, 0x2000 | P);
        put(&m, 0x2000 + ((gva >> 39) & 0x1ff) * 8, 0x3000 | P);
        put(&m, 0x3000 + ((gva >> 30) & 0x1ff) * 8, 0x4000 | P);
        put(&m, 0x4000 + ((gva >> 21) & 0x1ff) * 8, 0x5000 | P);
        put(&m, 0x5000 + ((gva >> 12) & 0x1ff) * 8, 0x9000 | P);
        assert_eq!(
            translate(&m, &lm(0x1000, true), gva + 5).unwrap().gpa,
            0x9005
        );
        // The same address is non-canonical under 4-level paging.
        assert!(matches!(
            translate(&m, &lm(0x1000, false), gva),
            Err(PagingError::NonCanonical { .. })
        ));
    }

    #[test]
    fn partial_read_stops_at_unmapped_page() {
        let m = mem();
        put(&m, 0x1000, 0x2000 | P);
        put(&m, 0x2000, 0x3000 | P);
        put(&m, 0x3000, 0x4000 | P);
        put(&m, 0x4000, 0x10000 | P); // va 0x0000 → 0x10000; va 0x1000 unmapped
        m.write_slice(&[0xab; 16], GuestAddress(0x10ff8)).unwrap();
        let ctx = lm(0x1000, false);
        let mut buf = [0u8; 32];
        assert_eq!(read_virt(&m, &ctx, 0xff8, &mut buf), 8);
        assert_eq!(&buf[..8], &[0xab; 8]);
        assert_eq!(read_virt_u64(&m, &ctx, 0xffc), None);
        assert_eq!(write_virt(&m, &ctx, 0xffc, &[1; 8]), 4);
    }

    #[test]
    fn tables_outside_ram_are_errors_not_panics() {
        let m = mem();
        put(&m, 0x1000, 0xffff_f000 | P); // PDPT far outside the 64 MiB of RAM
        let ctx = lm(0x1000, false);
        assert!(matches!(
            translate(&m, &ctx, 0x1000),
            Err(PagingError::OutsideRam { .. })
        ));
        let mut buf = [0u8; 4];
        assert_eq!(read_virt(&m, &ctx, 0x1000, &mut buf), 0);
        // A CR3 beyond RAM too.
        assert!(matches!(
            translate(&m, &lm(1 << 40, false), 0),
            Err(PagingError::OutsideRam { .. })
        ));
    }

    #[test]
    fn paging_off_is_identity() {
        let m = mem();
        let t = translate(&m, &PagingContext::default(), 0x1234).unwrap();
        assert_eq!(t.gpa, 0x1234);
    }
}
