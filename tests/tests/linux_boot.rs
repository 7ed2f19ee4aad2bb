//! Debian's stock cloud kernel under `vmm run` on this host: the banner and e820 map, both vCPUs of `--cpus 2` from
//! the ACPI MADT, and past `int3_selftest` (the VMM delivers the CPL0 int3 that PVM reports as an internal error as
//! the #BP it is; QEMU stops there).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::bins::bin;
use integration_tests::repo_root;

fn debian_vmlinux() -> std::path::PathBuf {
    let out = Command::new(repo_root().join("scripts/fetch-debian-kernel"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/fetch-debian-kernel");
    assert!(out.status.success(), "fetching Debian's kernel failed");
    String::from_utf8(out.stdout).unwrap().trim().into()
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
        let mut child = Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(kernel)
            .args(["--cmdline", "earlyprintk=serial console=ttyS0 nokaslr"])
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

#[test]
fn debian_kernel_gets_past_int3_selftest() {
    let sock = std::env::temp_dir().join(format!("linux-boot-{}.sock", std::process::id()));
    let mut vm = Booting::start(&["--control", sock.to_str().unwrap()]);
    // The last line before alternative_instructions() runs int3_selftest (slow here: CPL0 is emulated).
    vm.wait_for("x86/fpu: x87 FPU will use FXSAVE", Duration::from_secs(400));
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
        after >= 0xffff_ffff_8000_0000,
        "not in the kernel: {after:#x}"
    );
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
