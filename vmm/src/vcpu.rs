//! One thread per vCPU, owning its `VcpuFd`, with an explicit state machine (Running / Paused / Exited).
//!
//! Other threads talk to a vCPU only through its request channel plus a kick (see `kick`); the thread answers
//! requests between `KVM_RUN`s and blocks on the channel while paused — it never busy-waits.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use gdbstub_kvm::{StopEvent, StopReason};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_regs, kvm_run, kvm_sregs, KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::debug::{DebugResume, DebugShared, MmioData, MmioOutcome, VcpuDebugState};
use crate::devices::{PioDevices, PioOutcome};
use crate::exit::{self, InternalErrorAction, VmEnd};
use crate::kick::{self, Kicker};
use crate::paging::{read_virt, PagingContext};
use crate::sampler::{
    thread_cpu_time_ns, walk_callchain, CpuTimeCredit, SampleRequest, MAX_CALLCHAIN,
};
use crate::{GuestMode, GuestRegisters, Sample};

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Where x86 KVM puts port-I/O data in the kvm_run mapping (KVM_PIO_PAGE_OFFSET = 1 page), and its size.
const PIO_PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {vcpu}: {op} failed")]
    Ioctl {
        vcpu: usize,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0} has exited")]
    Exited(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    Running = 0,
    Paused = 1,
    Exited = 2,
}

pub type Reply<T> = Sender<Result<T, VcpuError>>;

/// Requests a vCPU thread serves between runs.
pub enum VcpuRequest {
    /// Stop running guest code; the reply comes once the vCPU is out of `KVM_RUN` and parked.
    Pause(Reply<()>),
    Resume,
    GetRegisters {
        with_fpu: bool,
        reply: Reply<GuestRegisters>,
    },
    /// One MSR (None: KVM does not know it).
    ReadMsr {
        index: u32,
        reply: Reply<Option<u64>>,
    },
    SetRegisters(Box<GuestRegisters>, Reply<()>),
    SetGuestDebug(Box<kvm_guest_debug>, Reply<()>),
    /// gdb resumes this vCPU (continue or step), with the breakpoint configuration to run with.
    DebugResume(DebugResume),
    /// The VM is ending: leave the thread.
    Exit,
}

/// What a vCPU tells the VM (the coordinator thread).
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest or KVM ended the VM.
    End(VmEnd),
}

/// The shared, thread-safe side of one vCPU.
pub struct VcpuHandle {
    pub id: usize,
    pub tx: Sender<VcpuRequest>,
    pub kicker: Kicker,
    /// Host thread id of the vCPU thread.
    pub tid: u32,
    pub state: Arc<AtomicU8>,
    pub sample_request: Arc<SampleRequest>,
    pub exits: crate::exit_stats::SharedExitTable,
}

impl VcpuHandle {
    pub fn state(&self) -> VcpuState {
        match self.state.load(Ordering::Acquire) {
            0 => VcpuState::Running,
            1 => VcpuState::Paused,
            _ => VcpuState::Exited,
        }
    }

    /// Sends a request and kicks the vCPU out of the guest so it sees it promptly.
    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(req).map_err(|_| VcpuError::Exited(self.id))?;
        // A paused vCPU is blocked on the channel (the send wakes it) or will drain the channel before its next
        // KVM_RUN (see `Vcpu::run`): a kick would only make that KVM_RUN return at once with EINTR, a wasted
        // ioctl and signal on every gdb step. The fence pairs with the one in `Vcpu::run`: either this load sees
        // the vCPU running (and kicks), or the vCPU's drain sees the request.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.state() != VcpuState::Paused {
            self.kicker.kick();
        }
        Ok(())
    }

    /// Sends a request carrying a reply channel and waits for the answer.
    pub fn call<T>(&self, make: impl FnOnce(Reply<T>) -> VcpuRequest) -> Result<T, VcpuError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(make(tx))?;
        rx.recv().map_err(|_| VcpuError::Exited(self.id))?
    }
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    pub id: usize,
    pub fd: VcpuFd,
    pub rx: Receiver<VcpuRequest>,
    pub events: Sender<VcpuEvent>,
    pub devices: Arc<PioDevices>,
    pub mem: GuestMemoryMmap,
    pub state: Arc<AtomicU8>,
    pub sample_request: Arc<SampleRequest>,
    pub sampling: Arc<crate::sampler::SamplingSlot>,
    pub use_sync_regs: bool,
    pub symbolize: Option<crate::vm::SymbolizeFn>,
    /// Debugger state shared with the gdb thread (breakpoint tables, watched pages, stop queue).
    pub debug: Arc<DebugShared>,
    pub debug_state: VcpuDebugState,
    pub exits: crate::exit_stats::SharedExitTable,
    pub cpu_credit: CpuTimeCredit,
}

impl Vcpu {
    pub(crate) fn set_state(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }

    fn state(&self) -> VcpuState {
        match self.state.load(Ordering::Acquire) {
            0 => VcpuState::Running,
            1 => VcpuState::Paused,
            _ => VcpuState::Exited,
        }
    }

    fn ioctl_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let vcpu = self.id;
        move |source| VcpuError::Ioctl { vcpu, op, source }
    }

    /// The thread body. Returns when the VM ends or an `Exit` request arrives.
    pub fn run(mut self) {
        // Unregisters the kick target even when this thread panics: the guard drops before `self` (and with it
        // the kvm_run mapping the pointer points into).
        let _unregister = ImmediateExitRegistration;
        kick::register_immediate_exit(immediate_exit_ptr(self.fd.get_kvm_run()));
        if self.use_sync_regs {
            self.fd.get_kvm_run().kvm_valid_regs = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) as u64;
        }
        while self.state() != VcpuState::Exited {
            if self.state() == VcpuState::Paused {
                match self.rx.recv() {
                    Ok(req) => self.serve(req),
                    Err(_) => self.set_state(VcpuState::Exited),
                }
                self.drop_sample_request();
                continue;
            }
            // Pairs with the fence in `VcpuHandle::send`: a request sent while this vCPU still looked paused (so
            // without a kick) is seen here, after the state says running, and before the next KVM_RUN.
            std::sync::atomic::fence(Ordering::SeqCst);
            while let Ok(req) = self.rx.try_recv() {
                self.serve(req);
            }
            if self.state() != VcpuState::Running {
                continue;
            }
            self.run_once();
        }
    }

    fn serve(&mut self, req: VcpuRequest) {
        match req {
            VcpuRequest::Pause(reply) => {
                self.set_state(VcpuState::Paused);
                let _ = reply.send(Ok(()));
            }
            VcpuRequest::Resume => {
                if self.state() == VcpuState::Paused {
                    self.set_state(VcpuState::Running);
                }
            }
            VcpuRequest::GetRegisters { with_fpu, reply } => {
                let _ = reply.send(self.registers(with_fpu));
            }
            VcpuRequest::ReadMsr { index, reply } => {
                let _ = reply.send(Ok(self.read_msr(index)));
            }
            VcpuRequest::SetRegisters(regs, reply) => {
                let _ = reply.send(self.set_registers(&regs));
            }
            VcpuRequest::SetGuestDebug(dbg, reply) => {
                let result = self
                    .apply_guest_debug(&dbg)
                    .map_err(self.ioctl_err("KVM_SET_GUEST_DEBUG"));
                let _ = reply.send(result);
            }
            VcpuRequest::DebugResume(resume) => self.debug_resume(resume),
            VcpuRequest::Exit => self.set_state(VcpuState::Exited),
        }
    }

    /// Full register state through ioctls (debugger and crash paths; the sampler uses sync regs instead).
    /// `f` of the general and special registers as the last exit left them: from the sync regs KVM fills in
    /// `kvm_run` on every exit (no ioctl) where the host has them, else `KVM_GET_REGS`/`KVM_GET_SREGS` (`None` if
    /// those fail). Valid only until something changes the vCPU's registers after the exit.
    pub(crate) fn with_exit_regs<T>(
        &mut self,
        f: impl FnOnce(&kvm_regs, &kvm_sregs) -> T,
    ) -> Option<T> {
        if self.use_sync_regs {
            let run = self.fd.get_kvm_run();
            // SAFETY: kvm_valid_regs asked KVM to fill `s.regs` (regs and sregs) on every exit; the union is plain
            // data.
            let synced = unsafe { &run.s.regs };
            return Some(f(&synced.regs, &synced.sregs));
        }
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => Some(f(&r, &s)),
            _ => None,
        }
    }

    pub fn registers(&self, with_fpu: bool) -> Result<GuestRegisters, VcpuError> {
        let regs = self.fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        let fpu = if with_fpu {
            Some(self.fd.get_fpu().map_err(self.ioctl_err("KVM_GET_FPU"))?)
        } else {
            None
        };
        let k_gs_base = self.read_msr(MSR_KERNEL_GS_BASE).unwrap_or(0);
        Ok(crate::regs::from_kvm(
            &regs,
            &sregs,
            fpu.as_ref(),
            k_gs_base,
        ))
    }

    fn set_registers(&self, g: &GuestRegisters) -> Result<(), VcpuError> {
        let mut regs = self.fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))?;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        let mut fpu = self.fd.get_fpu().map_err(self.ioctl_err("KVM_GET_FPU"))?;
        crate::regs::into_kvm(g, &mut regs, &mut sregs, &mut fpu);
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&fpu)
            .map_err(self.ioctl_err("KVM_SET_FPU"))?;
        self.write_msr(MSR_KERNEL_GS_BASE, g.k_gs_base)
    }

    fn write_msr(&self, index: u32, data: u64) -> Result<(), VcpuError> {
        let failed = self.ioctl_err("KVM_SET_MSRS");
        let entry = kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[entry]) else {
            return Err(failed(kvm_ioctls::Error::new(libc::ENOMEM)));
        };
        match self.fd.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            // KVM stops at the first MSR it refuses and returns how many it set.
            Ok(_) => Err(failed(kvm_ioctls::Error::new(libc::EINVAL))),
            Err(source) => Err(failed(source)),
        }
    }

    fn read_msr(&self, index: u32) -> Option<u64> {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (self.fd.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    }

    fn run_once(&mut self) {
        let mut debug_exit = DebugExit::None;
        let mut pio = false;
        let result = self.fd.run();
        let handling_started = std::time::Instant::now();
        let key = crate::exit_stats::ExitKey::of(&result);
        let end = match result {
            // Port I/O is served once `run`'s borrow of kvm_run ends: the access size is needed too.
            Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => {
                pio = true;
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match self
                    .debug
                    .mmio_access(&self.mem, addr, MmioData::Read(data))
                {
                    // No MMIO devices: reads of unbacked guest-physical space return all-ones, like an empty bus.
                    MmioOutcome::NotWatched => data.fill(0xff),
                    MmioOutcome::Served => {}
                    MmioOutcome::Hit(reason) => debug_exit = DebugExit::Watchpoint(reason),
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let MmioOutcome::Hit(reason) =
                    self.debug
                        .mmio_access(&self.mem, addr, MmioData::Write(data))
                {
                    debug_exit = DebugExit::Watchpoint(reason);
                }
                None
            }
            Ok(VcpuExit::Hlt) => Some(VmEnd::GuestReset),
            Ok(VcpuExit::Shutdown) => Some(self.crash(SHUTDOWN.into())),
            Ok(VcpuExit::SystemEvent(..)) => Some(VmEnd::GuestReset),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(self.crash(format!(
                "VM entry failed (hardware reason {reason:#x} on host cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => self.on_internal_error(),
            Ok(VcpuExit::Debug(arch)) => {
                debug_exit = DebugExit::Debug(arch);
                None
            }
            Ok(other) => {
                let what = format!("unexpected exit: {other:?}");
                Some(self.crash(what))
            }
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            // An application processor that got INIT returns EAGAIN once; run again.
            Err(e) if e.errno() == libc::EAGAIN => None,
            Err(e) => Some(self.crash(format!("KVM_RUN failed: {e}"))),
        };
        let end = if pio { self.serve_pio() } else { end };
        self.handle_debug_exit(debug_exit);
        if self.sample_request.take() {
            self.take_sample();
        }
        self.exits
            .record(key, handling_started.elapsed().as_nanos() as u64);
        let end = end.and_then(|end| self.hold_crash_for_debugger(end));
        if let Some(end) = end {
            self.set_state(VcpuState::Exited);
            let _ = self.events.send(VcpuEvent::End(end));
        }
    }

    /// Serves a `KVM_EXIT_IO`: `count` accesses of `size` bytes (`rep ins`/`outs` bring several in one exit, and
    /// a 16- or 32-bit access to a byte-wide device covers several ports), so the size matters, not just the length.
    fn serve_pio(&mut self) -> Option<VmEnd> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit just taken was KVM_EXIT_IO, so `io` is the union member KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        let len = io.size as usize * io.count as usize;
        // KVM's own limits (1, 2 or 4 bytes; the data fits its one PIO page): anything else is not read or written.
        if !matches!(io.size, 1 | 2 | 4)
            || len > PIO_PAGE_SIZE
            || io.data_offset as usize != PIO_PAGE_SIZE
        {
            return Some(self.crash(format!(
                "KVM_EXIT_IO with size {} count {} at data offset {:#x}, outside KVM's PIO page",
                io.size, io.count, io.data_offset
            )));
        }
        // SAFETY: checked above: the data lies in the PIO page, the second page of the kvm_run mapping (which x86
        // KVM always maps, at least three pages), and lives as long as the vCPU fd; nothing else refers to it while
        // this slice exists (the same slice kvm-ioctls hands out with the exit).
        let data = unsafe {
            std::slice::from_raw_parts_mut(
                (run as *mut kvm_run as *mut u8).add(io.data_offset as usize),
                len,
            )
        };
        let size = io.size as usize;
        let outcome = if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT {
            self.devices.pio_write(io.port, size, data)
        } else {
            self.devices.pio_read(io.port, size, data)
        };
        match outcome {
            PioOutcome::ExitRequested(status) => Some(VmEnd::GuestExit(status)),
            PioOutcome::ResetRequested => Some(VmEnd::GuestReset),
            PioOutcome::Handled | PioOutcome::Unclaimed => None,
        }
    }

    fn drop_sample_request(&self) {
        if self.sample_request.take() {
            if let Some(sink) = self.sampling.current() {
                sink.loss.idle_ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn take_sample(&mut self) {
        let Some(sink) = self.sampling.current() else {
            return;
        };
        if sink.kick_only {
            return;
        }
        let owed = self.cpu_credit.due(thread_cpu_time_ns(), sink.period_ns);
        let capped = self.cpu_credit.take_capped();
        if capped > 0 {
            sink.loss.ticks_skipped.fetch_add(capped, Ordering::Relaxed);
        }
        if owed == 0 {
            sink.loss.idle_ticks.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let read = self.with_exit_regs(|r, s| {
            let ctx = PagingContext {
                cr0: s.cr0,
                cr3: s.cr3,
                cr4: s.cr4,
                efer: s.efer,
            };
            (r.rip, r.rsp, r.rbp, s.cs.selector, ctx)
        });
        let Some((rip, rsp, rbp, cs, ctx)) = read else {
            sink.loss.idle_ticks.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let callchain = if sink.callchains {
            walk_callchain(&self.mem, &ctx, (rip, rsp, rbp), MAX_CALLCHAIN)
        } else {
            Vec::new()
        };
        let sample = Sample {
            time_ns: sink.epoch.elapsed().as_nanos() as u64,
            vcpu: self.id as u32,
            rip,
            mode: if cs & 3 == 0 {
                GuestMode::Kernel
            } else {
                GuestMode::User
            },
            cr3: ctx.cr3 & 0x000f_ffff_ffff_f000,
            callchain,
            period: None,
        };
        for _ in 1..owed {
            sink.push(sample.clone());
        }
        sink.push(sample);
    }

    fn on_internal_error(&mut self) -> Option<VmEnd> {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` union member is the valid one.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let bytes = exit::instruction_bytes(internal.suberror, internal.ndata, &internal.data);
        let regs = self.registers(false).ok();
        // Guest memory at RIP is authoritative: the bytes PVM attaches do not always start at RIP.
        let byte_at_rip = regs
            .as_ref()
            .and_then(|r| {
                let mut b = [0u8; 1];
                (read_virt(&self.mem, &PagingContext::from_regs(r), r.rip, &mut b) == 1)
                    .then_some(b[0])
            })
            .or_else(|| bytes.first().copied());
        let debugger_owns = regs
            .as_ref()
            .is_some_and(|r| self.debug.owns_sw_breakpoint(r.rip));
        match exit::classify_internal_error(internal.suberror, byte_at_rip, debugger_owns) {
            InternalErrorAction::InjectBreakpoint => match self.inject_breakpoint() {
                Ok(()) => None,
                Err(e) => Some(self.crash(format!("cannot deliver guest int3 as #BP: {e}"))),
            },
            InternalErrorAction::CompleteFwait => match self.complete_fwait() {
                Ok(()) => None,
                Err(e) => Some(self.crash(format!("cannot complete the guest's fwait: {e}"))),
            },
            InternalErrorAction::DebuggerBreakpoint => {
                // RIP stays on the int3, as gdb expects of a software breakpoint hit.
                self.debug_report(StopReason::SwBreakpoint);
                None
            }
            InternalErrorAction::Fatal => Some(self.crash(format!(
                "KVM internal error: {} (suberror {}){}",
                exit::suberror_name(internal.suberror),
                internal.suberror,
                if bytes.is_empty() {
                    String::new()
                } else {
                    format!(", instruction bytes {bytes:02x?}")
                }
            ))),
        }
    }

    /// Completes an `fwait` the host's emulator rejected: a no-op unless an unmasked x87 exception is pending
    /// (FSW.ES), in which case the guest gets the #MF (vector 16) fwait would have raised.
    fn complete_fwait(&mut self) -> Result<(), VcpuError> {
        let fpu = self.fd.get_fpu().map_err(self.ioctl_err("KVM_GET_FPU"))?;
        if fpu.fsw & 0x80 != 0 {
            let mut events = self
                .fd
                .get_vcpu_events()
                .map_err(self.ioctl_err("KVM_GET_VCPU_EVENTS"))?;
            events.exception.injected = 1;
            events.exception.nr = 16;
            events.exception.has_error_code = 0;
            return self
                .fd
                .set_vcpu_events(&events)
                .map_err(self.ioctl_err("KVM_SET_VCPU_EVENTS"));
        }
        let mut regs = self.fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))?;
        // An fwait in the address space's last byte is followed by address 0, as on the CPU.
        regs.rip = regs.rip.wrapping_add(1);
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))
    }

    /// Delivers a CPL0 `int3` that the host reported as an emulation failure to the guest as #BP.
    fn inject_breakpoint(&mut self) -> Result<(), VcpuError> {
        let mut regs = self.fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))?;
        // The guest picks where its int3 is: one in the address space's last byte returns to address 0.
        regs.rip = regs.rip.wrapping_add(1);
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))?;
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(self.ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(self.ioctl_err("KVM_SET_VCPU_EVENTS"))
    }

    fn crash(&self, reason: String) -> VmEnd {
        let report = match self.registers(false) {
            Ok(regs) => {
                let mut code = [0u8; 16];
                let n = read_virt(
                    &self.mem,
                    &PagingContext::from_regs(&regs),
                    regs.rip,
                    &mut code,
                );
                let symbol = self.symbolize.as_ref().and_then(|f| f(regs.rip));
                let mut report =
                    exit::crash_report(self.id, &reason, &regs, &code[..n], symbol.as_deref());
                if reason == SHUTDOWN && exit::is_reset_state(&regs) {
                    report.push('\n');
                    report.push_str(exit::RESET_AFTER_SHUTDOWN);
                }
                report
            }
            Err(e) => format!("vCPU {}: {reason}\n  (registers unavailable: {e})", self.id),
        };
        VmEnd::Crash {
            vcpu: self.id,
            reason,
            report,
        }
    }
}

/// The crash reason of a `KVM_EXIT_SHUTDOWN`.
const SHUTDOWN: &str = "triple fault (KVM_EXIT_SHUTDOWN)";

/// A debug-relevant exit seen inside `run_once`'s match, acted on once the exit's borrow of `kvm_run` ends.
enum DebugExit {
    None,
    Debug(kvm_debug_exit_arch),
    Watchpoint(StopReason),
}

// Debugger hooks of the run loop (the rest is in `debug::vcpu_side`).
impl Vcpu {
    fn handle_debug_exit(&mut self, exit: DebugExit) {
        match exit {
            DebugExit::None => {}
            DebugExit::Debug(arch) => self.on_debug_exit(arch),
            DebugExit::Watchpoint(reason) => {
                // Report the state after the access: a load's data reaches its register on the next entry.
                self.complete_pending_exit();
                self.debug_report(reason);
            }
        }
    }

    /// With gdb attached, a crashed vCPU stops (SIGSEGV in gdb, state inspectable) instead of ending the VM;
    /// resuming it runs into the crash again, and once gdb is gone the crash ends the VM as usual.
    fn hold_crash_for_debugger(&mut self, end: VmEnd) -> Option<VmEnd> {
        let VmEnd::Crash { reason, .. } = &end else {
            return Some(end);
        };
        let description = match self.code_page_read_watched() {
            Some(page) => format!(
                "{reason}: it runs code from guest page {page:#x}, which a read or access watchpoint took away \
                 from the guest (page protection); delete that watchpoint and it can continue"
            ),
            None => reason.clone(),
        };
        let event = StopEvent {
            vcpu: self.id,
            reason: StopReason::Crashed { description },
        };
        let held = self
            .debug
            .report_if_attached(event, || self.set_state(VcpuState::Paused));
        (!held).then_some(end)
    }
}

/// Clears this thread's kick target when dropped.
struct ImmediateExitRegistration;

impl Drop for ImmediateExitRegistration {
    fn drop(&mut self) {
        kick::register_immediate_exit(std::ptr::null_mut());
    }
}

fn immediate_exit_ptr(run: &mut kvm_run) -> *mut u8 {
    &mut run.immediate_exit as *mut u8
}
