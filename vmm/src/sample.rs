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
    /// What the sample stands for, in its event's unit (cycles for `-e cycles`, where the PMU varies it). `None`:
    /// one period of the sampler's clock (1 / frequency), as every PMU-free sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
}

/// Sample accounting beyond the samples themselves. Never silently dropped.
///
/// Samples follow CPU time, like perf's cpu-clock: a vCPU owes one sample per period of CPU time its thread
/// consumed. Ticks on which a vCPU consumed none (halted, paused, waiting for SIPI, descheduled) are `idle_ticks`:
/// counted, but not losses. `queue_full` and `ticks_skipped` are real losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleLoss {
    /// The consumer's queue was full: a sample was taken and dropped.
    pub queue_full: u64,
    /// Ticks that found a vCPU idle (no CPU time used since its last sample), or still busy with the previous kick.
    pub idle_ticks: u64,
    /// Samples owed by CPU time that no kick took: the vCPU ran longer than `MAX_SAMPLES_PER_KICK` periods
    /// between two kicks (the kicker fell behind, or the vCPU could not be interrupted) and the excess was dropped.
    pub ticks_skipped: u64,
}

impl SampleLoss {
    /// Samples owed and not delivered (what perf calls lost).
    pub fn lost(&self) -> u64 {
        self.queue_full.saturating_add(self.ticks_skipped)
    }
}
