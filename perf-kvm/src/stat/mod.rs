//! `perf-kvm stat`'s engine: the VM source trait shared with `top`, the perf-style exit table, and the recording file.

pub mod file;
pub mod in_process;
pub mod source;
pub mod table;
pub mod tracepoints;
