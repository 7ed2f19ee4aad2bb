//! `/proc/kallsyms` / System.map text, then lookups in the table built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use symbols::Symbolizer;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(entries) = symbols::parse_kallsyms(&text) else {
        return;
    };
    let mut symbolizer = Symbolizer::new();
    if symbolizer.add_kallsyms_text("fuzz", &text).is_err() {
        return;
    }
    let addrs: Vec<u64> = entries
        .iter()
        .flat_map(|e| {
            [
                e.address,
                e.address.wrapping_add(1),
                e.address.wrapping_sub(1),
            ]
        })
        .collect();
    let _ = symbolizer.symbolize(&addrs);
});
