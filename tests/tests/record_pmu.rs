//! `perf-kvm record -e cycles`: decided at run time by trying the PMU. On a host without one (our PVM hosts) it
//! must refuse in one clear line and exit non-zero; on a host with one it must record guest cycles that report
//! like the guest's own truth. `-e cpu-clock` names the default sampler explicitly.

use std::process::Command;
use std::time::Duration;

use integration_tests::bins::{bin, run_with_deadline};
use integration_tests::guest_elf;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pkvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn record(event: &str, data: &std::path::Path, work: &str) -> std::process::Output {
    let (out, timed_out) = run_with_deadline(
        Command::new(bin("perf-kvm"))
            .args(["record", "-e", event, "-F", "500", "-o"])
            .arg(data)
            .args(["--", "run", "--kernel"])
            .arg(guest_elf())
            .args(["--cpus", "2", "--cmdline", &format!("work={work} secs=2")]),
        Duration::from_secs(120),
    );
    assert!(!timed_out, "record -e {event} hung");
    out
}

/// Shares of the named functions in a `--sort sym` report, in percent.
fn shares(data: &std::path::Path, names: &[&str]) -> Vec<f64> {
    let out = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "--sort", "sym", "--no-children", "-i"])
        .arg(data)
        .arg("--guest-vmlinux")
        .arg(guest_elf())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    names
        .iter()
        .map(|name| {
            text.lines()
                .filter(|l| l.split_whitespace().last() == Some(*name))
                .filter_map(|l| {
                    l.split_whitespace()
                        .next()?
                        .trim_end_matches('%')
                        .parse::<f64>()
                        .ok()
                })
                .sum()
        })
        .collect()
}

/// user_hot_a's share (its whole chain, leaf to root) of the time spent in user_hot_a and user_cold together.
fn hot_share(data: &std::path::Path) -> f64 {
    let s = shares(
        data,
        &[
            "user_hot_a",
            "user_stage1",
            "user_stage2",
            "user_leaf",
            "user_cold",
        ],
    );
    let hot: f64 = s[..4].iter().sum();
    100.0 * hot / (hot + s[4]).max(1e-9)
}

#[test]
fn cycles_records_guest_cycles_or_refuses_in_one_line() {
    let dir = scratch("pmu");
    let data = dir.join("cycles.data");
    let work = "user_hot_a:70,user_cold:30";
    let out = record("cycles", &data, work);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match vmm::pmu::probe_guest_cycles() {
        Err(vmm::pmu::PmuError::NoPmu { .. }) => {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(
                stderr.contains("no hardware PMU") && stderr.contains("PMU-free sampler"),
                "{stderr}"
            );
            assert!(
                !data.exists(),
                "no file is written when nothing can be recorded"
            );
        }
        Err(other) => {
            // A PMU that is there but not ours to use (perf_event_paranoid): the same one-line refusal.
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{other}: {stderr}");
        }
        Ok(()) => {
            assert!(out.status.success(), "{stderr}");
            let report = Command::new(bin("perf-kvm"))
                .args(["report", "--stdio", "-i"])
                .arg(&data)
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&report.stdout).contains("of event 'cycles'"));
            // Cycles follow guest CPU time on a fixed-frequency core only roughly: generous bounds.
            let hot = hot_share(&data);
            assert!(
                (hot - 70.0).abs() < 12.0,
                "user_hot_a's share of the user work: {hot:.1}%"
            );
        }
    }
}

#[test]
fn cpu_clock_names_the_default_sampler() {
    let dir = scratch("cpuclock");
    let data = dir.join("cc.data");
    let out = record("cpu-clock", &data, "user_hot_a:70,user_cold:30");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ±6 points: boot and calibration take their own share, so user_hot_a is compared with user_cold only.
    let hot = hot_share(&data);
    assert!(
        (hot - 70.0).abs() < 6.0,
        "user_hot_a's share of the user work: {hot:.1}%"
    );
    let bad = Command::new(bin("perf-kvm"))
        .args(["record", "-e", "instructions", "--", "run", "--kernel"])
        .arg(guest_elf())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert!(err.contains("unknown event 'instructions'"), "{err}");
}

/// `-e cycles --vm SOCKET` attaches to the vCPU threads the control socket names: those ids must be the VMM's
/// vCPU threads (named vcpuN, in order), and the recording must then work or refuse as in-process.
#[test]
fn cycles_attaches_to_the_vcpu_threads_a_control_socket_names() {
    let dir = scratch("pmu-vm");
    let sock = dir.join("vm.sock");
    let vmm = integration_tests::bins::KillOnDrop(
        Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(guest_elf())
            .args([
                "--cpus",
                "2",
                "--cmdline",
                "work=user_hot_a:100 secs=8",
                "--control",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match vmm::control::ControlClient::connect(&sock) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no control socket: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let info = client.call(vmm::control::Request::Info).unwrap();
    let pid = vmm.0.id();
    let tids: Vec<u64> = info["info"]["vcpu_tids"]
        .as_array()
        .unwrap_or_else(|| panic!("no vcpu_tids in {info}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tids.len(), 2, "{info}");
    for (i, tid) in tids.iter().enumerate() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }
    let data = dir.join("vm-cycles.data");
    let (out, timed_out) = run_with_deadline(
        Command::new(bin("perf-kvm"))
            .args(["record", "-e", "cycles", "--duration", "1", "--vm"])
            .arg(&sock)
            .arg("-o")
            .arg(&data),
        Duration::from_secs(60),
    );
    assert!(!timed_out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match vmm::pmu::probe_guest_cycles() {
        Ok(()) => assert!(out.status.success(), "{stderr}"),
        Err(_) => {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
        }
    }
}
