//! `perf-kvm report` on perf.data files that carry records of unknown types (a newer kernel's, a vendor tool's)
//! and on files whose headers are cut or corrupt: unknown records are skipped with a count in one warning line
//! and the rest reports exactly as without them; broken headers give one clear error naming the file.

#[path = "perf_data_fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use fixture::{perf, temp_dir};
use integration_tests::bins::bin;
use perf_kvm::report::{run_report, LoadError, ReportError, ReportOptions};

const DATA_OFFSET_AT: usize = 40;
const DATA_SIZE_AT: usize = 48;
const FEATURES_AT: usize = 72;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A record of `kind` with a header that tells its size truthfully, and an 8-byte aligned body.
fn record(kind: u32, body_len: usize) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&kind.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes());
    r.extend_from_slice(&((8 + body_len) as u16).to_le_bytes());
    r.extend((0..body_len).map(|i| (i as u8).wrapping_mul(29)));
    r
}

/// Offsets of the records in the data section.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let start = u64_at(bytes, DATA_OFFSET_AT) as usize;
    let end = start + u64_at(bytes, DATA_SIZE_AT) as usize;
    let mut at = start;
    let mut out = Vec::new();
    while at < end {
        out.push(at);
        at += u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as usize;
    }
    out
}

/// Inserts `extra` into the data section at `at` (a record boundary), growing the data size and moving the
/// feature sections (which follow the data) by as much: a file real perf would write if it knew those records.
fn insert_into_data(bytes: &[u8], at: usize, extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + extra.len());
    out.extend_from_slice(&bytes[..at]);
    out.extend_from_slice(extra);
    out.extend_from_slice(&bytes[at..]);
    let data_size = u64_at(&out, DATA_SIZE_AT) + extra.len() as u64;
    put_u64(&mut out, DATA_SIZE_AT, data_size);
    let features: u32 = out[FEATURES_AT..104].iter().map(|b| b.count_ones()).sum();
    let table = (u64_at(&out, DATA_OFFSET_AT) + data_size) as usize;
    for i in 0..features as usize {
        let entry = table + 16 * i;
        let moved = u64_at(&out, entry) + extra.len() as u64;
        put_u64(&mut out, entry, moved);
    }
    out
}

fn report(path: &Path) -> (String, Vec<String>) {
    let mut out = Vec::new();
    let summary = run_report(&ReportOptions::new(path.to_owned()), &mut out).expect("report");
    (String::from_utf8(out).unwrap(), summary.warnings)
}

fn real_perf_recording(dir: &Path) -> PathBuf {
    let data = dir.join("real.data");
    let output = data.display().to_string();
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
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done",
    ]);
    data
}

#[test]
fn unknown_record_types_are_skipped_with_one_warning() {
    let dir = temp_dir("bad-records-unknown");
    let original = real_perf_recording(&dir);
    let bytes = std::fs::read(&original).unwrap();
    let offsets = record_offsets(&bytes);
    assert!(offsets.len() > 20, "a real recording has records");
    // Three unknown types: 40 (a kernel record type newer than this reader), 200 (past perf's own user records)
    // and 32868 (the vendor range simpleperf uses, but no type it defines), one of them twice; at the start of the
    // data, in the middle, and at the end.
    let mut modified = bytes.clone();
    let end = u64_at(&bytes, DATA_OFFSET_AT) as usize + u64_at(&bytes, DATA_SIZE_AT) as usize;
    let middle = offsets[offsets.len() / 2];
    let inserts: [(usize, Vec<u8>); 3] = [
        (end, [record(200, 16), record(40, 0)].concat()),
        (middle, record(32868, 64)),
        (offsets[0], [record(40, 24), record(200, 8)].concat()),
    ];
    // Back to front, so earlier offsets stay valid.
    for (at, extra) in &inserts {
        modified = insert_into_data(&modified, *at, extra);
    }
    let with_unknown = dir.join("unknown.data");
    std::fs::write(&with_unknown, &modified).unwrap();

    let (plain, plain_warnings) = report(&original);
    let (text, warnings) = report(&with_unknown);
    let new: Vec<&String> = warnings
        .iter()
        .filter(|w| !plain_warnings.contains(w))
        .collect();
    assert_eq!(
        new,
        ["skipped 5 record(s) of unknown type (type 40 ×2, 200 ×2, 32868 ×1)"],
        "{warnings:?}"
    );
    // The report itself is identical but for that warning line.
    let without_warning: String = text
        .lines()
        .filter(|l| !l.contains("unknown type"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(without_warning, plain);
    assert!(plain.contains("# Samples:"), "{plain}");

    // The binary says it once, on stderr, and succeeds.
    let out = Command::new(bin("perf-kvm"))
        .args(["report", "--stdio", "-i"])
        .arg(&with_unknown)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("unknown type"))
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
fn cut_and_corrupt_headers_give_one_clear_error() {
    let dir = temp_dir("bad-records-headers");
    let bytes = std::fs::read(real_perf_recording(&dir)).unwrap();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Cut inside the 104-byte file header.
        (
            "cut-header",
            bytes[..60].to_vec(),
            "ends inside its header (60 of 104 bytes)",
        ),
        (
            "magic-only",
            bytes[..8].to_vec(),
            "ends inside its header (8 of 104 bytes)",
        ),
        // Cut inside the attribute section: the header's sections point past the end.
        (
            "cut-attrs",
            bytes[..150].to_vec(),
            "lies outside the 150-byte file",
        ),
    ];
    let mut header_size = bytes.clone();
    put_u64(&mut header_size, 8, 4096);
    cases.push(("header-size", header_size, "header size 4096, expected 104"));
    let mut attr_size = bytes.clone();
    put_u64(&mut attr_size, 16, 7);
    cases.push(("attr-size", attr_size, "does not hold 7-byte attributes"));
    let mut data_size = bytes.clone();
    put_u64(&mut data_size, DATA_SIZE_AT, 1 << 40);
    cases.push(("data-size", data_size, "data section"));
    for (name, content, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &content).unwrap();
        let err = run_report(&ReportOptions::new(path.clone()), &mut Vec::new()).expect_err(name);
        assert!(
            matches!(err, ReportError::Load(LoadError::BadLayout { .. })),
            "{name}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "{name}: {message}"
        );
        let out = Command::new(bin("perf-kvm"))
            .args(["report", "--stdio", "-i"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: one line: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}

#[test]
fn corrupt_record_sizes_in_the_data_name_the_record() {
    let dir = temp_dir("bad-records-data");
    let bytes = std::fs::read(real_perf_recording(&dir)).unwrap();
    let offsets = record_offsets(&bytes);
    let victim = offsets[offsets.len() / 2];
    for (name, size) in [
        ("size-zero", 0u16),
        ("size-short", 4),
        ("size-huge", 0xfff8),
    ] {
        let mut content = bytes.clone();
        content[victim + 6..victim + 8].copy_from_slice(&size.to_le_bytes());
        let path = dir.join(name);
        std::fs::write(&path, &content).unwrap();
        let out = Command::new(bin("perf-kvm"))
            .args(["report", "--stdio", "-i"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!(
            "{} is a corrupt perf.data file: the record at offset {victim:#x} claims {size} bytes",
            path.display()
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(&expected), "{name}: {stderr}");
    }
}
