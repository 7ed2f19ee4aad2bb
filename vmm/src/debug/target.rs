//! `gdbstub_kvm::DebugTarget` over the VMM's vCPU threads.

use std::os::fd::RawFd;
use std::sync::Arc;

use gdbstub_kvm::{
    DebugTarget, GuestRegisters, HwBreakpoints, ResumeAction, StopEvent, StopReason, SwBreakpoints,
    TargetError, VcpuIndex, WatchKind, Watchpoints,
};
use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress};

use super::dr::{self, Slot, SlotUse};
use super::{protections, DebugResume, DebugShared, MemorySlots, WatchChunk, CR0_PG, INT3};
use crate::paging::{self, PagingContext};
use crate::probe::{HostCaps, Int3Delivery};
use crate::vcpu::{VcpuError, VcpuRequest, VcpuState};
use crate::vm::VmControl;

/// The debug target of one VM. Create one per VM; the gdb server thread owns it.
pub struct VmDebugTarget {
    control: VmControl,
    shared: Arc<DebugShared>,
    caps: HostCaps,
    slots: MemorySlots,
    /// DR0-DR3: hardware breakpoints, and watchpoints where the host delivers data breakpoints.
    dr_slots: [Option<Slot>; dr::SLOTS],
    /// Id of the next page-protection watchpoint.
    next_watch_id: u64,
    /// Per vCPU: the RIP of the hardware breakpoint it was last reported stopped on.
    hw_stops: Vec<Option<u64>>,
    /// Per vCPU: its registers as last read while stopped (`true`: complete, with the FPU/SSE state and
    /// `k_gs_base`). A stopped vCPU's registers change only through `write_registers`; every resume forgets
    /// them. gdb reads registers and memory (which needs CR3) several times per stop, each a round trip to the
    /// vCPU thread otherwise.
    registers: Vec<Option<(GuestRegisters, bool)>>,
    /// Number of the latest `resume`; a vCPU that reported a stop during it has parked itself.
    generation: u64,
}

fn vcpu_failed(what: &str) -> impl FnOnce(VcpuError) -> TargetError + '_ {
    move |e| TargetError::failed(what.to_string(), e)
}

impl VmDebugTarget {
    pub fn new(control: VmControl, caps: HostCaps) -> Self {
        VmDebugTarget {
            shared: control.debug_shared(),
            slots: control.memory_slots(),
            caps,
            dr_slots: [None; dr::SLOTS],
            hw_stops: vec![None; control.vcpu_count()],
            registers: vec![None; control.vcpu_count()],
            generation: 0,
            next_watch_id: 0,
            control,
        }
    }

    /// The VM this target debugs.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// The state the vCPU threads share with this target (the server uses it to mark sessions).
    pub fn shared(&self) -> Arc<DebugShared> {
        self.shared.clone()
    }

    fn check_vcpu(&self, vcpu: VcpuIndex) -> Result<(), TargetError> {
        if vcpu < self.control.vcpu_count() {
            Ok(())
        } else {
            Err(TargetError::NoSuchVcpu { vcpu })
        }
    }

    fn paging_context(&mut self, vcpu: VcpuIndex) -> Result<PagingContext, TargetError> {
        let regs = self.registers_of(vcpu, false)?;
        Ok(PagingContext::from_regs(&regs))
    }

    /// A stopped vCPU's registers, from the cache when it has them (`with_fpu`: complete, the FPU/SSE state and
    /// `k_gs_base` too).
    fn registers_of(
        &mut self,
        vcpu: VcpuIndex,
        with_fpu: bool,
    ) -> Result<GuestRegisters, TargetError> {
        self.check_vcpu(vcpu)?;
        if let Some((regs, full)) = self.registers[vcpu] {
            if full || !with_fpu {
                return Ok(regs);
            }
        }
        if let Some(reported) = self.parked_by_report(vcpu).and_then(|p| p.registers) {
            self.registers[vcpu] = Some((reported.regs, reported.complete));
            if reported.complete || !with_fpu {
                return Ok(reported.regs);
            }
        }
        let regs = self
            .control
            .registers(vcpu, with_fpu)
            .map_err(vcpu_failed("cannot read the vCPU's registers"))?;
        // Only a parked vCPU's registers stay put; one running for the VMM (no session) is not cached.
        if self.control.handles()[vcpu].state() != VcpuState::Running {
            self.registers[vcpu] = Some((regs, with_fpu));
        }
        Ok(regs)
    }

    /// The stop `vcpu` reported during the latest resume, if it did: it has parked itself since and nothing
    /// but the gdb thread (this) makes it run again.
    fn parked_by_report(&self, vcpu: VcpuIndex) -> Option<super::ParkedStop> {
        self.shared
            .parked(vcpu)
            .filter(|p| p.generation == self.generation)
            .filter(|_| self.control.handles()[vcpu].state() == VcpuState::Paused)
    }

    /// Translates a breakpoint or watch address with vCPU 0's page tables (kernel mappings are shared).
    fn translate(&mut self, gva: u64) -> Result<paging::Translation, TargetError> {
        let ctx = self.paging_context(0)?;
        if ctx.cr0 & CR0_PG == 0 {
            return Err(TargetError::refused(format!(
                "cannot watch {gva:#x} yet: vCPU 0 has not enabled paging, so guest virtual addresses do not \
                 translate (stop once paging is on first, e.g. with a breakpoint, then set the watchpoint)"
            )));
        }
        paging::translate(self.control.memory(), &ctx, gva)
            .map_err(|_| TargetError::NotMapped { gva })
    }

    /// On PVM hosts every debug event of ring-3 code goes to the guest: breakpoints there can never stop.
    fn refuse_user_code(&mut self, gva: u64, what: &str) -> Result<(), TargetError> {
        if !self.caps.pvm {
            return Ok(());
        }
        let user_half = gva >> 63 == 0;
        let ctx = self.paging_context(0)?;
        // Before paging is on there is no user/supervisor distinction to read; the address half decides.
        let user_page = ctx.cr0 & CR0_PG != 0
            && paging::translate(self.control.memory(), &ctx, gva).is_ok_and(|t| t.user);
        if user_half || user_page {
            return Err(TargetError::refused(format!(
                "cannot set a {what} at {gva:#x}: it is user-space (ring-3) code, and on this PVM host ring-3 \
                 int3, debug-register and single-step events go to the guest, never to the VMM"
            )));
        }
        Ok(())
    }

    /// The guest-debug configuration every vCPU runs with.
    fn armed(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        if !self.shared.sw_breakpoints().is_empty()
            || !self.shared.pending_sw_breakpoints().is_empty()
        {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        let (addrs, dr7) = dr::encode(&self.dr_slots);
        if dr7 != 0 {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[..dr::SLOTS].copy_from_slice(&addrs);
            dbg.arch.debugreg[7] = dr7;
        }
        dbg
    }

    /// Other vCPUs' breakpoint hits from the same stop are dropped rather than reported after gdb's next resume
    /// (gdb 13 trips an assertion when one arrives while it steps a thread over a breakpoint). Nothing is lost:
    /// those vCPUs still sit on the breakpoint, not yet executed, and hit it again when resumed.
    fn drop_pending_breakpoint_hits(&mut self) {
        let queue = self.shared.queue();
        let mut kept = Vec::new();
        while let Some(event) = queue.take() {
            if !matches!(
                event.reason,
                StopReason::SwBreakpoint | StopReason::HwBreakpoint
            ) {
                kept.push(event);
            }
        }
        for event in kept {
            queue.push(event);
        }
    }

    fn take_dr_slot(&mut self, slot: Slot) -> Result<(), TargetError> {
        let free = self
            .dr_slots
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or_else(|| {
                TargetError::refused(format!(
                    "all {} debug registers (DR0-DR3) are in use by hardware breakpoints or watchpoints",
                    dr::SLOTS
                ))
            })?;
        *free = Some(slot);
        Ok(())
    }

    /// Frees the slot holding exactly this; false if none does.
    fn release_dr_slot(&mut self, slot: Slot) -> bool {
        match self.dr_slots.iter_mut().find(|s| **s == Some(slot)) {
            Some(found) => {
                *found = None;
                true
            }
            None => false,
        }
    }

    fn apply_watch_protection(&mut self) -> Result<(), TargetError> {
        let pages = protections(&self.shared.watches());
        self.slots
            .apply(&pages)
            .map_err(|e| TargetError::failed("cannot change the guest memory slots", e))
    }
}

impl DebugTarget for VmDebugTarget {
    fn vcpu_count(&self) -> usize {
        self.control.vcpu_count()
    }

    fn pause_all(&mut self) -> Result<(), TargetError> {
        let mut waits = Vec::new();
        for (vcpu, handle) in self.control.handles().iter().enumerate() {
            if handle.state() == VcpuState::Exited || self.parked_by_report(vcpu).is_some() {
                continue;
            }
            let (tx, rx) = std::sync::mpsc::channel();
            // A vCPU that left between the check and the send has ended with the VM: nothing to pause.
            if handle.send(VcpuRequest::Pause(tx)).is_ok() {
                waits.push(rx);
            }
        }
        for rx in waits {
            // A closed channel means the vCPU thread ended meanwhile; likewise nothing to pause.
            let _ = rx.recv();
        }
        Ok(())
    }

    fn resume(&mut self, actions: &[(VcpuIndex, ResumeAction)]) -> Result<(), TargetError> {
        for &(vcpu, action) in actions {
            self.check_vcpu(vcpu)?;
            if action == ResumeAction::Step && self.caps.pvm {
                let regs = self.registers_of(vcpu, false)?;
                if regs.cpl() == 3 {
                    return Err(TargetError::refused(format!(
                        "vCPU {vcpu} is in user-space (ring-3) code at {:#x}: this PVM host delivers ring-3 \
                         single-steps to the guest, so it cannot be stepped from the VMM",
                        regs.rip
                    )));
                }
            }
        }
        let armed = self.armed();
        let blockirq = self.caps.has_blockirq();
        self.registers.iter_mut().for_each(|r| *r = None);
        self.generation += 1;
        let generation = self.generation;
        for &(vcpu, action) in actions {
            let handle = &self.control.handles()[vcpu];
            if handle.state() == VcpuState::Exited {
                continue;
            }
            handle
                .send(VcpuRequest::DebugResume(DebugResume {
                    action,
                    armed,
                    blockirq,
                    step_over_hw_at: self.hw_stops[vcpu].take(),
                    plant_pending: !self.shared.pending_sw_breakpoints().is_empty(),
                    generation,
                }))
                .map_err(vcpu_failed("cannot resume the vCPU"))?;
        }
        Ok(())
    }

    fn read_registers(&mut self, vcpu: VcpuIndex) -> Result<GuestRegisters, TargetError> {
        self.registers_of(vcpu, true)
    }

    fn read_core_registers(&mut self, vcpu: VcpuIndex) -> Result<GuestRegisters, TargetError> {
        self.registers_of(vcpu, false)
    }

    fn write_registers(
        &mut self,
        vcpu: VcpuIndex,
        regs: &GuestRegisters,
    ) -> Result<(), TargetError> {
        self.check_vcpu(vcpu)?;
        // What KVM keeps may differ from what was written (reserved bits): read it back next time.
        self.registers[vcpu] = None;
        self.shared.forget_parked_registers(vcpu);
        self.control
            .set_registers(vcpu, *regs)
            .map_err(vcpu_failed("cannot write the vCPU's registers"))
    }

    fn read_memory(
        &mut self,
        vcpu: VcpuIndex,
        gva: u64,
        buf: &mut [u8],
    ) -> Result<usize, TargetError> {
        let ctx = self.paging_context(vcpu)?;
        let n = paging::read_virt(self.control.memory(), &ctx, gva, buf);
        if n == 0 && !buf.is_empty() {
            return Err(TargetError::NotMapped { gva });
        }
        // Show the original bytes under our int3s.
        let end = gva.saturating_add(n as u64);
        for (&addr, bp) in self.shared.sw_breakpoints().range(gva..end) {
            buf[(addr - gva) as usize] = bp.original;
        }
        Ok(n)
    }

    fn write_memory(&mut self, vcpu: VcpuIndex, gva: u64, data: &[u8]) -> Result<(), TargetError> {
        let ctx = self.paging_context(vcpu)?;
        let mem = self.control.memory();
        let mut probe = vec![0u8; data.len()];
        let readable = paging::read_virt(mem, &ctx, gva, &mut probe);
        if readable < data.len() {
            return Err(TargetError::NotMapped {
                gva: gva.wrapping_add(readable as u64),
            });
        }
        let mut patched = data.to_vec();
        let end = gva.saturating_add(data.len() as u64);
        for (&addr, bp) in self.shared.sw_breakpoints().range_mut(gva..end) {
            // Keep the breakpoint: the new byte becomes the one it restores.
            let offset = (addr - gva) as usize;
            bp.original = data[offset];
            patched[offset] = INT3;
        }
        if paging::write_virt(mem, &ctx, gva, &patched) < patched.len() {
            return Err(TargetError::NotMapped { gva });
        }
        Ok(())
    }

    fn stop_event_fd(&self) -> RawFd {
        self.shared.queue().fd()
    }

    fn take_stop_event(&mut self) -> Option<StopEvent> {
        // All-stop: the reporting vCPU parked itself; park the others before gdb hears of it.
        let _ = self.pause_all();
        let event = self.shared.queue().take()?;
        if event.reason == StopReason::HwBreakpoint {
            self.hw_stops[event.vcpu] = self.registers_of(event.vcpu, false).ok().map(|r| r.rip);
        }
        self.drop_pending_breakpoint_hits();
        Some(event)
    }

    fn as_sw_breakpoints(&mut self) -> Option<&mut dyn SwBreakpoints> {
        Some(self)
    }

    fn as_hw_breakpoints(&mut self) -> Option<&mut dyn HwBreakpoints> {
        Some(self)
    }

    fn as_watchpoints(&mut self) -> Option<&mut dyn Watchpoints> {
        self.caps
            .readonly_mem
            .then_some(self as &mut dyn Watchpoints)
    }

    fn vcpu_description(&mut self, vcpu: VcpuIndex) -> Option<String> {
        self.control.vcpu_state(vcpu).map(|state| {
            match state {
                VcpuState::Running => "running",
                VcpuState::Paused => "stopped",
                VcpuState::Exited => "exited",
            }
            .to_string()
        })
    }
}

impl SwBreakpoints for VmDebugTarget {
    fn add_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        if self.caps.int3 == Int3Delivery::Guest {
            return Err(TargetError::refused(format!(
                "cannot set a breakpoint at {gva:#x}: this host's KVM does not intercept int3 (`vmm probe`: it \
                 reaches the guest's own #BP handler, as under QEMU's TCG SVM), so a planted int3 would crash the \
                 guest instead of stopping it; step, interrupt or watch instead"
            )));
        }
        self.refuse_user_code(gva, "breakpoint")?;
        if self.shared.owns_sw_breakpoint(gva) {
            return Ok(());
        }
        let ctx = self.paging_context(0)?;
        if ctx.cr0 & CR0_PG == 0 && gva >> 63 == 1 {
            // A kernel address before the guest has paging: the resumed vCPU steps until paging is on and
            // plants it then (see `debug_resume`).
            let mut pending = self.shared.pending_sw_breakpoints();
            if !pending.contains(&gva) {
                pending.push(gva);
            }
            return Ok(());
        }
        let gpa = paging::translate(self.control.memory(), &ctx, gva)
            .map_err(|_| TargetError::NotMapped { gva })?
            .gpa;
        if self
            .shared
            .plant_sw_breakpoint(self.control.memory(), gva, gpa)
        {
            Ok(())
        } else {
            Err(TargetError::NotMapped { gva })
        }
    }

    fn remove_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        {
            let mut pending = self.shared.pending_sw_breakpoints();
            if let Some(at) = pending.iter().position(|&p| p == gva) {
                pending.remove(at);
                return Ok(());
            }
        }
        let bp = self
            .shared
            .sw_breakpoints()
            .remove(&gva)
            .ok_or_else(|| TargetError::refused(format!("no breakpoint at {gva:#x}")))?;
        self.control
            .memory()
            .write_obj(bp.original, GuestAddress(bp.gpa))
            .map_err(|_| TargetError::NotMapped { gva })
    }
}

impl HwBreakpoints for VmDebugTarget {
    fn hw_breakpoint_slots(&self) -> usize {
        dr::SLOTS
    }

    fn add_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        if !self.caps.hw_exec_breakpoints {
            return Err(TargetError::refused(format!(
                "cannot set a hardware breakpoint at {gva:#x}: debug-register execute breakpoints never stop the \
                 guest on this host (`vmm probe`, as under QEMU's TCG SVM)"
            )));
        }
        self.refuse_user_code(gva, "hardware breakpoint")?;
        let slot = Slot {
            addr: gva,
            what: SlotUse::Execute,
        };
        if self.dr_slots.contains(&Some(slot)) {
            return Ok(());
        }
        self.take_dr_slot(slot)
    }

    fn remove_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        let slot = Slot {
            addr: gva,
            what: SlotUse::Execute,
        };
        if self.release_dr_slot(slot) {
            Ok(())
        } else {
            Err(TargetError::refused(format!(
                "no hardware breakpoint at {gva:#x}"
            )))
        }
    }
}

impl Watchpoints for VmDebugTarget {
    fn add_watchpoint(&mut self, gva: u64, len: u64, kind: WatchKind) -> Result<(), TargetError> {
        if len == 0 || gva.checked_add(len).is_none() {
            return Err(TargetError::refused(format!(
                "invalid watch range {gva:#x}+{len}"
            )));
        }
        let data_slot = Slot {
            addr: gva,
            what: SlotUse::Data { kind, len },
        };
        if self.caps.data_breakpoints
            && dr::data_watch_fits(gva, len, kind)
            && self.take_dr_slot(data_slot).is_ok()
        {
            return Ok(());
        }
        let id = self.next_watch_id;
        self.next_watch_id += 1;
        let mut chunks = Vec::new();
        let mut done = 0;
        while done < len {
            let at = gva + done;
            let t = self.translate(at)?;
            let piece = (len - done).min(super::PAGE_SIZE - (t.gpa & (super::PAGE_SIZE - 1)));
            chunks.push(WatchChunk {
                id,
                watch_gva: gva,
                watch_len: len,
                kind,
                gpa: t.gpa,
                gva: at,
                len: piece,
            });
            done += piece;
        }
        self.shared.watches().extend(chunks);
        let applied = self.apply_watch_protection();
        if applied.is_err() {
            self.shared.watches().retain(|c| c.id != id);
        }
        applied
    }

    fn remove_watchpoint(
        &mut self,
        gva: u64,
        len: u64,
        kind: WatchKind,
    ) -> Result<(), TargetError> {
        let data_slot = Slot {
            addr: gva,
            what: SlotUse::Data { kind, len },
        };
        if self.release_dr_slot(data_slot) {
            return Ok(());
        }
        {
            let mut watches = self.shared.watches();
            let Some(id) = watches
                .iter()
                .find(|c| c.watch_gva == gva && c.watch_len == len && c.kind == kind)
                .map(|c| c.id)
            else {
                return Err(TargetError::refused(format!(
                    "no watchpoint at {gva:#x}+{len}"
                )));
            };
            watches.retain(|c| c.id != id);
        }
        self.apply_watch_protection()
    }
}
