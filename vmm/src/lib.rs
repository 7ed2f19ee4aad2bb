//! A KVM VMM that boots Linux guests and the project's test guest, and exposes guest debug and sampling state.

pub mod boot;
pub mod cli;
pub mod control;
pub mod cpuid;
pub mod debug;
pub mod devices;
pub mod exit;
pub mod exit_stats;
pub mod kick;
pub mod kvm_stats;
pub mod paging;
pub mod pmu;
pub mod probe;
pub mod probe_cache;
pub mod regs;
pub mod sample;
pub mod sample_queue;
pub mod sampler;
pub mod vcpu;
pub mod vm;

pub use exit::VmEnd;
pub use gdbstub_kvm::{FpuState, GuestRegisters, Segment};
pub use probe::HostCaps;
pub use sample::{GuestMode, Sample, SampleLoss};
pub use vm::{Vm, VmConfig, VmControl, VmInfo};

/// Opens /dev/kvm with an error that says what is wrong.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, KvmOpenError> {
    kvm_ioctls::Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmOpenError::Missing,
        libc::EACCES | libc::EPERM => KvmOpenError::Permission,
        _ => KvmOpenError::Other(e),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or enable nested virtualization)")]
    Missing,
    #[error("permission denied opening /dev/kvm: add yourself to the kvm group or run as root")]
    Permission,
    #[error("cannot open /dev/kvm")]
    Other(#[source] kvm_ioctls::Error),
}
