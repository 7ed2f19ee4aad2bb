//! gdb remote stub for KVM guests, on the `gdbstub` crate, over a small debug-target trait.
//!
//! This crate knows nothing of KVM setup: `vmm` implements [`DebugTarget`] and calls [`serve`] for `--gdb`.
//!
//! ```no_run
//! # fn demo(target: &mut impl gdbstub_kvm::DebugTarget) -> Result<(), Box<dyn std::error::Error>> {
//! let listener = gdbstub_kvm::GdbListener::bind(&"127.0.0.1:1234".parse()?)?;
//! let connection = listener.accept()?;
//! let end = gdbstub_kvm::serve(connection, target)?;
//! eprintln!("gdb session ended: {end:?}");
//! # Ok(()) }
//! ```

mod adapter;
pub mod arch;
pub mod connection;
pub mod regs;
pub mod stop_queue;
pub mod stub;
pub mod target;
pub mod testing;

pub use connection::{ConnectionError, GdbAddress, GdbConnection, GdbListener};
pub use regs::{FpuState, GuestRegisters, Segment};
pub use stop_queue::{StopQueue, StopQueueError};
pub use stub::{serve, SessionEnd, StubError, PACKET_SIZE};
pub use target::{
    DebugTarget, HwBreakpoints, ResumeAction, StopEvent, StopReason, SwBreakpoints, TargetError,
    VcpuIndex, WatchKind, Watchpoints,
};
