//! Samples are plain data: they leave the VMM unsymbolized and flow one way, to the consumer.

use serde::{Deserialize, Serialize};

/// Guest privilege ring of a sample, as perf distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GuestMode {
    /// CPL 0: guest kernel.
    Kernel,
    /// CPL 3 (or 1/2): guest user space.
    User,
}

/// One sample of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Host CLOCK_MONOTONIC time of the sample, nanoseconds.
    pub time_ns: u64,
    /// vCPU index (0-based).
    pub vcpu: u32,
    /// Guest instruction pointer.
    pub rip: u64,
    pub mode: GuestMode,
    /// Guest CR3 with the PCID/flag bits masked off: the address-space id.
    pub cr3: u64,
    /// Return addresses from the frame-pointer walk, innermost first, not including `rip`. Empty without `-g`.
    pub callchain: Vec<u64>,
}

/// Loss accounting: samples that were asked for and not delivered, by cause. Never silently dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleLoss {
    /// The consumer's queue was full.
    pub queue_full: u64,
    /// A kick found the vCPU not in guest mode (halted, paused, or handling an exit) and took no sample.
    pub vcpu_not_running: u64,
    /// The kicker fell behind its period and skipped ticks.
    pub ticks_skipped: u64,
}
