//! `perf-kvm symbolize` on a small ELF the test compiles itself (gcc -O2 -g, with inlining), every byte of every
//! function, against binutils `addr2line -a -f -i -p` and `llvm-symbolizer --output-style=GNU -a -f -i -p`.

mod symbolize_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use symbolize_common::*;

fn build_program(dir: &Path) -> PathBuf {
    let source = dir.join("inline_test.c");
    std::fs::write(&source, SMALL_C_PROGRAM).expect("write C source");
    let elf = dir.join("inline_test");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fno-pie", "-no-pie", "-o"])
        .arg(&elf)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed");
    elf
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvm-prof-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn symbolize_small_elf_matches_addr2line_and_llvm_symbolizer_on_every_byte() {
    let dir = scratch_dir("symbolize-small");
    let elf = build_program(&dir);
    let functions = readelf_functions(&elf);
    let addrs: Vec<u64> = functions
        .iter()
        .filter(|(_, _, name)| {
            ["main", "nearest", "hash", "fail"]
                .iter()
                .any(|f| name.starts_with(f))
        })
        .flat_map(|&(start, size, _)| start..start + size)
        .collect();
    assert!(addrs.len() > 100, "too few addresses: {}", addrs.len());

    let (comparison, ours) = compare_with_peers(&elf, &addrs);
    let summary = comparison.summary();
    eprintln!("{summary}");
    assert_eq!(comparison.agreeing, addrs.len(), "{summary}");
    assert!(comparison.unexplained.is_empty(), "{summary}");
    // The program must really exercise inlining, or this test proves little.
    assert!(
        ours.iter().any(|r| r.frames.len() >= 3),
        "no address with two levels of inlining"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn symbolize_small_elf_unknown_addresses_are_unknown_not_nearest_symbol() {
    let dir = scratch_dir("symbolize-unknown");
    let elf = build_program(&dir);
    let functions = readelf_functions(&elf);
    let end_of_last = functions
        .iter()
        .map(|&(start, size, _)| start + size)
        .max()
        .unwrap();
    // Far past every section, below the first, and zero: binutils says `?? ??:0`, and so must we.
    let addrs = [0, 0x10, end_of_last + 0x10_0000, u64::MAX - 1];
    let (ours, _) = perf_kvm_symbolize(&["--guest-vmlinux", elf.to_str().unwrap()], &addrs);
    assert_eq!(ours, binutils_addr2line(&elf, &addrs));
    for record in parse_records(&ours) {
        assert!(
            record.frames.is_empty(),
            "{:#x} should be unknown:\n{ours}",
            record.addr
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
