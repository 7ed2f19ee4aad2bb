//! `perf-kvm stat --vm SOCKET` against a real `vmm run --control SOCKET`, including the VM ending under it.

mod stat_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stat_common::{guest_elf, perf_kvm, Scratch};

#[test]
fn watches_a_running_vm_and_survives_its_end() {
    let scratch = Scratch::new("stat-socket");
    let sock = scratch.0.join("vm.sock");
    let vmm = perf_kvm().with_file_name("vmm");
    let mut vm = Command::new(&vmm)
        .args(["run", "--kernel", guest_elf().to_str().unwrap()])
        .args([
            "--cmdline",
            "work=user_hot_a:100 secs=4",
            "--control",
            sock.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", vmm.display()));
    let started = Instant::now();
    while !sock.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the VM never opened its control socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = Command::new(perf_kvm())
        .args([
            "stat",
            "--vm",
            sock.to_str().unwrap(),
            "--duration",
            "0.5",
            "--event",
            "ioport",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("the VM at {}", sock.display())),
        "{text}"
    );
    assert!(
        text.contains("0x3f8:POUT"),
        "the guest's console writes: {text}"
    );
    assert!(text.contains("KVM counters: not available"), "{text}");

    // Without --duration, stat watches until the VM (and its socket) goes away, then prints what it read.
    let out = Command::new(perf_kvm())
        .args(["stat", "--vm", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(err.contains("the VM went away"), "{err}");
    assert!(
        text.contains("IO_INSTRUCTION") && text.contains("Total Samples:"),
        "{text}"
    );
    assert!(vm.wait().unwrap().success());
}
