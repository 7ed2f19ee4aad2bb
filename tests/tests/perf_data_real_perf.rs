//! perf.data files from our writer, read by the real `perf` (the installed /usr/bin/perf).

#[path = "perf_data_fixture.rs"]
mod fixture;

use fixture::{perf, report_rows, temp_dir, GuestBinaries, LOST};
use perf_kvm::perf_data::{CallchainContext, PerfDataError, PerfDataWriter};

fn guest_report(bins: &GuestBinaries, data: &std::path::Path, sort: &str) -> String {
    let vmlinux = format!("--guestvmlinux={}", bins.vmlinux.display());
    let input = data.display().to_string();
    let args = [
        "kvm",
        "--host",
        "--guest",
        &vmlinux,
        "report",
        "-i",
        &input,
        "--stdio",
        "--no-children",
    ];
    let (stdout, _) = perf(&[&args[..], &["--sort", sort]].concat());
    stdout
}

#[test]
fn perf_kvm_report_attributes_samples_to_guest_symbols() {
    let bins = GuestBinaries::build(&temp_dir("pd-report"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let stdout = guest_report(&bins, &data, "dso,sym");
    let rows = report_rows(&stdout);
    let row = |sym: &str| {
        rows.iter()
            .find(|r| r.columns.last().map(String::as_str) == Some(sym))
            .unwrap_or_else(|| panic!("{sym} in\n{stdout}"))
    };
    assert_eq!(row("kernel_hot").percent, 60.0);
    assert_eq!(
        row("kernel_hot").columns,
        ["[guest.kernel.kallsyms]", "[g]", "kernel_hot"]
    );
    assert_eq!(row("kernel_warm").percent, 20.0);
    assert_eq!(row("kernel_warm").columns[1], "[g]");
    assert_eq!(row("user_hot").percent, 20.0);
    assert_eq!(row("user_hot").columns, ["user", "[u]", "user_hot"]);
    assert_eq!(rows.len(), 3, "{stdout}");
    assert!(
        stdout.contains(&format!("Total Lost Samples: {LOST}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("Samples: 500  of event 'cpu-clock'"),
        "{stdout}"
    );
}

#[test]
fn perf_kvm_report_splits_guest_user_samples_by_address_space() {
    let bins = GuestBinaries::build(&temp_dir("pd-comm"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let stdout = guest_report(&bins, &data, "comm,sym");
    let rows = report_rows(&stdout);
    let percent = |comm: &str, sym: &str| {
        rows.iter()
            .find(|r| {
                r.columns.first().map(String::as_str) == Some(comm)
                    && r.columns.last().map(String::as_str) == Some(sym)
            })
            .unwrap_or_else(|| panic!("{comm} {sym} in\n{stdout}"))
            .percent
    };
    assert_eq!(percent("cr3:0x3000", "user_hot"), 12.0);
    assert_eq!(percent("cr3:0x4000", "user_hot"), 8.0);
    assert_eq!(percent("cr3:0x1000", "kernel_hot"), 60.0);
}

#[test]
fn perf_script_shows_guest_callchains() {
    let bins = GuestBinaries::build(&temp_dir("pd-script"));
    let data = bins.write_recording("perf.data", CallchainContext::Plain);
    let vmlinux = format!("--guestvmlinux={}", bins.vmlinux.display());
    let (stdout, _) = perf(&["script", &vmlinux, "-i", &data.display().to_string()]);
    let blocks: Vec<&str> = stdout
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    assert_eq!(blocks.len(), 500, "{stdout}");
    let first: Vec<&str> = blocks[0].lines().map(str::trim).collect();
    assert!(
        first[0].starts_with("cr3:0x1000  1000 [000]"),
        "{}",
        blocks[0]
    );
    assert!(
        first[1].ends_with("kernel_hot+0x4 ([guest.kernel.kallsyms])"),
        "{}",
        blocks[0]
    );
    assert!(
        first[2].ends_with("kernel_caller+0x5 ([guest.kernel.kallsyms])"),
        "{}",
        blocks[0]
    );
    let user = blocks
        .iter()
        .find(|b| b.contains("user_hot"))
        .expect("a user sample");
    assert!(user.contains("user_hot+0x4 ("), "{user}");
    assert!(user.contains("user_main+0x5 ("), "{user}");
}

#[test]
fn perf_dump_shows_guest_cpumodes_markers_and_build_id() {
    let bins = GuestBinaries::build(&temp_dir("pd-dump"));
    let data = bins.write_recording("perf.data", CallchainContext::Guest);
    let input = data.display().to_string();
    let (dump, _) = perf(&["report", "-D", "-i", &input]);
    let guest_kernel = dump.matches("PERF_RECORD_SAMPLE(IP, 0x4)").count();
    let guest_user = dump.matches("PERF_RECORD_SAMPLE(IP, 0x5)").count();
    assert_eq!((guest_kernel, guest_user), (400, 100));
    // With guest markers the raw chain starts with PERF_CONTEXT_GUEST_KERNEL (-2176) / _USER (-2560).
    assert!(
        dump.contains("0: fffffffffffff780"),
        "no PERF_CONTEXT_GUEST_KERNEL in the dump"
    );
    assert!(
        dump.contains("0: fffffffffffff600"),
        "no PERF_CONTEXT_GUEST_USER in the dump"
    );
    assert!(dump.contains("[guest.kernel.kallsyms]"));
    let (ids, _) = perf(&["buildid-list", "-i", &input]);
    let hex: String = bins
        .kernel_build_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        ids.contains(&format!("{hex} [guest.kernel.kallsyms]")),
        "{ids}"
    );
    let (header, _) = perf(&["report", "--header-only", "-i", &input]);
    assert!(header.contains("# nrcpus online : 2"), "{header}");
    assert!(
        header.contains("# cmdline : perf-kvm record -g"),
        "{header}"
    );
    assert!(header.contains("# event : name = cpu-clock"), "{header}");
}

#[test]
fn perf_reads_an_unfinished_file_up_to_the_last_flush() {
    let bins = GuestBinaries::build(&temp_dir("pd-killed"));
    let path = bins.dir.join("perf.data");
    let mut writer = PerfDataWriter::create(&path, &bins.meta(CallchainContext::Plain)).unwrap();
    for sample in &bins.samples()[..100] {
        writer.write_sample(sample).unwrap();
    }
    writer.flush().unwrap();
    // As after SIGKILL: no finish, nothing after the flush reaches the file.
    std::mem::forget(writer);
    let vmlinux = format!("--guestvmlinux={}", bins.vmlinux.display());
    let input = path.display().to_string();
    let (stdout, _) = perf(&[
        "kvm",
        "--host",
        "--guest",
        &vmlinux,
        "report",
        "-i",
        &input,
        "--stdio",
        "--no-children",
    ]);
    assert!(
        stdout.contains("Samples: 100  of event 'cpu-clock"),
        "{stdout}"
    );
    let rows = report_rows(&stdout);
    assert_eq!(rows[0].percent, 60.0, "{stdout}");
    assert_eq!(
        rows[0].columns.last().map(String::as_str),
        Some("kernel_hot"),
        "{stdout}"
    );
}

#[test]
fn write_errors_are_reported_with_the_path() {
    let mut writer = PerfDataWriter::create(std::path::Path::new("/dev/full"), &Default::default());
    assert!(matches!(writer, Err(PerfDataError::ZeroFrequency)));
    let meta = perf_kvm::perf_data::RecordMeta {
        freq_hz: 100,
        ..Default::default()
    };
    writer = PerfDataWriter::create(std::path::Path::new("/dev/full"), &meta);
    let err = writer
        .and_then(|mut w| w.flush())
        .expect_err("/dev/full accepts nothing");
    assert!(
        matches!(&err, PerfDataError::Write { path, source } if path.as_os_str() == "/dev/full" && source.raw_os_error() == Some(libc_enospc())),
        "{err:?}"
    );
    assert!(err.to_string().contains("/dev/full"));
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn kernel_build_id_is_read_from_the_kernel_image_when_not_given() {
    let bins = GuestBinaries::build(&temp_dir("pd-buildid"));
    let path = bins.dir.join("perf.data");
    let mut meta = bins.meta(CallchainContext::Plain);
    meta.guest_kernel_build_id = None;
    let writer = PerfDataWriter::create(&path, &meta).unwrap();
    writer.finish().unwrap();
    let (ids, _) = perf(&["buildid-list", "-i", &path.display().to_string()]);
    let hex: String = bins
        .kernel_build_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        ids.contains(&format!("{hex} [guest.kernel.kallsyms]")),
        "{ids}"
    );
}

#[test]
fn perf_symbolizes_without_a_known_kernel_range() {
    let bins = GuestBinaries::build(&temp_dir("pd-norange"));
    let path = bins.dir.join("perf.data");
    let mut meta = bins.meta(CallchainContext::Plain);
    meta.guest_kernel_range = None;
    let mut writer = PerfDataWriter::create(&path, &meta).unwrap();
    for sample in &bins.samples() {
        writer.write_sample(sample).unwrap();
    }
    writer.finish().unwrap();
    let rows = report_rows(&guest_report(&bins, &path, "dso,sym"));
    let kernel_hot = rows
        .iter()
        .find(|r| r.columns.last().map(String::as_str) == Some("kernel_hot"));
    assert_eq!(kernel_hot.map(|r| r.percent), Some(60.0), "{rows:?}");
    let user_hot = rows
        .iter()
        .find(|r| r.columns.last().map(String::as_str) == Some("user_hot"));
    assert_eq!(user_hot.map(|r| r.percent), Some(20.0), "{rows:?}");
}
