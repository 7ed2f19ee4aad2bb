//! perf.data on arbitrary bytes through `perf-kvm report`'s whole path: header and section checks, the repair of
//! unfinished files, record parsing, symbolization of samples, and every output form (table, call graph, folded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use perf_kvm::report::{run_report_bytes, ReportOptions, SortKey};

fuzz_target!(|data: &[u8]| {
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
