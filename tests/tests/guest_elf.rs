//! Static checks of the test guest ELF with binutils: no vector registers in ring-0 code, the workload symbols
//! and their DWARF, the PVH note, intact frame-pointer chains, ring-3 code that only touches ring-3 memory.

use integration_tests::guest_elf;
use std::process::Command;

const USER_LO: u64 = 0x40_0000;
const USER_HI: u64 = 0x60_0000;
const KERNEL_LO: u64 = 0xffff_ffff_8000_0000;

const USER_FUNCS: [&str; 6] = [
    "user_hot_a",
    "user_hot_b",
    "user_cold",
    "user_stage1",
    "user_stage2",
    "user_leaf",
];
const KERNEL_FUNCS: [&str; 4] = [
    "kernel_spin",
    "kernel_stage1",
    "kernel_stage2",
    "kernel_leaf",
];

fn tool(name: &str, args: &[&str]) -> String {
    let elf = guest_elf();
    let out = Command::new(name)
        .args(args)
        .arg(&elf)
        .output()
        .unwrap_or_else(|e| panic!("running {name} (binutils): {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (name, address, nm type letter) for every symbol.
fn symbols() -> Vec<(String, u64, char)> {
    tool("nm", &[])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (a, t, n) = (it.next()?, it.next()?, it.next()?);
            Some((
                n.to_string(),
                u64::from_str_radix(a, 16).ok()?,
                t.chars().next()?,
            ))
        })
        .collect()
}

fn symbol(name: &str) -> (u64, char) {
    symbols()
        .into_iter()
        .find(|s| s.0 == name)
        .map(|s| (s.1, s.2))
        .unwrap_or_else(|| panic!("nm does not list {name}"))
}

/// Disassembly of one function (objdump's block for `<name>:`).
fn disassemble(name: &str) -> String {
    let all = tool("objdump", &["-d", "--no-show-raw-insn"]);
    let start = all
        .find(&format!("<{name}>:\n"))
        .unwrap_or_else(|| panic!("{name} not in the disassembly"));
    let body = &all[start..];
    body[..body.find("\n\n").unwrap_or(body.len())].to_string()
}

#[test]
fn ring0_text_uses_no_vector_registers() {
    for section in [".boot", ".text"] {
        let dis = tool("objdump", &["-d", "--no-show-raw-insn", "-j", section]);
        assert!(dis.lines().count() > 20, "{section}: no disassembly");
        let bad: Vec<&str> = dis
            .lines()
            .filter(|l| {
                l.contains("%xmm") || l.contains("%ymm") || l.contains("%zmm") || l.contains("%mm")
            })
            .collect();
        assert!(
            bad.is_empty(),
            "vector registers in ring-0 section {section}:\n{}",
            bad.join("\n")
        );
    }
}

#[test]
fn nm_lists_every_workload_function_where_it_runs() {
    for f in USER_FUNCS {
        let (addr, ty) = symbol(f);
        assert!(ty == 'T' || ty == 't', "{f}: type {ty}");
        assert!(
            (USER_LO..USER_HI).contains(&addr),
            "{f} at {addr:#x}: not in the ring-3 image"
        );
    }
    for f in KERNEL_FUNCS {
        let (addr, ty) = symbol(f);
        assert!(ty == 'T' || ty == 't', "{f}: type {ty}");
        assert!(
            addr >= KERNEL_LO,
            "{f} at {addr:#x}: not in the kernel image"
        );
    }
    let (uc, _) = symbol("user_counter");
    assert!((USER_LO..USER_HI).contains(&uc), "user_counter at {uc:#x}");
    let (kc, _) = symbol("kernel_counter");
    assert!(kc >= KERNEL_LO, "kernel_counter at {kc:#x}");
}

#[test]
fn dwarf_describes_every_workload_function() {
    let info = tool("readelf", &["--debug-dump=info"]);
    let names = USER_FUNCS
        .iter()
        .chain(KERNEL_FUNCS.iter())
        .chain(["user_counter", "kernel_counter"].iter());
    for f in names {
        let found = info
            .lines()
            .any(|l| l.contains("DW_AT_name") && l.trim_end().ends_with(&format!(": {f}")));
        assert!(found, "no DW_AT_name for {f} in .debug_info");
    }
    assert!(
        info.contains("DW_AT_low_pc"),
        "no code ranges in .debug_info"
    );
}

#[test]
fn pvh_note_points_at_the_32_bit_entry() {
    let notes = tool("readelf", &["-n", "-W"]);
    let at = notes.find("Xen").expect("no Xen note");
    let note = &notes[at..];
    assert!(
        note.contains("0x00000012"),
        "Xen note is not XEN_ELFNOTE_PHYS32_ENTRY (18):\n{note}"
    );
    let desc = note
        .split("description data:")
        .nth(1)
        .expect("note without description");
    let bytes: Vec<u8> = desc
        .split_whitespace()
        .take(4)
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let entry = u32::from_le_bytes(bytes.try_into().unwrap()) as u64;
    let (pvh, _) = symbol("pvh_start32");
    assert_eq!(entry, pvh, "PVH entry in the note vs pvh_start32");
    assert!(
        (0x10_0000..0x40_0000).contains(&entry),
        "PVH entry {entry:#x} not near 1 MiB"
    );
}

#[test]
fn load_segments_have_physical_addresses_in_low_ram() {
    let ph = tool("readelf", &["-l", "-W"]);
    let loads: Vec<&str> = ph
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .collect();
    assert!(loads.len() >= 3, "too few LOAD segments:\n{ph}");
    let mut kernel_seen = false;
    for l in loads {
        let f: Vec<&str> = l.split_whitespace().collect();
        let vaddr = u64::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap();
        let paddr = u64::from_str_radix(f[3].trim_start_matches("0x"), 16).unwrap();
        assert!(
            (0x10_0000..0x60_0000).contains(&paddr),
            "LOAD at paddr {paddr:#x}: {l}"
        );
        if vaddr >= KERNEL_LO {
            assert_eq!(
                vaddr - KERNEL_LO,
                paddr,
                "kernel segment not at 0xffffffff80000000 + phys: {l}"
            );
            kernel_seen = true;
        }
    }
    assert!(kernel_seen, "no higher-half kernel segment");
}

#[test]
fn call_chains_keep_their_frames() {
    // Each function sets up a frame, and each caller calls (never jumps to) the next, so a frame-pointer walk from
    // the leaf gives leaf → stage2 → stage1 → top.
    for chain in [
        ["user_hot_a", "user_stage1", "user_stage2", "user_leaf"],
        [
            "kernel_spin",
            "kernel_stage1",
            "kernel_stage2",
            "kernel_leaf",
        ],
    ] {
        for f in chain {
            let d = disassemble(f);
            let body: Vec<&str> = d
                .lines()
                .skip(1)
                .map(|l| l.split('\t').nth(1).unwrap_or("").trim())
                .collect();
            assert!(
                body.len() > 2 && body[0] == "push   %rbp" && body[1] == "mov    %rsp,%rbp",
                "{f}: no frame\n{d}"
            );
        }
        for w in chain.windows(2) {
            let d = disassemble(w[0]);
            let target = format!("<{}>", w[1]);
            assert!(
                d.lines().any(|l| l.contains("call") && l.contains(&target)),
                "{} does not call {}:\n{d}",
                w[0],
                w[1]
            );
            assert!(
                !d.lines().any(|l| l.contains("jmp") && l.contains(&target)),
                "{} tail-calls {}:\n{d}",
                w[0],
                w[1]
            );
        }
    }
}

#[test]
fn ring3_code_touches_only_ring3_memory() {
    let dis = tool("objdump", &["-d", "--no-show-raw-insn", "-j", ".user"]);
    assert!(dis.contains("<user_main>:"), "user_main not in .user");
    for l in dis.lines().filter(|l| l.starts_with("  ")) {
        assert_eq!(
            kernel_address_in(l),
            None,
            "ring-3 code refers to a kernel address: {l}"
        );
        let insn = l.split('\t').nth(1).unwrap_or("");
        if insn.starts_with("call") || insn.starts_with('j') {
            if let Some(t) = insn
                .split_whitespace()
                .nth(1)
                .and_then(|t| u64::from_str_radix(t, 16).ok())
            {
                assert!(
                    (USER_LO..USER_HI).contains(&t),
                    "ring-3 branch out of the user image: {l}"
                );
            }
        }
    }
}

/// The first kernel-half address in an objdump line: branch targets, RIP-relative operands, absolute immediates
/// and sign-extended 32-bit displacements (`jmp *-0x7fef4e28(,%rdi,8)` is 0xffffffff8010b1d8).
fn kernel_address_in(line: &str) -> Option<u64> {
    let insn = line.split('\t').skip(1).collect::<Vec<_>>().join(" ");
    for tok in insn.split(|c: char| !c.is_ascii_hexdigit() && c != 'x' && c != '-') {
        let (neg, t) = match tok.strip_prefix('-') {
            Some(t) => (true, t),
            None => (false, tok),
        };
        let hex = t.trim_start_matches("0x");
        if !(6..=16).contains(&hex.len()) {
            continue;
        }
        if let Ok(v) = u64::from_str_radix(hex, 16) {
            let a = if neg { v.wrapping_neg() } else { v };
            if a >= KERNEL_LO {
                return Some(a);
            }
        }
    }
    None
}

#[test]
fn address_scan_sees_kernel_references() {
    assert_eq!(
        kernel_address_in("  400004:\tjmp    *-0x7fef4e28(,%rdi,8)"),
        Some(0xffff_ffff_8010_b1d8)
    );
    assert_eq!(
        kernel_address_in("  400004:\tcall   ffffffff80101000 <x>"),
        Some(0xffff_ffff_8010_1000)
    );
    assert_eq!(
        kernel_address_in("  40026c:\tlock incq 0x8d4(%rip)        # 400b48 <user_counter>"),
        None
    );
    assert_eq!(kernel_address_in("  400aa8:\tmov    -0x8(%rbp),%rax"), None);
}
