//! perf.data (file format v2, `PERFILE2`) writing for guest samples.
//!
//! The layout and the conventions real `perf` needs to attribute guest samples are documented in
//! docs/perf-data.md. Reading is done by the `linux-perf-data` crate (see `crate::report`).

mod encode;
mod writer;

pub use writer::{
    CallchainContext, GuestUserMap, PerfDataError, PerfDataWriter, RecordMeta, Salvaged,
};

/// The event a recording samples; it names the file's one attr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SampledEvent {
    /// The PMU-free sampler: a vCPU's CPU time, like perf's cpu-clock.
    #[default]
    CpuClock,
    /// Guest-only CPU cycles from the host PMU (`-e cycles`); each sample carries its own period.
    Cycles,
}

impl SampledEvent {
    pub fn name(self) -> &'static str {
        match self {
            SampledEvent::CpuClock => "cpu-clock",
            SampledEvent::Cycles => "cycles",
        }
    }
}

/// `perf_event_header.misc` cpumode values (include/uapi/linux/perf_event.h).
pub const PERF_RECORD_MISC_GUEST_KERNEL: u16 = 4;
pub const PERF_RECORD_MISC_GUEST_USER: u16 = 5;

/// Callchain context markers, as the kernel stores them: negative numbers in a u64.
pub const PERF_CONTEXT_KERNEL: u64 = -128i64 as u64;
pub const PERF_CONTEXT_USER: u64 = -512i64 as u64;
pub const PERF_CONTEXT_GUEST_KERNEL: u64 = -2176i64 as u64;
pub const PERF_CONTEXT_GUEST_USER: u64 = -2560i64 as u64;
/// Any callchain entry at or above this value is a context marker, not an address.
pub const PERF_CONTEXT_MAX: u64 = -4095i64 as u64;

/// perf's id for the default guest machine. Every guest record is filed under this machine pid.
pub const DEFAULT_GUEST_KERNEL_ID: u32 = 0;

/// The pseudo file name perf uses for a guest kernel map.
pub const GUEST_KERNEL_MMAP_NAME: &str = "[guest.kernel.kallsyms]";

/// First pid handed out to guest address spaces; one pid per distinct CR3, in order of first appearance.
/// (pid 0 is the guest machine's own id and means "kernel" to perf.)
pub const FIRST_ADDRESS_SPACE_PID: u32 = 1000;

/// COMM name given to the thread of an address space: `cr3:0x<hex>`. The report parses it back.
pub fn address_space_comm(cr3: u64) -> String {
    format!("cr3:{cr3:#x}")
}

/// Inverse of [`address_space_comm`].
pub fn parse_address_space_comm(comm: &str) -> Option<u64> {
    let hex = comm.strip_prefix("cr3:0x")?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_space_comm_round_trips() {
        assert_eq!(address_space_comm(0x1234_5000), "cr3:0x12345000");
        assert_eq!(
            parse_address_space_comm(&address_space_comm(0x1234_5000)),
            Some(0x1234_5000)
        );
        assert_eq!(parse_address_space_comm("bash"), None);
        assert_eq!(parse_address_space_comm("cr3:0xzz"), None);
    }
}
