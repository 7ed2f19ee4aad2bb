//! Random register, memory, breakpoint and watchpoint requests straight through the VMM's `DebugTarget` against
//! a live test guest: nothing may panic, bad requests get errors, and the target stays usable.

use gdbstub_kvm::{DebugTarget, ResumeAction, TargetError, WatchKind};
use integration_tests::guest_elf;
use vmm::debug::VmDebugTarget;
use vmm::vcpu::VcpuState;

const CR0_PG: u64 = 1 << 31;
const ITERATIONS: usize = 400;

/// xorshift64*: reproducible without a dependency; the seed is printed for replays (`FUZZ_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The guest kernel's function entries and data objects, from the real `nm`.
struct GuestSymbols {
    functions: Vec<u64>,
    data: Vec<u64>,
}

impl GuestSymbols {
    fn load() -> GuestSymbols {
        let out = std::process::Command::new("nm")
            .arg(guest_elf())
            .output()
            .expect("nm (binutils) must be installed");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut symbols = GuestSymbols {
            functions: Vec::new(),
            data: Vec::new(),
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(addr), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr < 0xffff_ffff_8000_0000 {
                continue;
            }
            match kind {
                "T" | "t" => symbols.functions.push(addr),
                "D" | "d" | "B" | "b" => symbols.data.push(addr),
                _ => {}
            }
        }
        assert!(!symbols.functions.is_empty() && !symbols.data.is_empty());
        symbols
    }

    fn pick(list: &[u64], rng: &mut Rng) -> u64 {
        list[rng.below(list.len() as u64) as usize]
    }
}

/// Any kind of address: kernel functions and data, the kernel image at random, user space, unmapped, extremes.
fn address(rng: &mut Rng, symbols: &GuestSymbols) -> u64 {
    match rng.below(8) {
        0 | 1 => GuestSymbols::pick(&symbols.functions, rng),
        2 => GuestSymbols::pick(&symbols.data, rng) + rng.below(64),
        3 => 0xffff_ffff_8010_0000 + rng.below(0x2_0000),
        4 => 0x40_0000 + rng.below(0x2000),
        5 => 0xffff_c000_0dea_d000 + rng.below(0x1000),
        6 => [0, u64::MAX - 7, 0x8000_0000_0000_0000][rng.below(3) as usize],
        _ => rng.next(),
    }
}

/// Mostly where a breakpoint or watchpoint keeps the guest alive (function entries, data), else anything.
fn sensible_address(rng: &mut Rng, symbols: &GuestSymbols, data: bool) -> u64 {
    match (rng.below(10), data) {
        (0, _) => address(rng, symbols),
        (_, false) => GuestSymbols::pick(&symbols.functions, rng),
        (_, true) => GuestSymbols::pick(&symbols.data, rng),
    }
}

fn vcpu(rng: &mut Rng, count: usize) -> usize {
    // Now and then one that does not exist.
    rng.below(count as u64 + 1) as usize
}

fn kind(rng: &mut Rng) -> WatchKind {
    [WatchKind::Write, WatchKind::Read, WatchKind::Access][rng.below(3) as usize]
}

#[test]
fn random_requests_through_the_debug_target_never_panic() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001u64);
    println!("FUZZ_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let symbols = GuestSymbols::load();

    let kvm = vmm::open_kvm().expect("/dev/kvm");
    let caps = vmm::HostCaps::probe(&kvm).expect("probe");
    let args: Vec<String> = [
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--cmdline",
        "work=kernel_spin:50,user_hot_a:50 secs=30",
        "--cpus",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = vmm::cli::parse_run_args(&args)
        .expect("arguments")
        .vm_config(Box::new(std::io::sink()))
        .expect("config");
    let (vm, _) = vmm::Vm::start(&kvm, &caps, cfg).expect("VM");
    let control = vm.control();
    let mut target = VmDebugTarget::new(vm.control(), caps);
    let count = target.vcpu_count();

    // Let the guest turn paging on so that translations succeed as well as fail.
    loop {
        target.pause_all().expect("pause");
        if target.read_registers(0).expect("registers").cr0 & CR0_PG != 0 {
            break;
        }
        target
            .resume(&[(0, ResumeAction::Continue), (1, ResumeAction::Continue)])
            .expect("resume");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let mut sw = Vec::new();
    let mut hw = Vec::new();
    let mut watches = Vec::new();
    // How many requests succeeded, per kind: a fuzz run where nothing ever succeeds tests nothing.
    let (mut reads_ok, mut sw_ok, mut watch_ok) = (0, 0, 0);
    for _ in 0..ITERATIONS {
        match rng.below(12) {
            0 => {
                let mut actions = Vec::new();
                for v in 0..count {
                    match rng.below(3) {
                        0 => actions.push((v, ResumeAction::Step)),
                        1 => actions.push((v, ResumeAction::Continue)),
                        _ => {}
                    }
                }
                if actions.is_empty() {
                    actions.push((vcpu(&mut rng, count), ResumeAction::Continue));
                }
                let _ = target.resume(&actions);
                target.pause_all().expect("pause after resume");
                while target.take_stop_event().is_some() {}
            }
            1 => {
                let v = vcpu(&mut rng, count);
                match target.read_registers(v) {
                    Ok(regs) => {
                        // A vCPU the random breakpoints crashed has left; a live one keeps what was written.
                        if target.write_registers(v, &regs).is_ok() {
                            if let Ok(again) = target.read_registers(v) {
                                assert_eq!(again.gpr, regs.gpr, "register round trip");
                            }
                        }
                    }
                    Err(e) => assert!(v >= count || !matches!(e, TargetError::NoSuchVcpu { .. })),
                }
            }
            2 | 3 => {
                let len = rng.below(5000) as usize;
                let mut buf = vec![0u8; len];
                let gva = address(&mut rng, &symbols);
                if let Ok(n) = target.read_memory(vcpu(&mut rng, count), gva, &mut buf) {
                    assert!(n <= len);
                    reads_ok += 1;
                    // Writing back what was read changes nothing in the guest.
                    let _ = target.write_memory(0, gva, &buf[..n]);
                }
            }
            4 => {
                let data: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                // Only where nothing lives: the unmapped hole (must fail) or a random address.
                let gva = 0xffff_c000_0dea_d000 + rng.below(0x1000);
                assert!(target.write_memory(0, gva, &data).is_err() || data.is_empty());
            }
            5 | 6 => {
                let gva = sensible_address(&mut rng, &symbols, false);
                // Adding an address twice is a no-op success: one removal takes it out.
                if target
                    .as_sw_breakpoints()
                    .unwrap()
                    .add_sw_breakpoint(gva)
                    .is_ok()
                {
                    sw_ok += 1;
                    if !sw.contains(&gva) {
                        sw.push(gva);
                    }
                }
            }
            7 => {
                if let Some(gva) = sw.pop() {
                    target
                        .as_sw_breakpoints()
                        .unwrap()
                        .remove_sw_breakpoint(gva)
                        .expect("remove a planted breakpoint");
                } else {
                    let gva = address(&mut rng, &symbols);
                    assert!(target
                        .as_sw_breakpoints()
                        .unwrap()
                        .remove_sw_breakpoint(gva)
                        .is_err());
                }
            }
            8 => {
                let gva = address(&mut rng, &symbols);
                let hw_bps = target.as_hw_breakpoints().unwrap();
                if rng.below(2) == 0 {
                    if hw_bps.add_hw_breakpoint(gva).is_ok() && !hw.contains(&gva) {
                        hw.push(gva);
                    }
                } else if let Some(gva) = hw.pop() {
                    hw_bps
                        .remove_hw_breakpoint(gva)
                        .expect("remove an armed hw breakpoint");
                }
                assert!(hw.len() <= 4);
            }
            9 | 10 => {
                let Some(wp) = target.as_watchpoints() else {
                    continue;
                };
                if rng.below(2) == 0 || watches.is_empty() {
                    let gva = sensible_address(&mut rng, &symbols, true);
                    let len = if rng.below(8) == 0 {
                        rng.below(9000)
                    } else {
                        1 + rng.below(16)
                    };
                    let (gva, len, k) = (gva, len, kind(&mut rng));
                    if wp.add_watchpoint(gva, len, k).is_ok() {
                        watch_ok += 1;
                        watches.push((gva, len, k));
                    }
                } else {
                    let (gva, len, k) = watches.pop().unwrap();
                    wp.remove_watchpoint(gva, len, k)
                        .expect("remove a set watchpoint");
                }
            }
            _ => {
                let _ = target.read_registers(vcpu(&mut rng, count));
            }
        }
    }

    println!("succeeded: {reads_ok} memory reads, {sw_ok} breakpoints, {watch_ok} watchpoints");
    assert!(
        reads_ok > 0 && sw_ok > 0,
        "the guest's kernel mappings were never usable"
    );

    // Clean up and prove the target still works: the guest runs on with nothing installed.
    for gva in sw {
        target
            .as_sw_breakpoints()
            .unwrap()
            .remove_sw_breakpoint(gva)
            .expect("remove");
    }
    for gva in hw {
        target
            .as_hw_breakpoints()
            .unwrap()
            .remove_hw_breakpoint(gva)
            .expect("remove");
    }
    for (gva, len, k) in watches {
        target
            .as_watchpoints()
            .unwrap()
            .remove_watchpoint(gva, len, k)
            .expect("remove");
    }
    while target.take_stop_event().is_some() {}
    let all: Vec<_> = (0..count).map(|v| (v, ResumeAction::Continue)).collect();
    target.resume(&all).expect("resume all");
    target.pause_all().expect("pause");
    // Random int3s and watched pages may have crashed the guest: then its vCPUs have left, and say so.
    for v in 0..count {
        let exited = control.vcpu_state(v) == Some(VcpuState::Exited);
        assert!(exited || target.read_registers(v).is_ok());
    }
    control.stop();
    let end = vm.run_to_end();
    println!("VM ended: {end:?}");
}
