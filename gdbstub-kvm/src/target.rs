//! The debug-target trait the stub drives; `vmm` implements it over its vCPU threads.
//!
//! # Threading
//!
//! The stub runs on one thread of its own (the "gdb thread"). It owns the target (`&mut T`) for the whole session
//! and calls every method below from that thread only, one call at a time; nothing is called from a vCPU thread.
//! A VMM whose vCPUs each run on their own thread implements the methods by sending requests over its channels and
//! kicking the vCPU threads, and waits for the answers inside the call.
//!
//! # Run states
//!
//! The target is either *stopped* (every vCPU out of guest mode, parked, answering requests) or *running* (the
//! vCPUs named in the last [`DebugTarget::resume`] are executing). The stub calls:
//! - [`DebugTarget::pause_all`] once when a session starts and when gdb sends Ctrl-C;
//! - register and memory methods and the breakpoint/watchpoint capabilities only while the target is stopped;
//! - [`DebugTarget::resume`] only while stopped;
//! - [`DebugTarget::take_stop_event`] whenever [`DebugTarget::stop_event_fd`] polls readable.
//!
//! # All-stop
//!
//! When one vCPU hits something worth reporting (breakpoint, watchpoint, finished step, exit, crash), the target
//! stops *all* vCPUs first, then queues a [`StopEvent`] and makes the stop-event fd readable. Several vCPUs may
//! queue events in the same stop (two breakpoints hit at once): the stub reports one, and the others stay queued
//! and are reported after the next `resume` (gdb's native Linux target does the same).

use std::os::fd::RawFd;

use crate::regs::GuestRegisters;

/// A vCPU index, `0..vcpu_count()`. gdb sees vCPU `n` as thread `n + 1`.
pub type VcpuIndex = usize;

/// What one vCPU does on [`DebugTarget::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeAction {
    /// Run until the next stop event (of any vCPU).
    Continue,
    /// Execute exactly one guest instruction, then stop all vCPUs and report [`StopReason::StepDone`].
    Step,
}

/// Access kind of a watchpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// `watch`: stop after a store to the range.
    Write,
    /// `rwatch`: stop after a load from the range.
    Read,
    /// `awatch`: stop after a load or a store.
    Access,
}

/// Why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An int3 from the target's own software breakpoint table. RIP is the breakpoint address (as if the int3
    /// had not executed), as gdb expects with the `swbreak` feature.
    SwBreakpoint,
    /// A hardware execute breakpoint; RIP is the breakpoint address, the instruction not yet executed.
    HwBreakpoint,
    /// A [`ResumeAction::Step`] completed.
    StepDone,
    /// An access to a watched range completed; RIP is past the accessing instruction. `addr` is the accessed
    /// address (within the watched range).
    Watchpoint { kind: WatchKind, addr: u64 },
    /// Stopped on request ([`DebugTarget::pause_all`]) or for a reason with no better name; reported as SIGINT.
    Paused,
    /// The guest shut down (e.g. wrote to an exit port); the session ends after this is reported.
    Exited { status: u8 },
    /// The vCPU cannot continue (e.g. an unhandled KVM internal error, triple fault). Reported to gdb as SIGSEGV;
    /// the vCPU's state stays inspectable.
    Crashed { description: String },
}

/// One stop, as queued by the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopEvent {
    /// The vCPU that caused the stop.
    pub vcpu: VcpuIndex,
    pub reason: StopReason,
}

/// Errors a target reports to the stub. The message is shown on the VMM's stderr and gdb gets an error reply.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("vCPU {vcpu} does not exist")]
    NoSuchVcpu { vcpu: VcpuIndex },
    /// The request is valid but this target or host cannot do it; the message says why, for the user.
    #[error("{message}")]
    Refused { message: String },
    /// The guest virtual address has no mapping in that vCPU's page tables.
    #[error("guest virtual address {gva:#x} is not mapped")]
    NotMapped { gva: u64 },
    /// The target could not talk to its vCPUs (a vCPU thread died, an ioctl failed, ...).
    #[error("{context}")]
    Failed {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TargetError {
    /// A [`TargetError::Refused`] with this message.
    pub fn refused(message: impl Into<String>) -> Self {
        TargetError::Refused {
            message: message.into(),
        }
    }

    /// A [`TargetError::Failed`] saying what was being done, with the underlying error.
    pub fn failed(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TargetError::Failed {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// The core of a debuggable VM. Capabilities beyond it are opt-in through the `as_*` methods.
///
/// Every method is called on the gdb thread only (see the module docs).
pub trait DebugTarget {
    /// Number of vCPUs; constant for the lifetime of the target. Must be at least 1.
    fn vcpu_count(&self) -> usize;

    /// Stops every vCPU and returns once all of them are out of guest mode and parked. Idempotent: pausing a
    /// stopped target returns at once. Stop events that raced with the pause stay queued.
    fn pause_all(&mut self) -> Result<(), TargetError>;

    /// Starts the listed vCPUs, each with its action, and returns without waiting for them to stop. vCPUs not
    /// listed stay stopped (gdb's scheduler locking). Called only while stopped; `actions` names each vCPU at most
    /// once and is never empty. When a stepped vCPU finishes its instruction, the target stops the others too
    /// (all-stop) and queues [`StopReason::StepDone`]; another vCPU's event may win the race and be reported
    /// instead, which gdb handles. If an action is impossible on this host (e.g. stepping ring-3 code on PVM),
    /// return [`TargetError::Refused`] with a message saying so and start nothing: the stub shows the message in
    /// gdb and reports an immediate stop. A vCPU resumed at the address of a hardware breakpoint it stopped on
    /// must execute that instruction instead of re-reporting the breakpoint (x86's RF flag; on PVM: clear DR7,
    /// single-step once, re-arm).
    fn resume(&mut self, actions: &[(VcpuIndex, ResumeAction)]) -> Result<(), TargetError>;

    /// The vCPU's full register state, FPU/SSE included (`GuestRegisters::fpu` must be filled here even if
    /// other users of the type skip it). Called only while stopped.
    fn read_registers(&mut self, vcpu: VcpuIndex) -> Result<GuestRegisters, TargetError>;

    /// The registers a stop reply carries (general registers, rip, rflags, segment selectors) and the paging
    /// state; `fpu` and `k_gs_base` may be left out. The stub calls it for every stop reply, so a target that can
    /// answer it more cheaply than [`DebugTarget::read_registers`] (e.g. from the state KVM handed back with
    /// the exit) should. Called only while stopped.
    fn read_core_registers(&mut self, vcpu: VcpuIndex) -> Result<GuestRegisters, TargetError> {
        self.read_registers(vcpu)
    }

    /// Replaces the vCPU's register state. The stub passes a full snapshot: what `read_registers` returned,
    /// with the registers gdb knows overlaid (gdb writes its whole set after changing one). State gdb cannot see
    /// (a segment's hidden base/limit/attributes except the fs/gs bases, rflags bits 32-63, the x87 pointers'
    /// upper bits) is as `read_registers` returned it, so writing the snapshot back wholesale (`SET_REGS`,
    /// `SET_SREGS`, `SET_FPU`, `MSR_KERNEL_GS_BASE`) is correct. Called only while stopped.
    fn write_registers(
        &mut self,
        vcpu: VcpuIndex,
        regs: &GuestRegisters,
    ) -> Result<(), TargetError>;

    /// Reads guest memory at virtual address `gva`, translated with `vcpu`'s current page tables. Returns the
    /// number of bytes read: a read that crosses into an unmapped page returns the readable prefix; a read whose
    /// first byte is unmapped returns [`TargetError::NotMapped`]. Bytes under the target's own software
    /// breakpoints read as the original bytes, not as int3. Called only while stopped.
    fn read_memory(
        &mut self,
        vcpu: VcpuIndex,
        gva: u64,
        buf: &mut [u8],
    ) -> Result<usize, TargetError>;

    /// Writes guest memory at virtual address `gva` (translated like [`DebugTarget::read_memory`]); all or
    /// nothing. Writing over one of the target's own software breakpoints updates the saved original byte and
    /// keeps the breakpoint. Called only while stopped.
    fn write_memory(&mut self, vcpu: VcpuIndex, gva: u64, data: &[u8]) -> Result<(), TargetError>;

    /// A file descriptor (typically an eventfd) that polls readable while a [`StopEvent`] is queued. The stub
    /// blocks in poll(2) on it together with the gdb connection, so it never busy-polls. The target keeps
    /// ownership; the stub never reads, writes or closes it. Must stay the same fd for the session.
    fn stop_event_fd(&self) -> RawFd;

    /// Takes the oldest queued stop event, if any. When the queue becomes empty the target must make the fd
    /// unreadable again (for an eventfd: read it to reset the counter) before returning. When a session ends
    /// (detach, dropped connection) the stub takes and discards whatever is still queued before resuming, so the
    /// VMM must act on guest exits and crashes itself as well; events queued while no gdb is attached are reported
    /// to the next session after its first resume. [`crate::StopQueue`] implements this part.
    fn take_stop_event(&mut self) -> Option<StopEvent>;

    /// Software breakpoint support, if the target has it.
    fn as_sw_breakpoints(&mut self) -> Option<&mut dyn SwBreakpoints> {
        None
    }

    /// Hardware execute breakpoint support, if the target has it.
    fn as_hw_breakpoints(&mut self) -> Option<&mut dyn HwBreakpoints> {
        None
    }

    /// Watchpoint support, if the target has it.
    fn as_watchpoints(&mut self) -> Option<&mut dyn Watchpoints> {
        None
    }

    /// Extra text shown by `monitor info vcpus` for one vCPU (e.g. "running", "halted", mp_state). Optional.
    fn vcpu_description(&mut self, vcpu: VcpuIndex) -> Option<String> {
        let _ = vcpu;
        None
    }
}

/// Software breakpoints. The target owns the table: it patches int3 over the original byte (on KVM with
/// `KVM_GUESTDBG_USE_SW_BP`), and uses the table to tell its own int3s from the guest's. All methods are called
/// only while the target is stopped.
pub trait SwBreakpoints {
    /// Plants a breakpoint at `gva`. gdb's breakpoint packets carry no thread, so translate with any vCPU's page
    /// tables (kernel mappings are shared; use vCPU 0's). Adding an address that already has one is a no-op
    /// success. Refuse with [`TargetError::Refused`] where the host cannot trap it (e.g. user-space addresses on
    /// PVM, where int3 at CPL 3 goes to the guest).
    fn add_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError>;
    /// Removes a breakpoint and restores the original byte. Removing an unknown address is an error.
    fn remove_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError>;
}

/// Hardware execute breakpoints (x86: DR0-DR3 with DR7), at most [`HwBreakpoints::hw_breakpoint_slots`].
pub trait HwBreakpoints {
    /// How many can be set at once (4 on x86).
    fn hw_breakpoint_slots(&self) -> usize {
        4
    }
    /// Arms a breakpoint at `gva` on every vCPU. Refuse when all slots are taken or the host cannot do it.
    fn add_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError>;
    fn remove_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError>;
}

/// Data watchpoints of any size. The target chooses the mechanism (debug registers, or page protection where data
/// breakpoints never fire, as on PVM). Ranges are guest virtual, translated like software breakpoints. A stop is
/// reported after the access completed, with RIP past the accessing instruction, as [`StopReason::Watchpoint`]
/// carrying the accessed guest virtual address (gdb matches it against its watchpoints). gdb itself compares old
/// and new values for `watch` and silently resumes when a store did not change the value.
pub trait Watchpoints {
    fn add_watchpoint(&mut self, gva: u64, len: u64, kind: WatchKind) -> Result<(), TargetError>;
    fn remove_watchpoint(&mut self, gva: u64, len: u64, kind: WatchKind)
        -> Result<(), TargetError>;
}
