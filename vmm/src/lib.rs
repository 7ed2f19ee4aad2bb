//! A KVM VMM that boots Linux guests and the project's test guest, and exposes guest debug and sampling state.

pub mod boot;
pub mod paging;
pub mod sample;

pub use gdbstub_kvm::{FpuState, GuestRegisters, Segment};
pub use sample::{GuestMode, Sample, SampleLoss};
