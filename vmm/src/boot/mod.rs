//! Kernel loading and boot-protocol setup: ELF through its PVH note, ELF through the 64-bit Linux boot protocol, and
//! bzImage through the 64-bit boot protocol; initramfs, command line, e820 map, boot params, MP table, ACPI tables.

pub mod acpi;
pub mod layout;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF nor a bzImage (bad magic)")]
    UnknownFormat { path: String },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "bzImage {path} has no 64-bit entry point (boot protocol too old or XLF_KERNEL_64 clear)"
    )]
    No64BitEntry { path: String },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory above the kernel; raise --mem"
    )]
    InitrdTooBig { path: String, size: u64 },
    #[error("kernel command line is invalid or longer than {max} bytes")]
    Cmdline { max: usize },
    #[error("writing boot data into guest memory")]
    WriteMemory(#[source] vm_memory::GuestMemoryError),
    #[error("writing boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh { entry: u64 },
    /// 64-bit long mode on identity page tables, `rsi` = zero page.
    Linux64 { entry: u64 },
}

/// What the loader did; enough to start the boot vCPU and to describe the VM.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub kernel_end: u64,
    pub format: &'static str,
}

pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub num_cpus: usize,
    /// Words appended to the command line when the kernel is Linux (host workarounds such as `noxsave`).
    pub linux_workarounds: &'a [String],
}

/// Loads the kernel (and initrd) and writes every boot structure the entry protocol needs.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<LoadedKernel, BootError> {
    let kpath = cfg.kernel.display().to_string();
    let mut file = File::open(cfg.kernel).map_err(|source| BootError::OpenKernel {
        path: kpath.clone(),
        source,
    })?;
    load_image(mem, &mut file, &kpath, cfg)
}

/// [`load`] on a kernel image from any seekable reader (a file, or bytes in memory, as the fuzzer does);
/// `kpath` names it in errors, `cfg.kernel` is not opened.
pub fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    file: &mut F,
    kpath: &str,
    cfg: &BootConfig,
) -> Result<LoadedKernel, BootError> {
    let kpath = kpath.to_owned();
    let mut magic = [0u8; 0x206];
    let n = read_up_to(file, &mut magic).map_err(|source| BootError::OpenKernel {
        path: kpath.clone(),
        source,
    })?;
    let is_elf = n >= 4 && magic[..4] == *b"\x7fELF";
    let is_bzimage = n >= 0x206 && magic[0x202..0x206] == *b"HdrS";
    let load_err = |source| BootError::LoadKernel {
        path: kpath.clone(),
        source,
    };

    let notes = if is_elf {
        scan_elf_notes(file).unwrap_or_default()
    } else {
        ElfNotes::default()
    };
    let is_linux = is_bzimage || notes.linux;
    let mut words = cfg.cmdline.to_string();
    if is_linux {
        for w in cfg.linux_workarounds {
            if !words.split_whitespace().any(|x| x == *w) {
                words = format!("{words} {w}").trim().to_string();
            }
        }
    }
    let cmdline_err = || BootError::Cmdline {
        max: CMDLINE_MAX_SIZE,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| cmdline_err())?;
    if !words.is_empty() {
        cmdline.insert_str(&words).map_err(|_| cmdline_err())?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|_| cmdline_err())?;
    let cmdline_size = words.len() as u32 + 1;

    mptable::write(mem, cfg.num_cpus)?;
    let rsdp = acpi::write(mem, cfg.num_cpus)?;

    if is_elf {
        let r =
            Elf::load(mem, None, file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(load_err)?;
        let initrd = load_initrd(mem, cfg.initrd, r.kernel_end)?;
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Some(entry.0),
            _ => notes.pvh_entry,
        };
        if let Some(entry) = pvh_entry {
            write_pvh_start_info(mem, initrd, rsdp)?;
            return Ok(LoadedKernel {
                entry: EntryPoint::Pvh { entry },
                kernel_end: r.kernel_end,
                format: "ELF (PVH entry)",
            });
        }
        let mut hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            type_of_loader: 0xff,
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        };
        hdr.version = 0x020f;
        write_zero_page(mem, hdr, cmdline_size, initrd, rsdp)?;
        write_long_mode_tables(mem)?;
        Ok(LoadedKernel {
            entry: EntryPoint::Linux64 {
                entry: r.kernel_load.0,
            },
            kernel_end: r.kernel_end,
            format: "ELF (64-bit Linux boot protocol)",
        })
    } else if is_bzimage {
        let r = BzImage::load(mem, None, file, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(load_err)?;
        let mut hdr = r.setup_header.ok_or_else(|| BootError::No64BitEntry {
            path: kpath.clone(),
        })?;
        // 64-bit entry exists from protocol 2.12 with XLF_KERNEL_64 (bit 0 of xloadflags).
        if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
            return Err(BootError::No64BitEntry { path: kpath });
        }
        hdr.type_of_loader = 0xff;
        hdr.loadflags |= 0x80; // CAN_USE_HEAP
        hdr.heap_end_ptr = 0xfe00;
        let initrd = load_initrd(mem, cfg.initrd, r.kernel_end)?;
        write_zero_page(mem, hdr, cmdline_size, initrd, rsdp)?;
        write_long_mode_tables(mem)?;
        Ok(LoadedKernel {
            entry: EntryPoint::Linux64 {
                entry: r.kernel_load.0 + 0x200,
            },
            kernel_end: r.kernel_end,
            format: "bzImage (64-bit Linux boot protocol)",
        })
    } else {
        Err(BootError::UnknownFormat { path: kpath })
    }
}

/// What the ELF notes say about a kernel.
#[derive(Debug, Default, PartialEq, Eq)]
struct ElfNotes {
    /// A note owned by "Linux" (every vmlinux has LINUX_ELFNOTE notes).
    linux: bool,
    /// XEN_ELFNOTE_PHYS32_ENTRY, from whichever PT_NOTE segment holds it (linux-loader only looks at the last one).
    pvh_entry: Option<u64>,
}

const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn scan_elf_notes<R: Read + Seek>(file: &mut R) -> std::io::Result<ElfNotes> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let phoff = le64(&ehdr[32..40]);
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]).min(64) as u64;
    let mut found = ElfNotes::default();
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        file.read_exact(&mut ph)?;
        if le32(&ph[0..4]) != 4 {
            continue; // not PT_NOTE
        }
        let size = le64(&ph[32..40]).min(1 << 16) as usize;
        let mut notes = vec![0u8; size];
        file.seek(SeekFrom::Start(le64(&ph[8..16])))?;
        file.read_exact(&mut notes)?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let namesz = le32(&notes[p..p + 4]) as usize;
            let descsz = le32(&notes[p + 4..p + 8]) as usize;
            let kind = le32(&notes[p + 8..p + 12]);
            let name = notes.get(p + 12..p + 12 + namesz).unwrap_or_default();
            let desc_at = p + 12 + namesz.div_ceil(4) * 4;
            let desc = notes.get(desc_at..desc_at + descsz).unwrap_or_default();
            if name.starts_with(b"Linux") {
                found.linux = true;
            }
            if name.starts_with(b"Xen") && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                found.pvh_entry = match desc.len() {
                    4 => Some(le32(desc) as u64),
                    8 => Some(le64(desc)),
                    _ => found.pvh_entry,
                };
            }
            p = desc_at + descsz.div_ceil(4) * 4;
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(found)
}

fn read_up_to<R: Read + Seek>(file: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Places the initrd page-aligned at the top of the first RAM range, above the kernel. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: Option<&Path>,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = initrd else { return Ok(None) };
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: p.clone(),
        source,
    })?;
    let size = data.len() as u64;
    let top = first_range_end(mem);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end && addr >= HIGH_MEMORY_START => {
            mem.write_slice(&data, GuestAddress(addr))
                .map_err(BootError::WriteMemory)?;
            Ok(Some((addr, size)))
        }
        _ => Err(BootError::InitrdTooBig { path: p, size }),
    }
}

fn first_range_end(mem: &GuestMemoryMmap) -> u64 {
    let mut end = 0;
    for region in mem.iter() {
        if region.start_addr().0 == 0 {
            end = region.start_addr().0 + region.len();
        }
    }
    end
}

/// e820 map: low RAM below the EBDA, reserved EBDA..1 MiB, then RAM around the MMIO hole.
fn e820_entries(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, 1),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, 2),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIGH_MEMORY_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            v.push((start, end - start, 1));
        }
    }
    v
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_entries(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        nr_modules: initrd.is_some() as u32,
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Configure)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: setup_header,
    cmdline_size: u32,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut bp = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
    bp.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    let entries = e820_entries(mem);
    for (i, (addr, size, type_)) in entries.iter().enumerate() {
        bp.e820_table[i].addr = *addr;
        bp.e820_table[i].size = *size;
        bp.e820_table[i].r#type = *type_;
    }
    bp.e820_entries = entries.len() as u8;
    let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Configure)
}

/// GDT (null, null, code64 @0x10, data @0x18, tss @0x20) and identity page tables for the first 4 GiB.
pub(crate) fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: [u64; 5] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(BootError::WriteMemory)?;
    }
    mem.write_obj(PDPT_START | 3, GuestAddress(PML4_START))
        .map_err(BootError::WriteMemory)?;
    for pd in 0..4u64 {
        let pd_addr = PD_START + pd * 0x1000;
        mem.write_obj(pd_addr | 3, GuestAddress(PDPT_START + pd * 8))
            .map_err(BootError::WriteMemory)?;
        for i in 0..512u64 {
            let entry = ((pd << 30) + (i << 21)) | 0x83;
            mem.write_obj(entry, GuestAddress(pd_addr + i * 8))
                .map_err(BootError::WriteMemory)?;
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: (!long) as u8,
        s: 1,
        l: long as u8,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Register state of the boot vCPU at the kernel's entry, applied over the vCPU's reset `sregs`.
pub fn boot_cpu_state(entry: EntryPoint, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let tss = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        selector: 0x20,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
            sregs.cs = segment(0x10, 0xb, false);
            let data = segment(0x18, 0x3, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = tss;
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            sregs.gdt.base = GDT_START;
            sregs.gdt.limit = 5 * 8 - 1;
            sregs.cs = segment(0x10, 0xb, true);
            let data = segment(0x18, 0x3, false);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = tss;
            sregs.cr3 = PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LME | LMA
        }
    }
    (regs, sregs)
}
