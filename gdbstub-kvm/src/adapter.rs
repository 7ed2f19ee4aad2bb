//! Bridges a [`DebugTarget`] to the `gdbstub` crate's target traits.

use std::num::NonZeroUsize;

use gdbstub::common::{Signal, Tid};
use gdbstub::outputln;
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetResult};

use crate::arch::{expedited_registers, RegNumber, X86_64Kvm, REGISTER_BLOCK_LEN};
use crate::regs::GuestRegisters;
use crate::target::{
    DebugTarget, ResumeAction, StopEvent, StopReason, TargetError, VcpuIndex, WatchKind,
};

const EFAULT: u8 = 14;
const EINVAL: u8 = 22;

pub(crate) fn tid_of(vcpu: VcpuIndex) -> Tid {
    NonZeroUsize::MIN.saturating_add(vcpu)
}

fn vcpu_of(tid: Tid) -> VcpuIndex {
    tid.get() - 1
}

/// What the stub has installed in the target, so a dropped connection can take it all out again.
#[derive(Debug, Default)]
struct Installed {
    sw_breakpoints: Vec<u64>,
    hw_breakpoints: Vec<u64>,
    watchpoints: Vec<(u64, u64, WatchKind)>,
}

pub(crate) struct Adapter<'t, T: DebugTarget + ?Sized> {
    pub(crate) target: &'t mut T,
    actions: Vec<Option<ResumeAction>>,
    scheduler_locked: bool,
    installed: Installed,
    /// A resume the target refused: reported to gdb as an immediate stop with this message.
    pub(crate) refused_resume: Option<(VcpuIndex, String)>,
    /// gdb sent an interrupt while the target was already stopped (its Ctrl-C raced with its own resume
    /// packet). gdbstub answers the next resume with that interrupt's stop at once, so that resume must leave the
    /// target stopped.
    pub(crate) interrupted_while_stopped: bool,
    /// The vCPU gdb last resumed or saw stop; a Ctrl-C stop is reported on it.
    pub(crate) focus_vcpu: VcpuIndex,
}

impl<'t, T: DebugTarget + ?Sized> Adapter<'t, T> {
    pub(crate) fn new(target: &'t mut T) -> Self {
        let count = target.vcpu_count();
        Adapter {
            target,
            actions: vec![None; count],
            scheduler_locked: false,
            installed: Installed::default(),
            refused_resume: None,
            interrupted_while_stopped: false,
            focus_vcpu: 0,
        }
    }

    fn vcpu(&self, tid: Tid) -> Result<VcpuIndex, TargetError> {
        let vcpu = vcpu_of(tid);
        if vcpu < self.target.vcpu_count() {
            Ok(vcpu)
        } else {
            Err(TargetError::NoSuchVcpu { vcpu })
        }
    }

    /// Removes everything gdb installed, ignoring failures: used when a session ends without gdb cleaning up.
    pub(crate) fn remove_all_installed(&mut self) {
        let installed = std::mem::take(&mut self.installed);
        if let Some(sw) = self.target.as_sw_breakpoints() {
            for addr in installed.sw_breakpoints {
                let _ = sw.remove_sw_breakpoint(addr);
            }
        }
        if let Some(hw) = self.target.as_hw_breakpoints() {
            for addr in installed.hw_breakpoints {
                let _ = hw.remove_hw_breakpoint(addr);
            }
        }
        if let Some(watch) = self.target.as_watchpoints() {
            for (addr, len, kind) in installed.watchpoints {
                let _ = watch.remove_watchpoint(addr, len, kind);
            }
        }
    }

    /// The registers to send with a stop reply of the vCPU that just stopped (`None` if they cannot be read:
    /// gdb then asks for them itself and gets the error).
    pub(crate) fn expedited(&mut self) -> Option<Vec<(RegNumber, Vec<u8>)>> {
        let regs = self.target.read_core_registers(self.focus_vcpu).ok()?;
        Some(expedited_registers(&regs))
    }

    /// The gdb stop reply for a target event.
    pub(crate) fn stop_reason(&mut self, mut event: StopEvent) -> MultiThreadStopReason<u64> {
        if event.vcpu >= self.target.vcpu_count() {
            report(&format!(
                "target reported a stop on nonexistent vCPU {}",
                event.vcpu
            ));
            event.vcpu = 0;
        }
        let tid = tid_of(event.vcpu);
        self.focus_vcpu = event.vcpu;
        let trap = MultiThreadStopReason::SignalWithThread {
            tid,
            signal: Signal::SIGTRAP,
        };
        match event.reason {
            StopReason::SwBreakpoint if self.target.as_sw_breakpoints().is_some() => {
                MultiThreadStopReason::SwBreak(tid)
            }
            StopReason::HwBreakpoint if self.target.as_hw_breakpoints().is_some() => {
                MultiThreadStopReason::HwBreak(tid)
            }
            StopReason::Watchpoint { kind, addr } if self.target.as_watchpoints().is_some() => {
                let kind = match kind {
                    WatchKind::Write => gdbstub::target::ext::breakpoints::WatchKind::Write,
                    WatchKind::Read => gdbstub::target::ext::breakpoints::WatchKind::Read,
                    WatchKind::Access => gdbstub::target::ext::breakpoints::WatchKind::ReadWrite,
                };
                MultiThreadStopReason::Watch { tid, kind, addr }
            }
            StopReason::SwBreakpoint | StopReason::HwBreakpoint | StopReason::Watchpoint { .. } => {
                trap
            }
            StopReason::StepDone => trap,
            StopReason::Paused => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGINT,
            },
            StopReason::Exited { status } => MultiThreadStopReason::Exited(status),
            StopReason::Crashed { description } => {
                report(&format!("vCPU {} crashed: {description}", event.vcpu));
                MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGSEGV,
                }
            }
        }
    }
}

/// Messages for the person running the VMM; gdb itself only gets an error number for most refusals.
pub(crate) fn report(message: &str) {
    eprintln!("gdbstub-kvm: {message}");
}

fn nonfatal(error: TargetError) -> gdbstub::target::TargetError<TargetError> {
    report(&error.to_string());
    match error {
        TargetError::NotMapped { .. } => gdbstub::target::TargetError::Errno(EFAULT),
        _ => gdbstub::target::TargetError::Errno(EINVAL),
    }
}

/// Answers a Z/z packet: `Ok(false)` tells gdb "not done" without ending the session.
fn breakpoint_result(
    result: Result<(), TargetError>,
) -> Result<bool, gdbstub::target::TargetError<TargetError>> {
    match result {
        Ok(()) => Ok(true),
        Err(e) => {
            report(&e.to_string());
            Ok(false)
        }
    }
}

impl<T: DebugTarget + ?Sized> Target for Adapter<'_, T> {
    type Arch = X86_64Kvm;
    type Error = TargetError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    // Without a software-breakpoint capability gdb writes int3 into guest memory itself; that is what such a
    // target asked for by not offering one.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl<T: DebugTarget + ?Sized> MultiThreadBase for Adapter<'_, T> {
    fn read_registers(&mut self, regs: &mut GuestRegisters, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu(tid).map_err(nonfatal)?;
        *regs = self.target.read_registers(vcpu).map_err(nonfatal)?;
        Ok(())
    }

    fn write_registers(&mut self, regs: &GuestRegisters, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu(tid).map_err(nonfatal)?;
        // gdb's register block carries only part of the state (segment selectors without the hidden base,
        // limit and attributes, no FPU pointers' upper bits...). Overlay what it carries on the live state.
        let mut block = Vec::with_capacity(REGISTER_BLOCK_LEN);
        gdbstub::arch::Registers::gdb_serialize(regs, |b| block.push(b.unwrap_or(0)));
        let mut current = self.target.read_registers(vcpu).map_err(nonfatal)?;
        let upper_rflags = current.rflags & !0xffff_ffff;
        gdbstub::arch::Registers::gdb_deserialize(&mut current, &block)
            .map_err(|()| gdbstub::target::TargetError::Errno(EINVAL))?;
        current.rflags |= upper_rflags;
        self.target
            .write_registers(vcpu, &current)
            .map_err(nonfatal)
    }

    fn read_addrs(
        &mut self,
        start_addr: u64,
        data: &mut [u8],
        tid: Tid,
    ) -> TargetResult<usize, Self> {
        let vcpu = self.vcpu(tid).map_err(nonfatal)?;
        match self.target.read_memory(vcpu, start_addr, data) {
            Ok(n) => Ok(n),
            // gdb probes unmapped addresses all the time (e.g. `x` past a mapping); not worth a message.
            Err(TargetError::NotMapped { .. }) => Err(gdbstub::target::TargetError::Errno(EFAULT)),
            Err(e) => Err(nonfatal(e)),
        }
    }

    fn write_addrs(&mut self, start_addr: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let vcpu = self.vcpu(tid).map_err(nonfatal)?;
        self.target
            .write_memory(vcpu, start_addr, data)
            .map_err(nonfatal)
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), Self::Error> {
        (0..self.target.vcpu_count()).for_each(|vcpu| thread_is_active(tid_of(vcpu)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl<T: DebugTarget + ?Sized> MultiThreadResume for Adapter<'_, T> {
    fn resume(&mut self) -> Result<(), Self::Error> {
        if std::mem::take(&mut self.interrupted_while_stopped) {
            return Ok(());
        }
        let default = (!self.scheduler_locked).then_some(ResumeAction::Continue);
        let actions: Vec<(VcpuIndex, ResumeAction)> = self
            .actions
            .iter()
            .enumerate()
            .filter_map(|(vcpu, action)| action.or(default).map(|a| (vcpu, a)))
            .collect();
        if let Some((vcpu, _)) = actions.iter().find(|(_, a)| *a == ResumeAction::Step) {
            self.focus_vcpu = *vcpu;
        }
        let Some(&(first_vcpu, _)) = actions.first() else {
            self.refused_resume = Some((self.focus_vcpu, "gdb resumed no vCPU".to_owned()));
            return Ok(());
        };
        // A refusal (e.g. a step the host cannot do) must not end the session: the stub reports it as an
        // immediate stop with the message instead.
        if let Err(e) = self.target.resume(&actions) {
            report(&e.to_string());
            self.refused_resume = Some((first_vcpu, e.to_string()));
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.scheduler_locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        // Signals cannot be delivered to a vCPU; gdb passes none by default (SIGINT/SIGTRAP are "nopass").
        let vcpu = self.vcpu(tid)?;
        self.actions[vcpu] = Some(ResumeAction::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl<T: DebugTarget + ?Sized> MultiThreadSingleStep for Adapter<'_, T> {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        let vcpu = self.vcpu(tid)?;
        self.actions[vcpu] = Some(ResumeAction::Step);
        Ok(())
    }
}

impl<T: DebugTarget + ?Sized> MultiThreadSchedulerLocking for Adapter<'_, T> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.scheduler_locked = true;
        Ok(())
    }
}

impl<T: DebugTarget + ?Sized> ThreadExtraInfo for Adapter<'_, T> {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = format!("vCPU {}", vcpu_of(tid));
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl<T: DebugTarget + ?Sized> Breakpoints for Adapter<'_, T> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        self.target.as_sw_breakpoints().is_some().then_some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        self.target.as_hw_breakpoints().is_some().then_some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        self.target.as_watchpoints().is_some().then_some(self)
    }
}

impl<T: DebugTarget + ?Sized> SwBreakpoint for Adapter<'_, T> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(sw) = self.target.as_sw_breakpoints() else {
            return Ok(false);
        };
        let result = sw.add_sw_breakpoint(addr);
        if result.is_ok() && !self.installed.sw_breakpoints.contains(&addr) {
            self.installed.sw_breakpoints.push(addr);
        }
        breakpoint_result(result)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(sw) = self.target.as_sw_breakpoints() else {
            return Ok(false);
        };
        let result = sw.remove_sw_breakpoint(addr);
        self.installed.sw_breakpoints.retain(|a| *a != addr);
        breakpoint_result(result)
    }
}

impl<T: DebugTarget + ?Sized> HwBreakpoint for Adapter<'_, T> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(hw) = self.target.as_hw_breakpoints() else {
            return Ok(false);
        };
        let result = hw.add_hw_breakpoint(addr);
        if result.is_ok() && !self.installed.hw_breakpoints.contains(&addr) {
            self.installed.hw_breakpoints.push(addr);
        }
        breakpoint_result(result)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(hw) = self.target.as_hw_breakpoints() else {
            return Ok(false);
        };
        let result = hw.remove_hw_breakpoint(addr);
        self.installed.hw_breakpoints.retain(|a| *a != addr);
        breakpoint_result(result)
    }
}

fn watch_kind(kind: gdbstub::target::ext::breakpoints::WatchKind) -> WatchKind {
    match kind {
        gdbstub::target::ext::breakpoints::WatchKind::Write => WatchKind::Write,
        gdbstub::target::ext::breakpoints::WatchKind::Read => WatchKind::Read,
        gdbstub::target::ext::breakpoints::WatchKind::ReadWrite => WatchKind::Access,
    }
}

impl<T: DebugTarget + ?Sized> HwWatchpoint for Adapter<'_, T> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: gdbstub::target::ext::breakpoints::WatchKind,
    ) -> TargetResult<bool, Self> {
        let Some(watch) = self.target.as_watchpoints() else {
            return Ok(false);
        };
        let kind = watch_kind(kind);
        let result = watch.add_watchpoint(addr, len, kind);
        if result.is_ok() {
            self.installed.watchpoints.push((addr, len, kind));
        }
        breakpoint_result(result)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: gdbstub::target::ext::breakpoints::WatchKind,
    ) -> TargetResult<bool, Self> {
        let Some(watch) = self.target.as_watchpoints() else {
            return Ok(false);
        };
        let kind = watch_kind(kind);
        let result = watch.remove_watchpoint(addr, len, kind);
        if let Some(pos) = self
            .installed
            .watchpoints
            .iter()
            .position(|w| *w == (addr, len, kind))
        {
            self.installed.watchpoints.remove(pos);
        }
        breakpoint_result(result)
    }
}

impl<T: DebugTarget + ?Sized> MonitorCmd for Adapter<'_, T> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        match cmd.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["info", "vcpus"] => {
                for vcpu in 0..self.target.vcpu_count() {
                    let line = match self.target.read_registers(vcpu) {
                        Ok(regs) => format!(
                            "vCPU {vcpu} (thread {}): rip={:#x} cpl={} cr3={:#x}",
                            vcpu + 1,
                            regs.rip,
                            regs.cpl(),
                            regs.cr3
                        ),
                        Err(e) => format!("vCPU {vcpu} (thread {}): {e}", vcpu + 1),
                    };
                    match self.target.vcpu_description(vcpu) {
                        Some(extra) => outputln!(out, "{line} {extra}"),
                        None => outputln!(out, "{line}"),
                    }
                }
            }
            [] | ["help"] => {
                outputln!(out, "monitor commands:");
                outputln!(out, "  info vcpus   one line per vCPU: rip, CPL, cr3");
            }
            _ => outputln!(
                out,
                "unknown monitor command {:?}; try `monitor help`",
                cmd.trim()
            ),
        }
        Ok(())
    }
}
