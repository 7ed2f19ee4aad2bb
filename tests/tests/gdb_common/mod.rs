//! Helpers of the `gdb_vmm*` tests: a `vmm run --gdb --gdb-wait` process with the test guest, and the real gdb
//! in batch mode against it.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use integration_tests::bins::{bin, probe_line, run_with_deadline, vmm_probe};
use integration_tests::guest_elf;

/// Generous limits for processes that normally end in seconds; they only turn a hang into a failure.
pub const GDB_LIMIT: Duration = Duration::from_secs(120);
pub const VMM_LIMIT: Duration = Duration::from_secs(120);
pub const INTERRUPT_ATTEMPTS: usize = 30;

/// Gets the guest from its first instruction to `kernel_spin` with paging on.
pub const TO_KERNEL_SPIN: [&str; 4] =
    ["set language c", "hbreak kernel_spin", "continue", "delete"];

/// Gets a running guest (`Vmm::start_running`) into its ring-0 workload without any breakpoint: a write watch
/// (page protection, on every host) on `kernel_counter` stops it in `kernel_leaf`, right after the store.
pub const TO_KERNEL_CODE_BY_WATCH: [&str; 4] = [
    "set language c",
    "watch *(unsigned long *)&kernel_counter",
    "continue",
    "delete",
];

pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether gdb's `break` and `hbreak` can stop the guest on this host (`vmm probe`: int3 reaches the VMM and DR
/// execute breakpoints fire). Not under QEMU's TCG SVM (the SVM lane), where the stub refuses both.
pub fn host_stops_at_breakpoints() -> bool {
    let probe = vmm_probe();
    let int3_to_guest =
        probe_line(probe, "CPL0 int3 arrives as").starts_with("the guest's #BP handler");
    let no_exec_bp = probe_line(probe, "exec breakpoints (DR)").starts_with("no");
    assert_eq!(
        int3_to_guest, no_exec_bp,
        "a host with one kind of breakpoint but not the other: the tests expect both or neither\n{probe}"
    );
    !int3_to_guest
}

/// On a host where no breakpoint stops the guest: `break` and `hbreak` are refused, in gdb and with the VMM's
/// reason, and the guest stays stopped and attachable (`detach` lets it finish). For tests whose path needs
/// breakpoints: they check this refusal there and say so; the hosts with breakpoints run the rest.
pub fn check_breakpoints_refused(vmm: Vmm) {
    let out = run_gdb(
        &vmm.address,
        &[
            "set language c",
            "break kernel_leaf",
            "hbreak kernel_stage2",
            "continue",
            "detach",
        ],
    );
    assert!(
        out.contains("Cannot insert breakpoint 1"),
        "break refused in gdb"
    );
    assert!(
        out.contains("Cannot insert hardware breakpoint 2"),
        "hbreak refused in gdb"
    );
    let (code, _, stderr) = vmm.finish();
    assert!(
        stderr.contains("does not intercept int3"),
        "the VMM says why: {stderr}"
    );
    assert!(
        stderr.contains("execute breakpoints never stop the guest"),
        "{stderr}"
    );
    assert_eq!(code, Some(0), "the guest finished after detach");
    println!("this host stops at no breakpoint (vmm probe): checked the refusals; hosts with breakpoints run the rest");
}

/// A `vmm run --gdb 127.0.0.1:0 --gdb-wait` process, its gdb address, and its output collected on threads.
pub struct Vmm {
    pub child: Child,
    pub address: String,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Vmm {
    pub fn start(cmdline: &str, cpus: &str) -> Vmm {
        Vmm::start_at(cmdline, cpus, "127.0.0.1:0")
    }

    pub fn start_at(cmdline: &str, cpus: &str, gdb_address: &str) -> Vmm {
        Vmm::start_kernel(&guest_elf(), cmdline, cpus, gdb_address)
    }

    /// `vmm run --kernel KERNEL` (any kernel the VMM boots) with gdb waiting.
    pub fn start_kernel(kernel: &Path, cmdline: &str, cpus: &str, gdb_address: &str) -> Vmm {
        Vmm::spawn(kernel, cmdline, cpus, gdb_address, true)
    }

    /// The test guest running from the start (no `--gdb-wait`), returned once it prints `guest: workload start`
    /// (paging on, the workload under way), for gdb to attach to.
    pub fn start_running(cmdline: &str, cpus: &str) -> Vmm {
        let vmm = Vmm::spawn(&guest_elf(), cmdline, cpus, "127.0.0.1:0", false);
        let started = std::time::Instant::now();
        while !vmm
            .stdout
            .recv_timeout(VMM_LIMIT)
            .expect("guest output")
            .contains("guest: workload start")
        {
            assert!(started.elapsed() < VMM_LIMIT, "the workload never started");
        }
        vmm
    }

    fn spawn(kernel: &Path, cmdline: &str, cpus: &str, gdb_address: &str, wait: bool) -> Vmm {
        let mut child = Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(kernel)
            .args(["--cmdline", cmdline, "--cpus", cpus])
            .args(["--gdb", gdb_address])
            .args(wait.then_some("--gdb-wait"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first_lines = String::new();
        let address = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!("vmm ended before listening for gdb:\n{first_lines}");
            }
            first_lines.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("vmm: gdb server listening on ") {
                // gdb takes a unix socket as its bare path.
                let address = rest.split_whitespace().next().unwrap();
                break address.strip_prefix("unix:").unwrap_or(address).to_string();
            }
        };
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(stderr);
        Vmm {
            child,
            address,
            stdout,
            stderr,
        }
    }

    /// Waits for the process to end; its exit code, stdout and stderr.
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if start.elapsed() > VMM_LIMIT {
                let _ = self.child.kill();
                break self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout: String = self.stdout.iter().collect();
        let stderr: String = self.stderr.iter().collect();
        println!("--- vmm stdout ---\n{stdout}\n--- vmm stderr ---\n{stderr}");
        (status.code(), stdout, stderr)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn collect_lines(source: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if tx.send(line + "\n").is_err() {
                break;
            }
        }
    });
    rx
}

pub fn gdb_command(address: &str, commands: &[&str]) -> Command {
    gdb_command_for(&guest_elf(), address, commands)
}

/// gdb in batch mode on `elf`, connected to `address`, running `commands`.
pub fn gdb_command_for(elf: &Path, address: &str, commands: &[&str]) -> Command {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set confirm off", "-ex"])
        .arg(format!("file {}", elf.display()))
        .args(["-ex", &format!("target remote {address}")]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    cmd
}

/// Runs gdb to completion; stdout and stderr together.
pub fn run_gdb(address: &str, commands: &[&str]) -> String {
    run_gdb_command(gdb_command(address, commands))
}

/// Runs gdb to completion; stdout and stderr merged in the order gdb wrote them (errors go to stderr).
pub fn run_gdb_in_order(address: &str, commands: &[&str]) -> String {
    GdbProcess::spawn(gdb_command(address, commands)).finish()
}

/// Runs a gdb command line to completion; stdout and stderr together.
pub fn run_gdb_command(mut command: Command) -> String {
    let (out, killed) = run_with_deadline(&mut command, GDB_LIMIT);
    let text = integration_tests::bins::stdout_then_stderr(&out);
    println!("--- gdb output ---\n{text}");
    assert!(!killed, "gdb did not finish:\n{text}");
    text
}

/// The value of the last `$N = 0x...` line after `marker`.
pub fn hex_value_after(out: &str, marker: &str) -> u64 {
    let tail = &out[out
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in:\n{out}"))..];
    let line = tail
        .lines()
        .find(|l| l.starts_with('$') && l.contains(" = 0x"))
        .unwrap_or_else(|| panic!("no value after {marker:?}"));
    let hex = line
        .split(" = 0x")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

/// A gdb running in the background in a process group of its own (so that `shell` children die with it), its
/// stdout and stderr merged in gdb's own order.
pub struct GdbProcess {
    child: Child,
    output: mpsc::Receiver<String>,
    seen: String,
}

impl GdbProcess {
    pub fn spawn(mut cmd: Command) -> GdbProcess {
        use std::os::unix::process::CommandExt;
        let (reader, writer) = std::io::pipe().expect("pipe");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer)
            .spawn()
            .expect("gdb must be installed (/usr/bin/gdb)");
        // Close our copies of the write end (the Command holds them), so the reader sees gdb's end.
        drop(cmd);
        GdbProcess {
            child,
            output: collect_lines(reader),
            seen: String::new(),
        }
    }

    /// Waits until gdb printed `marker`; panics with what it printed after `limit`.
    pub fn wait_for(&mut self, marker: &str, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.seen.contains(marker) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.output.recv_timeout(left) {
                Ok(line) => self.seen.push_str(&line),
                Err(_) => panic!("gdb did not print {marker:?}:\n{}", self.seen),
            }
        }
    }

    /// SIGKILLs gdb and everything it started; what it had printed.
    pub fn kill(mut self) -> String {
        // SAFETY: kill(2) on the process group of a child we spawned (with process_group(0)) and have not reaped.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
        self.seen + &self.output.iter().collect::<String>()
    }

    /// Waits for gdb to end by itself (killing it after `GDB_LIMIT`); everything it printed.
    pub fn finish(mut self) -> String {
        let deadline = std::time::Instant::now() + GDB_LIMIT;
        while self.child.try_wait().expect("try_wait").is_none() {
            if std::time::Instant::now() > deadline {
                let printed = self.kill();
                panic!("gdb did not finish:\n{printed}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.seen + &self.output.iter().collect::<String>();
        println!("--- gdb output ---\n{out}");
        out
    }
}
