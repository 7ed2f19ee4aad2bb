//! Kernel modules: a relocatable `.ko`-like object placed at the section addresses a guest's
//! `/sys/module/NAME/sections/` reports, and kallsyms module symbols bounded by `/proc/modules` regions.

use std::path::{Path, PathBuf};
use std::process::Command;

use symbols::Symbolizer;

const MODULE_SOURCE: &str = r#"
int counter;
int __attribute__((noinline)) module_work(int n) { int s = 0; for (int i = 0; i < n; i++) s += i * counter; return s; }
int __attribute__((noinline)) module_other(int n) { return module_work(n) + 1; }
__attribute__((section(".init.text"), noinline)) int module_init_fn(void) { return module_other(3); }
"#;

const TEXT_BASE: u64 = 0xffff_ffff_c0a0_0000;
const INIT_BASE: u64 = 0xffff_ffff_c0b4_0000;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn build_module(name: &str) -> (Scratch, PathBuf) {
    let dir = Scratch(std::env::temp_dir().join(format!("symbols-{name}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let source = dir.0.join("mod.c");
    std::fs::write(&source, MODULE_SOURCE).unwrap();
    let object = dir.0.join("mod.ko");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-c", "-o"])
        .arg(&object)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success());
    (dir, object)
}

/// (section-relative value, size, section, name) of defined functions, as binutils `readelf -sW` prints them.
fn functions(object: &Path) -> Vec<(u64, u64, String, String)> {
    let out = Command::new("readelf")
        .arg("-sW")
        .arg(object)
        .output()
        .unwrap();
    let sections = Command::new("readelf")
        .arg("-SW")
        .arg(object)
        .output()
        .unwrap();
    let section_names: Vec<(String, String)> = String::from_utf8_lossy(&sections.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix('[')?;
            let (index, rest) = l.split_once(']')?;
            Some((
                index.trim().to_owned(),
                rest.split_whitespace().next()?.to_owned(),
            ))
        })
        .collect();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[3] != "FUNC" {
                return None;
            }
            let section = section_names.iter().find(|(i, _)| i == f[6])?.1.clone();
            Some((
                u64::from_str_radix(f[1], 16).ok()?,
                f[2].parse().ok()?,
                section,
                f[7].to_owned(),
            ))
        })
        .collect()
}

#[test]
fn module_elf_placed_by_sysfs_sections() {
    let (dir, object) = build_module("ko");
    let sysfs = dir.0.join("sections");
    std::fs::create_dir_all(&sysfs).unwrap();
    std::fs::write(sysfs.join(".text"), format!("0x{TEXT_BASE:016x}\n")).unwrap();
    std::fs::write(sysfs.join(".init.text"), format!("0x{INIT_BASE:016x}\n")).unwrap();
    let layout = symbols::read_module_sections(&sysfs).unwrap();
    assert_eq!(layout.len(), 2);

    let mut symbolizer = Symbolizer::new();
    symbolizer.add_module_elf(&object, &layout).unwrap();
    let functions = functions(&object);
    assert_eq!(functions.len(), 3, "{functions:?}");
    for (value, size, section, name) in &functions {
        let base = if section == ".init.text" {
            INIT_BASE
        } else {
            TEXT_BASE
        };
        let start = base + value;
        let results = symbolizer.symbolize(&[start, start + size - 1, start + size / 2]);
        for (result, offset) in results.iter().zip([0, size - 1, size / 2]) {
            let outer = result
                .frames
                .last()
                .unwrap_or_else(|| panic!("{name}+{offset:#x} unknown"));
            assert_eq!(outer.function.as_deref(), Some(name.as_str()));
            assert_eq!(outer.symbol_offset, Some(offset));
        }
    }
    let text_end = functions
        .iter()
        .filter(|f| f.2 == ".text")
        .map(|f| TEXT_BASE + f.0 + f.1)
        .max()
        .unwrap();
    let outside = symbolizer.symbolize(&[TEXT_BASE - 1, text_end + 0x1000, INIT_BASE - 1]);
    assert!(outside.iter().all(|r| r.frames.is_empty()), "{outside:?}");

    // Without a layout, `.text` goes at the bias and other sections are unknown.
    let mut text_only = Symbolizer::new();
    text_only.add_elf(&object, TEXT_BASE).unwrap();
    let work = functions.iter().find(|f| f.3 == "module_work").unwrap();
    let init = functions.iter().find(|f| f.3 == "module_init_fn").unwrap();
    let r = text_only.symbolize(&[TEXT_BASE + work.0 + 1, INIT_BASE + init.0]);
    assert_eq!(r[0].frames[0].function.as_deref(), Some("module_work"));
    assert!(r[1].frames.is_empty());
}

#[test]
fn sysfs_sections_with_garbage_or_hidden_addresses_are_errors() {
    let (dir, _) = build_module("sysfs-bad");
    let sysfs = dir.0.join("sections");
    std::fs::create_dir_all(&sysfs).unwrap();
    std::fs::write(sysfs.join(".text"), "not an address\n").unwrap();
    assert!(symbols::read_module_sections(&sysfs).is_err());
    std::fs::write(sysfs.join(".text"), "0x0000000000000000\n").unwrap();
    assert!(symbols::read_module_sections(&sysfs).is_err());
    assert!(symbols::read_module_sections(&dir.0.join("missing")).is_err());
}

#[test]
fn kallsyms_module_symbols_stay_inside_their_module() {
    let dir =
        Scratch(std::env::temp_dir().join(format!("symbols-kallsyms-mod-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let kallsyms = dir.0.join("kallsyms");
    std::fs::write(
        &kallsyms,
        "ffffffff81000000 T _text\n\
         ffffffff81000100 T core_fn\n\
         ffffffff81200000 T _etext\n\
         ffffffffc0a00000 t kvm_first\t[kvm]\n\
         ffffffffc0a00400 t kvm_last\t[kvm]\n\
         ffffffffc0c00000 t other_fn\t[other]\n",
    )
    .unwrap();
    let modules = dir.0.join("modules");
    std::fs::write(
        &modules,
        "kvm 4096 0 - Live 0xffffffffc0a00000\nother 8192 0 - Live 0xffffffffc0c00000\n",
    )
    .unwrap();

    let mut symbolizer = Symbolizer::new();
    symbolizer.add_kallsyms(&kallsyms).unwrap();
    let before_modules = symbolizer.symbolize(&[0xffff_ffff_c0a0_0800, 0xffff_ffff_c0a0_2000]);
    // Without /proc/modules, the last symbol of a module is allowed a page, not the gap to the next module.
    assert_eq!(
        before_modules[0].frames[0].function.as_deref(),
        Some("kvm_last")
    );
    assert!(
        before_modules[1].frames.is_empty(),
        "{:?}",
        before_modules[1]
    );

    symbolizer.add_modules(&modules).unwrap();
    let r = symbolizer.symbolize(&[
        0xffff_ffff_8100_0180, // core_fn + 0x80
        0xffff_ffff_8130_0000, // past _etext: unknown
        0xffff_ffff_c0a0_0410, // kvm_last + 0x10
        0xffff_ffff_c0a0_0fff, // last byte of kvm
        0xffff_ffff_c0a0_1000, // one past kvm: unknown, no module
        0xffff_ffff_c0c0_1fff, // other_fn, at the end of `other`
    ]);
    assert_eq!(r[0].frames[0].function.as_deref(), Some("core_fn"));
    assert_eq!(r[0].frames[0].symbol_offset, Some(0x80));
    assert_eq!(r[0].object.as_deref(), Some(symbols::KERNEL_OBJECT_NAME));
    assert!(
        r[1].frames.is_empty() && r[1].object.is_none(),
        "{:?}",
        r[1]
    );
    assert_eq!(r[2].frames[0].function.as_deref(), Some("kvm_last"));
    assert_eq!(r[2].object.as_deref(), Some("[kvm]"));
    assert_eq!(r[3].frames[0].function.as_deref(), Some("kvm_last"));
    assert!(
        r[4].frames.is_empty() && r[4].object.is_none(),
        "{:?}",
        r[4]
    );
    assert_eq!(r[5].frames[0].function.as_deref(), Some("other_fn"));
    assert_eq!(r[5].object.as_deref(), Some("[other]"));
}
