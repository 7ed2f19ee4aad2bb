//! `perf-kvm record` under faults (issue #8): SIGINT/SIGTERM at random moments leave a complete file whose sample
//! count is what record said; SIGKILL leaves a file `report` calls truncated and still reads; a full disk (a small
//! tmpfs, or RLIMIT_FSIZE) ends the recording with one error line over a valid file; a control-socket client killed
//! mid-stream leaves the VMM and its guest running for the next client.
//!
//! The moments come from a seeded generator; the seed is printed, and `RECORD_SIGNALS_SEED=N` replays a run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bins::bin;
use integration_tests::guest_elf;

/// A small xorshift generator: the moments must be reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("RECORD_SIGNALS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: seed {seed} (replay with RECORD_SIGNALS_SEED={seed})");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration uniformly in `[lo_ms, hi_ms)`.
    fn between_ms(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.next() % (hi_ms - lo_ms))
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pkvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn guest_run_args(cmdline: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .to_vec()
}

fn send(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet (a zombie at worst), so it is never another
    // process's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Waits until `pid` has handlers for SIGINT and SIGTERM (SigCgt in /proc), so a "random moment" never falls
/// before the program could possibly react to the signal.
fn wait_for_handlers(child: &mut Child) {
    let want = (1u64 << (libc::SIGINT - 1)) | (1u64 << (libc::SIGTERM - 1));
    let t = Instant::now();
    loop {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .unwrap_or(0);
        if caught & want == want {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "record exited before installing its handlers"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "record never installed its signal handlers"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for record's first progress line on stderr (`... samples/s ]`), then keeps draining stderr so record
/// never blocks on it.
fn wait_for_first_progress(child: &mut Child) {
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&seen).contains("samples/s ]") {
                let _ = tx.send(());
                told = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no progress line from record within 60 s");
}

fn wait_with_deadline(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: the waiting thread has not reaped it (it would have answered), so the pid is still ours.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("pid {pid} did not finish within {limit:?}");
        }
    }
}

/// The `N` of record's `(N samples, M lost)` line.
fn recorded_samples(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("Captured and wrote"))
        .unwrap_or_else(|| panic!("no summary line from record:\n{stderr}"));
    line.split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad summary line {line}"))
}

/// `perf-kvm report --stdio`: its output, and the `# Samples: N` it gives.
fn report(data: &Path) -> (Output, String, u64) {
    let out = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "-i"])
        .arg(data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no `# Samples:` line in report:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out, text, samples)
}

/// Real perf reads the file without an error and sees `expect` samples. `perf script` shows guest samples only with
/// a guest kernel image, given as a copy (perf 6.1 double-frees when it is also the mapped user binary: README).
fn assert_perf_script_reads(data: &Path, expect: u64) {
    // Not next to the data: that may be a full file system.
    let vmlinux = std::env::temp_dir().join(format!("pkvm-vmlinux-{}.elf", std::process::id()));
    std::fs::copy(guest_elf(), &vmlinux).unwrap();
    let out = Command::new("perf")
        .arg("script")
        .arg(format!("--guestvmlinux={}", vmlinux.display()))
        .args(["-F", "cpu,time", "-i"])
        .arg(data)
        .output()
        .expect("perf installed (scripts/install-test-deps)");
    std::fs::remove_file(&vmlinux).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "perf script failed: {stderr}");
    assert!(
        !stderr.to_lowercase().contains("error") && !stderr.contains("truncated"),
        "perf script complained: {stderr}"
    );
    // One line per sample: with these fields perf prints no callchain lines.
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    assert_eq!(lines, expect, "perf script's samples vs record's count");
}

/// Asserts the file is complete and valid and holds exactly `samples` samples, by both readers.
fn assert_complete(data: &Path, samples: u64) {
    let (out, text, reported) = report(data);
    assert!(
        out.status.success(),
        "report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("WARNING"), "{text}");
    assert_eq!(
        reported, samples,
        "report's sample count vs record's:\n{text}"
    );
    assert_perf_script_reads(data, samples);
}

#[derive(Clone, Copy, Debug)]
enum Moment {
    /// Within the first 150 ms after the handlers exist: the VM is still starting (or attaching).
    Early,
    Mid,
    /// Around the time the guest's workload ends by itself.
    NearEnd,
}

impl Moment {
    fn pick(self, rng: &mut Rng) -> Duration {
        match self {
            Moment::Early => rng.between_ms(0, 150),
            Moment::Mid => rng.between_ms(600, 1400),
            Moment::NearEnd => rng.between_ms(1700, 2600),
        }
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "?",
    }
}

/// One signal plan per moment, both SIGINT and SIGTERM among them, in an order the generator picks.
fn plan(rng: &mut Rng) -> Vec<(Moment, libc::c_int)> {
    let mut signals = [libc::SIGINT, libc::SIGTERM, libc::SIGINT];
    if rng.next().is_multiple_of(2) {
        signals[2] = libc::SIGTERM;
    }
    let k = (rng.next() % 3) as usize;
    signals.rotate_left(k);
    [Moment::Early, Moment::Mid, Moment::NearEnd]
        .into_iter()
        .zip(signals)
        .collect()
}

const GUEST: &str = "work=user_hot_a:70,kernel_spin:30 secs=2";

/// `perf-kvm record -o DATA EXTRA... TAIL...` (1 kHz unless EXTRA says otherwise).
fn spawn_record(data: &Path, extra: &[&str], tail: &[String]) -> Child {
    let freq: &[&str] = if extra.contains(&"-F") {
        &[]
    } else {
        &["-F", "1000"]
    };
    Command::new(bin("perf-kvm"))
        .arg("record")
        .args(freq)
        .arg("-o")
        .arg(data)
        .args(extra)
        .args(tail)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A VMM serving `--control` with the guest running `cmdline`, once its socket exists.
fn spawn_vmm(dir: &Path, cmdline: &str) -> (Child, PathBuf) {
    let sock = dir.join("vm.sock");
    let _ = std::fs::remove_file(&sock);
    let vm = Command::new(bin("vmm"))
        .args(guest_run_args(cmdline))
        .arg("--control")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    integration_tests::bins::wait_until_exists(&sock, Duration::from_secs(30));
    (vm, sock)
}

fn interrupted_record_is_complete(
    rng: &mut Rng,
    dir: &Path,
    moment: Moment,
    signal: libc::c_int,
    attach: bool,
) {
    let data = dir.join(format!("{moment:?}-{}.data", signal_name(signal)));
    let vmm = attach.then(|| spawn_vmm(dir, GUEST));
    let mut rec = match &vmm {
        Some((_, sock)) => spawn_record(&data, &["--vm", sock.to_str().unwrap()], &[]),
        None => {
            let mut tail = vec!["--".to_string()];
            tail.extend(guest_run_args(GUEST));
            spawn_record(&data, &[], &tail)
        }
    };
    wait_for_handlers(&mut rec);
    let delay = moment.pick(rng);
    std::thread::sleep(delay);
    send(&rec, signal);
    let out = wait_with_deadline(rec, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let what = format!(
        "{} after {delay:?} ({moment:?}, {})",
        signal_name(signal),
        if attach { "--vm" } else { "in-process" }
    );
    assert!(out.status.success(), "{what}: record failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let samples = recorded_samples(&stderr);
    eprintln!("{what}: {samples} samples");
    assert_complete(&data, samples);
    if let Some((vm, _)) = vmm {
        let out = wait_with_deadline(vm, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{what}: the VMM failed after record left"
        );
    }
}

#[test]
fn sigint_and_sigterm_at_random_moments_leave_complete_files_in_process() {
    let mut rng = Rng::from_env("in-process");
    let dir = scratch("sig-inproc");
    for (moment, signal) in plan(&mut rng) {
        interrupted_record_is_complete(&mut rng, &dir, moment, signal, false);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigint_and_sigterm_at_random_moments_leave_complete_files_attached() {
    let mut rng = Rng::from_env("--vm");
    let dir = scratch("sig-attach");
    for (moment, signal) in plan(&mut rng) {
        interrupted_record_is_complete(&mut rng, &dir, moment, signal, true);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Complete records in the data section, walked independently of both readers: `(samples, bytes)`.
fn samples_on_disk(data: &Path) -> u64 {
    let bytes = std::fs::read(data).unwrap();
    assert_eq!(&bytes[..8], b"PERFILE2");
    let data_offset = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let (mut at, mut samples) = (data_offset, 0);
    while at + 8 <= bytes.len() {
        let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let size = u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as usize;
        if size < 8 || at + size > bytes.len() {
            break;
        }
        samples += u64::from(kind == 9);
        at += size;
    }
    samples
}

fn killed_record_is_reported_as_truncated(rng: &mut Rng, dir: &Path, attach: bool) {
    let data = dir.join("killed.data");
    let guest = "work=user_hot_a:70,kernel_spin:30 secs=4";
    let vmm = attach.then(|| spawn_vmm(dir, guest));
    let mut rec = match &vmm {
        Some((_, sock)) => spawn_record(&data, &["-g", "--vm", sock.to_str().unwrap()], &[]),
        None => {
            let mut tail = vec!["--".to_string()];
            tail.extend(guest_run_args(guest));
            spawn_record(&data, &["-g"], &tail)
        }
    };
    // The first progress line comes right after the first flush: samples are on disk from then on (before it,
    // they sit in the writer's buffer and a SIGKILL leaves a header with data size 0). The moment falls between
    // that and the guest's end, so some kills land just after a flush and some with records past it.
    wait_for_first_progress(&mut rec);
    let delay = rng.between_ms(0, 1500);
    std::thread::sleep(delay);
    send(&rec, libc::SIGKILL);
    let _ = wait_with_deadline(rec, Duration::from_secs(30));
    let what = format!(
        "SIGKILL after {delay:?} ({})",
        if attach { "--vm" } else { "in-process" }
    );
    let on_disk = samples_on_disk(&data);
    let header_data_size =
        u64::from_le_bytes(std::fs::read(&data).unwrap()[48..56].try_into().unwrap());
    eprintln!(
        "{what}: {on_disk} complete sample records on disk, header data size {header_data_size}"
    );
    assert!(on_disk > 0, "{what}: no samples reached the disk");
    let (out, text, reported) = report(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("# WARNING"))
        .collect();
    assert_eq!(warnings.len(), 1, "{what}: want one warning line:\n{text}");
    assert!(
        warnings[0].contains("not finished"),
        "{what}: {}",
        warnings[0]
    );
    assert_eq!(
        reported, on_disk,
        "{what}: report must show every complete sample:\n{text}"
    );
    assert!(
        text.contains("user_hot_a"),
        "{what}: no symbols in the report:\n{text}"
    );
    if let Some((vm, _)) = vmm {
        let out = wait_with_deadline(vm, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{what}: the VMM failed after record was killed"
        );
    }
}

#[test]
fn sigkill_leaves_a_file_report_calls_truncated_and_reads() {
    let mut rng = Rng::from_env("sigkill");
    let dir = scratch("sig-kill");
    killed_record_is_reported_as_truncated(&mut rng, &dir, false);
    killed_record_is_reported_as_truncated(&mut rng, &dir, true);
    std::fs::remove_dir_all(&dir).ok();
}

/// Records at a high rate into `data` until the disk (or the file size limit) refuses; checks the one error line
/// and the file left behind.
fn record_until_full(data: &Path, fsize_limit: Option<u64>) {
    let mut tail = vec!["--".to_string()];
    tail.extend(guest_run_args("work=user_hot_a:70,kernel_spin:30 secs=20"));
    let mut cmd = Command::new(bin("perf-kvm"));
    cmd.args(["record", "-F", "10000", "-g", "-o"])
        .arg(data)
        .args(&tail)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = fsize_limit {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let out = wait_with_deadline(cmd.spawn().unwrap(), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "record must fail on a full disk: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| l.starts_with("perf-kvm:"))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line:\n{stderr}");
    let line = errors[0];
    let want_cause = if fsize_limit.is_some() {
        "File too large"
    } else {
        "No space left on device"
    };
    assert!(
        line.contains(want_cause) && line.contains("and is complete"),
        "{line}"
    );
    let kept: u64 = line
        .split("keeps the ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sample count in: {line}"));
    eprintln!("{line}");
    assert!(kept > 0, "{line}");
    assert_complete(data, kept);
}

#[test]
fn disk_full_ends_record_with_one_error_and_a_complete_file() {
    let dir = scratch("disk-full");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        /// Unmounts even when the checks fail.
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(&mnt);
        eprintln!("a 256 KiB tmpfs at {}", mnt.display());
        record_until_full(&mnt.join("p.data"), None);
    } else {
        eprintln!(
            "cannot mount a tmpfs (not root?): a 256 KiB RLIMIT_FSIZE stands for the full disk"
        );
        record_until_full(&dir.join("p.data"), Some(256 * 1024));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn file_size_limit_ends_record_with_one_error_and_a_complete_file() {
    let dir = scratch("fsize");
    record_until_full(&dir.join("p.data"), Some(200 * 1024 + 17));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_control_client_killed_mid_stream_leaves_the_vm_serving() {
    let dir = scratch("client-kill");
    let (vm, sock) = spawn_vmm(&dir, "work=user_hot_a:100 secs=16");
    // A record killed mid-stream.
    let mut first = spawn_record(
        &dir.join("a.data"),
        &["-F", "5000", "-g", "--vm", sock.to_str().unwrap()],
        &[],
    );
    wait_for_handlers(&mut first);
    std::thread::sleep(Duration::from_millis(1000));
    send(&first, libc::SIGKILL);
    let _ = wait_with_deadline(first, Duration::from_secs(30));
    // A raw client that asks for the stream, never reads it, and goes away.
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    writeln!(
        raw,
        r#"{{"v":1,"cmd":"sample","freq":5000,"callchain":true}}"#
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    drop(raw);
    // A client that asks for the stream and stays connected without reading loses the session once its socket
    // buffer is full and a write has blocked for 5 s (vmm/docs/control-protocol.md).
    let mut stalled = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    writeln!(
        stalled,
        r#"{{"v":1,"cmd":"sample","freq":5000,"callchain":true}}"#
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    // A new client streams again.
    let data = dir.join("c.data");
    let rec = spawn_record(
        &data,
        &["--duration", "1.5", "--vm", sock.to_str().unwrap()],
        &[],
    );
    let out = wait_with_deadline(rec, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the next record failed: {stderr}");
    let samples = recorded_samples(&stderr);
    assert!(
        samples > 100,
        "the next client got only {samples} samples: {stderr}"
    );
    assert_complete(&data, samples);
    drop(stalled);
    // The guest finishes its workload and says so.
    let mut vm = vm;
    let mut stdout = String::new();
    vm.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let out = wait_with_deadline(vm, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "the VMM failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("guest-truth:"),
        "no truth line from the guest:\n{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
