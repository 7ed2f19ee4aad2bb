//! The vCPU-thread half of the debugger: applying a resume (step, step over a hardware breakpoint), turning debug
//! exits into stop events, and parking the vCPU when it reports one.

use gdbstub_kvm::{GuestRegisters, ResumeAction, StopEvent, StopReason};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_INJECT_DB, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};

use super::{dr, protections, Protection, ReportedRegisters, CR0_PG, PAGE_SIZE};
use crate::paging::{self, read_virt, PagingContext};
use crate::vcpu::{Vcpu, VcpuState};

const HLT: u8 = 0xf4;
/// How long a vCPU steps waiting for pending breakpoints to become mapped (a few seconds at PVM's step rate).
const MAX_STEPS_UNTIL_PAGING: u32 = 500_000;
/// x86 #BP.
const BP_VECTOR: u32 = 3;

/// What the gdb thread asks of one vCPU when it resumes it.
#[derive(Debug, Clone, Copy)]
pub struct DebugResume {
    pub action: ResumeAction,
    /// The breakpoint configuration every vCPU runs with (sw/hw breakpoint flags and debug registers).
    pub armed: kvm_guest_debug,
    /// Step with `KVM_GUESTDBG_BLOCKIRQ` so a pending interrupt does not turn a step into a handler entry.
    pub blockirq: bool,
    /// The vCPU was last reported stopped on a hardware breakpoint here: if it is still there, execute that
    /// instruction with DR7 cleared first (the breakpoint re-fires forever otherwise), then re-arm.
    pub step_over_hw_at: Option<u64>,
    /// Software breakpoints wait for the guest to enable paging: a continued vCPU without paging steps until it
    /// has it and plants them.
    pub plant_pending: bool,
    /// The gdb thread's number for this resume, recorded with the stop this vCPU reports (see `ParkedStop`).
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Stepping {
    #[default]
    None,
    /// gdb asked for one instruction.
    Requested { blockirq: bool },
    /// Executing the instruction under a hardware breakpoint with DR7 cleared (it re-fires forever otherwise),
    /// then re-arming; `then_report` when gdb asked for a step rather than a continue.
    OverHwBreakpoint { then_report: bool },
    /// Continuing instruction by instruction until paging is on and the pending breakpoints are planted.
    UntilPaging { steps: u32 },
}

/// Per-vCPU debugger state, owned by the vCPU thread.
#[derive(Debug, Default)]
pub struct VcpuDebugState {
    armed: kvm_guest_debug,
    stepping: Stepping,
    generation: u64,
    /// What the last `KVM_SET_GUEST_DEBUG` of this vCPU set (`None`: unknown). Successive steps ask for the same
    /// configuration, and the ioctl costs ~12-30 µs on PVM hosts.
    applied: Option<kvm_guest_debug>,
}

impl Vcpu {
    /// Serves `VcpuRequest::DebugResume`: configures guest debug for the action and starts running.
    pub(crate) fn debug_resume(&mut self, resume: DebugResume) {
        self.debug_state.armed = resume.armed;
        self.debug_state.generation = resume.generation;
        // RIP matters only to a vCPU that stopped on a hardware breakpoint (one ioctl saved per step otherwise).
        let rip = match resume.step_over_hw_at.map(|_| self.fd.get_regs()) {
            None => None,
            Some(Ok(regs)) => Some(regs.rip),
            Some(Err(e)) => {
                self.debug_report(StopReason::Crashed {
                    description: format!("cannot read registers to resume: {e}"),
                });
                return;
            }
        };
        let mut step_flags = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        if resume.blockirq {
            step_flags |= KVM_GUESTDBG_BLOCKIRQ;
        }
        let stopped_on_hw = rip.is_some()
            && resume.step_over_hw_at == rip
            && resume.armed.control & KVM_GUESTDBG_USE_HW_BP != 0;
        let mut dbg = resume.armed;
        self.debug_state.stepping = if stopped_on_hw {
            dbg.arch.debugreg[7] = 0;
            dbg.control |= step_flags;
            Stepping::OverHwBreakpoint {
                then_report: resume.action == ResumeAction::Step,
            }
        } else if resume.plant_pending
            && resume.action == ResumeAction::Continue
            && !self.paging_on()
        {
            // Without BLOCKIRQ: this is a continue, interrupts are welcome.
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
            Stepping::UntilPaging { steps: 0 }
        } else if resume.action == ResumeAction::Step {
            dbg.control |= step_flags;
            Stepping::Requested {
                blockirq: resume.blockirq,
            }
        } else {
            Stepping::None
        };
        if let Err(e) = self.apply_guest_debug(&dbg) {
            self.debug_state.stepping = Stepping::None;
            self.debug_report(StopReason::Crashed {
                description: format!("KVM_SET_GUEST_DEBUG failed: {e}"),
            });
            return;
        }
        self.set_state(VcpuState::Running);
    }

    /// A `KVM_EXIT_DEBUG`: the end of a step, a hardware breakpoint, or (hardware KVM) an int3.
    pub(crate) fn on_debug_exit(&mut self, arch: kvm_debug_exit_arch) {
        let stepping = std::mem::take(&mut self.debug_state.stepping);
        if let Stepping::UntilPaging { steps } = stepping {
            if dr::decode_hit(&self.debug_state.armed.arch.debugreg, arch.dr6).is_none()
                && !self.plant_pending_breakpoints()
            {
                if steps < MAX_STEPS_UNTIL_PAGING {
                    self.debug_state.stepping = Stepping::UntilPaging { steps: steps + 1 };
                    return;
                }
                eprintln!(
                    "vmm: gdb: vCPU {} ran {MAX_STEPS_UNTIL_PAGING} instructions without the pending breakpoints \
                     becoming mapped; running on without them",
                    self.id
                );
            }
        }
        // The registers of a finished step: read once, for the `hlt` check and for the report.
        let mut registers = None;
        if let Stepping::Requested { blockirq: true } = stepping {
            registers = self.exit_registers();
            if registers.as_ref().is_some_and(|r| self.at_hlt(&r.regs)) {
                // Clearing BLOCKIRQ on a `hlt` with an interrupt pending hangs the vCPU on PVM hosts: execute the
                // `hlt` in the same step mode (it does not halt under single-step) and report the step after it.
                self.debug_state.stepping = stepping;
                return;
            }
        }
        let reports_step = matches!(
            stepping,
            Stepping::Requested { .. } | Stepping::OverHwBreakpoint { then_report: true }
        );
        // A vCPU that reports parks until the next resume, which sets its debug configuration anew.
        if stepping != Stepping::None && !reports_step {
            // Back to the armed configuration: no single-step, DR7 re-armed.
            let armed = self.debug_state.armed;
            if let Err(e) = self.apply_guest_debug(&armed) {
                self.debug_report(StopReason::Crashed {
                    description: format!("KVM_SET_GUEST_DEBUG failed after a step: {e}"),
                });
                return;
            }
        }
        match stepping {
            Stepping::Requested { .. } | Stepping::OverHwBreakpoint { then_report: true } => {
                let registers = registers.or_else(|| self.exit_registers());
                self.debug_report_with(StopReason::StepDone, registers);
                return;
            }
            Stepping::OverHwBreakpoint { then_report: false } => return,
            // Planted (or given up on): armed again, running normally from here.
            Stepping::UntilPaging { .. }
                if dr::decode_hit(&self.debug_state.armed.arch.debugreg, arch.dr6).is_none() =>
            {
                return
            }
            // A hardware breakpoint fired meanwhile: reported below.
            Stepping::UntilPaging { .. } | Stepping::None => {}
        }
        if arch.exception == BP_VECTOR {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(arch.pc);
            if self.debug.owns_sw_breakpoint(rip) {
                self.debug_report(StopReason::SwBreakpoint);
            } else {
                // The guest's own int3: hand it back as the #BP it is.
                let mut dbg = self.debug_state.armed;
                dbg.control |= KVM_GUESTDBG_INJECT_BP;
                if let Err(e) = self.apply_guest_debug(&dbg) {
                    self.debug_report(StopReason::Crashed {
                        description: format!("cannot re-inject the guest's int3: {e}"),
                    });
                }
            }
        } else if let Some(reason) = dr::decode_hit(&self.debug_state.armed.arch.debugreg, arch.dr6)
        {
            // Execute breakpoints stop before the instruction, data breakpoints (traps) after the access.
            self.debug_report(reason);
        } else if self.debug.session_active() {
            self.debug_report(StopReason::Paused);
        }
    }

    /// `KVM_SET_GUEST_DEBUG`, skipped when the vCPU already runs with exactly this configuration. Injections
    /// (`KVM_GUESTDBG_INJECT_*`) act when set, so a configuration with one is always applied.
    pub(crate) fn apply_guest_debug(
        &mut self,
        dbg: &kvm_guest_debug,
    ) -> Result<(), kvm_ioctls::Error> {
        let injects = dbg.control & (KVM_GUESTDBG_INJECT_BP | KVM_GUESTDBG_INJECT_DB) != 0;
        if !injects && self.debug_state.applied.as_ref() == Some(dbg) {
            return Ok(());
        }
        self.debug_state.applied = None;
        self.fd.set_guest_debug(dbg)?;
        self.debug_state.applied = Some(*dbg);
        Ok(())
    }

    /// The registers right after an exit, for a stop report (see [`Vcpu::with_exit_regs`]). Without the
    /// FPU/SSE state and `k_gs_base`, which gdb rarely wants at a step (the gdb thread asks for them then).
    fn exit_registers(&mut self) -> Option<ReportedRegisters> {
        let regs = self.with_exit_regs(|r, s| crate::regs::from_kvm(r, s, None, 0))?;
        Some(ReportedRegisters {
            regs,
            complete: false,
        })
    }

    fn paging_on(&self) -> bool {
        self.fd.get_sregs().is_ok_and(|s| s.cr0 & CR0_PG != 0)
    }

    /// Plants the pending software breakpoints once this vCPU has paging; true when none is left.
    fn plant_pending_breakpoints(&self) -> bool {
        match self.registers(false) {
            Ok(regs) if regs.cr0 & CR0_PG != 0 => self
                .debug
                .plant_pending(&self.mem, &PagingContext::from_regs(&regs)),
            _ => false,
        }
    }

    /// The guest physical page of RIP if a read or access watchpoint has taken it from the guest: on PVM hosts
    /// an instruction fetch from it is a KVM emulation failure, which the crash report then explains.
    pub(crate) fn code_page_read_watched(&self) -> Option<u64> {
        let regs = self.registers(false).ok()?;
        let gpa = paging::translate(&self.mem, &PagingContext::from_regs(&regs), regs.rip)
            .ok()?
            .gpa;
        let page = gpa & !(PAGE_SIZE - 1);
        let protected =
            protections(&self.debug.watches()).get(&page) == Some(&Protection::Unmapped);
        protected.then_some(page)
    }

    /// Whether the next instruction is `hlt`.
    fn at_hlt(&self, regs: &GuestRegisters) -> bool {
        let mut byte = [0u8; 1];
        read_virt(
            &self.mem,
            &PagingContext::from_regs(regs),
            regs.rip,
            &mut byte,
        ) == 1
            && byte[0] == HLT
    }

    /// Completes an exit KVM has not finished (an MMIO load's data goes into its register on the next entry),
    /// so the reported state is after the access.
    pub(crate) fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Queues this vCPU's stop for gdb and parks it. The gdb thread stops the other vCPUs before it reports it.
    pub(crate) fn debug_report(&mut self, reason: StopReason) {
        // gdb wants them at once (stop reply, then memory through this CR3): read here, where it costs only the
        // ioctls, rather than on request from the gdb thread, which costs two thread wake-ups more.
        let registers = self.registers(true).ok().map(|regs| ReportedRegisters {
            regs,
            complete: true,
        });
        self.debug_report_with(reason, registers);
    }

    /// [`Vcpu::debug_report`] with the registers already read.
    fn debug_report_with(&mut self, reason: StopReason, registers: Option<ReportedRegisters>) {
        let event = StopEvent {
            vcpu: self.id,
            reason,
        };
        self.debug
            .report_parked(event, self.debug_state.generation, registers, || {
                self.set_state(VcpuState::Paused)
            });
    }
}
