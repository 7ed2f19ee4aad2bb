//! `vmm run` end to end on this host's KVM: the test guest on 1 and 2 vCPUs, bad input, and the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::bins::{bin, run_with_deadline};
use integration_tests::guest_elf;

fn vmm(args: &[&str]) -> (std::process::Output, bool) {
    run_with_deadline(Command::new(bin("vmm")).args(args), Duration::from_secs(60))
}

fn truth_line(stdout: &str) -> Vec<(String, f64)> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("guest-truth: "))
        .expect("overall truth line");
    line["guest-truth: ".len()..]
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("name=value");
            (k.to_string(), v.parse().expect("percentage"))
        })
        .collect()
}

#[test]
fn test_guest_runs_on_one_and_two_vcpus_and_exits_zero() {
    let elf = guest_elf();
    for cpus in ["1", "2"] {
        let (out, killed) = vmm(&[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "work=user_hot_a:60,user_hot_b:30,user_cold:10 secs=2",
            "--cpus",
            cpus,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!killed, "vmm did not finish: {stdout}");
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("cpus={cpus}")),
            "guest saw the wrong CPU count:\n{stdout}"
        );
        let per_cpu = stdout
            .lines()
            .filter(|l| l.starts_with("guest-truth cpu"))
            .count();
        assert_eq!(
            per_cpu.to_string(),
            cpus,
            "one truth line per vCPU:\n{stdout}"
        );
        for (name, want) in [
            ("user_hot_a", 60.0),
            ("user_hot_b", 30.0),
            ("user_cold", 10.0),
        ] {
            let got = truth_line(&stdout)
                .into_iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v);
            let got = got.unwrap_or_else(|| panic!("{name} missing from truth line:\n{stdout}"));
            assert!((got - want).abs() <= 1.0, "{name}: {got} vs {want}");
        }
    }
}

#[test]
fn guest_exit_status_becomes_the_process_status() {
    let elf = guest_elf();
    // fault=port: the guest touches an unknown port, reports it, and exits non-zero on its own.
    let (out, _) = vmm(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "fault=port",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        out.status.code().is_some(),
        "killed by a signal: {:?}",
        out.status
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

fn assert_clean_failure(args: &[&str], expect: &str) {
    let (out, killed) = vmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!killed, "vmm hung on {args:?}");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in {stderr:?}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one clear line, got: {stderr}"
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_nonzero_exit() {
    let dir = std::env::temp_dir().join(format!("vmm-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 4096]).unwrap();
    let truncated = dir.join("truncated.elf");
    let elf_bytes = std::fs::read(guest_elf()).unwrap();
    std::fs::write(&truncated, &elf_bytes[..200]).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let big_initrd = dir.join("initrd");
    let f = std::fs::File::create(&big_initrd).unwrap();
    f.set_len(40 << 20).unwrap();
    let elf = guest_elf();
    let elf = elf.to_str().unwrap();

    assert_clean_failure(
        &["run", "--kernel", "/nonexistent/kernel"],
        "does not exist",
    );
    assert_clean_failure(
        &["run", "--kernel", garbage.to_str().unwrap()],
        "neither an ELF nor a bzImage",
    );
    assert_clean_failure(
        &["run", "--kernel", empty.to_str().unwrap()],
        "neither an ELF nor a bzImage",
    );
    assert_clean_failure(
        &["run", "--kernel", truncated.to_str().unwrap()],
        "cannot load kernel",
    );
    assert_clean_failure(
        &["run", "--kernel", elf, "--cpus", "0"],
        "--cpus must be between 1",
    );
    assert_clean_failure(
        &["run", "--kernel", elf, "--mem", "4"],
        "--mem must be at least",
    );
    assert_clean_failure(
        &[
            "run",
            "--kernel",
            elf,
            "--mem",
            "32",
            "--initrd",
            big_initrd.to_str().unwrap(),
        ],
        "does not fit in guest memory",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_kvm_device_and_no_permission_are_explained() {
    // A private mount namespace with an empty /dev: no /dev/kvm at all.
    let (out, _) = run_with_deadline(
        Command::new("unshare")
            .args([
                "--mount",
                "sh",
                "-c",
                "mount -t tmpfs none /dev && exec \"$0\" probe",
            ])
            .arg(bin("vmm")),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
    // An unprivileged user cannot open the root-only /dev/kvm here.
    let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0,
        "this check needs a /dev/kvm closed to others (mode {mode:o})"
    );
    let (out, _) = run_with_deadline(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("vmm"))
            .arg("probe"),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("permission denied opening /dev/kvm"),
        "{stderr}"
    );
}

#[test]
fn control_socket_serves_info_regs_pause_resume_with_mode_0600() {
    let dir = std::env::temp_dir().join(format!("vmm-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let elf = guest_elf();
    let mut child = integration_tests::bins::KillOnDrop(
        Command::new(bin("vmm"))
            .args([
                "run",
                "--kernel",
                elf.to_str().unwrap(),
                "--cpus",
                "2",
                "--cmdline",
                "work=user_hot_a:100 secs=4",
            ])
            .arg("--control")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut tries = 0;
    let conn = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("control socket never came up: {e}"),
        }
    };
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Wait until both vCPUs run the workload (application processors start in real mode).
    let mut guest_out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    let mut workers = 0;
    while workers < 2 {
        line.clear();
        assert!(
            guest_out.read_line(&mut line).unwrap() > 0,
            "guest output ended early"
        );
        workers += line.contains("worker started") as usize;
    }
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut ask = |req: &str| -> serde_json::Value {
        writeln!(w, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    };
    let info = ask(r#"{"v":1,"cmd":"info"}"#);
    assert_eq!(info["ok"], true);
    assert_eq!(info["info"]["vcpus"], 2);
    assert_eq!(info["protocol"], 1);
    let paused = ask(r#"{"v":1,"cmd":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    // While paused, registers are stable between two reads.
    let a = ask(r#"{"v":1,"cmd":"regs","vcpu":1}"#);
    let b = ask(r#"{"v":1,"cmd":"regs","vcpu":1}"#);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["regs"]["rip"], b["regs"]["rip"]);
    assert_eq!(
        a["regs"]["efer"].as_u64().unwrap() & 0x400,
        0x400,
        "long mode active: {a}"
    );
    assert_eq!(ask(r#"{"v":1,"cmd":"resume"}"#)["ok"], true);
    let stats = ask(r#"{"v":1,"cmd":"exit_stats"}"#);
    assert_eq!(stats["exit_stats"].as_array().unwrap().len(), 2, "{stats}");
    // Garbage and wrong versions get errors, not a dead connection.
    assert_eq!(ask("not json at all")["ok"], false);
    assert_eq!(ask(r#"{"v":1,"cmd":"regs","vcpu":7}"#)["ok"], false);
    assert!(ask(r#"{"v":9,"cmd":"info"}"#)["error"]
        .as_str()
        .unwrap()
        .contains("version"));
    std::io::copy(&mut guest_out, &mut std::io::sink()).unwrap();
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "guest did not finish cleanly after pause/resume: {status:?}"
    );
    assert!(!sock.exists(), "socket file left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every `fault=` mode of the test guest under our VMM: a non-zero exit, a clear message, and the vCPU state (the
/// VMM's crash report for a triple fault; the guest's own exception line, which our VMM lets it print, otherwise).
#[test]
fn every_guest_fault_mode_ends_non_zero_with_the_vcpu_state() {
    let elf = guest_elf();
    let cases: [(&str, i32, &[&str]); 5] = [
        (
            "triple",
            1,
            &[
                "vmm: guest crashed",
                "triple fault (KVM_EXIT_SHUTDOWN)",
                "RIP: 0x",
                "<guest::fault::",
                "CR3:",
            ],
        ),
        (
            "mmio",
            3,
            &[
                "guest-fault: mmio addr=0xd0000000 wrote=0xdeadbeef read=0xffffffff",
                "status 3",
            ],
        ),
        ("int3", 35, &["vector=3 #BP rip=0xffffffff8", "status 35"]),
        (
            "pagefault",
            46,
            &["vector=14 #PF", "cr2=0xffffc0000dead000", "status 46"],
        ),
        (
            "user-pagefault",
            46,
            &["vector=14 #PF", "cs=0x33", "cr2=0xdead000", "status 46"],
        ),
    ];
    for (mode, code, expect) in cases {
        let (out, killed) = vmm(&[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            &format!("fault={mode}"),
        ]);
        let all = integration_tests::bins::stdout_then_stderr(&out);
        assert!(!killed, "fault={mode} hung:\n{all}");
        assert_eq!(out.status.code(), Some(code), "fault={mode}:\n{all}");
        assert!(!all.contains("panicked"), "fault={mode}:\n{all}");
        // SVM hosts reset a vCPU at a triple fault: the report says its registers are the reset values, and only
        // there may it lack the faulting function.
        let reset = all.contains("these are the vCPU's reset values");
        assert!(
            !reset || std::path::Path::new("/sys/module/kvm_amd").exists(),
            "fault={mode}: reset registers on a host that keeps the faulting state:\n{all}"
        );
        for e in expect {
            if reset && *e == "<guest::fault::" {
                continue;
            }
            assert!(all.contains(e), "fault={mode}: missing {e:?} in:\n{all}");
        }
    }
}

/// `--control` and `--gdb` on a unix path never replace what the user owns: a regular file or a directory there is
/// one clear error before the guest runs (the file keeps its bytes), a live socket (another VM serving) is refused
/// and that VM keeps serving, and only a stale socket file (nobody answering) is replaced.
#[test]
fn socket_paths_never_replace_files_directories_or_live_sockets() {
    let dir = std::env::temp_dir().join(format!("vmm-socket-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = guest_elf();
    let precious = dir.join("precious.txt");
    std::fs::write(&precious, b"the user's data\n").unwrap();
    let a_dir = dir.join("a-directory");
    std::fs::create_dir_all(&a_dir).unwrap();
    let run = |flag: &str, path: &std::path::Path, cmdline: &str| {
        let (out, killed) = vmm(&[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            cmdline,
            flag,
            path.to_str().unwrap(),
        ]);
        assert!(!killed, "vmm hung with {flag} {}", path.display());
        out
    };
    for flag in ["--control", "--gdb"] {
        for (path, what) in [(&precious, "is not a socket"), (&a_dir, "is a directory")] {
            let out = run(flag, path, "boot_only=1");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{flag} {}: {stderr}",
                path.display()
            );
            assert!(
                stderr.contains(what) && stderr.contains("refusing to replace it"),
                "{stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(
                out.stdout.is_empty(),
                "the guest never ran: {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    assert_eq!(std::fs::read(&precious).unwrap(), b"the user's data\n");
    assert!(a_dir.is_dir());

    // A live socket: the second VM is refused, the first keeps answering.
    let sock = dir.join("vm.sock");
    let _first = integration_tests::bins::KillOnDrop(
        Command::new(bin("vmm"))
            .args([
                "run",
                "--kernel",
                elf.to_str().unwrap(),
                "--cmdline",
                "secs=30",
                "--control",
            ])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    integration_tests::bins::wait_until_exists(&sock, Duration::from_secs(30));
    let out = run("--control", &sock, "boot_only=1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a live socket"), "{stderr}");
    let mut conn = UnixStream::connect(&sock).expect("the first VM still serves");
    writeln!(conn, r#"{{"v":1,"cmd":"info"}}"#).unwrap();
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).unwrap();
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    drop(_first);

    // A stale socket (a listener that went away without removing its file) is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let out = run("--control", &stale, "boot_only=1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
