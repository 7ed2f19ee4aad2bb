//! A hostile guest against our VMM (issue 8): the test guest's `hostile=` modes storm the port and MMIO spaces,
//! take timer interrupts as fast as the host delivers them, point page tables outside guest RAM and spin on garbage
//! frame pointers while `perf-kvm record -g` samples and gdb reads memory. The VMM must keep the guest running to
//! its truth lines (or end it with a crash report), never panic, and its walkers must end every chain cleanly.
//!
//! The timer storm aims at 1,000,000 interrupts within 20 s (`HOSTILE_TIMER_IRQS`, `HOSTILE_TIMER_SECS` change
//! both); on PVM hosts the rate is far lower (see docs/test-guest.md), so it stops at the time bound.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod gdb_common;

use integration_tests::bins::{bin, run_with_deadline};
use integration_tests::guest_elf;

const VMM_LIMIT: Duration = Duration::from_secs(180);

fn run_vmm(cmdline: &str) -> (Output, String) {
    let (out, killed) = run_with_deadline(
        Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(guest_elf())
            .args(["--cmdline", cmdline]),
        VMM_LIMIT,
    );
    let all = integration_tests::bins::stdout_then_stderr(&out);
    println!("--- vmm output ({cmdline}) ---\n{all}");
    assert!(!killed, "vmm did not finish within {VMM_LIMIT:?}:\n{all}");
    assert!(!all.contains("panicked"), "the VMM panicked:\n{all}");
    (out, all)
}

/// `key=value` pairs of the `guest-hostile: MODE ...` line.
fn hostile_line(all: &str, mode: &str) -> HashMap<String, String> {
    let prefix = format!("guest-hostile: {mode} ");
    let line = all
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains('='))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{all}"));
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(fields: &HashMap<String, String>, key: &str) -> u64 {
    let v = fields
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|e| panic!("{key}={v}: {e}"))
}

/// The guest finished its workload normally: exit 0 and the overall truth line with every function. The shares
/// are only checked loosely (within 15 points): accuracy is record_accuracy.rs's business, and a host loaded enough
/// to stall the vCPU for tens of milliseconds stretches single slices past what the guest's correction phase can
/// make up in a one-second run.
fn assert_truth(code: Option<i32>, all: &str, weights: &[(&str, f64)]) {
    assert_eq!(code, Some(0), "guest did not finish cleanly:\n{all}");
    let line = all
        .lines()
        .find_map(|l| l.strip_prefix("guest-truth: "))
        .unwrap_or_else(|| panic!("no truth line:\n{all}"));
    for (name, want) in weights {
        let got: f64 = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {line}"))
            .parse()
            .unwrap();
        assert!(
            (got - want).abs() <= 15.0,
            "{name}: {got} vs {want} in {line}"
        );
    }
}

#[test]
fn port_io_storm_then_the_guest_runs_to_its_truth() {
    let storm = 4000;
    let (out, all) = run_vmm(&format!(
        "hostile=ports storm={storm} seed=3 work=user_hot_a:60,user_hot_b:40 secs=1"
    ));
    let f = hostile_line(&all, "ports");
    assert_eq!(num(&f, "attempts"), storm);
    assert!(
        num(&f, "reads") > storm / 5 && num(&f, "writes") > storm / 5,
        "{f:?}"
    );
    assert!(
        num(&f, "string_in_elems") > 0 && num(&f, "string_out_elems") > 0,
        "{f:?}"
    );
    // Unclaimed ports read as all-ones (an empty ISA bus), so most reads do; the UART's and KVM's do not.
    assert!(
        num(&f, "all_ones_reads") > 0 && num(&f, "all_ones_reads") < num(&f, "reads"),
        "{f:?}"
    );
    // String I/O reaches the UART element by element: four reads of its line status register each see THR empty,
    // and a line written with one `rep outsb` comes out whole.
    assert_eq!(num(&f, "rep_insb_lsr"), 0x6060_6060, "{f:?}");
    assert!(
        all.contains("\nguest-hostile: ports line written with rep outsb\n"),
        "{all}"
    );
    assert_truth(
        out.status.code(),
        &all,
        &[("user_hot_a", 60.0), ("user_hot_b", 40.0)],
    );
}

#[test]
fn mmio_storm_outside_ram_below_and_above_4g_completes_every_access() {
    let dir = scratch("mmio");
    let sock = dir.join("vm.sock");
    let vmm = LiveVmm::start(
        &[
            "--cmdline",
            "hostile=mmio storm=4000 seed=5 work=user_hot_a:60,user_hot_b:40 secs=2",
            "--control",
            sock.to_str().unwrap(),
        ],
        "guest-user: worker started",
    );
    let f = hostile_line(&vmm.early, "mmio");
    assert!(
        num(&f, "below_4g") > 1000 && num(&f, "above_4g") > 1000,
        "{f:?}"
    );
    assert!(num(&f, "writes") > 1000, "{f:?}");
    // Nothing is there: every load of any size reads all-ones.
    assert!(num(&f, "reads") > 1000, "{f:?}");
    assert_eq!(num(&f, "all_ones_reads"), num(&f, "reads"), "{f:?}");
    // 8-byte loads across the end of RAM: RAM bytes below, all-ones above.
    assert_eq!(num(&f, "straddles"), 7, "{f:?}");
    assert_eq!(num(&f, "straddle_ok"), 7, "{f:?}");
    // The highest window sits at the top of the guest's physical address space.
    let bits = num(&f, "phys_bits");
    assert_eq!(num(&f, "top_window"), (1u64 << bits) - (2 << 20), "{f:?}");
    // The VMM's exit accounting saw every access but keeps a bounded number of addresses.
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    writeln!(conn, r#"{{"v":1,"cmd":"exit_stats"}}"#).unwrap();
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).unwrap();
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let keys = v["exit_stats"][0]["by_key"].as_array().unwrap();
    let mmio: Vec<_> = keys
        .iter()
        .filter(|k| k[0]["reason"].as_str().unwrap().starts_with("mmio"))
        .collect();
    let exits: u64 = mmio.iter().map(|k| k[1]["count"].as_u64().unwrap()).sum();
    assert!(
        mmio.len() <= vmm::exit_stats::MAX_MMIO_KEYS + 2,
        "{} MMIO keys",
        mmio.len()
    );
    assert!(exits >= num(&f, "accesses"), "{exits} MMIO exits for {f:?}");
    let (code, all) = vmm.finish();
    assert!(!all.contains("panicked"), "{all}");
    assert_truth(code, &all, &[("user_hot_a", 60.0), ("user_hot_b", 40.0)]);
    std::fs::remove_dir_all(&dir).ok();
}

/// The same from ring 3, through user-accessible mappings of MMIO space (below 4 GiB and at 1 TiB): each exit costs
/// far more than from ring 0 on PVM hosts, so fewer of them.
#[test]
fn mmio_storm_from_ring3_completes_every_access() {
    let (out, all) =
        run_vmm("hostile=user-mmio storm=500 seed=9 work=user_hot_a:60,user_hot_b:40 secs=1");
    let f = hostile_line(&all, "user-mmio");
    assert_eq!(num(&f, "accesses"), 500, "{f:?}");
    assert!(num(&f, "reads") > 100, "{f:?}");
    assert_eq!(num(&f, "all_ones_reads"), num(&f, "reads"), "{f:?}");
    println!("ring-3 MMIO: {} µs per access", num(&f, "us_per_access"));
    assert_truth(
        out.status.code(),
        &all,
        &[("user_hot_a", 60.0), ("user_hot_b", 40.0)],
    );
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn timer_interrupt_storm_ends_by_count_or_time_and_the_workload_goes_on() {
    let target = env_u64("HOSTILE_TIMER_IRQS", 1_000_000);
    let secs = env_u64("HOSTILE_TIMER_SECS", 20);
    let hz = 100;
    let started = Instant::now();
    let (out, all) = run_vmm(&format!(
        "hostile=timer irqs={target} irq_secs={secs} hz={hz} work=user_hot_a:60,user_hot_b:40 secs=1"
    ));
    let f = hostile_line(&all, "timer");
    let (irqs, ms) = (num(&f, "irqs"), num(&f, "ms"));
    println!(
        "timer storm: {irqs} interrupts in {ms} ms ({} per second), target {target} in {secs} s, test took {:?}",
        num(&f, "rate_per_s"),
        started.elapsed()
    );
    assert!(
        irqs >= target.min(1000),
        "far too few timer interrupts: {f:?}"
    );
    if f["reached"] == "yes" {
        assert!(irqs >= target, "{f:?}");
    } else {
        // Not reached: the storm ran to its time bound (and the guest stopped it then, not much later).
        assert!(ms + 50 >= secs * 1000 && ms <= (secs + 2) * 1000, "{f:?}");
    }
    // The storm's interrupts are not counted as the workload's timer ticks: those follow the workload's length
    // (its functions' milliseconds) at `hz`.
    let stats = all
        .lines()
        .find_map(|l| l.strip_prefix("guest-stats cpu0: "))
        .unwrap_or_else(|| panic!("no stats line:\n{all}"));
    let field = |suffix: &str| -> u64 {
        stats
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| v.parse::<u64>().unwrap())
            .sum()
    };
    let (ticks, ms) = (field("ticks"), field("_ms"));
    assert!(
        ticks <= hz * (ms / 1000 + 2),
        "workload ticks include the storm's: {ticks} in {ms} ms at {hz} Hz"
    );
    assert_truth(
        out.status.code(),
        &all,
        &[("user_hot_a", 60.0), ("user_hot_b", 40.0)],
    );
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hostile-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running `vmm run --gdb 127.0.0.1:0` with stdout and stderr collected on threads.
struct LiveVmm {
    child: Child,
    gdb_address: String,
    stdout: std::sync::mpsc::Receiver<String>,
    /// Guest output up to the line `start` waited for.
    early: String,
}

impl LiveVmm {
    /// Starts the VM and returns once `ready` appears on its stdout.
    fn start(args: &[&str], ready: &str) -> LiveVmm {
        let mut child = Command::new(bin("vmm"))
            .args(["run", "--kernel"])
            .arg(guest_elf())
            .args(args)
            .args(["--gdb", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let gdb_address = loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).unwrap_or(0) > 0,
                "vmm ended early"
            );
            if let Some(rest) = line.trim().strip_prefix("vmm: gdb server listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut vmm = LiveVmm {
            child,
            gdb_address,
            stdout: rx,
            early: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        while !seen.contains(ready) {
            let left = deadline.saturating_duration_since(Instant::now());
            match vmm.stdout.recv_timeout(left) {
                Ok(line) => seen.push_str(&(line + "\n")),
                Err(_) => {
                    let _ = vmm.child.kill();
                    panic!("no {ready:?} from the guest:\n{seen}");
                }
            }
        }
        vmm.early = seen;
        vmm
    }

    /// Waits for the VM to end; its exit code and the whole stdout.
    fn finish(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < VMM_LIMIT, "the VM did not end");
            std::thread::sleep(Duration::from_millis(50));
        };
        let rest: Vec<String> = self.stdout.iter().collect();
        let out = format!("{}{}\n", self.early, rest.join("\n"));
        println!("--- vmm stdout ---\n{out}");
        (status.code(), out)
    }
}

impl Drop for LiveVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every line of `report --folded` is `comm;frame;...;frame count`: the frames of the deepest sample.
fn deepest_folded_stack(data: &Path) -> usize {
    let out = Command::new(bin("perf-kvm"))
        .args(["report", "--folded", "-i"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(';').count() - 1)
        .max()
        .unwrap_or(0)
}

#[test]
fn wild_frame_pointers_and_page_tables_outside_ram_under_record_g_and_gdb() {
    let dir = scratch("wild");
    let sock = dir.join("vm.sock");
    let data = dir.join("perf.data");
    let sock_arg = sock.to_str().unwrap().to_string();
    let vmm = LiveVmm::start(
        &[
            "--cmdline",
            "hostile=badpt work=user_wild_stack:50,user_hot_a:50 secs=6",
            "--control",
            &sock_arg,
        ],
        "guest-user: worker started",
    );
    let bad: HashMap<String, String> = vmm
        .early
        .lines()
        .filter_map(|l| l.strip_prefix("guest-hostile: badpt "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(bad.len(), 10, "badpt addresses: {bad:?}");
    let record = Command::new(bin("perf-kvm"))
        .args(["record", "-F", "1000", "-g", "--duration", "4", "-o"])
        .arg(&data)
        .arg("--vm")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // While samples are taken, gdb stops the VM and reads through every bad entry, then lets it go on.
    let unreadable = [
        "pml4_past_ram",
        "pml4_huge",
        "pdpt_huge",
        "pdpt_1g_leaf",
        "pd_2m_leaf",
        "pd_pt_past_ram",
        "pt_past_ram",
        "pt_huge",
    ];
    let mut cmds: Vec<String> = unreadable
        .iter()
        .map(|k| format!("x/2gx {}", bad[*k]))
        .collect();
    cmds.push(format!("x/2gx {}", bad["pt_last_ram_word"]));
    cmds.push(format!("x/2gx {}", bad["recursive"]));
    cmds.extend([
        "bt 300".into(),
        "info registers rbp".into(),
        "detach".into(),
    ]);
    let text = gdb_common::run_gdb(
        &vmm.gdb_address,
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for k in unreadable {
        let addr = bad[k].trim_start_matches("0x");
        assert!(
            text.contains(&format!("Cannot access memory at address 0x{addr}")),
            "{k}: gdb read something at {addr}:\n{text}"
        );
    }
    // The last word of RAM reads; the next page (past RAM) does not: a partial read.
    let last = u64::from_str_radix(bad["pt_last_ram_word"].trim_start_matches("0x"), 16).unwrap();
    assert!(
        text.contains(&format!("Cannot access memory at address {:#x}", last + 8)),
        "no partial read at {last:#x}:\n{text}"
    );
    // The recursive entry reads the PML4 itself: its entry 1 is the one pointing past RAM.
    let rec = bad["recursive"].trim_start_matches("0x");
    // (gdb's errors go to stderr, so its stdout runs such lines together: match the value right after the address.)
    assert!(text.contains(&format!("0x{rec}:\t0x")), "{text}");
    assert!(text.contains("Inferior 1 (process 1) detached"), "{text}");

    let rec_out = record.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&rec_out.stderr);
    assert!(rec_out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (code, out) = vmm.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("guest-exception"), "{out}");

    // Samples are there, in the wild spin, and the chains stop at the walker's depth limit even on the 200-frame
    // chain (the sample's own IP + 127 frames).
    let report = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "-i"])
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    println!("--- report ---\n{text}");
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let share = |sym: &str| -> f64 {
        text.lines()
            .filter(|l| l.trim_end().ends_with(&format!("] {sym}")))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|v| v.trim_end_matches('%').parse::<f64>().ok())
            .sum()
    };
    let wild = share("user_wild_spin") + share("user_plain_spin");
    assert!(wild > 15.0, "user_wild_spin has {wild}% self time:\n{text}");
    let depth = deepest_folded_stack(&data);
    assert_eq!(depth, 128, "deepest recorded stack");
    // Real perf reads the file too.
    let perf = Command::new("perf")
        .args(["script", "-i"])
        .arg(&data)
        .output()
        .expect("perf installed");
    assert!(
        perf.status.success(),
        "{}",
        String::from_utf8_lossy(&perf.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cr3_outside_ram_ends_with_a_crash_report_under_record_and_gdb() {
    for (mode, cr3_shown) in [("cr3-past-ram", "CR3: 10000000"), ("cr3-huge", "CR3: ")] {
        let (out, all) = run_vmm(&format!("fault={mode}"));
        assert_eq!(out.status.code(), Some(1), "{mode}:\n{all}");
        assert!(all.contains("vmm: guest crashed"), "{mode}:\n{all}");
        assert!(all.contains(cr3_shown), "{mode}:\n{all}");
        // Nothing maps RIP any more: the report says so instead of reading anything.
        assert!(all.contains("Code: <unreadable>"), "{mode}:\n{all}");
    }
    // The same crash while perf-kvm record -g samples: the file is complete and readable.
    let dir = scratch("cr3");
    let data = dir.join("perf.data");
    let rec = Command::new(bin("perf-kvm"))
        .args(["record", "-F", "1000", "-g", "-o"])
        .arg(&data)
        .args(["--", "run", "--kernel"])
        .arg(guest_elf())
        .args(["--cmdline", "fault=cr3-huge"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&rec.stderr);
    assert!(rec.status.success(), "{stderr}");
    assert!(
        stderr.contains("the guest crashed") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let report = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "-g", "-i"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    // And with gdb attached: the crash stops the vCPU, and gdb reads through the bad CR3 without harm.
    let vmm = LiveVmm::start(&["--cmdline", "fault=cr3-huge", "--gdb-wait"], "");
    let cmds: Vec<String> = [
        "continue",
        "p/x $cr3",
        "x/2gx $pc",
        "x/2gx $sp",
        "bt",
        "kill",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let text = gdb_common::run_gdb(
        &vmm.gdb_address,
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(text.contains("SIGSEGV"), "{text}");
    assert!(
        text.contains("Cannot access memory at address 0xffffffff8"),
        "{text}"
    );
    let (code, _) = vmm.finish();
    assert!(code.is_some(), "killed by a signal");
    std::fs::remove_dir_all(&dir).ok();
}

/// `int3` in the last byte of the address space: the instruction after it is at 0. On PVM hosts the VMM delivers the
/// #BP itself (RIP + 1 wrapped; an overflow panic before) and, should a vCPU thread ever panic, the VM now ends with a
/// report instead of hanging.
#[test]
fn int3_at_the_top_of_the_address_space_reaches_the_guest() {
    let (out, all) = run_vmm("fault=int3-top");
    assert_eq!(out.status.code(), Some(35), "{all}");
    assert!(all.contains("vector=3 #BP rip=0x0 "), "{all}");
}
