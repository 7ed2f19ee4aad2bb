//! `perf-kvm record` when its VM goes away under it: the guest ending mid-record, and the VMM behind `--vm` being
//! killed mid-stream. Both leave a complete file that real perf and our report read.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bins::bin;
use integration_tests::guest_elf;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pkvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Both readers accept the file and see samples in it.
fn assert_valid(data: &std::path::Path) {
    let ours = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "-i"])
        .arg(data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ours.stdout);
    assert!(
        ours.status.success(),
        "report: {}",
        String::from_utf8_lossy(&ours.stderr)
    );
    assert!(
        !text.contains("WARNING: the file was not finished"),
        "{text}"
    );
    let samples: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(samples > 50, "too few samples: {text}");
    let perf = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .output()
        .expect("perf installed");
    assert!(
        perf.status.success(),
        "perf script: {}",
        String::from_utf8_lossy(&perf.stderr)
    );
}

#[test]
fn the_guest_ending_mid_record_leaves_a_complete_file() {
    let dir = scratch("rec-end");
    let data = dir.join("p.data");
    let started = Instant::now();
    let out = Command::new(bin("perf-kvm"))
        .args(["record", "-F", "500", "-g", "--duration", "60", "-o"])
        .arg(&data)
        .args([
            "--",
            "run",
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--cmdline",
            "work=user_hot_a:100 secs=1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "record did not stop with the guest"
    );
    assert_valid(&data);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_vmm_dying_mid_stream_leaves_a_complete_file() {
    let dir = scratch("rec-kill");
    let sock = dir.join("vm.sock");
    let data = dir.join("p.data");
    let mut vm = Command::new(bin("vmm"))
        .args([
            "run",
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--cmdline",
            "work=user_hot_a:100 secs=30",
        ])
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    integration_tests::bins::wait_until_exists(&sock, Duration::from_secs(30));
    let rec = Command::new(bin("perf-kvm"))
        .args(["record", "-F", "500", "-o"])
        .arg(&data)
        .arg("--vm")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    vm.kill().unwrap();
    vm.wait().unwrap();
    let out = rec.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Captured and wrote"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_valid(&data);
    std::fs::remove_dir_all(&dir).ok();
}
