//! `perf-kvm record` on the test guest against the guest's own truth: shares within ±3 points, callchains with the
//! known shape in both rings, and the real perf reading the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::bins::{bin, run_with_deadline};
use integration_tests::guest_elf;

struct Recording {
    /// The guest's overall truth line, function → percent.
    truth: BTreeMap<String, f64>,
    /// `perf-kvm report --folded`: stack → samples.
    folded: Vec<(String, u64)>,
    data: std::path::PathBuf,
}

fn record(work: &str, secs: u32, cpus: u32) -> Recording {
    let data = std::env::temp_dir().join(format!(
        "pkvm-acc-{}-{}.data",
        std::process::id(),
        work.len()
    ));
    let elf = guest_elf();
    let (out, killed) = run_with_deadline(
        Command::new(bin("perf-kvm"))
            .args(["record", "-F", "1000", "-g", "-o"])
            .arg(&data)
            .args([
                "--",
                "run",
                "--kernel",
                elf.to_str().unwrap(),
                "--cpus",
                &cpus.to_string(),
                "--cmdline",
            ])
            .arg(format!("work={work} secs={secs}")),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !killed && out.status.success(),
        "record failed:\n{stdout}\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("guest-truth: "))
        .expect("truth line");
    let truth = line["guest-truth: ".len()..]
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let report = Command::new(bin("perf-kvm"))
        .args(["report", "--folded", "-i"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let folded = String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter_map(|l| {
            let (stack, n) = l.rsplit_once(' ')?;
            Some((stack.to_string(), n.parse().ok()?))
        })
        .collect();
    Recording {
        truth,
        folded,
        data,
    }
}

fn frames(stack: &str) -> Vec<&str> {
    stack
        .split(';')
        .map(|f| f.trim_end_matches("_[k]"))
        .collect()
}

/// Which workload function a sample belongs to, the way the guest times it: `kernel_spin` is timed in ring 3 around
/// the whole system call, so its ring-3 stub (`user_enter_kernel_spin`) and the kernel entry path (on PVM hosts the
/// #UD gate: `exc_common` → `exception_handler` → `syscall_dispatch`) count for it, except the final report's
/// output calls (`finish`, `print`).
fn workload_of<'a>(truth: &'a BTreeMap<String, f64>, fs: &[&str]) -> Option<&'a String> {
    if let Some(name) = truth.keys().find(|k| fs.contains(&k.as_str())) {
        return Some(name);
    }
    let entry_path = fs.get(1).is_some_and(|f| *f == "exc_common")
        && !fs
            .iter()
            .any(|f| f.contains("finish") || f.contains("print") || f.contains("timer"));
    if fs.contains(&"user_enter_kernel_spin") || entry_path {
        return truth.get_key_value("kernel_spin").map(|(k, _)| k);
    }
    None
}

/// Share of each truth function among the samples that belong to one of them.
fn measured_shares(rec: &Recording) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = rec.truth.keys().map(|k| (k.clone(), 0)).collect();
    for (stack, n) in &rec.folded {
        if let Some(name) = workload_of(&rec.truth, &frames(stack)) {
            *counts.get_mut(name).unwrap() += n;
        }
    }
    let total: u64 = counts.values().sum();
    assert!(total > 1000, "too few workload samples: {counts:?}");
    counts
        .into_iter()
        .map(|(k, n)| (k, 100.0 * n as f64 / total as f64))
        .collect()
}

/// Of the samples whose innermost frame is `leaf`, the fraction whose stack holds `chain` (outermost first) in order.
fn chain_fraction(rec: &Recording, leaf: &str, chain: &[&str]) -> f64 {
    let (mut with, mut all) = (0u64, 0u64);
    let mut without = Vec::new();
    for (stack, n) in &rec.folded {
        let fs = frames(stack);
        if fs.last() != Some(&leaf) {
            continue;
        }
        all += n;
        if fs.windows(chain.len()).any(|w| w == chain) {
            with += n;
        } else {
            without.push((*n, stack.as_str()));
        }
    }
    // Shown on failure: which chains fell short, most frequent first.
    without.sort_by_key(|w| std::cmp::Reverse(w.0));
    for (n, stack) in without.iter().take(8) {
        println!("{leaf} without the full chain: {n} x {stack}");
    }
    assert!(all > 100, "too few {leaf} samples ({all})");
    with as f64 / all as f64
}

fn assert_shares_match(rec: &Recording) {
    let measured = measured_shares(rec);
    for (name, want) in &rec.truth {
        let got = measured[name];
        assert!(
            (got - want).abs() <= 3.0,
            "{name}: report {got:.1}% vs guest truth {want:.1}% ({measured:?})"
        );
    }
}

#[test]
fn user_workload_shares_and_callchains_match_the_guest_truth() {
    let rec = record("user_hot_a:60,user_hot_b:30,user_cold:10", 5, 1);
    assert_shares_match(&rec);
    let f = chain_fraction(
        &rec,
        "user_leaf",
        &["user_hot_a", "user_stage1", "user_stage2", "user_leaf"],
    );
    assert!(
        f >= 0.95,
        "only {:.1}% of user_leaf samples carry the full chain",
        f * 100.0
    );
    real_perf_reads(&rec.data, "user_leaf");
    std::fs::remove_file(&rec.data).ok();
}

#[test]
fn kernel_workload_shares_and_callchains_match_the_guest_truth() {
    let rec = record("kernel_spin:40,user_hot_a:60", 4, 1);
    assert_shares_match(&rec);
    let f = chain_fraction(
        &rec,
        "kernel_leaf",
        &[
            "kernel_spin",
            "kernel_stage1",
            "kernel_stage2",
            "kernel_leaf",
        ],
    );
    assert!(
        f >= 0.95,
        "only {:.1}% of kernel_leaf samples carry the full chain",
        f * 100.0
    );
    // Kernel frames are marked guest-kernel in the report.
    assert!(
        rec.folded
            .iter()
            .any(|(s, _)| s.contains("kernel_leaf_[k]")),
        "kernel_leaf not marked [k]"
    );
    real_perf_reads(&rec.data, "kernel_leaf");
    std::fs::remove_file(&rec.data).ok();
}

/// Debian's linux-perf reads the file: `perf script` names the hot leaf, and `perf kvm --guest report` puts the
/// same symbol on top as our report. perf 6.1 double-frees when `--guestvmlinux` names the very file that is also a
/// guest user mapping (the test guest's one ELF is both), so perf gets a copy of the ELF: same bytes, same build-id.
fn real_perf_reads(data: &Path, leaf: &str) {
    let copy = data.with_extension("vmlinux");
    std::fs::copy(guest_elf(), &copy).unwrap();
    let guestvmlinux = format!("--guestvmlinux={}", copy.display());
    let perf = |args: &[&str]| {
        let out = Command::new("perf")
            .args(args.iter().map(|a| {
                if *a == "GUESTVMLINUX" {
                    guestvmlinux.as_str()
                } else {
                    a
                }
            }))
            .arg("-i")
            .arg(data)
            .output()
            .expect("perf is installed (scripts/install-test-deps)");
        assert!(
            out.status.success(),
            "perf {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let script = perf(&["script", "-F", "ip,sym", "GUESTVMLINUX"]);
    assert!(script.contains(leaf), "perf script does not name {leaf}");
    let theirs = perf(&[
        "kvm",
        "--guest",
        "GUESTVMLINUX",
        "report",
        "--stdio",
        "--no-children",
        "--sort",
        "sym",
    ]);
    let top_theirs = theirs
        .lines()
        .find(|l| l.contains('%') && !l.starts_with('#'))
        .unwrap_or_default();
    let ours = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"])
        .arg(data)
        .output()
        .unwrap();
    let ours = String::from_utf8_lossy(&ours.stdout);
    let top_ours = ours
        .lines()
        .find(|l| l.contains('%') && !l.starts_with('#'))
        .unwrap_or_default();
    let name = |l: &str| l.split_whitespace().last().unwrap_or_default().to_string();
    assert_eq!(
        name(top_theirs),
        name(top_ours),
        "top symbol: perf {top_theirs:?} vs ours {top_ours:?}"
    );
    assert!(
        theirs.contains(leaf),
        "perf kvm report does not name {leaf}:\n{theirs}"
    );
    std::fs::remove_file(&copy).ok();
}
