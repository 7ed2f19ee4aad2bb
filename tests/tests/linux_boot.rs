//! Debian's stock cloud kernel under `vmm run` on this host: the banner and e820 map, both vCPUs of `--cpus 2` from
//! the ACPI MADT, the bzImage's decompressor, and the bzImage with KASLR on: `perf-kvm symbolize --vm` finds the
//! random offset, and the kernel gets past `int3_selftest` (the VMM delivers the CPL0 int3 that PVM reports as an
//! internal error as the #BP it is; QEMU stops there).

mod symbolize_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::bins::{bin, run_with_deadline};

fn debian_vmlinux() -> std::path::PathBuf {
    integration_tests::script_output("fetch-debian-kernel", &[]).into()
}

/// The bzImage `scripts/fetch-debian-kernel` caches next to the vmlinux.
fn debian_bzimage() -> std::path::PathBuf {
    debian_vmlinux().with_extension("bzImage")
}

struct Booting {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Booting {
    fn start(extra: &[&str]) -> Booting {
        Booting::start_kernel(&debian_vmlinux(), extra)
    }

    fn start_kernel(kernel: &std::path::Path, extra: &[&str]) -> Booting {
        Booting::start_kernel_with(kernel, "earlyprintk=serial console=ttyS0 nokaslr", extra)
    }

    fn start_kernel_with(kernel: &std::path::Path, cmdline: &str, extra: &[&str]) -> Booting {
        let mut child = Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(kernel)
            .args(["--cmdline", cmdline])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Booting {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a line containing `text`, failing with the log after `limit`.
    fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.log.push(line);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        panic!(
            "no {text:?} within {limit:?}; log tail:\n{}\nstderr:\n{stderr}",
            self.log.join("\n")
        );
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debian_kernel_prints_its_banner_and_e820_map() {
    let mut vm = Booting::start(&[]);
    vm.wait_for("Linux version 6.1", Duration::from_secs(60));
    vm.wait_for("Command line:", Duration::from_secs(30));
    let cmdline = vm.log.last().unwrap().clone();
    assert!(cmdline.contains("nokaslr"), "{cmdline}");
    vm.wait_for(
        "BIOS-e820: [mem 0x0000000000100000-",
        Duration::from_secs(30),
    );
    assert!(vm
        .log
        .iter()
        .any(|l| l.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable")));
    // The child is still running: the VMM did not die on anything so far.
    assert!(vm.child.try_wait().unwrap().is_none());
}

#[test]
fn debian_kernel_sees_two_vcpus_through_the_acpi_madt() {
    // Debian's kernels have no MP-table parser (CONFIG_X86_MPPARSE is off): the CPUs come from the MADT or nowhere.
    let mut vm = Booting::start(&["--cpus", "2"]);
    vm.wait_for("ACPI: RSDP 0x00000000000E0000", Duration::from_secs(120));
    vm.wait_for(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        Duration::from_secs(180),
    );
    vm.wait_for(
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        Duration::from_secs(60),
    );
    for bad in ["not listed by BIOS", "ACPI BIOS Error", "ACPI Error"] {
        assert!(
            !vm.log.iter().any(|l| l.contains(bad)),
            "{bad:?} in:\n{}",
            vm.log.join("\n")
        );
    }
    assert!(vm.child.try_wait().unwrap().is_none());
}

fn ask(sock: &std::path::Path, req: &str) -> serde_json::Value {
    let s = UnixStream::connect(sock).expect("control socket");
    let mut w = s.try_clone().unwrap();
    writeln!(w, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn internal_errors(sock: &std::path::Path) -> u64 {
    let stats = ask(sock, r#"{"v":1,"cmd":"exit_stats"}"#);
    stats["exit_stats"][0]["by_key"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[0]["reason"] == "internal_error")
        .map(|e| e[1]["count"].as_u64().unwrap())
        .sum()
}

/// Debian's bzImage with KASLR on (no `nokaslr`), which its decompressor applies: `perf-kvm symbolize --vm` takes
/// the offset from the running guest's MSR_LSTAR, and the test checks it against the guest itself (its banner
/// read with the real gdb at `linux_banner` + offset) and against binutils/llvm-symbolizer at link addresses.
/// The same boot then goes on past `int3_selftest` (the VMM delivers the CPL0 int3 that PVM reports as an internal
/// error as the #BP it is; QEMU stops there): one multi-minute boot for both.
#[test]
fn debian_bzimage_with_kaslr_symbolizes_through_lstar_and_gets_past_int3_selftest() {
    let dbg_vmlinux = symbolize_common::debian_vmlinux();
    let (payload_id, dbg_id) = (
        symbolize_common::readelf_build_id(&debian_vmlinux()),
        symbolize_common::readelf_build_id(&dbg_vmlinux),
    );
    assert_eq!(
        payload_id,
        dbg_id,
        "{} is not the bzImage's kernel (build-ids differ): fetch the -dbg package of the same ABI",
        dbg_vmlinux.display()
    );
    let linked = nm_addresses(
        &dbg_vmlinux,
        &["entry_SYSCALL_64", "linux_banner", "_text", "_end"],
    );

    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("kaslr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, gdb_sock) = (dir.join("vm.sock"), dir.join("gdb.sock"));
    let mut vm = Booting::start_kernel_with(
        &debian_bzimage(),
        "earlyprintk=serial console=ttyS0",
        &[
            "--control",
            sock.to_str().unwrap(),
            "--gdb",
            gdb_sock.to_str().unwrap(),
        ],
    );
    // Decompressing the 53 MB kernel at CPL0 takes ~60 s of vCPU time under PVM's emulator (README): generous.
    vm.wait_for("Linux version 6.1", Duration::from_secs(900));
    println!("{:?}: banner", started.elapsed());
    // The decompressor speaks only when it does not randomize ("KASLR disabled: 'nokaslr' on cmdline.",
    // "Physical KASLR disabled: no suitable memory region!"); the kernel's own memory randomization names its
    // entropy sources.
    let decompressor = vm.log.clone();
    assert!(
        !decompressor.iter().any(|l| l.contains("KASLR disabled")),
        "{decompressor:#?}"
    );
    vm.wait_for("Memory KASLR using", Duration::from_secs(120));

    // syscall_init() (trap_init → cpu_init) points MSR_LSTAR at entry_SYSCALL_64, a few seconds after the banner.
    let deadline = Instant::now() + Duration::from_secs(600);
    let lstar = loop {
        let reply = ask(&sock, r#"{"v":1,"cmd":"msr","vcpu":0,"index":3221225602}"#);
        let lstar = reply["value"].as_u64().expect("MSR_LSTAR");
        if lstar != 0 {
            break lstar;
        }
        assert!(Instant::now() < deadline, "the guest never set MSR_LSTAR");
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "the VMM exited: {:?}",
            vm.log.last()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let offset = lstar.wrapping_sub(linked["entry_SYSCALL_64"]);
    assert_eq!(offset % 0x20_0000, 0, "LSTAR {lstar:#x}: not a KASLR step");
    // KASLR may draw offset 0 (about one boot in 480): the answer is then still checked, only not told apart
    // from the link address below.
    if offset == 0 {
        println!("KASLR drew offset 0 this boot: the link-address contrast is skipped");
    }
    println!(
        "{:?}: KASLR offset {offset:#x} (LSTAR {lstar:#x})",
        started.elapsed()
    );

    // The guest itself: its banner is at the randomized address, and nothing like it at the link address.
    let banner = linked["linux_banner"];
    let out = gdb_strings(&gdb_sock, &[banner + offset, banner]);
    let at = |addr: u64| {
        out.lines()
            .find(|l| l.starts_with(&format!("{addr:#x}:")))
            .unwrap_or_else(|| panic!("gdb printed nothing at {addr:#x}:\n{out}"))
    };
    assert!(at(banner + offset).contains("\"Linux version 6.1"), "{out}");
    if offset != 0 {
        assert!(!at(banner).contains("Linux version"), "{out}");
    }

    // Where the vCPU runs now, plus addresses inside functions: `symbolize --vm` at run-time addresses must
    // answer what binutils and llvm-symbolizer answer at the link addresses.
    let functions = symbolize_common::readelf_functions(&dbg_vmlinux);
    let rips: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            ask(&sock, r#"{"v":1,"cmd":"regs","vcpu":0}"#)["regs"]["rip"]
                .as_u64()
                .unwrap()
        })
        .collect();
    for rip in &rips {
        assert!(
            (linked["_text"]..linked["_end"]).contains(&rip.wrapping_sub(offset)),
            "rip {rip:#x} outside the kernel at offset {offset:#x}"
        );
    }
    let in_sized_function = |link: u64| {
        functions
            .iter()
            .any(|(start, size, _)| (*start..start + size).contains(&link))
    };
    assert!(
        rips.iter().any(|rip| in_sized_function(rip - offset)),
        "no rip inside a sized function: {rips:x?}"
    );
    let mut link_addrs = vec![linked["entry_SYSCALL_64"]];
    link_addrs.extend(rips.iter().map(|rip| rip - offset));
    link_addrs.extend(symbolize_common::addresses_inside_functions(&functions, 40));
    let run_time: Vec<String> = link_addrs
        .iter()
        .map(|a| format!("{:#x}", a + offset))
        .collect();
    let (output, killed) = run_with_deadline(
        Command::new(symbolize_common::perf_kvm())
            .arg("symbolize")
            .arg("--guest-vmlinux")
            .arg(&dbg_vmlinux)
            .arg("--vm")
            .arg(&sock)
            .args(&run_time),
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !killed && output.status.success() && stderr.is_empty(),
        "{stderr}"
    );
    let mut ours = symbolize_common::parse_records(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(ours.len(), link_addrs.len());
    assert!(
        ours[0]
            .frames
            .first()
            .is_some_and(|f| f.function == "entry_SYSCALL_64"),
        "LSTAR: {:?}",
        ours[0]
    );
    for record in &mut ours {
        record.addr -= offset;
        record.address_text = format!("{:#018x}", record.addr);
    }
    let binutils = symbolize_common::parse_records(&symbolize_common::binutils_addr2line(
        &dbg_vmlinux,
        &link_addrs,
    ));
    let llvm = symbolize_common::parse_records(&symbolize_common::llvm_symbolizer(
        &dbg_vmlinux,
        &link_addrs,
    ));
    let comparison = symbolize_common::compare(&ours, &binutils, &llvm);
    assert_eq!(
        comparison.agreeing,
        link_addrs.len(),
        "{}",
        comparison.summary()
    );

    println!("{:?}: symbolized", started.elapsed());

    // The last line before alternative_instructions() runs int3_selftest (slow here: CPL0 is emulated).
    vm.wait_for("x86/fpu: x87 FPU will use FXSAVE", Duration::from_secs(600));
    let deadline = Instant::now() + Duration::from_secs(120);
    while internal_errors(&sock) == 0 {
        assert!(
            Instant::now() < deadline,
            "the kernel never reached int3_selftest"
        );
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "the VMM exited: {:?}",
            vm.log.last()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The int3 was recovered: the guest keeps running kernel code well past it.
    let rip = |_: ()| {
        ask(&sock, r#"{"v":1,"cmd":"regs","vcpu":0}"#)["regs"]["rip"]
            .as_u64()
            .unwrap()
    };
    let before = rip(());
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "the VMM died after the int3: {:?}",
        vm.log.last()
    );
    let after = rip(());
    assert_ne!(before, after, "the vCPU is stuck");
    assert!(
        (linked["_text"]..linked["_end"]).contains(&after.wrapping_sub(offset)),
        "not in the kernel: {after:#x}"
    );
    println!("{:?}: past int3_selftest", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Link addresses of `names` in `elf`'s symbol table, as binutils `nm` reads it.
fn nm_addresses(elf: &Path, names: &[&str]) -> HashMap<String, u64> {
    let out = Command::new("nm").arg(elf).output().expect("nm");
    assert!(out.status.success(), "nm {}", elf.display());
    let mut found = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut fields = line.split_whitespace();
        if let (Some(addr), Some(_kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        {
            if names.contains(&name) && !found.contains_key(name) {
                found.insert(name.to_owned(), u64::from_str_radix(addr, 16).unwrap());
            }
        }
    }
    for name in names {
        assert!(found.contains_key(*name), "no {name} in {}", elf.display());
    }
    found
}

/// The real gdb, attached to the running guest for a moment: `x/s` at each address, then detach.
fn gdb_strings(gdb_sock: &Path, addrs: &[u64]) -> String {
    let mut gdb = Command::new("gdb");
    gdb.args(["-batch", "-nx", "-ex", "set confirm off", "-ex"])
        .arg(format!("target remote {}", gdb_sock.display()));
    for addr in addrs {
        gdb.args(["-ex", &format!("x/s {addr:#x}")]);
    }
    gdb.args(["-ex", "detach"]);
    let (out, killed) = run_with_deadline(&mut gdb, Duration::from_secs(120));
    let text = integration_tests::bins::stdout_then_stderr(&out);
    assert!(!killed && out.status.success(), "gdb:\n{text}");
    text
}

fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}
fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

fn wait_for_socket(path: &std::path::Path, vm: &mut Booting) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "no control socket");
        assert!(vm.child.try_wait().unwrap().is_none(), "the VMM exited");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bzImage through the 64-bit boot protocol. Its decompressor runs at CPL0, which KVM's emulator interprets
/// on PVM hosts: decompressing the 53 MB kernel takes minutes there (README), so this checks what it can
/// deterministically: the setup header was taken (format, entry at the 64-bit entry point = load address + 0x200 in
/// long mode with `rsi` at the zero page), our command line reached the decompressor (it prints about `nokaslr`
/// on the serial console), and the vCPU then runs inside the decompressor on page tables of its own.
#[test]
fn debian_bzimage_enters_its_decompressor_through_the_64_bit_entry() {
    let bz = debian_bzimage();
    let image = std::fs::read(&bz).unwrap();
    assert_eq!(&image[0x202..0x206], b"HdrS");
    assert!(
        le16(&image, 0x206) >= 0x20c && image[0x236] & 1 != 0,
        "64-bit entry point"
    );
    let pref_address = le32(&image, 0x258);
    let init_size = le32(&image, 0x260);

    let dir = std::env::temp_dir().join(format!("bzimage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (control, gdb) = (dir.join("vm.sock"), dir.join("gdb.sock"));
    // --gdb-wait holds the vCPUs before their first instruction; the control socket reads them and resumes.
    let mut vm = Booting::start_kernel(
        &bz,
        &[
            "--control",
            control.to_str().unwrap(),
            "--gdb",
            gdb.to_str().unwrap(),
            "--gdb-wait",
        ],
    );
    wait_for_socket(&control, &mut vm);
    let info = ask(&control, r#"{"v":1,"cmd":"info"}"#);
    assert_eq!(
        info["info"]["kernel_format"],
        "bzImage (64-bit Linux boot protocol)"
    );
    let regs = ask(&control, r#"{"v":1,"cmd":"regs","vcpu":0}"#)["regs"].clone();
    let reg = |name: &str| {
        regs[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {regs}"))
    };
    assert_eq!(
        reg("rip"),
        0x10_0000 + 0x200,
        "startup_64 of the protected-mode image at 1 MiB"
    );
    assert_eq!(reg("rsi"), 0x7000, "boot_params");
    assert_eq!(reg("efer") & 0x500, 0x500, "long mode");
    assert!(ask(&control, r#"{"v":1,"cmd":"resume"}"#)["ok"]
        .as_bool()
        .unwrap());

    // choose_random_location() reads our command line through boot_params.hdr.cmd_line_ptr.
    vm.wait_for(
        "KASLR disabled: 'nokaslr' on cmdline.",
        Duration::from_secs(240),
    );
    let regs = ask(&control, r#"{"v":1,"cmd":"regs","vcpu":0}"#)["regs"].clone();
    let (rip, cr3) = (regs["rip"].as_u64().unwrap(), regs["cr3"].as_u64().unwrap());
    if rip >= 0xffff_ffff_8000_0000 {
        // A host that runs CPL0 code natively is through the decompressor already: the kernel proper speaks.
        vm.wait_for("Linux version 6.1", Duration::from_secs(60));
    } else {
        // The decompressor relocated itself to the end of the buffer it decompresses into and built its own
        // identity page tables.
        assert!(
            (pref_address..pref_address + init_size).contains(&rip),
            "rip {rip:#x} outside the decompression buffer {pref_address:#x}+{init_size:#x}"
        );
        assert_ne!(cr3, 0x9000, "still on the VMM's boot page tables");
    }
    assert!(vm.child.try_wait().unwrap().is_none(), "the VMM exited");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's stock bzImage, KASLR on, boots a busybox initramfs to user space on 2 vCPUs, and busybox's `poweroff -f`
/// (ACPI S5) ends the VM with status 0. Needs a host where Linux reaches user space: on PVM it never does (a ring-3
/// SYSCALL faults on `entry_SYSCALL_64`, HOST.md), so it is ignored there, and the SVM lane (`scripts/test-svm`) runs
/// it with `--include-ignored`, giving it `KVM_PROF_DEBIAN_BZIMAGE` (else `scripts/fetch-debian-kernel`'s) and
/// `KVM_PROF_BUSYBOX_INITRAMFS` (a cpio whose /init prints `l2-user-space:` and powers off; the lane builds it).
/// A boot that stops making progress fails with every vCPU's registers, never waits forever.
#[test]
#[ignore = "needs a host where Linux reaches user space (not PVM): scripts/test-svm runs it"]
fn debian_bzimage_boots_busybox_to_user_space_on_two_vcpus_and_powers_off() {
    let bzimage = std::env::var_os("KVM_PROF_DEBIAN_BZIMAGE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(debian_bzimage);
    let initramfs = std::env::var_os("KVM_PROF_BUSYBOX_INITRAMFS")
        .expect("KVM_PROF_BUSYBOX_INITRAMFS: a busybox initramfs (scripts/test-svm builds one)");
    let dir = std::env::temp_dir().join(format!("linux-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let mut vm = Booting::start_kernel_with(
        &bzimage,
        "console=ttyS0 panic=-1",
        &[
            "--cpus",
            "2",
            "--mem",
            "512",
            "--initrd",
            initramfs.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    let started = Instant::now();
    let limit = Duration::from_secs(300);
    let mut quiet_since = Instant::now();
    let status = loop {
        match vm.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                vm.log.push(line);
                quiet_since = Instant::now();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break vm.child.wait().unwrap(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // A hang: no console line for 120 s (the slowest quiet stretch seen in the lane is ~10 s) or past the limit.
        if quiet_since.elapsed() > Duration::from_secs(120) || started.elapsed() > limit {
            let regs: Vec<String> = (0..2)
                .map(|n| ask(&sock, &format!(r#"{{"v":1,"cmd":"regs","vcpu":{n}}}"#)).to_string())
                .collect();
            panic!(
                "the boot stopped making progress after {:?}; vCPU registers:\n{}\nlog:\n{}",
                started.elapsed(),
                regs.join("\n"),
                vm.log.join("\n")
            );
        }
    };
    let log = vm.log.join("\n");
    println!("{log}\n(boot to power-off: {:?})", started.elapsed());
    let cmdline = vm
        .log
        .iter()
        .find(|l| l.contains("Command line:"))
        .expect("the kernel prints its command line");
    assert!(!cmdline.contains("nokaslr"), "KASLR stays on: {cmdline}");
    assert!(log.contains("smpboot: Allowing 2 CPUs"), "{log}");
    assert!(log.contains("Run /init as init process"), "{log}");
    assert!(
        log.contains("l2-user-space: pid 1, 2 cpus online"),
        "busybox ran as pid 1 with both CPUs:\n{log}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "ACPI power-off ends the VM with 0:\n{log}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
