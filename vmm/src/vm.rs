//! Building a VM (memory, irqchip, PIT, devices, kernel, vCPUs) and coordinating its life until it ends.

use std::path::PathBuf;
use std::sync::atomic::AtomicU8;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{self, BootConfig, BootError};
use crate::cpuid::{self, CpuidPolicy};
use crate::debug::{DebugShared, MemorySlots, RamRegion, VcpuDebugState};
use crate::devices::{PioDevices, SerialOut, COM1_IRQ};
use crate::exit::VmEnd;
use crate::kick::{self, Kicker};
use crate::paging::{self, PagingContext};
use crate::probe::{HostCaps, ProbeError};
use crate::sampler::{
    SampleRequest, SampleStream, SamplerConfig, SamplerError, SamplingSession, SamplingSlot,
};
use crate::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuRequest, VcpuState};
use crate::GuestRegisters;

/// Turns a guest address into `symbol+0xoff`, for crash reports.
pub type SymbolizeFn = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("--cpus must be between 1 and {max} (got {got})")]
    CpuCount { got: usize, max: usize },
    #[error("--mem must be at least 16 MiB and at most 1 TiB (got {0} MiB)")]
    MemSize(u64),
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM: {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Device(#[from] crate::devices::DeviceError),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Debug(#[from] crate::debug::DebugError),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: usize,
    pub mem_mib: u64,
    pub no_pmu: bool,
    pub serial_out: SerialOut,
    pub sampler: Option<SamplerConfig>,
    pub symbolize: Option<SymbolizeFn>,
    /// Create the vCPUs parked (`--gdb-wait`): no guest instruction runs until a debugger resumes them.
    pub start_paused: bool,
}

/// Static facts about a running VM (control socket `info`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmInfo {
    pub vcpus: usize,
    pub mem_mib: u64,
    pub kernel: String,
    pub kernel_format: String,
    pub cmdline: String,
    pub pid: u32,
    /// Host thread id of each vCPU's thread, in vCPU order (what `perf-kvm record -e cycles` attaches to).
    #[serde(default)]
    pub vcpu_tids: Vec<u32>,
}

/// A thread-safe handle to a running VM: pause/resume, registers, guest memory. Cheap to clone.
#[derive(Clone)]
pub struct VmControl {
    inner: Arc<ControlInner>,
}

struct ControlInner {
    vcpus: Vec<VcpuHandle>,
    mem: GuestMemoryMmap,
    info: VmInfo,
    end_tx: Sender<VcpuEvent>,
    // For the debugger: its shared tables, and what memory-slot surgery for watchpoints needs.
    debug: Arc<DebugShared>,
    vm_fd: Arc<VmFd>,
    ram: Vec<RamRegion>,
    sampling: Arc<SamplingSlot>,
    session: Mutex<Option<SamplingSession>>,
    /// Zero of sample timestamps.
    epoch: Instant,
    kvm_stats: crate::kvm_stats::KvmStatsSources,
}

impl VmControl {
    pub fn info(&self) -> &VmInfo {
        &self.inner.info
    }
    pub fn vcpu_count(&self) -> usize {
        self.inner.vcpus.len()
    }
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }
    pub fn vcpu_state(&self, vcpu: usize) -> Option<VcpuState> {
        self.inner.vcpus.get(vcpu).map(|v| v.state())
    }

    /// Parks every vCPU; returns once all are out of the guest.
    pub fn pause_all(&self) -> Result<(), VcpuError> {
        let waits: Vec<_> = self
            .inner
            .vcpus
            .iter()
            .filter(|v| v.state() != VcpuState::Exited)
            .map(|v| {
                let (tx, rx) = mpsc::channel();
                v.send(VcpuRequest::Pause(tx)).map(|_| (v.id, rx))
            })
            .collect::<Result<_, _>>()?;
        for (id, rx) in waits {
            rx.recv().map_err(|_| VcpuError::Exited(id))??;
        }
        Ok(())
    }

    pub fn resume_all(&self) -> Result<(), VcpuError> {
        for v in &self.inner.vcpus {
            if v.state() == VcpuState::Paused {
                v.send(VcpuRequest::Resume)?;
            }
        }
        Ok(())
    }

    pub fn resume(&self, vcpu: usize) -> Result<(), VcpuError> {
        self.handle(vcpu)?.send(VcpuRequest::Resume)
    }

    fn handle(&self, vcpu: usize) -> Result<&VcpuHandle, VcpuError> {
        self.inner.vcpus.get(vcpu).ok_or(VcpuError::Exited(vcpu))
    }

    /// Registers of one vCPU. A running vCPU is kicked, answers between two `KVM_RUN`s, and goes on.
    pub fn registers(&self, vcpu: usize, with_fpu: bool) -> Result<GuestRegisters, VcpuError> {
        self.handle(vcpu)?
            .call(|reply| VcpuRequest::GetRegisters { with_fpu, reply })
    }

    pub fn set_registers(&self, vcpu: usize, regs: GuestRegisters) -> Result<(), VcpuError> {
        self.handle(vcpu)?
            .call(|reply| VcpuRequest::SetRegisters(Box::new(regs), reply))
    }

    pub fn set_guest_debug(
        &self,
        vcpu: usize,
        dbg: kvm_bindings::kvm_guest_debug,
    ) -> Result<(), VcpuError> {
        self.handle(vcpu)?
            .call(|reply| VcpuRequest::SetGuestDebug(Box::new(dbg), reply))
    }

    /// Reads guest virtual memory as `vcpu` sees it; returns the readable prefix length.
    pub fn read_virt(&self, vcpu: usize, gva: u64, buf: &mut [u8]) -> Result<usize, VcpuError> {
        let regs = self.registers(vcpu, false)?;
        Ok(paging::read_virt(
            &self.inner.mem,
            &PagingContext::from_regs(&regs),
            gva,
            buf,
        ))
    }

    pub(crate) fn handles(&self) -> &[VcpuHandle] {
        &self.inner.vcpus
    }

    /// The debugger state every vCPU thread shares.
    pub fn debug_shared(&self) -> Arc<DebugShared> {
        self.inner.debug.clone()
    }

    /// The VM's memory slots as installed at boot, for watchpoint page protection. One debug target uses it.
    pub(crate) fn memory_slots(&self) -> MemorySlots {
        MemorySlots::new(self.inner.vm_fd.clone(), self.inner.ram.clone())
    }

    /// Starts sampling every vCPU at `cfg.frequency_hz` of its CPU time; one session at a time.
    pub fn start_sampling(&self, cfg: SamplerConfig) -> Result<SampleStream, SamplerError> {
        let mut session = self.inner.session.lock().unwrap_or_else(|e| e.into_inner());
        if session.is_some() {
            return Err(SamplerError::Busy);
        }
        let targets = self
            .inner
            .vcpus
            .iter()
            .map(|h| (h.sample_request.clone(), h.kicker))
            .collect();
        let (s, stream) =
            SamplingSession::start(&self.inner.sampling, cfg, self.inner.epoch, targets)?;
        *session = Some(s);
        Ok(stream)
    }

    /// Ends the sampling session, if any. Samples already queued stay readable from its stream.
    pub fn stop_sampling(&self) {
        let session = self
            .inner
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = session {
            s.stop(&self.inner.sampling);
        }
    }

    /// One MSR of one vCPU (e.g. MSR_LSTAR for the guest kernel's KASLR offset); None when KVM does not know it.
    pub fn read_msr(&self, vcpu: usize, index: u32) -> Result<Option<u64>, VcpuError> {
        self.handle(vcpu)?
            .call(|reply| VcpuRequest::ReadMsr { index, reply })
    }

    /// Exit statistics of every vCPU, in vCPU order.
    pub fn exit_stats(&self) -> Vec<crate::exit_stats::VcpuExitStats> {
        self.inner
            .vcpus
            .iter()
            .map(|v| v.exits.snapshot())
            .collect()
    }

    /// Exit statistics of every vCPU, zeroed as they are read (`stat live` intervals).
    pub fn take_exit_stats(&self) -> Vec<crate::exit_stats::VcpuExitStats> {
        self.inner.vcpus.iter().map(|v| v.exits.take()).collect()
    }

    /// KVM's own counters (binary stats fd) of the VM and every vCPU, read now.
    pub fn kvm_stats(
        &self,
    ) -> Result<crate::kvm_stats::KvmStatsSnapshot, crate::kvm_stats::KvmStatsError> {
        self.inner.kvm_stats.snapshot()
    }

    /// Asks the VM to end (as if the guest had powered off): `run_to_end` returns `VmEnd::Stopped`.
    pub fn stop(&self) {
        let _ = self.inner.end_tx.send(VcpuEvent::End(VmEnd::Stopped));
    }
}

/// A created VM with its vCPU threads running.
pub struct Vm {
    control: VmControl,
    events: Receiver<VcpuEvent>,
    threads: Vec<JoinHandle<()>>,
    devices: Arc<PioDevices>,
    // Kept alive for the life of the VM: dropping them tears the VM down.
    _vm_fd: Arc<VmFd>,
}

impl Vm {
    /// Builds the VM and starts every vCPU. Returns the VM and, when sampling was asked for, its sample stream.
    pub fn start(
        kvm: &Kvm,
        caps: &HostCaps,
        cfg: VmConfig,
    ) -> Result<(Vm, Option<SampleStream>), VmError> {
        let max = caps.max_vcpus.min(254);
        if cfg.cpus == 0 || cfg.cpus > max {
            return Err(VmError::CpuCount { got: cfg.cpus, max });
        }
        if !(16..=1 << 20).contains(&cfg.mem_mib) {
            return Err(VmError::MemSize(cfg.mem_mib));
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Optional: hosts without stats fds still run, `kvm_stats()` then says why it has nothing.
        let mut kvm_stats = crate::kvm_stats::KvmStatsSources {
            vm: crate::kvm_stats::StatsFd::open(&vm_fd).ok(),
            vcpus: Vec::new(),
        };
        if cfg.no_pmu && caps.pmu_can_disable {
            let cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_PMU_CAPABILITY,
                args: [kvm_bindings::KVM_PMU_CAP_DISABLE as u64, 0, 0, 0],
                ..Default::default()
            };
            vm_fd
                .enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(PMU_CAPABILITY)"))?;
        }
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem_size = cfg.mem_mib << 20;
        let ranges: Vec<(GuestAddress, usize)> = boot::layout::ram_ranges(mem_size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            mib: cfg.mem_mib,
            source,
        })?;
        let mut ram = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .expect("region start is inside the region");
            ram.push(RamRegion {
                gpa: region.start_addr().0,
                len: region.len(),
                host: host as u64,
            });
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping belongs to `mem`, which the VM keeps (through VmControl) until after the VM fd
            // and every vCPU are gone.
            unsafe { vm_fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let boot_cfg = BootConfig {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            num_cpus: cfg.cpus,
            linux_workarounds: &caps.linux_cmdline_workarounds(),
        };
        let loaded = boot::load(&mem, &boot_cfg)?;

        let (devices, serial_irq) = PioDevices::new(cfg.serial_out)?;
        let devices = Arc::new(devices);
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let policy = CpuidPolicy::from_caps(caps, cfg.no_pmu);

        kick::install_handler();
        let (event_tx, events) = mpsc::channel();
        let sampling = Arc::new(SamplingSlot::default());
        let epoch = Instant::now();
        let debug = Arc::new(DebugShared::new()?);
        let initial_state = if cfg.start_paused {
            VcpuState::Paused
        } else {
            VcpuState::Running
        };
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for id in 0..cfg.cpus {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            kvm_stats.vcpus.push(
                kvm_stats
                    .vm
                    .as_ref()
                    .and_then(|_| crate::kvm_stats::StatsFd::open(&fd).ok()),
            );
            fd.set_cpuid2(&cpuid::for_vcpu(
                &supported,
                &policy,
                id as u32,
                cfg.cpus as u32,
            ))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
            set_lint(&fd)?;
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            if id == 0 {
                let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                let (regs, sregs) = boot::boot_cpu_state(loaded.entry, sregs);
                fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
            let (tx, rx) = mpsc::channel();
            let state = Arc::new(AtomicU8::new(initial_state as u8));
            let sample_request = Arc::new(SampleRequest::default());
            let exits = Arc::new(crate::exit_stats::ExitTable::default());
            let vcpu = Vcpu {
                id,
                fd,
                rx,
                events: event_tx.clone(),
                devices: devices.clone(),
                mem: mem.clone(),
                state: state.clone(),
                sample_request: sample_request.clone(),
                sampling: sampling.clone(),
                use_sync_regs: caps.has_sync_regs(),
                symbolize: cfg.symbolize.clone(),
                debug: debug.clone(),
                debug_state: VcpuDebugState::default(),
                exits: exits.clone(),
                cpu_credit: Default::default(),
            };
            let (kicker_tx, kicker_rx) = mpsc::channel();
            let (panic_events, panic_state) = (event_tx.clone(), state.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() } as u32;
                    let _ = kicker_tx.send((Kicker::current(), tid));
                    // A VMM bug on this thread must end the VM with a diagnostic, not leave it waiting for a vCPU
                    // that is gone.
                    let run = std::panic::AssertUnwindSafe(move || vcpu.run());
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        panic_state.store(
                            VcpuState::Exited as u8,
                            std::sync::atomic::Ordering::Release,
                        );
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        let reason = format!("VMM bug: the vCPU thread panicked: {what}");
                        let _ = panic_events.send(VcpuEvent::End(VmEnd::Crash {
                            vcpu: id,
                            report: format!("vCPU {id}: {reason}"),
                            reason,
                        }));
                    }
                })
                .map_err(VmError::Thread)?;
            let (kicker, tid) = kicker_rx
                .recv()
                .map_err(|_| VmError::Vcpu(VcpuError::Exited(id)))?;
            threads.push(thread);
            handles.push(VcpuHandle {
                id,
                tx,
                kicker,
                tid,
                state,
                sample_request,
                exits,
            });
        }
        let info = VmInfo {
            vcpus: cfg.cpus,
            mem_mib: cfg.mem_mib,
            kernel: cfg.kernel.display().to_string(),
            kernel_format: loaded.format.to_string(),
            cmdline: cfg.cmdline.clone(),
            pid: std::process::id(),
            vcpu_tids: handles.iter().map(|h| h.tid).collect(),
        };
        let control = VmControl {
            inner: Arc::new(ControlInner {
                vcpus: handles,
                mem,
                info,
                end_tx: event_tx,
                debug,
                vm_fd: vm_fd.clone(),
                ram,
                sampling,
                session: Mutex::new(None),
                epoch,
                kvm_stats,
            }),
        };
        let stream = match cfg.sampler {
            Some(s) => Some(control.start_sampling(s)?),
            None => None,
        };
        Ok((
            Vm {
                control,
                events,
                threads,
                devices,
                _vm_fd: vm_fd,
            },
            stream,
        ))
    }

    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// Feeds host input to the guest's UART.
    pub fn devices(&self) -> Arc<PioDevices> {
        self.devices.clone()
    }

    /// Blocks until the VM ends, then stops every vCPU thread and the sampler.
    pub fn run_to_end(self) -> VmEnd {
        let end = match self.events.recv() {
            Ok(VcpuEvent::End(end)) => end,
            Err(_) => VmEnd::Stopped,
        };
        self.control.stop_sampling();
        for v in &self.control.inner.vcpus {
            let _ = v.send(VcpuRequest::Exit);
        }
        for t in self.threads {
            let _ = t.join();
        }
        self.devices.flush_serial();
        end
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them, so a guest using the legacy PIC gets its interrupts.
fn set_lint(fd: &kvm_ioctls::VcpuFd) -> Result<(), VmError> {
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [i8], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    set(&mut lapic.regs, 0x350, 7);
    set(&mut lapic.regs, 0x360, 4);
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}
