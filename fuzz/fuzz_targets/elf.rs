//! ELF + symbol table + DWARF (line tables, inline frames, discriminators) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use symbols::{format_addr2line, Addr2lineStyle, Symbolizer};

fuzz_target!(|data: &[u8]| {
    let mut symbolizer = Symbolizer::new();
    if symbolizer.add_elf_bytes("fuzz", data.to_vec(), 0).is_err() {
        return;
    }
    // Probe around the ELF entry point (valid in mutants of a real seed, so DWARF gets parsed) and at addresses
    // taken from the input itself.
    let word = |at: usize| {
        data.get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let entry = word(24);
    let mut addrs: Vec<u64> = (0..64).map(|i| entry.wrapping_add(i * 3)).collect();
    addrs.extend((0..8).map(|i| word(data.len().saturating_sub(8 * (i + 1)))));
    for result in symbolizer.symbolize(&addrs) {
        let _ = format_addr2line(&result, Addr2lineStyle::AFIP);
    }
    let _ = symbolizer.warnings();
});
