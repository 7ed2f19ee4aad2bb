//! perf.data on arbitrary bytes through `perf-kvm report`'s whole path: header and section checks, the repair of
//! unfinished files, record parsing, symbolization of samples, and every output form (table, call graph, folded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use perf_kvm::report::{run_report_bytes, ReportOptions, SortKey};

static PANIC_HOOK: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // The report catches panics of the third-party record parser (`load.rs`) and counts the record as skipped:
    // libfuzzer-sys's hook would abort on those too. With the default hook back, a panic that escapes the report
    // still aborts (libfuzzer-sys's wrapper does) and counts as a crash.
    PANIC_HOOK.call_once(|| drop(std::panic::take_hook()));
    let mut options = ReportOptions::new("fuzz.data".into());
    // Paths inside the input must not make the fuzzer read this machine's files.
    options.open_recorded_files = false;
    options.sort = vec![SortKey::Comm, SortKey::Pid, SortKey::Dso, SortKey::Sym, SortKey::Cpu];
    options.call_graph = true;
    let mut out = Vec::new();
    if run_report_bytes(data.to_vec(), &options, &mut out).is_err() {
        return;
    }
    options.folded = true;
    let _ = run_report_bytes(data.to_vec(), &options, &mut out);
});
