//! `perf-kvm report` on files from our writer and from the real `perf record`, checked against real perf.

#[path = "perf_data_fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};

use fixture::{perf, report_rows, temp_dir, GuestBinaries, ReportRow, LOST};
use perf_kvm::perf_data::{CallchainContext, PerfDataWriter};
use perf_kvm::report::{run_report, LoadError, ReportError, ReportOptions, SortKey};

fn options(bins: &GuestBinaries, data: &Path) -> ReportOptions {
    let mut options = ReportOptions::new(data.to_owned());
    options.symbols.guest_vmlinux = Some(bins.vmlinux.clone());
    options.symbols.guest_user_elf = Some(bins.user.clone());
    options
}

fn our_report(options: &ReportOptions) -> String {
    let mut out = Vec::new();
    run_report(options, &mut out).expect("report");
    String::from_utf8(out).unwrap()
}

fn perf_kvm_rows(bins: &GuestBinaries, data: &Path, extra: &[&str]) -> Vec<ReportRow> {
    let vmlinux = format!("--guestvmlinux={}", bins.vmlinux.display());
    let input = data.display().to_string();
    let args = [
        "kvm", "--host", "--guest", &vmlinux, "report", "-i", &input, "--stdio",
    ];
    let (stdout, _) = perf(&[&args[..], extra].concat());
    report_rows(&stdout)
}

fn sorted(mut rows: Vec<ReportRow>) -> Vec<ReportRow> {
    rows.sort_by(|a, b| a.columns.cmp(&b.columns));
    rows
}

#[test]
fn self_overhead_table_matches_perf_kvm_report() {
    for context in [CallchainContext::Plain, CallchainContext::Guest] {
        let bins = GuestBinaries::build(&temp_dir("rep-self"));
        let data = bins.write_recording("perf.data", context);
        let mut options = options(&bins, &data);
        options.children = false;
        let ours = our_report(&options);
        let theirs = perf_kvm_rows(&bins, &data, &["--no-children", "--sort", "comm,dso,sym"]);
        assert_eq!(theirs.len(), 4);
        assert_eq!(sorted(report_rows(&ours)), sorted(theirs), "{ours}");
        assert!(
            ours.contains(&format!("# Total Lost Samples: {LOST}")),
            "{ours}"
        );
        assert!(
            ours.contains("# Samples: 500  of event 'cpu-clock'"),
            "{ours}"
        );
        assert!(
            ours.contains("# Overhead  Command     Shared Object            Symbol"),
            "{ours}"
        );
    }
}

#[test]
fn children_table_matches_perf_kvm_report() {
    let bins = GuestBinaries::build(&temp_dir("rep-children"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let ours = our_report(&options(&bins, &data));
    let theirs = perf_kvm_rows(&bins, &data, &["--children", "--sort", "comm,dso,sym"]);
    // Children rows: the first percentage is parsed as the row's; the Self column is the first "column".
    let kernel_caller = theirs
        .iter()
        .find(|r| r.columns.last().unwrap() == "kernel_caller")
        .expect("perf row");
    assert_eq!(kernel_caller.percent, 80.0);
    assert_eq!(sorted(report_rows(&ours)), sorted(theirs), "{ours}");
}

#[test]
fn call_graph_shows_the_callers() {
    let bins = GuestBinaries::build(&temp_dir("rep-graph"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let mut options = options(&bins, &data);
    options.children = false;
    options.call_graph = true;
    options.sort = vec![SortKey::Sym];
    let ours = our_report(&options);
    let expected = "    60.00%  [g] kernel_hot\n            |\n            ---kernel_hot\n               kernel_caller\n";
    assert!(ours.contains(expected), "{ours}");
    let expected = "    20.00%  [u] user_hot\n            |\n            ---user_hot\n               user_main\n";
    assert!(ours.contains(expected), "{ours}");
}

#[test]
fn folded_stacks_and_flame_graph() {
    let bins = GuestBinaries::build(&temp_dir("rep-folded"));
    let data = bins.write_recording("perf.data", CallchainContext::Guest);
    let mut options = options(&bins, &data);
    options.folded = true;
    let ours = our_report(&options);
    assert_eq!(
        ours.lines().collect::<Vec<_>>(),
        [
            "cr3:0x1000;kernel_caller_[k];kernel_hot_[k] 300",
            "cr3:0x1000;kernel_caller_[k];kernel_warm_[k] 100",
            "cr3:0x3000;user_main;user_hot 60",
            "cr3:0x4000;user_main;user_hot 40",
        ]
    );
    let svg = bins.dir.join("flame.svg");
    options.folded = false;
    options.flamegraph = Some(svg.clone());
    our_report(&options);
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "not an SVG"
    );
    for name in ["kernel_hot", "kernel_caller", "user_main", "cr3:0x4000"] {
        assert!(svg.contains(name), "{name} missing from the flame graph");
    }
}

#[test]
fn vcpu_filter_keeps_one_vcpu() {
    let bins = GuestBinaries::build(&temp_dir("rep-vcpu"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let mut options = options(&bins, &data);
    options.children = false;
    options.vcpu = Some(1);
    options.sort = vec![SortKey::Cpu];
    let ours = our_report(&options);
    assert!(ours.contains("# Samples: 250  of event"), "{ours}");
    let rows = report_rows(&ours);
    assert_eq!(rows.len(), 1, "{ours}");
    assert_eq!(rows[0].columns, ["001"]);
}

#[test]
fn unfinished_file_is_reported_and_read() {
    let bins = GuestBinaries::build(&temp_dir("rep-killed"));
    let path = bins.dir.join("perf.data");
    let mut writer = PerfDataWriter::create(&path, &bins.meta(CallchainContext::Plain)).unwrap();
    for sample in &bins.samples()[..100] {
        writer.write_sample(sample).unwrap();
    }
    writer.flush().unwrap();
    std::mem::forget(writer);
    // A torn record at the end, as a write cut by SIGKILL leaves it; and the header of a recorder that died
    // before its first flush (data size 0).
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[9, 0, 0, 0, 4, 0, 0x50, 0, 1, 2, 3]);
    bytes[48..56].copy_from_slice(&0u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let mut out = Vec::new();
    let summary =
        run_report(&options(&bins, &path), &mut out).expect("an unfinished file still reports");
    let out = String::from_utf8(out).unwrap();
    assert_eq!(summary.samples, 100);
    assert!(
        out.contains("# WARNING: the file was not finished (recorder killed?)"),
        "{out}"
    );
    assert!(
        out.contains("ignored 11 trailing bytes of a torn record"),
        "{out}"
    );
    assert!(out.contains("# Samples: 100  of event"), "{out}");
}

#[test]
fn garbage_files_give_clear_errors() {
    let dir = temp_dir("rep-garbage");
    let cases: [(&str, Vec<u8>); 3] = [
        ("empty", Vec::new()),
        (
            "text",
            b"this is not a perf.data file at all, just some words here....".repeat(4),
        ),
        ("bad-sections", {
            let mut b = b"PERFILE2".to_vec();
            b.extend((0..96u8).map(|i| i.wrapping_mul(37)));
            b.extend_from_slice(&[0xff; 64]);
            b
        }),
    ];
    for (name, bytes) in cases {
        let path: PathBuf = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = run_report(&ReportOptions::new(path.clone()), &mut Vec::new()).expect_err(name);
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{name}: {message}"
        );
        match name {
            "bad-sections" => assert!(
                matches!(err, ReportError::Load(LoadError::BadLayout { .. })),
                "{err:?}"
            ),
            _ => assert!(
                matches!(err, ReportError::Load(LoadError::NotPerfData { .. })),
                "{err:?}"
            ),
        }
    }
    let missing =
        run_report(&ReportOptions::new(dir.join("missing")), &mut Vec::new()).expect_err("missing");
    assert!(
        matches!(missing, ReportError::Load(LoadError::Read { .. })),
        "{missing:?}"
    );
}

#[test]
fn reads_real_perf_record_output_like_perf_report() {
    let dir = temp_dir("rep-host");
    let data = dir.join("host.data");
    let output = data.display().to_string();
    let workload = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done";
    perf(&[
        "record",
        "-q",
        "-e",
        "cpu-clock",
        "-F",
        "1000",
        "-g",
        "-o",
        &output,
        "--",
        "sh",
        "-c",
        workload,
    ]);
    let mut options = ReportOptions::new(data.clone());
    options.children = false;
    options.sort = vec![SortKey::Comm, SortKey::Dso];
    let ours = our_report(&options);
    let (theirs, _) = perf(&[
        "report",
        "-i",
        &output,
        "--stdio",
        "--no-children",
        "--sort",
        "comm,dso",
        "-g",
        "none",
    ]);
    let samples_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("# Samples:"))
            .map(str::to_owned)
    };
    assert_eq!(
        samples_line(&ours),
        samples_line(&theirs),
        "{ours}\n{theirs}"
    );
    assert_eq!(
        sorted(report_rows(&ours)),
        sorted(report_rows(&theirs)),
        "{ours}\n{theirs}"
    );
    assert!(
        report_rows(&ours)
            .iter()
            .any(|r| r.columns == ["sh", "dash"] || r.columns[0] == "sh"),
        "{ours}"
    );
}

#[test]
fn cut_and_corrupted_files_never_panic() {
    let bins = GuestBinaries::build(&temp_dir("rep-fuzz"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let original = std::fs::read(&data).unwrap();
    let damaged = bins.dir.join("damaged.data");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..300usize {
        let mut bytes = original.clone();
        if round % 2 == 0 {
            bytes.truncate(round * original.len() / 300);
        } else {
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % bytes.len();
                bytes[at] = (seed >> 32) as u8;
            }
        }
        std::fs::write(&damaged, &bytes).unwrap();
        // Any outcome but a panic is fine: a report of what was readable, or an error.
        let _ = run_report(&ReportOptions::new(damaged.clone()), &mut Vec::new());
    }
}

#[test]
fn guest_kallsyms_symbolize_like_perf_kvm_guestkallsyms() {
    let bins = GuestBinaries::build(&temp_dir("rep-kallsyms"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let (nm, _) = (
        std::process::Command::new("nm")
            .arg(&bins.vmlinux)
            .output()
            .unwrap()
            .stdout,
        (),
    );
    let kallsyms = bins.dir.join("kallsyms");
    std::fs::write(&kallsyms, nm).unwrap();
    let mut options = ReportOptions::new(data.clone());
    options.symbols.guest_kallsyms = Some(kallsyms.clone());
    options.children = false;
    let ours = our_report(&options);
    let input = data.display().to_string();
    let flag = format!("--guestkallsyms={}", kallsyms.display());
    let args = [
        "kvm",
        "--host",
        "--guest",
        &flag,
        "report",
        "-i",
        &input,
        "--stdio",
        "--no-children",
    ];
    let (theirs, _) = perf(&args);
    let theirs = sorted(report_rows(&theirs));
    assert!(
        theirs
            .iter()
            .any(|r| r.columns.last().unwrap() == "kernel_warm"),
        "{theirs:?}"
    );
    assert_eq!(sorted(report_rows(&ours)), theirs, "{ours}");
}
