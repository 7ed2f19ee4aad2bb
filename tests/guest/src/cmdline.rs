//! PVH start info and the command line: `work=NAME:WEIGHT,...`, `secs=N`, `hz=N`, `fault=MODE`, `cpus=N`,
//! `slice_us=N`, `boot_only=1`, and the hostile modes (`hostile=LIST`, `storm=N`, `irqs=N`, `irq_secs=N`,
//! `seed=N`). Unknown options are reported and ignored.

use crate::boot::phys;
use crate::console::Line;
use crate::user::{NWORK, USER_COLD, USER_HOT_A, USER_HOT_B, WORK_NAMES};

pub const HVM_START_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Fault {
    None,
    Triple,
    Mmio,
    Port,
    Int3,
    PageFault,
    UserPageFault,
    Cr3PastRam,
    Cr3Huge,
    Int3Top,
}

pub const FAULT_NAMES: [(&str, Fault); 9] = [
    ("triple", Fault::Triple),
    ("mmio", Fault::Mmio),
    ("port", Fault::Port),
    ("int3", Fault::Int3),
    ("pagefault", Fault::PageFault),
    ("user-pagefault", Fault::UserPageFault),
    ("cr3-past-ram", Fault::Cr3PastRam),
    ("cr3-huge", Fault::Cr3Huge),
    ("int3-top", Fault::Int3Top),
];

/// `hostile=` modes (a bit each); see hostile.rs.
pub const HOSTILE_PORTS: u32 = 1;
pub const HOSTILE_MMIO: u32 = 2;
pub const HOSTILE_TIMER: u32 = 4;
pub const HOSTILE_BADPT: u32 = 8;
pub const HOSTILE_USER_MMIO: u32 = 16;
pub const HOSTILE_NAMES: [(&str, u32); 5] = [
    ("ports", HOSTILE_PORTS),
    ("mmio", HOSTILE_MMIO),
    ("timer", HOSTILE_TIMER),
    ("badpt", HOSTILE_BADPT),
    ("user-mmio", HOSTILE_USER_MMIO),
];

#[derive(Clone, Copy)]
pub struct Config {
    pub secs: u64,
    pub hz: u64,
    pub slice_us: u64,
    /// Expected CPU count (0: discover).
    pub cpus: u64,
    pub fault: Fault,
    /// Enter the kernel with `int 0x80` rather than `syscall`.
    pub int80: bool,
    /// HOSTILE_* bits.
    pub hostile: u32,
    /// Accesses per port or MMIO storm.
    pub storm: u64,
    /// Timer interrupts the timer storm aims for, and its time bound in seconds.
    pub irqs: u64,
    pub irq_secs: u64,
    /// Seed of the storms' random numbers.
    pub seed: u64,
    /// Exit 0 right after the command-line line: no calibration, no CPUs, no workload (boot-time benchmarks).
    pub boot_only: bool,
    pub n: usize,
    pub ids: [u64; NWORK],
    pub weights: [u64; NWORK],
}

impl Config {
    pub const DEFAULT: Config = Config {
        secs: 3,
        hz: 100,
        slice_us: 2000,
        cpus: 0,
        fault: Fault::None,
        int80: true,
        hostile: 0,
        storm: 10_000,
        irqs: 1_000_000,
        irq_secs: 20,
        seed: 1,
        boot_only: false,
        n: 3,
        ids: [USER_HOT_A, USER_HOT_B, USER_COLD, 0, 0],
        weights: [60, 30, 10, 0, 0],
    };
}

/// Every range of the PVH memory map (any type): the MMIO storm aims outside all of them.
pub static mut MEMMAP: [(u64, u64); 16] = [(0, 0); 16];
pub static mut MEMMAP_LEN: usize = 0;

pub fn memmap() -> &'static [(u64, u64)] {
    unsafe {
        &*core::ptr::slice_from_raw_parts(
            core::ptr::addr_of!(MEMMAP) as *const (u64, u64),
            MEMMAP_LEN,
        )
    }
}

pub struct Boot {
    pub rsdp: u64,
    /// Highest end of a RAM range (memmap type 1) that contains 0x600000.
    pub free_end: u64,
}

static mut CMDLINE: [u8; 1024] = [0; 1024];
static mut CMDLINE_LEN: usize = 0;

pub fn cmdline() -> &'static [u8] {
    unsafe {
        &*core::ptr::slice_from_raw_parts(core::ptr::addr_of!(CMDLINE) as *const u8, CMDLINE_LEN)
    }
}

/// Reads `hvm_start_info` at physical `pa`: copies the command line, reads the memory map.
pub fn read_start_info(pa: u64) -> Boot {
    let si = phys::<u32>(pa);
    let magic = unsafe { *si };
    if magic != HVM_START_MAGIC {
        Line::new()
            .s("guest: bad hvm_start_info magic ")
            .hex(magic as u64)
            .s(" at ")
            .hex(pa)
            .print();
        crate::arch::exit(2);
    }
    let r64 = |off: u64| unsafe { *phys::<u64>(pa + off) };
    let cmdline_pa = r64(24);
    let rsdp = r64(32);
    let memmap_pa = r64(40);
    let memmap_n = unsafe { *phys::<u32>(pa + 48) } as u64;
    if cmdline_pa != 0 {
        let mut n = 0;
        while n < 1023 {
            let c = unsafe { *phys::<u8>(cmdline_pa + n as u64) };
            if c == 0 {
                break;
            }
            unsafe { CMDLINE[n] = c };
            n += 1;
        }
        unsafe { CMDLINE_LEN = n };
    }
    let mut free_end = 0;
    let version = unsafe { *phys::<u32>(pa + 4) };
    if version >= 1 && memmap_pa != 0 {
        for i in 0..memmap_n.min(128) {
            let e = memmap_pa + i * 24;
            let (addr, size, ty) =
                unsafe { (*phys::<u64>(e), *phys::<u64>(e + 8), *phys::<u32>(e + 16)) };
            if i < 16 {
                unsafe {
                    MEMMAP[i as usize] = (addr, size);
                    MEMMAP_LEN = i as usize + 1;
                }
            }
            let free = crate::paging::FREE_START;
            if ty == 1 && addr <= free && addr + size > free {
                free_end = (addr + size).min(0x1_0000_0000);
            }
        }
    }
    Boot { rsdp, free_end }
}

fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 {
        return None;
    }
    let mut n = 0u64;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

fn bad(what: &str, v: &[u8]) -> ! {
    Line::new()
        .s("guest: bad ")
        .s(what)
        .s(" '")
        .bytes(v)
        .s("'")
        .print();
    crate::arch::exit(2)
}

fn parse_work(v: &[u8], c: &mut Config) {
    c.n = 0;
    c.ids = [0; NWORK];
    c.weights = [0; NWORK];
    for item in v.split(|&b| b == b',') {
        if item.is_empty() {
            continue;
        }
        let (name, weight) = match item.iter().position(|&b| b == b':') {
            Some(p) => (
                &item[..p],
                number(&item[p + 1..]).unwrap_or_else(|| bad("work weight", item)),
            ),
            None => (item, 1),
        };
        let id = WORK_NAMES
            .iter()
            .position(|n| n.as_bytes() == name)
            .unwrap_or_else(|| bad("work function", name));
        if weight == 0 {
            continue;
        }
        if weight > 10_000 {
            bad("work weight", item);
        }
        match c.ids[..c.n].iter().position(|&x| x == id as u64) {
            Some(j) => c.weights[j] += weight,
            None => {
                c.ids[c.n] = id as u64;
                c.weights[c.n] = weight;
                c.n += 1;
            }
        }
    }
    if c.n == 0 {
        bad("work", v);
    }
}

pub fn parse(s: &[u8]) -> Config {
    let mut c = Config::DEFAULT;
    for tok in s.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if tok.is_empty() {
            continue;
        }
        let (k, v) = match tok.iter().position(|&b| b == b'=') {
            Some(p) => (&tok[..p], &tok[p + 1..]),
            None => (tok, &tok[tok.len()..]),
        };
        match k {
            b"work" => parse_work(v, &mut c),
            b"secs" => {
                c.secs = number(v)
                    .filter(|&s| s <= 3600)
                    .unwrap_or_else(|| bad("secs", v))
            }
            b"hz" => {
                c.hz = number(v)
                    .filter(|&h| h <= 5000)
                    .unwrap_or_else(|| bad("hz", v))
            }
            b"slice_us" => {
                c.slice_us = number(v)
                    .filter(|&s| s >= 10)
                    .unwrap_or_else(|| bad("slice_us", v))
            }
            b"syscall" => {
                c.int80 = match v {
                    b"int80" => true,
                    b"syscall" => false,
                    _ => bad("syscall", v),
                }
            }
            b"cpus" => c.cpus = number(v).unwrap_or_else(|| bad("cpus", v)),
            b"hostile" => {
                for m in v.split(|&b| b == b',').filter(|m| !m.is_empty()) {
                    c.hostile |= HOSTILE_NAMES
                        .iter()
                        .find(|h| h.0.as_bytes() == m)
                        .map(|h| h.1)
                        .unwrap_or_else(|| bad("hostile", m));
                }
            }
            b"storm" => {
                c.storm = number(v)
                    .filter(|&n| n <= 100_000_000)
                    .unwrap_or_else(|| bad("storm", v))
            }
            b"irqs" => {
                c.irqs = number(v)
                    .filter(|&n| n <= 1_000_000_000)
                    .unwrap_or_else(|| bad("irqs", v))
            }
            b"irq_secs" => {
                c.irq_secs = number(v)
                    .filter(|&s| (1..=3600).contains(&s))
                    .unwrap_or_else(|| bad("irq_secs", v))
            }
            b"seed" => c.seed = number(v).unwrap_or_else(|| bad("seed", v)),
            b"boot_only" => {
                c.boot_only = number(v)
                    .filter(|&b| b <= 1)
                    .unwrap_or_else(|| bad("boot_only", v))
                    == 1
            }
            b"fault" => {
                c.fault = FAULT_NAMES
                    .iter()
                    .find(|f| f.0.as_bytes() == v)
                    .map(|f| f.1)
                    .unwrap_or_else(|| bad("fault", v))
            }
            _ => {
                Line::new()
                    .s("guest: ignoring option '")
                    .bytes(tok)
                    .s("'")
                    .print();
            }
        }
    }
    c
}

pub fn print_work(l: &mut Line, c: &Config) {
    for i in 0..c.n {
        if i > 0 {
            l.s(",");
        }
        l.s(WORK_NAMES[c.ids[i] as usize]).s(":").dec(c.weights[i]);
    }
}
