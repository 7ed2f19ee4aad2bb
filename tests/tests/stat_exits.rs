//! `perf-kvm stat` against the test guest: the exits it reports match what the guest says it did.

mod stat_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::Command;

use stat_common::{guest_elf, number_after, perf_kvm, Scratch};

/// Samples column of the row named `name` in a perf-kvm-stat table.
fn row_samples(table: &str, name: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name))
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

fn total_samples(table: &str) -> u64 {
    number_after(table, "Total Samples:").expect("total line")
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(perf_kvm())
        .args(args)
        .output()
        .expect("running perf-kvm");
    assert!(
        out.status.success(),
        "perf-kvm {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn run_err(args: &[&str]) -> String {
    let out = Command::new(perf_kvm())
        .args(args)
        .output()
        .expect("running perf-kvm");
    assert_eq!(
        out.status.code(),
        Some(1),
        "perf-kvm {args:?} should fail cleanly"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn port_exits_and_halts_match_the_guest() {
    let scratch = Scratch::new("stat-exits");
    let elf = guest_elf();
    let rec = scratch.0.join("stat.json");
    let guest_out = run_ok(&[
        "stat",
        "record",
        "-o",
        rec.to_str().unwrap(),
        "--",
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--cpus",
        "2",
        "--cmdline",
        "work=user_hot_a:50,kernel_spin:50 secs=1",
    ]);
    // The guest counts every `out` it executes, the exit-port write included (docs in tests/guest/src/main.rs).
    let port_writes = number_after(&guest_out, "guest-io: port_writes=").expect("guest-io line");
    // Writes to the PIT and PIC stay in KVM's in-kernel devices and never reach the VMM (docs/test-guest.md).
    let in_kernel = number_after(&guest_out, " pit_pic_writes=")
        .expect("the test guest prints pit_pic_writes= (docs/test-guest.md); rebuild it with scripts/build-guest");
    assert!(port_writes > in_kernel + 20, "{guest_out}");
    let vmm_writes = port_writes - in_kernel;

    let ports = run_ok(&[
        "stat",
        "report",
        "-i",
        rec.to_str().unwrap(),
        "--event",
        "ioport",
    ]);
    let pout = sum_rows(&ports, ":POUT");
    assert_eq!(
        pout, vmm_writes,
        "every port write outside PIT/PIC is one POUT exit\n{ports}"
    );
    assert_eq!(row_samples(&ports, "0xf4:POUT"), Some(1), "{ports}");
    let serial = row_samples(&ports, "0x3f8:POUT").expect("serial row");
    assert!(serial > 20 && serial < vmm_writes, "{ports}");

    let reasons = run_ok(&["stat", "report", "-i", rec.to_str().unwrap()]);
    let io = row_samples(&reasons, "IO_INSTRUCTION").expect("IO_INSTRUCTION row");
    let reads = sum_rows(&ports, ":PIN");
    assert_eq!(io, vmm_writes + reads, "{reasons}");
    // The guest never executes `hlt`: no HLT exits reach the VMM and KVM counted no halts.
    assert_eq!(row_samples(&reasons, "HLT"), None, "{reasons}");
    assert_eq!(row_samples(&reasons, "halt_exits"), Some(0), "{reasons}");
    // KVM saw at least every exit that reached the VMM (it also counts those it handled itself).
    let kvm_exits = row_samples(&reasons, "exits").expect("KVM exits counter");
    assert!(kvm_exits >= total_samples(&reasons), "{reasons}");

    // Per vCPU: the tables split the exits and KVM's counters between the two vCPUs.
    let per_vcpu: Vec<String> = ["0", "1"]
        .iter()
        .map(|v| {
            run_ok(&[
                "stat",
                "report",
                "-i",
                rec.to_str().unwrap(),
                "--vcpu",
                v,
                "--key",
                "time",
            ])
        })
        .collect();
    for (v, table) in per_vcpu.iter().enumerate() {
        assert!(table.contains(&format!("VCPU {v}:")), "{table}");
    }
    assert_eq!(
        per_vcpu.iter().map(|t| total_samples(t)).sum::<u64>(),
        total_samples(&reasons),
        "{per_vcpu:?}"
    );
    assert_eq!(
        per_vcpu
            .iter()
            .map(|t| row_samples(t, "exits").unwrap())
            .sum::<u64>(),
        kvm_exits,
        "{per_vcpu:?}"
    );
    let err = run_err(&["stat", "report", "-i", rec.to_str().unwrap(), "--vcpu", "2"]);
    assert!(err.contains("--vcpu 2: the VM has 2 vCPU(s)"), "{err}");
}

#[test]
fn bare_stat_prints_the_table_after_the_guest() {
    let elf = guest_elf();
    let out = run_ok(&[
        "stat",
        "--",
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "work=user_hot_a:100 secs=1",
    ]);
    let guest_at = out.find("guest-io: port_writes=").expect("guest line");
    let table_at = out.find("VM-EXIT").expect("table header");
    assert!(guest_at < table_at, "{out}");
    let io = row_samples(&out, "IO_INSTRUCTION").unwrap();
    let writes = number_after(&out, "guest-io: port_writes=").unwrap();
    let in_kernel = number_after(&out, " pit_pic_writes=").unwrap();
    assert!(io >= writes - in_kernel, "{out}");
}

#[test]
fn live_prints_a_table_per_interval_until_the_vm_ends() {
    let elf = guest_elf();
    let out = run_ok(&[
        "stat",
        "live",
        "-d",
        "0.3",
        "--event",
        "ioport",
        "--",
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "work=user_hot_a:100 secs=1",
    ]);
    let tables: Vec<&str> = out.split("Analyze events for").skip(1).collect();
    assert!(tables.len() >= 2, "{out}");
    // Each interval is counted on its own: the exit-port write shows up in exactly one table.
    let exit_port: u64 = tables
        .iter()
        .filter_map(|t| row_samples(t, "0xf4:POUT"))
        .sum();
    assert_eq!(exit_port, 1, "{out}");
    for t in &tables {
        assert!(t.contains("Total Samples:"), "{t}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let scratch = Scratch::new("stat-bad");
    let garbage = scratch.0.join("garbage.json");
    std::fs::write(&garbage, b"PERFILE2 not json").unwrap();
    let err = run_err(&["stat", "report", "-i", garbage.to_str().unwrap()]);
    assert!(err.contains("is not a perf-kvm stat recording"), "{err}");
    let err = run_err(&[
        "stat",
        "report",
        "-i",
        scratch.0.join("missing.json").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot read"), "{err}");
    let unwritable = scratch.0.join("no-such-dir/stat.json");
    let err = run_err(&[
        "stat",
        "record",
        "-o",
        unwritable.to_str().unwrap(),
        "--",
        "run",
        "--kernel",
        "/x",
    ]);
    assert!(
        err.contains("cannot write") && err.contains("no-such-dir"),
        "{err}"
    );
    let err = run_err(&["stat"]);
    assert!(
        err.contains("--vm SOCKET") && err.contains("-- run"),
        "{err}"
    );
    let err = run_err(&[
        "stat",
        "--vm",
        scratch.0.join("no-socket").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot connect to control socket"), "{err}");
    let err = run_err(&[
        "stat",
        "live",
        "-d",
        "0",
        "--",
        "run",
        "--kernel",
        "/nonexistent",
    ]);
    assert!(err.contains("-d must be between"), "{err}");

    // A socket that answers garbage.
    let sock = scratch.0.join("garbage.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut conn = conn;
        let _ = conn.write_all(b"\x00\x01 this is not json\n");
    });
    let err = run_err(&["stat", "--vm", sock.to_str().unwrap()]);
    assert!(err.contains("malformed control reply"), "{err}");
    server.join().unwrap();
}

/// Sum of the samples column over every row whose name ends with `suffix` (`:POUT`, `:PIN`).
fn sum_rows(table: &str, suffix: &str) -> u64 {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().next().filter(|n| n.ends_with(suffix)))
        .map(|n| row_samples(table, n).expect("samples column"))
        .sum()
}
