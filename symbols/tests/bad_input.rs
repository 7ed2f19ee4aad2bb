//! Bad input never panics: missing, truncated and corrupted ELF files, DWARF with bad offsets, garbage kallsyms and
//! /proc/modules, and a vmlinux that is not the guest's. Each gives a clear error or warning.

use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection};
use symbols::{KallsymsError, KaslrError, Symbolizer, SymbolsError};

const SOURCE: &str = r#"
__asm__(".text\n.globl _text\n_text:\n");
static inline int twice(int v) { return v * 2; }
int __attribute__((noinline)) work(int n) { int s = 0; for (int i = 0; i < n; i++) s += twice(i); return s; }
void __attribute__((noinline)) entry_SYSCALL_64(void) { __asm__ volatile("" ::: "memory"); }
int main(int argc, char **argv) { (void)argv; entry_SYSCALL_64(); return work(argc); }
"#;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("symbols-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn compile(dir: &Scratch, name: &str, opt: &str) -> PathBuf {
    let source = dir.path(&format!("{name}.c"));
    std::fs::write(&source, SOURCE).unwrap();
    let elf = dir.path(name);
    let status = Command::new("gcc")
        .args([opt, "-g", "-fno-pie", "-no-pie", "-o"])
        .arg(&elf)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success());
    elf
}

/// `nm` output: (address, type, name).
fn nm(elf: &Path) -> Vec<(u64, char, String)> {
    let output = Command::new("nm").arg(elf).output().expect("run nm");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            Some((addr, f.next()?.chars().next()?, f.next()?.to_owned()))
        })
        .collect()
}

fn address_of(elf: &Path, name: &str) -> u64 {
    nm(elf)
        .into_iter()
        .find(|s| s.2 == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .0
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Loads `path` and, if that works, symbolizes `addrs`: must not panic either way.
fn load_and_symbolize(
    path: &Path,
    addrs: &[u64],
) -> Result<Vec<symbols::Symbolized>, SymbolsError> {
    let mut symbolizer = Symbolizer::new();
    symbolizer.add_elf(path, 0)?;
    let results = symbolizer.symbolize(addrs);
    let _ = symbolizer.warnings();
    Ok(results)
}

#[test]
fn missing_empty_and_non_elf_files_are_clear_errors() {
    let dir = Scratch::new("missing");
    let missing = dir.path("does-not-exist");
    let err = Symbolizer::new().add_elf(&missing, 0).unwrap_err();
    assert!(
        matches!(
            err,
            SymbolsError::Elf {
                source: symbols::ElfError::Open(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("does-not-exist"),
        "error names the file: {err}"
    );

    let empty = dir.path("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(Symbolizer::new().add_elf(&empty, 0).is_err());
    let text = dir.path("text");
    std::fs::write(&text, b"ffffffff81000000 T _text\n").unwrap();
    let err = Symbolizer::new().add_elf(&text, 0).unwrap_err();
    assert!(
        matches!(
            err,
            SymbolsError::Elf {
                source: symbols::ElfError::Parse(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        Symbolizer::new().add_elf(&dir.0, 0).is_err(),
        "a directory is not an ELF"
    );
}

#[test]
fn truncated_elf_never_panics() {
    let dir = Scratch::new("truncated");
    let elf = compile(&dir, "prog", "-O2");
    let bytes = std::fs::read(&elf).unwrap();
    let addrs: Vec<u64> = nm(&elf).iter().map(|s| s.0).chain([0, u64::MAX]).collect();
    let cut = dir.path("cut");
    let mut lengths: Vec<usize> = (0..128).collect();
    lengths.extend((1..64).map(|i| bytes.len() * i / 64));
    let mut errors = 0;
    for len in lengths {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        if load_and_symbolize(&cut, &addrs).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors >= 128,
        "a file cut inside its ELF header must be rejected ({errors} errors)"
    );
}

#[test]
fn corrupted_elf_never_panics() {
    let dir = Scratch::new("corrupt");
    let elf = compile(&dir, "prog", "-O2");
    let bytes = std::fs::read(&elf).unwrap();
    let addrs: Vec<u64> = nm(&elf).iter().map(|s| s.0 + 1).collect();
    let bad = dir.path("bad");
    for round in 0..300u64 {
        let mut copy = bytes.clone();
        // 1 to 8 random bytes anywhere, biased to the headers and tables at both ends where parsers look first.
        for k in 0..=(round % 8) {
            let r = splitmix(round * 31 + k);
            let at = if r.is_multiple_of(3) {
                (r >> 8) as usize % 256
            } else {
                (r >> 8) as usize % copy.len()
            };
            copy[at] = (r >> 40) as u8;
        }
        std::fs::write(&bad, &copy).unwrap();
        let _ = load_and_symbolize(&bad, &addrs);
    }
}

/// Overwrites bytes of a named section in a copy of `elf`.
fn corrupt_section(elf: &Path, out: &Path, section: &str, edit: impl Fn(&mut [u8])) {
    let mut bytes = std::fs::read(elf).unwrap();
    let (start, size) = {
        let file = object::File::parse(&*bytes).unwrap();
        let s = file
            .section_by_name(section)
            .unwrap_or_else(|| panic!("no {section}"));
        let (start, size) = s.file_range().unwrap();
        (start as usize, size as usize)
    };
    edit(&mut bytes[start..start + size]);
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn dwarf_with_bad_offsets_falls_back_to_symbols_and_warns() {
    let dir = Scratch::new("dwarf");
    let elf = compile(&dir, "prog", "-O2");
    let work = address_of(&elf, "work");
    type Corruption = (&'static str, &'static str, fn(&mut [u8]));
    let cases: [Corruption; 4] = [
        // CU header: unit_length(4) version(2) unit_type(1) address_size(1) debug_abbrev_offset(4) in DWARF 5.
        ("abbrev offset", ".debug_info", |d| {
            d[8..12].copy_from_slice(&0xffff_fff0u32.to_le_bytes())
        }),
        ("unit length", ".debug_info", |d| {
            d[0..4].copy_from_slice(&0xffff_fff0u32.to_le_bytes())
        }),
        ("line program", ".debug_line", |d| {
            d.iter_mut().skip(4).for_each(|b| *b = 0xff)
        }),
        ("abbreviations", ".debug_abbrev", |d| {
            d.iter_mut().for_each(|b| *b = 0x7f)
        }),
    ];
    for (what, section, edit) in cases {
        let bad = dir.path("bad-dwarf");
        corrupt_section(&elf, &bad, section, edit);
        let mut symbolizer = Symbolizer::new();
        symbolizer
            .add_elf(&bad, 0)
            .unwrap_or_else(|e| panic!("{what}: symbols are intact, load must work: {e}"));
        let result = symbolizer.symbolize(&[work + 2]).remove(0);
        let outer = result
            .frames
            .last()
            .unwrap_or_else(|| panic!("{what}: the symbol table still names it"));
        assert_eq!(outer.function.as_deref(), Some("work"), "{what}");
        assert_eq!(outer.symbol_offset, Some(2), "{what}");
        if outer.line.is_none() {
            let warnings = symbolizer.warnings();
            assert!(
                warnings.iter().any(|w| w.contains("DWARF")),
                "{what}: no DWARF warning in {warnings:?}"
            );
        }
    }
}

#[test]
fn garbage_kallsyms_and_modules_are_clear_errors() {
    let dir = Scratch::new("kallsyms");
    let cases: [(&str, &[u8]); 6] = [
        (
            "binary",
            &[0x7f, b'E', b'L', b'F', 0, 1, 2, 0xff, b'\n', 0x80, 0x81],
        ),
        ("words", b"hello world\n"),
        (
            "bad address",
            b"ffffffff81000000 T _text\nffffffffzz000000 T foo\n",
        ),
        ("too long address", b"1ffffffff81000000 T _text\n"),
        (
            "hidden addresses",
            b"0000000000000000 T _text\n0000000000000000 t foo\n",
        ),
        (
            "bad module column",
            b"ffffffff81000000 T _text\nffffffffc0000000 t foo\tkvm\n",
        ),
    ];
    for (what, text) in cases {
        let path = dir.path("kallsyms");
        std::fs::write(&path, text).unwrap();
        let err = Symbolizer::new().add_kallsyms(&path).unwrap_err();
        assert!(
            matches!(err, SymbolsError::Kallsyms { .. }),
            "{what}: {err:?}"
        );
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(
            chain.contains("kallsyms"),
            "{what}: error names the file: {chain}"
        );
    }
    let bad_address = dir.path("kallsyms");
    std::fs::write(
        &bad_address,
        b"ffffffff81000000 T _text\nffffffffzz000000 T foo\n",
    )
    .unwrap();
    let err = Symbolizer::new().add_kallsyms(&bad_address).unwrap_err();
    assert!(
        matches!(
            err,
            SymbolsError::Kallsyms {
                source: KallsymsError::BadAddress { line: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );

    let modules = dir.path("modules");
    std::fs::write(
        &modules,
        b"kvm 1142784 1 - Live 0xffffffffc08f0000\nkvm_intel lots 0 - Live 0x0\n",
    )
    .unwrap();
    let err = Symbolizer::new().add_modules(&modules).unwrap_err();
    assert!(
        matches!(
            err,
            SymbolsError::Kallsyms {
                source: KallsymsError::MalformedModule { line: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );
}

fn kallsyms_from(elf: &Path, offset: u64) -> String {
    nm(elf)
        .iter()
        .filter(|s| !"Uw".contains(s.1))
        .map(|(addr, kind, name)| format!("{:016x} {kind} {name}\n", addr + offset))
        .collect()
}

#[test]
fn kallsyms_kaslr_offset_and_mismatched_vmlinux() {
    let dir = Scratch::new("kaslr");
    let elf = compile(&dir, "prog", "-O2");
    let other = compile(&dir, "other", "-O0");
    let offset = 0x3a00000;
    let kallsyms = dir.path("kallsyms");
    std::fs::write(&kallsyms, kallsyms_from(&elf, offset)).unwrap();
    assert_eq!(
        symbols::kaslr_offset_from_kallsyms(&elf, &kallsyms).unwrap(),
        offset
    );

    let mut matching = Symbolizer::new();
    matching.add_elf(&elf, offset).unwrap();
    matching.add_kallsyms(&kallsyms).unwrap();
    assert!(matching.warnings().is_empty(), "{:?}", matching.warnings());
    let work = address_of(&elf, "work");
    let shifted = matching.symbolize(&[work + offset + 1]).remove(0);
    let mut plain = Symbolizer::new();
    plain.add_elf(&elf, 0).unwrap();
    assert_eq!(
        shifted.frames,
        plain.symbolize(&[work + 1]).remove(0).frames
    );

    // The same program built differently is "not the guest's vmlinux": loud warning.
    let mut mismatched = Symbolizer::new();
    mismatched.add_elf(&other, offset).unwrap();
    mismatched.add_kallsyms(&kallsyms).unwrap();
    let warnings = mismatched.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not the guest's kernel")),
        "{warnings:?}"
    );

    // A wrong explicit offset is reported too.
    let mut wrong_offset = Symbolizer::new();
    wrong_offset.add_elf(&elf, offset + 0x20_0000).unwrap();
    wrong_offset.add_kallsyms(&kallsyms).unwrap();
    assert!(
        wrong_offset
            .warnings()
            .iter()
            .any(|w| w.contains("imply KASLR offset")),
        "{:?}",
        wrong_offset.warnings()
    );
}

#[test]
fn kaslr_offset_from_lstar_checks_alignment() {
    let dir = Scratch::new("lstar");
    let elf = compile(&dir, "prog", "-O2");
    let entry = address_of(&elf, "entry_SYSCALL_64");
    assert_eq!(
        symbols::kaslr_offset_from_lstar(entry + 0x1e0_0000, &elf).unwrap(),
        0x1e0_0000
    );
    assert_eq!(symbols::kaslr_offset_from_lstar(entry, &elf).unwrap(), 0);
    let err = symbols::kaslr_offset_from_lstar(entry + 0x1000, &elf).unwrap_err();
    assert!(matches!(err, KaslrError::Misaligned { .. }), "{err:?}");
    let stripped = dir.path("stripped");
    assert!(Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&elf)
        .status()
        .unwrap()
        .success());
    let err = symbols::kaslr_offset_from_lstar(entry, &stripped).unwrap_err();
    assert!(matches!(err, KaslrError::MissingSymbol { .. }), "{err:?}");
}

#[test]
fn build_id_is_read_and_mismatch_warns() {
    let dir = Scratch::new("build-id");
    let elf = compile(&dir, "prog", "-O2");
    let id = symbols::build_id(&elf)
        .unwrap()
        .expect("gcc links a build-id");
    let readelf = Command::new("readelf")
        .arg("-n")
        .arg(&elf)
        .output()
        .unwrap();
    let expected = String::from_utf8_lossy(&readelf.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .unwrap();
    assert_eq!(
        id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        expected
    );

    let mut symbolizer = Symbolizer::new();
    symbolizer.add_elf(&elf, 0).unwrap();
    symbolizer.expect_build_id(&id);
    assert!(symbolizer.warnings().is_empty());
    symbolizer.expect_build_id(&[0xde, 0xad]);
    assert!(symbolizer
        .warnings()
        .iter()
        .any(|w| w.contains("BUILD-ID MISMATCH")));
}
