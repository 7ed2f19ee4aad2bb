//! `perf-kvm symbolize` on the test guest (kernel in the higher half, ring-3 code low, Rust with inlining) against
//! binutils addr2line and llvm-symbolizer: every address of every workload function, 100% agreement.

mod symbolize_common;

use symbolize_common::*;

#[test]
fn symbolize_test_guest_matches_peers_on_every_workload_byte() {
    let elf = integration_tests::guest_elf();
    let functions = readelf_functions(&elf);
    let wanted = [
        "user_hot_a",
        "user_stage1",
        "user_stage2",
        "user_leaf",
        "user_hot_b",
        "user_cold",
        "kernel_spin",
        "kernel_stage1",
        "kernel_stage2",
        "kernel_leaf",
    ];
    let addrs: Vec<u64> = functions
        .iter()
        .filter(|(_, _, name)| wanted.contains(&name.as_str()))
        .flat_map(|&(start, size, _)| start..start + size)
        .collect();
    let found = functions
        .iter()
        .filter(|(_, _, n)| wanted.contains(&n.as_str()))
        .count();
    assert_eq!(
        found,
        wanted.len(),
        "workload functions missing from the symbol table"
    );
    // Kernel (higher half) and user (low) addresses are both covered.
    assert!(
        addrs.iter().any(|a| *a >= 0xffff_8000_0000_0000)
            && addrs.iter().any(|a| *a < 0x8000_0000_0000)
    );
    let (comparison, _) = compare_with_peers(&elf, &addrs);
    let summary = comparison.summary();
    eprintln!("{summary}");
    assert_eq!(comparison.agreeing, addrs.len(), "{summary}");
    // The one difference left: for Rust inline frames llvm-symbolizer demangles by default, while binutils
    // `addr2line` (without -C) and we print the DWARF linkage name. Anything else is a real disagreement.
    for line in &comparison.unexplained {
        let (ours, llvm) = line
            .split_once(" vs llvm ")
            .unwrap_or_else(|| panic!("{line}"));
        let ours = ours.rsplit(": ").next().unwrap();
        // Legacy (`_ZN…17h<hash>E`) and v0 (`_R…`) Rust mangling.
        assert!(
            ours.starts_with("_ZN") || ours.starts_with("_R"),
            "not a demangling difference: {line}"
        );
        let is_hash = |s: &str| s.len() == 17 && s.starts_with('h');
        let last_segment = llvm.rsplit("::").find(|s| !is_hash(s)).unwrap();
        assert!(
            ours.contains(last_segment),
            "names a different function: {line}"
        );
    }
}
