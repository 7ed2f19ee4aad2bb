//! `perf-kvm stat --vm SOCKET` against a real `vmm run --control SOCKET`, including the VM ending under it.

mod stat_common;

use std::process::{Command, Stdio};
use std::time::Duration;

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
    integration_tests::bins::wait_until_exists(&sock, Duration::from_secs(60));

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

/// `perf-kvm top --vm` and `record --vm` attach to a VM started with `--control`, sample it, detach, and leave it
/// undisturbed: the guest still finishes its workload with the right truth and exit status 0.
#[test]
fn top_and_record_attach_sample_and_detach_without_disturbing_the_vm() {
    let scratch = Scratch::new("attach");
    let sock = scratch.0.join("vm.sock");
    let vmm = perf_kvm().with_file_name("vmm");
    let vm = Command::new(&vmm)
        .args(["run", "--kernel", guest_elf().to_str().unwrap()])
        .args([
            "--cmdline",
            "work=user_hot_a:70,user_cold:30 secs=8",
            "--control",
            sock.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    integration_tests::bins::wait_until_exists(&sock, Duration::from_secs(60));
    // top in text mode for ~2 s (SIGINT ends it like Ctrl-C).
    let top = Command::new(perf_kvm())
        .args([
            "top",
            "--stdio",
            "-d",
            "0.5",
            "--vm",
            sock.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(top.id() as i32, libc::SIGINT) };
    let top = top.wait_with_output().unwrap();
    let top_out = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "top: {top_out}\n{}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(
        top_out.contains("user_leaf") || top_out.contains("user_hot_a"),
        "top never showed the hot code:\n{top_out}"
    );
    // Then record 1 s of it.
    let data = scratch.0.join("attach.data");
    let rec = Command::new(perf_kvm())
        .args(["record", "-F", "500", "-g", "--duration", "1", "-o"])
        .arg(&data)
        .args(["--vm", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        rec.status.success(),
        "record: {}",
        String::from_utf8_lossy(&rec.stderr)
    );
    let report = Command::new(perf_kvm())
        .args(["report", "--stdio", "--sort", "sym", "-i"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&report.stdout).contains("user_leaf"));
    // The VM carries on to its normal end.
    let out = vm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("guest-truth: user_hot_a="), "{stdout}");
}
