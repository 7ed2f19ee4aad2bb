//! A [`DebugTarget`] over an in-memory "guest", to test the stub against real gdb without KVM.
//!
//! The guest is one flat stretch of kernel-like virtual addresses ([`GUEST_BASE`], [`GUEST_SIZE`]) with an unmapped
//! page at [`HOLE`] (for partial reads). Each vCPU runs on a background executor thread, like a VMM's vCPU threads:
//! a tiny interpreter of a handful of real x86 instructions (`nop`, `inc rax`, `mov [disp32], al`,
//! `mov al, [disp32]`, `jmp rel8`, `out imm8, al`, `int3`), which notices planted int3s, hardware breakpoint
//! addresses and watched addresses, and stops all vCPUs on each (all-stop).
//!
//! vCPU `n` loops over its own program at [`program_address`]`(n)`, storing `al` to [`data_address`]`(n)`. A write of
//! `al` to port [`EXIT_PORT`] ends the guest with status `al`; [`EXIT_STUB`] holds such an instruction.
//! Single-stepping a vCPU at CPL 3 is refused, as on a PVM host.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::regs::GuestRegisters;
use crate::stop_queue::{StopQueue, StopQueueError};
use crate::target::{
    DebugTarget, HwBreakpoints, ResumeAction, StopEvent, StopReason, SwBreakpoints, TargetError,
    VcpuIndex, WatchKind, Watchpoints,
};

/// First guest virtual address.
pub const GUEST_BASE: u64 = 0xffff_ffff_8100_0000;
/// Bytes of guest address space (one hole included).
pub const GUEST_SIZE: u64 = 0x1_0000;
/// The unmapped page.
pub const HOLE: u64 = GUEST_BASE + 0x8000;
const PAGE_SIZE: u64 = 0x1000;
/// `out EXIT_PORT, al` ends the guest with status `al`.
pub const EXIT_PORT: u8 = 0xf4;
/// Address of an `out EXIT_PORT, al` instruction.
pub const EXIT_STUB: u64 = GUEST_BASE + 0x1000;
/// Offset, in each vCPU program, of the `mov [data], al` store (for watchpoint tests).
pub const STORE_OFFSET: u64 = 4;
/// Offset of the `mov al, [data]` load.
pub const LOAD_OFFSET: u64 = 11;
const HW_BREAKPOINT_SLOTS: usize = 4;
/// Instructions per vCPU between releases of the state lock, so `pause_all` never waits long.
const BATCH: usize = 256;

/// Where vCPU `vcpu`'s loop starts.
pub fn program_address(vcpu: VcpuIndex) -> u64 {
    GUEST_BASE + 0x100 * vcpu as u64
}

/// The byte vCPU `vcpu` stores to (and loads from) on every iteration.
pub fn data_address(vcpu: VcpuIndex) -> u64 {
    GUEST_BASE + 0x4000 + 8 * vcpu as u64
}

/// Initial `cr3` of vCPU `vcpu`: distinct per vCPU so tests can tell them apart.
pub fn initial_cr3(vcpu: VcpuIndex) -> u64 {
    0x0123_4000 + 0x1000 * vcpu as u64
}

/// Initial `fs_base` of vCPU `vcpu`.
pub fn initial_fs_base(vcpu: VcpuIndex) -> u64 {
    0x7f00_0000_0000 + 0x1000 * vcpu as u64
}

/// EFER of every vCPU: SCE | LME | LMA | NXE.
pub const INITIAL_EFER: u64 = 0xd01;

#[derive(Debug, Default)]
struct FakeVcpu {
    regs: GuestRegisters,
    run: Option<ResumeAction>,
    /// Set on resume: a hardware breakpoint at the resume address does not fire again at once (x86's RF).
    resumed_at: Option<u64>,
}

struct FakeState {
    memory: Vec<u8>,
    vcpus: Vec<FakeVcpu>,
    /// Planted int3s and the bytes they replaced.
    sw_breakpoints: BTreeMap<u64, u8>,
    hw_breakpoints: Vec<u64>,
    watchpoints: Vec<(u64, u64, WatchKind)>,
    instructions_executed: u64,
    shutdown: bool,
}

struct Shared {
    state: Mutex<FakeState>,
    /// Signalled when vCPUs are resumed, on shutdown, and after each executed batch.
    changed: Condvar,
    stops: StopQueue,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panic on the executor thread would poison the lock; the state is still consistent for reads.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The fake VM. Dropping it stops its executor thread.
pub struct FakeTarget {
    shared: Arc<Shared>,
    executor: Option<JoinHandle<()>>,
}

/// A view of a [`FakeTarget`] for test assertions from another thread.
#[derive(Clone)]
pub struct FakeObserver {
    shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
pub enum FakeTargetError {
    #[error("a fake target needs at least one vCPU")]
    NoVcpus,
    #[error("cannot create the stop queue")]
    StopQueue(#[source] StopQueueError),
    #[error("cannot start the executor thread")]
    Thread(#[source] std::io::Error),
}

impl FakeTarget {
    /// A stopped VM with `vcpu_count` vCPUs at the start of their programs.
    pub fn new(vcpu_count: usize) -> Result<Self, FakeTargetError> {
        if vcpu_count == 0 {
            return Err(FakeTargetError::NoVcpus);
        }
        let stops = StopQueue::new().map_err(FakeTargetError::StopQueue)?;
        let state = FakeState {
            memory: initial_memory(vcpu_count),
            vcpus: (0..vcpu_count).map(initial_vcpu).collect(),
            sw_breakpoints: BTreeMap::new(),
            hw_breakpoints: Vec::new(),
            watchpoints: Vec::new(),
            instructions_executed: 0,
            shutdown: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            stops,
        });
        let executor_shared = Arc::clone(&shared);
        let executor = std::thread::Builder::new()
            .name("fake-vcpus".into())
            .spawn(move || run_executor(&executor_shared))
            .map_err(FakeTargetError::Thread)?;
        Ok(FakeTarget {
            shared,
            executor: Some(executor),
        })
    }

    pub fn observer(&self) -> FakeObserver {
        FakeObserver {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for FakeTarget {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(executor) = self.executor.take() {
            let _ = executor.join();
        }
    }
}

impl FakeObserver {
    /// Whether each vCPU is currently resumed.
    pub fn running(&self) -> Vec<bool> {
        self.shared
            .lock()
            .vcpus
            .iter()
            .map(|v| v.run.is_some())
            .collect()
    }

    /// Blocks until every vCPU is running and at least `more` further instructions have executed. Returns false
    /// if that did not happen within `patience` (a safety net against hanging a broken test, not a timing check).
    pub fn wait_for_progress(&self, more: u64, patience: Duration) -> bool {
        let start = self.shared.lock().instructions_executed;
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, patience, |s| {
                !(s.vcpus.iter().all(|v| v.run.is_some())
                    && s.instructions_executed >= start + more)
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.vcpus.iter().all(|v| v.run.is_some()) && state.instructions_executed >= start + more
    }

    /// Blocks until some vCPU is running (gdb resumed the target); false after `patience`.
    pub fn wait_until_running(&self, patience: Duration) -> bool {
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, patience, |s| s.vcpus.iter().all(|v| v.run.is_none()))
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.vcpus.iter().any(|v| v.run.is_some())
    }

    /// Planted int3s still in guest memory (none should remain after a session ends).
    pub fn planted_breakpoints(&self) -> usize {
        self.shared.lock().sw_breakpoints.len()
    }
}

fn initial_memory(vcpu_count: usize) -> Vec<u8> {
    let mut memory = vec![0u8; GUEST_SIZE as usize];
    for vcpu in 0..vcpu_count {
        let data = (data_address(vcpu) as i64 as i32).to_le_bytes();
        let mut program = vec![0x90, 0x48, 0xff, 0xc0, 0x88, 0x04, 0x25];
        program.extend_from_slice(&data);
        program.extend_from_slice(&[0x8a, 0x04, 0x25]);
        program.extend_from_slice(&data);
        program.push(0x90);
        // jmp back to the start: rel8 counted from the end of the 2-byte jmp.
        let rel = -((program.len() + 2) as i8);
        program.extend_from_slice(&[0xeb, rel as u8]);
        let at = (program_address(vcpu) - GUEST_BASE) as usize;
        memory[at..at + program.len()].copy_from_slice(&program);
    }
    let exit = (EXIT_STUB - GUEST_BASE) as usize;
    memory[exit..exit + 2].copy_from_slice(&[0xe6, EXIT_PORT]);
    memory
}

fn initial_vcpu(vcpu: VcpuIndex) -> FakeVcpu {
    let mut regs = GuestRegisters::default();
    regs.gpr[0] = 0x100 * vcpu as u64;
    regs.gpr[7] = GUEST_BASE + 0x7000 - 0x100 * vcpu as u64;
    regs.rip = program_address(vcpu);
    regs.rflags = 0x202;
    regs.cs.selector = 0x10;
    for seg in [&mut regs.ss, &mut regs.ds, &mut regs.es] {
        seg.selector = 0x18;
    }
    regs.fs.base = initial_fs_base(vcpu);
    regs.gs.base = 0xffff_8880_0000_0000 + 0x1_0000 * vcpu as u64;
    regs.cr0 = 0x8005_0033;
    regs.cr3 = initial_cr3(vcpu);
    regs.cr4 = 0x6a0;
    regs.efer = INITIAL_EFER;
    regs.fpu.fcw = 0x37f;
    regs.fpu.mxcsr = 0x1f80;
    FakeVcpu {
        regs,
        run: None,
        resumed_at: None,
    }
}

impl FakeState {
    /// Offset into `memory` of a mapped guest address.
    fn offset(&self, gva: u64) -> Option<usize> {
        let offset = gva.checked_sub(GUEST_BASE)?;
        let mapped = offset < GUEST_SIZE && !(HOLE..HOLE + PAGE_SIZE).contains(&gva);
        mapped.then_some(offset as usize)
    }

    fn byte(&self, gva: u64) -> Option<u8> {
        self.offset(gva).map(|o| self.memory[o])
    }

    fn check_vcpu(&self, vcpu: VcpuIndex) -> Result<(), TargetError> {
        if vcpu < self.vcpus.len() {
            Ok(())
        } else {
            Err(TargetError::NoSuchVcpu { vcpu })
        }
    }

    /// Executes one instruction of `vcpu`; returns why it must stop, if it must.
    fn execute_one(&mut self, vcpu: VcpuIndex) -> Option<StopReason> {
        let rip = self.vcpus[vcpu].regs.rip;
        let resumed_here = self.vcpus[vcpu].resumed_at.take() == Some(rip);
        if self.hw_breakpoints.contains(&rip) && !resumed_here {
            return Some(StopReason::HwBreakpoint);
        }
        let Some(opcode) = self.byte(rip) else {
            return Some(crash(format!(
                "instruction fetch from unmapped address {rip:#x}"
            )));
        };
        let fetch = |state: &Self, len: u64| -> Option<Vec<u8>> {
            (0..len).map(|i| state.byte(rip + i)).collect()
        };
        let disp32 = |bytes: &[u8]| {
            i32::from_le_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) as i64 as u64
        };
        self.instructions_executed += 1;
        let mut stop = None;
        let regs_rax = self.vcpus[vcpu].regs.gpr[0];
        let next_rip = match opcode {
            0xcc if self.sw_breakpoints.contains_key(&rip) => {
                return Some(StopReason::SwBreakpoint)
            }
            0xcc => {
                return Some(crash(format!(
                    "int3 at {rip:#x} not planted by the debugger"
                )))
            }
            0x90 => rip + 1,
            0xeb => {
                let Some(rel) = self.byte(rip + 1) else {
                    return Some(crash(format!(
                        "instruction fetch from unmapped address {:#x}",
                        rip + 1
                    )));
                };
                (rip + 2).wrapping_add(rel as i8 as i64 as u64)
            }
            0x48 if fetch(self, 3).as_deref() == Some(&[0x48, 0xff, 0xc0]) => {
                self.vcpus[vcpu].regs.gpr[0] = regs_rax.wrapping_add(1);
                rip + 3
            }
            0x88 | 0x8a => {
                let Some(bytes) = fetch(self, 7).filter(|b| b[1] == 0x04 && b[2] == 0x25) else {
                    return Some(crash(format!("unsupported instruction at {rip:#x}")));
                };
                let addr = disp32(&bytes);
                let Some(offset) = self.offset(addr) else {
                    return Some(crash(format!("page fault at {addr:#x}")));
                };
                let is_store = opcode == 0x88;
                if is_store {
                    self.memory[offset] = regs_rax as u8;
                } else {
                    let rax = &mut self.vcpus[vcpu].regs.gpr[0];
                    *rax = (*rax & !0xff) | u64::from(self.memory[offset]);
                }
                stop = self.watch_hit(addr, is_store);
                rip + 7
            }
            0xe6 if self.byte(rip + 1) == Some(EXIT_PORT) => {
                return Some(StopReason::Exited {
                    status: regs_rax as u8,
                });
            }
            other => return Some(crash(format!("undefined opcode {other:#04x} at {rip:#x}"))),
        };
        self.vcpus[vcpu].regs.rip = next_rip;
        stop.or((self.vcpus[vcpu].run == Some(ResumeAction::Step)).then_some(StopReason::StepDone))
    }

    fn watch_hit(&self, addr: u64, is_store: bool) -> Option<StopReason> {
        self.watchpoints.iter().find_map(|&(start, len, kind)| {
            let covers = (start..start.saturating_add(len.max(1))).contains(&addr);
            let fires = match kind {
                WatchKind::Write => is_store,
                WatchKind::Read => !is_store,
                WatchKind::Access => true,
            };
            (covers && fires).then_some(StopReason::Watchpoint { kind, addr })
        })
    }
}

fn crash(description: String) -> StopReason {
    StopReason::Crashed { description }
}

fn run_executor(shared: &Shared) {
    loop {
        let mut state = shared.lock();
        while !state.shutdown && state.vcpus.iter().all(|v| v.run.is_none()) {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.shutdown {
            return;
        }
        'batch: for _ in 0..BATCH {
            for vcpu in 0..state.vcpus.len() {
                if state.vcpus[vcpu].run.is_none() {
                    continue;
                }
                if let Some(reason) = state.execute_one(vcpu) {
                    // All-stop: nobody runs past another vCPU's stop.
                    state.vcpus.iter_mut().for_each(|v| v.run = None);
                    shared.stops.push(StopEvent { vcpu, reason });
                    break 'batch;
                }
            }
        }
        drop(state);
        shared.changed.notify_all();
        // The guest loops forever; don't burn a whole host core on it.
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl DebugTarget for FakeTarget {
    fn vcpu_count(&self) -> usize {
        self.shared.lock().vcpus.len()
    }

    fn pause_all(&mut self) -> Result<(), TargetError> {
        // The executor only runs while holding the lock, so once we hold it every vCPU is between instructions.
        self.shared
            .lock()
            .vcpus
            .iter_mut()
            .for_each(|v| v.run = None);
        Ok(())
    }

    fn resume(&mut self, actions: &[(VcpuIndex, ResumeAction)]) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        for &(vcpu, action) in actions {
            state.check_vcpu(vcpu)?;
            if action == ResumeAction::Step && state.vcpus[vcpu].regs.cpl() == 3 {
                return Err(TargetError::refused(format!(
                    "vCPU {vcpu} is in user mode (CPL 3): single-stepping user code is impossible on this host"
                )));
            }
        }
        for &(vcpu, action) in actions {
            let v = &mut state.vcpus[vcpu];
            v.run = Some(action);
            v.resumed_at = Some(v.regs.rip);
        }
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn read_registers(&mut self, vcpu: VcpuIndex) -> Result<GuestRegisters, TargetError> {
        let state = self.shared.lock();
        state.check_vcpu(vcpu)?;
        Ok(state.vcpus[vcpu].regs)
    }

    fn write_registers(
        &mut self,
        vcpu: VcpuIndex,
        regs: &GuestRegisters,
    ) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        state.check_vcpu(vcpu)?;
        state.vcpus[vcpu].regs = *regs;
        Ok(())
    }

    fn read_memory(
        &mut self,
        vcpu: VcpuIndex,
        gva: u64,
        buf: &mut [u8],
    ) -> Result<usize, TargetError> {
        let state = self.shared.lock();
        state.check_vcpu(vcpu)?;
        let mut read = 0;
        for (i, slot) in buf.iter_mut().enumerate() {
            let addr = gva.wrapping_add(i as u64);
            let Some(byte) = state.byte(addr) else { break };
            *slot = state.sw_breakpoints.get(&addr).copied().unwrap_or(byte);
            read += 1;
        }
        if read == 0 && !buf.is_empty() {
            return Err(TargetError::NotMapped { gva });
        }
        Ok(read)
    }

    fn write_memory(&mut self, vcpu: VcpuIndex, gva: u64, data: &[u8]) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        state.check_vcpu(vcpu)?;
        let offsets: Vec<usize> = (0..data.len() as u64)
            .map(|i| {
                let addr = gva.wrapping_add(i);
                state
                    .offset(addr)
                    .ok_or(TargetError::NotMapped { gva: addr })
            })
            .collect::<Result<_, _>>()?;
        for (i, (offset, byte)) in offsets.into_iter().zip(data).enumerate() {
            match state.sw_breakpoints.get_mut(&gva.wrapping_add(i as u64)) {
                Some(original) => *original = *byte,
                None => state.memory[offset] = *byte,
            }
        }
        Ok(())
    }

    fn stop_event_fd(&self) -> RawFd {
        self.shared.stops.fd()
    }

    fn take_stop_event(&mut self) -> Option<StopEvent> {
        self.shared.stops.take()
    }

    fn as_sw_breakpoints(&mut self) -> Option<&mut dyn SwBreakpoints> {
        Some(self)
    }

    fn as_hw_breakpoints(&mut self) -> Option<&mut dyn HwBreakpoints> {
        Some(self)
    }

    fn as_watchpoints(&mut self) -> Option<&mut dyn Watchpoints> {
        Some(self)
    }

    fn vcpu_description(&mut self, vcpu: VcpuIndex) -> Option<String> {
        let state = self.shared.lock();
        let vcpu = state.vcpus.get(vcpu)?;
        Some(
            if vcpu.run.is_some() {
                "running"
            } else {
                "stopped"
            }
            .to_owned(),
        )
    }
}

impl SwBreakpoints for FakeTarget {
    fn add_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        if state.sw_breakpoints.contains_key(&gva) {
            return Ok(());
        }
        let offset = state.offset(gva).ok_or(TargetError::NotMapped { gva })?;
        let original = std::mem::replace(&mut state.memory[offset], 0xcc);
        state.sw_breakpoints.insert(gva, original);
        Ok(())
    }

    fn remove_sw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        let original = state
            .sw_breakpoints
            .remove(&gva)
            .ok_or_else(|| TargetError::refused(format!("no software breakpoint at {gva:#x}")))?;
        let offset = state.offset(gva).ok_or(TargetError::NotMapped { gva })?;
        state.memory[offset] = original;
        Ok(())
    }
}

impl HwBreakpoints for FakeTarget {
    fn hw_breakpoint_slots(&self) -> usize {
        HW_BREAKPOINT_SLOTS
    }

    fn add_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        if state.hw_breakpoints.len() >= HW_BREAKPOINT_SLOTS {
            return Err(TargetError::refused(
                "all 4 hardware breakpoint slots are in use",
            ));
        }
        state.hw_breakpoints.push(gva);
        Ok(())
    }

    fn remove_hw_breakpoint(&mut self, gva: u64) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        let index = state
            .hw_breakpoints
            .iter()
            .position(|a| *a == gva)
            .ok_or_else(|| TargetError::refused(format!("no hardware breakpoint at {gva:#x}")))?;
        state.hw_breakpoints.remove(index);
        Ok(())
    }
}

impl Watchpoints for FakeTarget {
    fn add_watchpoint(&mut self, gva: u64, len: u64, kind: WatchKind) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        if state.offset(gva).is_none() {
            return Err(TargetError::NotMapped { gva });
        }
        state.watchpoints.push((gva, len, kind));
        Ok(())
    }

    fn remove_watchpoint(
        &mut self,
        gva: u64,
        len: u64,
        kind: WatchKind,
    ) -> Result<(), TargetError> {
        let mut state = self.shared.lock();
        let index = state
            .watchpoints
            .iter()
            .position(|w| *w == (gva, len, kind))
            .ok_or_else(|| TargetError::refused(format!("no watchpoint at {gva:#x}")))?;
        state.watchpoints.remove(index);
        Ok(())
    }
}
