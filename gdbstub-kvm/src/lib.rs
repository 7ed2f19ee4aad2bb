//! gdb remote stub for KVM guests, on the `gdbstub` crate, over a small debug-target trait.
//!
//! This crate knows nothing of KVM setup: `vmm` implements the target trait and links the stub for `--gdb`.

pub mod regs;

pub use regs::{FpuState, GuestRegisters, Segment};
