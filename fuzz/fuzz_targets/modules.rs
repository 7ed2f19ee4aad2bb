//! `/proc/modules` text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = symbols::parse_modules(&String::from_utf8_lossy(data));
});
