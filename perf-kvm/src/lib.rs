//! Library side of `perf-kvm`: the perf.data writer and the report engine, shared by the binary and the
//! integration tests.

pub mod feed;
pub mod perf_data;
pub mod report;
pub mod stat;
pub mod top;
