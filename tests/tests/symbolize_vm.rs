//! `perf-kvm symbolize --vm SOCKET` refusals, on the test guest under `vmm run --control`: a guest that has not
//! set MSR_LSTAR yet (its vCPU held before its first instruction), an ELF without `entry_SYSCALL_64`, a vmlinux
//! that is not the guest's kernel (LSTAR − `entry_SYSCALL_64` is not a KASLR step), and no VM at the socket. Each
//! is one error line on stderr, nothing on stdout, exit status 1. The working case, a KASLR'd Debian kernel, is
//! in linux_boot.rs (`debian_bzimage_with_kaslr_symbolizes_through_lstar_and_gets_past_int3_selftest`).

mod symbolize_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bins::{bin, run_with_deadline};
use integration_tests::guest_elf;

const MSR_LSTAR: u32 = 0xc000_0082;

/// A test guest under `vmm run --control`, held before its first instruction by `--gdb-wait`.
struct HeldGuest {
    child: Child,
    dir: PathBuf,
    control: PathBuf,
}

impl HeldGuest {
    fn start() -> HeldGuest {
        let dir = std::env::temp_dir().join(format!("symbolize-vm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (control, gdb) = (dir.join("vm.sock"), dir.join("gdb.sock"));
        let mut child = Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(guest_elf())
            .args(["--cmdline", "work=user_hot_a:100 secs=120"])
            .arg("--control")
            .arg(&control)
            .arg("--gdb")
            .arg(&gdb)
            .arg("--gdb-wait")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm");
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&control).is_err() {
            assert!(Instant::now() < deadline, "no control socket");
            assert!(child.try_wait().unwrap().is_none(), "the VMM exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        HeldGuest {
            child,
            dir,
            control,
        }
    }

    fn ask(&self, request: serde_json::Value) -> serde_json::Value {
        let stream = UnixStream::connect(&self.control).expect("control socket");
        writeln!(&stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["ok"], true, "{request} → {reply}");
        reply
    }

    fn lstar(&self) -> u64 {
        self.ask(serde_json::json!({"v": 1, "cmd": "msr", "vcpu": 0, "index": MSR_LSTAR}))["value"]
            .as_u64()
            .expect("KVM knows MSR_LSTAR")
    }
}

impl Drop for HeldGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `perf-kvm symbolize --guest-vmlinux ELF --vm SOCKET ADDR`, expecting a refusal; its one stderr line.
fn refusal(elf: &Path, socket: &Path) -> String {
    let (out, killed) = run_with_deadline(
        Command::new(symbolize_common::perf_kvm())
            .arg("symbolize")
            .arg("--guest-vmlinux")
            .arg(elf)
            .arg("--vm")
            .arg(socket)
            .arg("0xffffffff81000000"),
        Duration::from_secs(120),
    );
    assert!(!killed, "perf-kvm symbolize hung");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "no output on a refusal: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("perf-kvm: "), "{stderr:?}");
    stderr
}

#[test]
fn symbolize_vm_refuses_guests_without_a_usable_lstar() {
    let guest = HeldGuest::start();
    let elf = guest_elf();

    // No instruction has run: MSR_LSTAR still holds its reset value 0.
    assert_eq!(guest.lstar(), 0);
    let err = refusal(&elf, &guest.control);
    assert!(err.contains("has not set MSR_LSTAR yet"), "{err}");

    guest.ask(serde_json::json!({"v": 1, "cmd": "resume"}));
    let deadline = Instant::now() + Duration::from_secs(120);
    let lstar = loop {
        let lstar = guest.lstar();
        if lstar != 0 {
            break lstar;
        }
        assert!(
            Instant::now() < deadline,
            "the test guest never set MSR_LSTAR"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // The test guest's own ELF has a syscall entry, but not Linux's `entry_SYSCALL_64`.
    let err = refusal(&elf, &guest.control);
    assert!(
        err.contains(&format!("MSR_LSTAR {lstar:#x}"))
            && err.contains("has no `entry_SYSCALL_64` symbol"),
        "{err}"
    );

    // Debian's vmlinux is not this guest's kernel: LSTAR − its entry_SYSCALL_64 is no multiple of 2 MiB.
    let vmlinux = symbolize_common::debian_vmlinux();
    let err = refusal(&vmlinux, &guest.control);
    assert!(
        err.contains("is not a multiple of 0x200000: this vmlinux is not the guest's kernel"),
        "{err}"
    );

    let err = refusal(&elf, &guest.dir.join("no-such.sock"));
    assert!(
        err.contains("cannot connect to control socket") && err.contains("no-such.sock"),
        "{err}"
    );
}
