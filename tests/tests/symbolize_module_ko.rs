//! `perf-kvm symbolize --guest-ko` on kernel-module-like relocatable objects: DWARF lines and inline frames after
//! relocating `.rela.debug_*` to where the guest loaded each section (`--guest-sysmodule`, a copy of the guest's
//! /sys/module), or `.text` alone at its `/proc/modules` address (`--guest-modules`).
//!
//! Peers: for an object whose code is all in `.text`, llvm-symbolizer and binutils addr2line take section-relative
//! addresses. With several code sections, llvm-symbolizer 14 cannot tell them apart (every section of an ET_REL
//! object sits at 0, and it names the outer frame from whatever symbol of any section is at that offset), so there
//! binutils `addr2line -j SECTION` is the peer: it applies the relocations itself and takes offsets in one section.

mod symbolize_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use symbolize_common::*;

const SOURCE: &str = r#"
#include <stdlib.h>
#include <string.h>
struct point { int x, y; };
static inline int square(int v) { return v * v; }
static inline int dist2(struct point a, struct point b) { return square(a.x - b.x) + square(a.y - b.y); }
static int __attribute__((noinline)) nearest(const struct point *pts, int n, struct point q) {
    int best = -1, best_d = 0x7fffffff;
    for (int i = 0; i < n; i++) {
        int d = dist2(pts[i], q);
        if (d < best_d) { best_d = d; best = i; }
    }
    return best;
}
static inline unsigned mixbits(unsigned h, unsigned v) { h ^= v; h *= 16777619u; return h; }
unsigned __attribute__((noinline)) hash(const char *s) {
    unsigned h = 2166136261u;
    while (*s) h = mixbits(h, (unsigned char)*s++);
    return h;
}
static void __attribute__((noinline, cold)) fail(const char *why) { if (why) abort(); }
int main(int argc, char **argv) {
    struct point pts[4] = {{0, 0}, {3, 4}, {-2, 7}, {5, -1}};
    struct point q = { argc, (int)strlen(argv[0]) };
    int i = nearest(pts, 4, q);
    if (i < 0) fail("no point");
    return (int)(hash(argv[0]) & 0x7f) + i;
}
"#;

/// Where the "guest" loaded the code sections: far apart, as a module's core and init regions are.
const BASES: [(&str, u64); 3] = [
    (".text", 0xffff_ffff_c0a0_0000),
    (".text.unlikely", 0xffff_ffff_c0b1_0000),
    (".text.startup", 0xffff_ffff_c0c2_0000),
];

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvm-prof-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// `gcc -O2 -g -c`; `one_section` keeps every function in `.text` (no .text.startup/.text.unlikely).
fn build_object(dir: &Path, name: &str, one_section: bool) -> PathBuf {
    let source = dir.join("module_test.c");
    std::fs::write(&source, SOURCE).expect("write C source");
    let object = dir.join(format!("{name}.ko"));
    let mut gcc = Command::new("gcc");
    gcc.args(["-O2", "-g", "-c"]);
    if one_section {
        gcc.args([
            "-fno-reorder-functions",
            "-fno-reorder-blocks-and-partition",
        ]);
    }
    let status = gcc
        .arg("-o")
        .arg(&object)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed");
    object
}

/// A copy of a guest's /sys/module with one module: DIR/NAME/sections/SECTION holds its load address.
fn sysmodule(dir: &Path, module: &str, sections: &[(&str, u64)]) -> PathBuf {
    let root = dir.join("sysmodule");
    let sections_dir = root.join(module).join("sections");
    std::fs::create_dir_all(&sections_dir).unwrap();
    for (name, base) in sections {
        std::fs::write(sections_dir.join(name), format!("0x{base:016x}\n")).unwrap();
    }
    root
}

/// Defined functions by section name: (section-relative start, size), from binutils readelf.
fn functions_by_section(object: &Path) -> HashMap<String, Vec<(u64, u64)>> {
    let run = |flag: &str| {
        let out = Command::new("readelf")
            .arg(flag)
            .arg(object)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let section_names: HashMap<String, String> = run("-SW")
        .lines()
        .filter_map(|l| {
            let (index, rest) = l.trim().strip_prefix('[')?.split_once(']')?;
            Some((
                index.trim().to_owned(),
                rest.split_whitespace().next()?.to_owned(),
            ))
        })
        .collect();
    let mut out: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for line in run("-sW").lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[3] != "FUNC" {
            continue;
        }
        let (Some(section), Ok(start), Ok(size)) = (
            section_names.get(f[6]),
            u64::from_str_radix(f[1], 16),
            f[2].parse::<u64>(),
        ) else {
            continue;
        };
        out.entry(section.clone()).or_default().push((start, size));
    }
    out
}

/// binutils `addr2line -a -f -i -p -j SECTION` on section-relative offsets.
fn addr2line_in_section(object: &Path, section: &str, offsets: &[u64]) -> String {
    let mut command = Command::new("addr2line");
    command
        .args(["-a", "-f", "-i", "-p", "-j", section, "-e"])
        .arg(object);
    run_with_stdin(command, &addresses_text(offsets)).0
}

/// Our records for loaded addresses, moved back to section-relative offsets so they line up with the peers'
/// (which print the offsets they were given).
fn ours_at_offsets(
    args: &[&str],
    base: u64,
    offsets: &[u64],
    peer: &[TextRecord],
) -> Vec<TextRecord> {
    let addrs: Vec<u64> = offsets.iter().map(|o| base + o).collect();
    let (out, stderr) = perf_kvm_symbolize(args, &addrs);
    assert!(stderr.is_empty(), "unexpected warnings: {stderr}");
    let mut records = parse_records(&out);
    assert_eq!(records.len(), peer.len());
    for (record, theirs) in records.iter_mut().zip(peer) {
        assert_eq!(record.addr, base + theirs.addr, "records out of step");
        record.addr = theirs.addr;
        record.address_text = theirs.address_text.clone();
    }
    records
}

#[test]
fn module_dwarf_matches_llvm_symbolizer_and_addr2line_on_every_byte() {
    let dir = scratch_dir("ko-one-section");
    let object = build_object(&dir, "onesec", true);
    let functions = functions_by_section(&object);
    assert_eq!(functions.len(), 1, "all code in .text: {functions:?}");
    let offsets: Vec<u64> = functions[".text"]
        .iter()
        .flat_map(|&(start, size)| start..start + size)
        .collect();
    assert!(offsets.len() > 100, "too few addresses: {}", offsets.len());
    let base = BASES[0].1;
    let sys = sysmodule(&dir, "onesec", &BASES[..1]);
    let binutils = parse_records(&addr2line_in_section(&object, ".text", &offsets));
    let llvm = parse_records(&llvm_symbolizer(&object, &offsets));
    let ko = object.to_str().unwrap();
    let ours = ours_at_offsets(
        &["--guest-ko", ko, "--guest-sysmodule", sys.to_str().unwrap()],
        base,
        &offsets,
        &binutils,
    );
    let comparison = compare(&ours, &binutils, &llvm);
    let summary = comparison.summary();
    eprintln!("{summary}");
    assert_eq!(comparison.agreeing, offsets.len(), "{summary}");
    assert!(comparison.unexplained.is_empty(), "{summary}");
    assert!(
        ours.iter().any(|r| r.frames.len() >= 3),
        "no address with two levels of inlining: the relocated DWARF's inline frames are missing"
    );
    assert!(ours
        .iter()
        .all(|r| r.frames.iter().all(|f| f.line.is_some())));

    // The same module placed by its /proc/modules line (.text at the module's address) answers the same.
    let modules = dir.join("modules");
    std::fs::write(&modules, format!("onesec 16384 0 - Live 0x{base:016x}\n")).unwrap();
    let by_proc_modules = ours_at_offsets(
        &[
            "--guest-ko",
            ko,
            "--guest-modules",
            modules.to_str().unwrap(),
        ],
        base,
        &offsets,
        &binutils,
    );
    let texts = |r: &[TextRecord]| -> Vec<Vec<String>> {
        r.iter()
            .map(|r| r.frames.iter().map(|f| f.text.clone()).collect())
            .collect()
    };
    assert_eq!(texts(&by_proc_modules), texts(&ours));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn module_sections_loaded_apart_match_addr2line_per_section() {
    let dir = scratch_dir("ko-sections");
    let object = build_object(&dir, "multisec", false);
    let functions = functions_by_section(&object);
    let sys = sysmodule(&dir, "multisec", &BASES);
    let args = [
        "--guest-ko",
        object.to_str().unwrap(),
        "--guest-sysmodule",
        sys.to_str().unwrap(),
    ];
    for (section, base) in BASES {
        let offsets: Vec<u64> = functions
            .get(section)
            .unwrap_or_else(|| panic!("gcc -O2 put no function in {section}: {functions:?}"))
            .iter()
            .flat_map(|&(start, size)| start..start + size)
            .collect();
        let binutils = parse_records(&addr2line_in_section(&object, section, &offsets));
        let ours = ours_at_offsets(&args, base, &offsets, &binutils);
        for (o, b) in ours.iter().zip(&binutils) {
            let ours_text: Vec<&str> = o.frames.iter().map(|f| f.text.as_str()).collect();
            let their_text: Vec<&str> = b.frames.iter().map(|f| f.text.as_str()).collect();
            assert_eq!(ours_text, their_text, "{section}+{:#x}", o.addr);
            assert!(
                !o.frames.is_empty() && o.frames[0].line.is_some(),
                "{section}+{:#x}",
                o.addr
            );
        }
    }
    // .text alone from /proc/modules: the other sections' addresses are not the module's, and say so.
    let modules = dir.join("modules");
    std::fs::write(
        &modules,
        format!("multisec 16384 0 - Live 0x{:016x}\n", BASES[0].1),
    )
    .unwrap();
    let startup = functions[".text.startup"][0].0 + BASES[2].1;
    let (out, _) = perf_kvm_symbolize(
        &[
            "--guest-ko",
            object.to_str().unwrap(),
            "--guest-modules",
            modules.to_str().unwrap(),
        ],
        &[startup],
    );
    assert!(parse_records(&out)[0].frames.is_empty(), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_module_without_a_load_address_is_a_clear_error() {
    let dir = scratch_dir("ko-unplaced");
    let object = build_object(&dir, "lonely", true);
    let output = Command::new(perf_kvm())
        .args(["symbolize", "--guest-ko"])
        .arg(&object)
        .arg("0x1000")
        .output()
        .unwrap();
    let (out, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(out.is_empty(), "{out}");
    assert!(
        stderr.contains("no load address for module lonely") && stderr.lines().count() == 1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
