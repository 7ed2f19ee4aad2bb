//! The test guest: a freestanding x86-64 kernel that boots through the Xen PVH entry, brings up every vCPU, runs a
//! weighted ring-3/ring-0 workload for `secs` seconds and prints the ground truth (see docs/test-guest.md).
#![no_std]
#![no_main]
#![allow(non_upper_case_globals)]

mod arch;
mod boot;
mod cmdline;
mod console;
mod cpu;
mod fault;
mod hostile;
mod interrupts;
mod mem;
mod paging;
mod smp;
mod syscall;
mod timer;
mod user;
mod workload;

use crate::arch::{exit, outb, rdtsc, PORT_WRITES};
use crate::boot::{phys, MAX_CPUS};
use crate::cmdline::{Config, Fault};
use crate::console::{println, Line};
use crate::user::{UserConfig, UserResult, NWORK, WORK_NAMES};
use core::sync::atomic::{AtomicU64, Ordering};

pub const EXIT_OK: u32 = 0;
pub const EXIT_NO_X2APIC: u32 = 5;
pub const EXIT_TIMEOUT: u32 = 6;

static mut CONFIG: Config = Config::DEFAULT;
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static LAPIC_HZ: AtomicU64 = AtomicU64::new(0);
static NCPUS: AtomicU64 = AtomicU64::new(1);

fn config() -> &'static Config {
    unsafe { &*core::ptr::addr_of!(CONFIG) }
}

#[no_mangle]
pub extern "C" fn kmain(start_info: u32) -> ! {
    console::init();
    println("guest: test guest booting (PVH)");
    let boot = cmdline::read_start_info(start_info as u64);
    if boot.free_end > paging::FREE_START {
        paging::FREE_END.store(boot.free_end, Ordering::Relaxed);
    }
    Line::new()
        .s("guest: cmdline \"")
        .bytes(cmdline::cmdline())
        .s("\"")
        .print();
    unsafe { CONFIG = cmdline::parse(cmdline::cmdline()) };
    let cfg = config();
    if cfg.boot_only {
        println("guest: boot_only: exit 0");
        exit(0);
    }

    // Legacy PICs fully masked: only the LAPIC timer interrupts.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    if !cpu::has_x2apic() {
        println("guest: the CPU has no x2APIC (CPUID.1:ECX[21]); it is required");
        exit(EXIT_NO_X2APIC);
    }
    interrupts::build_idt();
    cpu::init(0);

    let (tsc_hz, src) = timer::calibrate_tsc();
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    let lapic_hz = timer::calibrate_lapic(tsc_hz);
    LAPIC_HZ.store(lapic_hz, Ordering::Relaxed);
    let src = match src {
        timer::TscSource::Pit => "pit",
        timer::TscSource::Cpuid => "cpuid",
        timer::TscSource::Guess => "guess",
    };
    Line::new()
        .s("guest: tsc_hz=")
        .dec(tsc_hz)
        .s(" (")
        .s(src)
        .s(") lapic_hz=")
        .dec(lapic_hz)
        .print();

    let (expected, how) = smp::expected_cpus(cfg.cpus, boot.rsdp);
    let n = smp::start_aps(expected, tsc_hz);
    NCPUS.store(n as u64, Ordering::Relaxed);
    let mut l = Line::new();
    l.s("guest: cpus=")
        .dec(n as u64)
        .s(" expected=")
        .dec(expected as u64)
        .s(" (")
        .s(how.name())
        .s(") apic_ids=");
    let mut first = true;
    for i in 0..MAX_CPUS {
        if participates(i) {
            l.s(if first { "" } else { "," })
                .dec(cpu::cpu(i).apic_id.load(Ordering::Relaxed) as u64);
            first = false;
        }
    }
    l.print();

    fault::run(cfg.fault);
    hostile::run(cfg, tsc_hz, lapic_hz);
    if cfg.hostile & cmdline::HOSTILE_BADPT != 0 {
        hostile::print_bad_tables();
    }

    let mut l = Line::new();
    l.s("guest: workload start secs=")
        .dec(cfg.secs)
        .s(" hz=")
        .dec(cfg.hz)
        .s(" work=");
    cmdline::print_work(&mut l, cfg);
    l.print();
    smp::GO.store(true, Ordering::Release);
    run_worker(0)
}

fn participates(idx: usize) -> bool {
    idx == 0 || cpu::cpu(idx).state.load(Ordering::Acquire) == cpu::STATE_READY
}

#[no_mangle]
pub extern "C" fn ap_main(idx: u32) -> ! {
    let idx = idx as usize;
    cpu::init(idx);
    if smp::check_in(idx) {
        while !smp::GO.load(Ordering::Acquire) {
            arch::pause();
        }
        run_worker(idx)
    }
    park()
}

fn park() -> ! {
    loop {
        arch::pause();
    }
}

/// Builds this CPU's address space and enters its ring-3 worker.
fn run_worker(idx: usize) -> ! {
    let cfg = config();
    let tsc_hz = TSC_HZ.load(Ordering::Relaxed);
    let us = paging::build_user_space();
    let c = cpu::cpu(idx);
    c.user_cr3 = us.cr3;
    // UserConfig 1 KiB below the stack top; the worker's stack starts below it, with a zero return address.
    let cfg_va = paging::USER_STACK_TOP - 512;
    let rsp = paging::USER_STACK_TOP - 1024 - 8;
    let page_off = |va: u64| va - (paging::USER_STACK_TOP - 4096);
    let ucfg = UserConfig {
        cpu: c.apic_id.load(Ordering::Relaxed) as u64,
        run_ticks: cfg.secs * tsc_hz,
        slice_ticks: (cfg.slice_us * (tsc_hz / 1000) / 1000).max(1),
        n: cfg.n as u64,
        ids: cfg.ids,
        weights: cfg.weights,
        fault: (cfg.fault == Fault::UserPageFault && idx == 0) as u64,
        int80: cfg.int80 as u64,
        wild: hostile::wild_frames(idx),
        mmio_accesses: if cfg.hostile & cmdline::HOSTILE_USER_MMIO != 0 && idx == 0 {
            cfg.storm
        } else {
            0
        },
        mmio_va: hostile::USER_MMIO_VA,
        mmio_seed: cfg.seed,
    };
    unsafe {
        *phys::<UserConfig>(us.top_page + page_off(cfg_va)) = ucfg;
        *phys::<u64>(us.top_page + page_off(rsp)) = 0;
    }
    timer::start(LAPIC_HZ.load(Ordering::Relaxed), cfg.hz);
    let entry = user_entry_address();
    unsafe {
        arch::write_cr3(us.cr3);
        core::arch::asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x202",
            "push {cs}",
            "push {rip}",
            "xor ebp, ebp",
            "iretq",
            ss = in(reg) cpu::USER_DS as u64,
            rsp = in(reg) rsp,
            cs = in(reg) cpu::USER_CS as u64,
            rip = in(reg) entry,
            in("rdi") cfg_va,
            options(noreturn),
        );
    }
}

/// Absolute address of `user_main` (a RIP-relative reference from the kernel could not reach 0x400000).
fn user_entry_address() -> u64 {
    let a: u64;
    unsafe {
        core::arch::asm!("movabs {}, offset {}", out(reg) a, sym user::user_main, options(nomem, nostack))
    };
    a
}

fn user_counter_value() -> u64 {
    let a: u64;
    unsafe {
        core::arch::asm!("movabs {}, offset {}", out(reg) a, sym user::user_counter, options(nomem, nostack))
    };
    unsafe { (*phys::<AtomicU64>(a)).load(Ordering::Relaxed) }
}

/// SYS_DONE: the worker on this CPU has finished.
pub fn worker_done(res: UserResult) -> ! {
    timer::stop();
    let idx = cpu::current();
    let c = cpu::cpu(idx);
    c.result = res;
    c.done.store(true, Ordering::Release);
    if idx != 0 {
        park();
    }
    finish()
}

/// BSP: waits for every worker, prints the truth lines and exits 0.
fn finish() -> ! {
    let cfg = config();
    let tsc_hz = TSC_HZ.load(Ordering::Relaxed);
    let t0 = rdtsc();
    while (0..MAX_CPUS).any(|i| participates(i) && !cpu::cpu(i).done.load(Ordering::Acquire)) {
        if rdtsc() - t0 > 5 * tsc_hz {
            println("guest: timed out waiting for workers");
            exit(EXIT_TIMEOUT);
        }
        arch::pause();
    }
    // Truth lines in APIC ID order.
    let mut total = [0u64; NWORK];
    let mut order = [0usize; MAX_CPUS];
    let mut n = 0;
    for i in 0..MAX_CPUS {
        if participates(i) {
            order[n] = i;
            n += 1;
        }
    }
    let order = &mut order[..n];
    order.sort_unstable_by_key(|&i| cpu::cpu(i).apic_id.load(Ordering::Relaxed));
    for &i in order.iter() {
        let c = cpu::cpu(i);
        let mut l = Line::new();
        l.s("guest-truth cpu")
            .dec(c.apic_id.load(Ordering::Relaxed) as u64)
            .s(":");
        truth(&mut l, cfg, &c.result.spent);
        l.print();
        for (t, s) in total.iter_mut().zip(c.result.spent.iter()) {
            *t += s;
        }
    }
    let mut l = Line::new();
    l.s("guest-truth:");
    truth(&mut l, cfg, &total);
    l.print();
    for &i in order.iter() {
        let c = cpu::cpu(i);
        let mut l = Line::new();
        l.s("guest-stats cpu")
            .dec(c.apic_id.load(Ordering::Relaxed) as u64)
            .s(": ticks=")
            .dec(c.ticks.load(Ordering::Relaxed));
        for j in 0..cfg.n {
            let k = cfg.ids[j] as usize;
            l.s(" ")
                .s(WORK_NAMES[k])
                .s("_ms=")
                .dec(c.result.spent[k] / (tsc_hz / 1000).max(1));
            l.s(" ")
                .s(WORK_NAMES[k])
                .s("_slices=")
                .dec(c.result.slices[k]);
        }
        l.print();
    }
    Line::new()
        .s("guest-counters: user_counter=")
        .dec(user_counter_value())
        .s(" kernel_counter=")
        .dec(workload::kernel_counter.load(Ordering::Relaxed))
        .print();
    print_io_and_exit()
}

/// Percent of the workload functions' measured TSC time, one decimal, in command-line order.
fn truth(l: &mut Line, cfg: &Config, spent: &[u64; NWORK]) {
    let sum: u64 = (0..cfg.n).map(|j| spent[cfg.ids[j] as usize]).sum();
    for j in 0..cfg.n {
        let k = cfg.ids[j] as usize;
        l.s(" ").s(WORK_NAMES[k]).s("=").pct(spent[k], sum);
    }
}

/// Prints `guest-io: port_writes=N pit_pic_writes=M` and exits. N counts every port write of the run: all before
/// this line, the line's own bytes (one `out` each, newline included) and the final 32-bit write to the exit port.
/// M is the part of N that went to the PIT and PIC ports (all of it before this line).
fn print_io_and_exit() -> ! {
    const PREFIX: &str = "guest-io: port_writes=";
    const MIDDLE: &str = " pit_pic_writes=";
    let before = PORT_WRITES.load(Ordering::Relaxed);
    let pit_pic = arch::PIT_PIC_WRITES.load(Ordering::Relaxed);
    let fixed = (PREFIX.len() + MIDDLE.len() + Line::new().dec(pit_pic).len() + 1) as u64; // + newline
    let mut total = before;
    for digits in 1..=20u64 {
        total = before + fixed + digits + 1; // + the exit write
        if Line::new().dec(total).len() as u64 == digits {
            break;
        }
    }
    Line::new()
        .s(PREFIX)
        .dec(total)
        .s(MIDDLE)
        .dec(pit_pic)
        .print();
    exit(EXIT_OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = Line::new();
    l.s("guest-panic:");
    if let Some(loc) = info.location() {
        l.s(" ").s(loc.file()).s(":").dec(loc.line() as u64);
    }
    if let Some(m) = info.message().as_str() {
        l.s(" ").s(m);
    }
    l.print();
    exit(1)
}
