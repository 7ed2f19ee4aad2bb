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
    std::fs::write(&source, SMALL_C_PROGRAM).expect("write C source");
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

/// Debian's kvm.ko with DWARF, from the release's `-dbg` package (`debian_dbg_file`), extracted once into the cache.
fn debian_kvm_ko() -> PathBuf {
    let release = debian_release();
    debian_dbg_file(
        &format!("./usr/lib/debug/lib/modules/{release}/kernel/arch/x86/kvm/kvm.ko"),
        &format!("kvm-{release}.ko"),
    )
}

/// 2,000 addresses inside kvm.ko's `.text` functions, its `.text` placed at a module address by a /proc/modules
/// line. The peers symbolize the same addresses in the same kvm.ko linked by binutils `ld` into an executable with
/// `.text` at that address (ld applies the relocations itself): every inline frame's function name equal to one
/// of theirs, every line llvm-symbolizer's, on >= 99.9% of addresses; differences explained as in the other tests.
/// (llvm-symbolizer 14 cannot take kvm.ko itself: its dozens of code sections all sit at 0, and it names outer
/// frames after symbols of other sections.)
#[test]
fn debian_kvm_ko_matches_peers_on_the_same_module_linked() {
    let ko = debian_kvm_ko();
    let functions = functions_by_section(&ko);
    let text = &functions[".text"];
    assert!(
        text.len() > 500,
        "kvm.ko .text has {} functions",
        text.len()
    );
    let base = 0xffff_ffff_c060_0000u64;
    let addrs: Vec<u64> = (0..2000u64)
        .map(|i| {
            let (start, size) = text[(mix(i) % text.len() as u64) as usize];
            base + start + mix(i ^ 0x5555) % size.max(1)
        })
        .collect();
    let dir = scratch_dir("ko-debian");
    let script = dir.join("text-first.ld");
    std::fs::write(
        &script,
        format!("SECTIONS {{ . = {base:#x}; .text : {{ *(.text) }} }}\n"),
    )
    .unwrap();
    let linked = dir.join("kvm.elf");
    let status = Command::new("ld")
        .arg("-T")
        .arg(&script)
        .args([
            "--unresolved-symbols=ignore-all",
            "-e",
            "0",
            "--no-warn-rwx-segments",
            "-o",
        ])
        .arg(&linked)
        .arg(&ko)
        .status()
        .expect("run ld");
    assert!(status.success(), "ld failed");
    let modules = dir.join("modules");
    std::fs::write(
        &modules,
        format!("kvm 1146880 1 kvm_intel, Live 0x{base:016x}\n"),
    )
    .unwrap();
    let (ours, stderr) = perf_kvm_symbolize(
        &[
            "--guest-ko",
            ko.to_str().unwrap(),
            "--guest-modules",
            modules.to_str().unwrap(),
        ],
        &addrs,
    );
    assert!(stderr.is_empty(), "unexpected warnings: {stderr}");
    let mut ours = parse_records(&ours);
    let binutils = parse_records(&binutils_addr2line(&linked, &addrs));
    let llvm = parse_records(&llvm_symbolizer(&linked, &addrs));
    // Asm stubs inside a C unit with no line rows for them (emulate.c's fastop stubs): both peers print a file for
    // the unit with no line (`emulate.c:?`, `emulate.c:0`), we print `??:?`. Function and (no) line agree; counted
    // and taken as binutils spells it, so the comparison below judges everything else.
    let mut unit_file_without_line = 0;
    for ((o, b), l) in ours.iter_mut().zip(&binutils).zip(&llvm) {
        if let ([ours], [theirs], [llvm]) = (&mut o.frames[..], &b.frames[..], &l.frames[..]) {
            let no_line = ours.line.is_none() && theirs.line.is_none() && llvm.line.is_none();
            if no_line
                && ours.file == "??"
                && ours.function == theirs.function
                && theirs.file == llvm.file
            {
                *ours = theirs.clone();
                unit_file_without_line += 1;
            }
        }
    }
    eprintln!("{unit_file_without_line} addresses in asm without line rows: peers print the unit's file, we `??`");
    let comparison = compare(&ours, &binutils, &llvm);
    let summary = comparison.summary();
    eprintln!("{summary}");
    assert!(comparison.agreeing * 1000 >= addrs.len() * 999, "{summary}");
    assert!(comparison.unexplained.is_empty(), "{summary}");
    let inlined = ours.iter().filter(|r| r.frames.len() > 1).count();
    assert!(inlined > 200, "only {inlined} addresses with inline frames");
    std::fs::remove_dir_all(&dir).ok();
}
