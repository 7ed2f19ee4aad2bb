//! ELF note blobs such as a guest's `/sys/kernel/notes` (build-id).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = symbols::build_id_from_notes(data);
});
