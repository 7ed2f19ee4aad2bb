//! Kallsyms and KASLR: the Debian vmlinux "booted" at a random KASLR offset, described by a kallsyms made from
//! binutils `nm` output shifted by that offset. `perf-kvm symbolize` must find the offset itself and answer exactly
//! what binutils `addr2line` answers for the unshifted addresses.

mod symbolize_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use symbolize_common::*;

const KASLR_ALIGN: u64 = 0x20_0000;

/// `nm` output (System.map format) with every address moved by `offset`.
fn shifted_system_map(vmlinux: &Path, offset: u64) -> String {
    let output = Command::new("nm").arg(vmlinux).output().expect("run nm");
    assert!(output.status.success(), "nm failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (addr, rest) = line.split_once(' ')?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            Some(format!("{:016x} {rest}\n", addr.wrapping_add(offset)))
        })
        .collect()
}

/// A random KASLR offset (printed; `KASLR_TEST_OFFSET=HEX` replays one). Linux randomizes the kernel within 1 GiB in
/// CONFIG_PHYSICAL_ALIGN (2 MiB) steps; here at least 128 MiB, more than the whole image, so that shifted addresses
/// never land back inside the unshifted vmlinux.
fn random_kaslr_offset() -> u64 {
    if let Ok(hex) = std::env::var("KASLR_TEST_OFFSET") {
        return u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .expect("KASLR_TEST_OFFSET is hex");
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let min_steps = 64;
    let offset = (min_steps + mix(seed) % (512 - min_steps)) * KASLR_ALIGN;
    eprintln!("KASLR offset {offset:#x} (replay with KASLR_TEST_OFFSET={offset:x})");
    offset
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvm-prof-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn symbolize_kaslr_shifted_vmlinux_with_kallsyms_matches_unshifted_addr2line() {
    let vmlinux = debian_vmlinux();
    let offset = random_kaslr_offset();
    let dir = scratch("symbolize-kaslr");
    let kallsyms = dir.join("kallsyms");
    std::fs::write(&kallsyms, shifted_system_map(&vmlinux, offset)).unwrap();

    let functions = readelf_functions(&vmlinux);
    let linked = addresses_inside_functions(&functions, 500);
    let shifted: Vec<u64> = linked.iter().map(|a| a + offset).collect();
    let v = vmlinux.to_str().unwrap();
    let k = kallsyms.to_str().unwrap();

    let (ours, stderr) =
        perf_kvm_symbolize(&["--guest-vmlinux", v, "--guest-kallsyms", k], &shifted);
    assert!(
        stderr.is_empty(),
        "a matching kallsyms must not warn: {stderr}"
    );
    let expected = binutils_addr2line(&vmlinux, &linked);
    let mut ours_records = parse_records(&ours);
    assert_eq!(
        ours_records.iter().map(|r| r.addr).collect::<Vec<_>>(),
        shifted
    );
    // Undo the shift in our records, then hold them to the same standard as the unshifted comparison.
    for (record, &addr) in ours_records.iter_mut().zip(&linked) {
        record.addr = addr;
        record.address_text = format!("0x{addr:016x}");
    }
    let llvm = llvm_symbolizer(&vmlinux, &linked);
    let comparison = compare(
        &ours_records,
        &parse_records(&expected),
        &parse_records(&llvm),
    );
    let summary = comparison.summary();
    assert_eq!(comparison.agreeing, linked.len(), "{summary}");
    assert!(comparison.unexplained.is_empty(), "{summary}");

    // An explicit --kaslr-offset gives the same answers.
    let (explicit, _) = perf_kvm_symbolize(
        &[
            "--guest-vmlinux",
            v,
            "--kaslr-offset",
            &format!("{offset:x}"),
        ],
        &shifted,
    );
    assert_eq!(explicit, ours);
    // And without the offset the shifted addresses are outside the vmlinux: unknown, not some symbol.
    let image_end = shifted_system_map(&vmlinux, 0)
        .lines()
        .find_map(|l| {
            l.strip_suffix(" B _end")
                .or_else(|| l.strip_suffix(" b _end"))
                .map(str::to_owned)
        })
        .map(|a| u64::from_str_radix(&a, 16).unwrap())
        .expect("vmlinux has _end");
    assert!(
        shifted.iter().all(|&a| a >= image_end),
        "offset {offset:#x} too small for this test"
    );
    let (unshifted, _) = perf_kvm_symbolize(&["--guest-vmlinux", v], &shifted[..20]);
    assert!(
        parse_records(&unshifted)
            .iter()
            .all(|r| r.frames.is_empty()),
        "{unshifted}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn symbolize_kallsyms_alone_names_the_containing_symbol() {
    let vmlinux = debian_vmlinux();
    let offset = random_kaslr_offset();
    let dir = scratch("symbolize-kallsyms-only");
    let kallsyms = dir.join("kallsyms");
    std::fs::write(&kallsyms, shifted_system_map(&vmlinux, offset)).unwrap();
    let functions = readelf_functions(&vmlinux);
    let linked = addresses_inside_functions(&functions, 300);
    let shifted: Vec<u64> = linked.iter().map(|a| a + offset).collect();

    let (ours, stderr) =
        perf_kvm_symbolize(&["--guest-kallsyms", kallsyms.to_str().unwrap()], &shifted);
    assert!(stderr.is_empty(), "{stderr}");
    // llvm-symbolizer names the outermost frame from the symbol table: that is what kallsyms can know.
    let llvm = parse_records(&llvm_symbolizer(&vmlinux, &linked));
    let nm_addresses: std::collections::HashMap<String, u64> = shifted_system_map(&vmlinux, 0)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            Some((f.nth(1)?.to_owned(), addr))
        })
        .collect();
    let mut aliases = 0;
    for (record, expected) in parse_records(&ours).iter().zip(&llvm) {
        assert_eq!(
            record.frames.len(),
            1,
            "kallsyms gives one frame: {record:?}"
        );
        let frame = &record.frames[0];
        assert_eq!(
            (frame.file.as_str(), frame.line),
            ("??", None),
            "{record:?}"
        );
        let want = &expected
            .frames
            .last()
            .expect("llvm knows every function")
            .function;
        if &frame.function != want {
            // Another name for the same address (aliases such as __x64_sys_foo / __ia32_sys_foo).
            assert_eq!(
                nm_addresses.get(&frame.function),
                nm_addresses.get(want),
                "{record:?} vs llvm {want}"
            );
            aliases += 1;
        }
    }
    assert!(
        aliases * 20 < linked.len(),
        "{aliases} aliases: too many to be coincidence"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn symbolize_warns_loudly_about_a_vmlinux_that_is_not_the_guests() {
    let vmlinux = debian_vmlinux();
    let v = vmlinux.to_str().unwrap();
    let offset = random_kaslr_offset();
    let dir = scratch("symbolize-mismatch");
    let addrs = [0xffff_ffff_8100_0000 + offset];

    // Another build of "the same" kernel: _text where expected, every other symbol elsewhere.
    let other_build: String = shifted_system_map(&vmlinux, offset)
        .lines()
        .map(|line| {
            let (addr, rest) = line.split_once(' ').unwrap();
            let addr = u64::from_str_radix(addr, 16).unwrap();
            let moved = if rest.ends_with(" _text") {
                addr
            } else {
                addr + 0x40 + (mix(addr) % 64) * 16
            };
            format!("{moved:016x} {rest}\n")
        })
        .collect();
    let kallsyms = dir.join("kallsyms-other-build");
    std::fs::write(&kallsyms, other_build).unwrap();
    let (_, stderr) = perf_kvm_symbolize(
        &[
            "--guest-vmlinux",
            v,
            "--guest-kallsyms",
            kallsyms.to_str().unwrap(),
        ],
        &addrs,
    );
    assert!(
        stderr.contains("does not match the guest's kallsyms"),
        "no mismatch warning: {stderr:?}"
    );

    // Kallsyms whose _text is not at a possible KASLR offset: a clear error, not a guess.
    let misaligned = dir.join("kallsyms-misaligned");
    std::fs::write(&misaligned, shifted_system_map(&vmlinux, offset + 0x1000)).unwrap();
    let output = Command::new(perf_kvm())
        .args([
            "symbolize",
            "--guest-vmlinux",
            v,
            "--guest-kallsyms",
            misaligned.to_str().unwrap(),
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("not the guest's kernel"),
        "{stderr}"
    );

    // Build-ids: the right one is silent, a wrong one is a loud warning.
    let build_id = readelf_build_id(&vmlinux);
    let (_, stderr) = perf_kvm_symbolize(
        &["--guest-vmlinux", v, "--guest-build-id", &build_id],
        &addrs,
    );
    assert!(stderr.is_empty(), "{stderr}");
    let wrong: String = build_id.chars().rev().collect();
    let (_, stderr) =
        perf_kvm_symbolize(&["--guest-vmlinux", v, "--guest-build-id", &wrong], &addrs);
    assert!(
        stderr.contains("BUILD-ID MISMATCH") && stderr.contains(&build_id),
        "{stderr:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
