//! A VM started in this process from `-- run ARGS` (as `perf stat -- CMD` starts its workload), and the enum
//! that puts it and the control-socket source behind [`VmSource`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm::cli::RunArgs;
use vmm::devices::SerialOut;
use vmm::exit_stats::VcpuExitStats;
use vmm::kvm_stats::KvmStatsSnapshot;
use vmm::sampler::{SampleStream, SamplerConfig};
use vmm::{HostCaps, Sample, SampleLoss, Vm, VmControl, VmEnd};

use super::source::{ControlSocketSource, SourceError, VmSource};

#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    #[error("nothing to watch: give `--vm SOCKET` or `-- run --kernel PATH ...`")]
    NoTarget,
    #[error("give either --vm SOCKET or `-- run ARGS`, not both")]
    BothTargets,
    #[error("bad VMM arguments after `--`: {0}")]
    BadArgs(String),
    #[error(transparent)]
    Kvm(#[from] vmm::KvmOpenError),
    #[error(transparent)]
    Probe(#[from] vmm::probe::ProbeError),
    #[error(transparent)]
    Config(#[from] vmm::cli::CliError),
    #[error("starting the VM")]
    Start(#[source] vmm::vm::VmError),
    #[error("cannot start the VM thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A VM running on a thread of this process, with its sample stream when sampling was asked for.
pub struct InProcessSource {
    control: VmControl,
    stream: Option<SampleStream>,
    kernel: PathBuf,
    ended: Arc<AtomicBool>,
    end: JoinHandle<VmEnd>,
}

impl InProcessSource {
    /// Boots the VM described by `vmm_args` (`run --kernel ...`); the guest's serial output goes to `serial`.
    pub fn start(
        vmm_args: &[String],
        sampler: Option<SamplerConfig>,
        serial: SerialOut,
    ) -> Result<InProcessSource, InProcessError> {
        if vmm_args.is_empty() {
            return Err(InProcessError::NoTarget);
        }
        let run_args: RunArgs = vmm::cli::parse_run_args(vmm_args)
            .map_err(|e| InProcessError::BadArgs(e.to_string()))?;
        let kvm = vmm::open_kvm()?;
        let caps = HostCaps::probe_cached(&kvm)?;
        let mut cfg = run_args.vm_config(serial)?;
        cfg.sampler = sampler;
        let (vm, stream) = Vm::start(&kvm, &caps, cfg).map_err(InProcessError::Start)?;
        let control = vm.control();
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let end = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let end = vm.run_to_end();
                flag.store(true, Ordering::SeqCst);
                end
            })
            .map_err(InProcessError::Thread)?;
        Ok(InProcessSource {
            control,
            stream,
            kernel: run_args.kernel,
            ended,
            end,
        })
    }

    /// Hands the sample stream to a consumer of its own (`record`).
    pub fn take_stream(&mut self) -> Option<SampleStream> {
        self.stream.take()
    }

    pub fn control(&self) -> &VmControl {
        &self.control
    }

    /// The kernel image the VM booted.
    pub fn kernel(&self) -> &std::path::Path {
        &self.kernel
    }

    /// Stops the VM if it still runs and returns how it ended.
    pub fn finish(self) -> VmEnd {
        if !self.ended.load(Ordering::SeqCst) {
            self.control.stop();
        }
        self.end.join().unwrap_or(VmEnd::Stopped)
    }
}

impl VmSource for InProcessSource {
    fn describe(&self) -> String {
        format!("the VM of {}", self.kernel.display())
    }

    fn vcpu_count(&self) -> usize {
        self.control.vcpu_count()
    }

    fn exit_stats(&mut self, reset: bool) -> Result<Vec<VcpuExitStats>, SourceError> {
        Ok(if reset {
            self.control.take_exit_stats()
        } else {
            self.control.exit_stats()
        })
    }

    fn kvm_stats(&mut self) -> Result<KvmStatsSnapshot, SourceError> {
        self.control.kvm_stats().map_err(SourceError::KvmStats)
    }

    fn drain_samples(&mut self, out: &mut Vec<Sample>, max: usize) -> Result<bool, SourceError> {
        let Some(stream) = &self.stream else {
            return Ok(false);
        };
        for _ in 0..max {
            match stream.rx.try_recv() {
                Ok(s) => out.push(s),
                Err(TryRecvError::Empty) => return Ok(true),
                Err(TryRecvError::Disconnected) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn sample_loss(&self) -> SampleLoss {
        self.stream
            .as_ref()
            .map(|s| s.loss.snapshot())
            .unwrap_or_default()
    }

    fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    fn guest_kernel(&self) -> Option<PathBuf> {
        Some(self.kernel.clone())
    }
}

/// The VM behind `stat` and `top`: started in-process, or reached through its control socket.
pub enum AnySource {
    InProcess(InProcessSource),
    Socket(ControlSocketSource),
}

impl AnySource {
    pub fn open(
        vm: Option<&Path>,
        vmm_args: &[String],
        sampler: Option<SamplerConfig>,
        serial: SerialOut,
    ) -> Result<AnySource, InProcessError> {
        match (vm, vmm_args.is_empty()) {
            (Some(_), false) => Err(InProcessError::BothTargets),
            (Some(sock), true) => {
                let mut source = ControlSocketSource::connect(sock)?;
                if let Some(s) = sampler {
                    source.start_sampling(s.frequency_hz, s.callchains)?;
                }
                Ok(AnySource::Socket(source))
            }
            (None, _) => Ok(AnySource::InProcess(InProcessSource::start(
                vmm_args, sampler, serial,
            )?)),
        }
    }

    fn inner(&self) -> &dyn VmSource {
        match self {
            AnySource::InProcess(s) => s,
            AnySource::Socket(s) => s,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn VmSource {
        match self {
            AnySource::InProcess(s) => s,
            AnySource::Socket(s) => s,
        }
    }

    /// Stops an in-process VM and says how it ended; a watched VM goes on (`None`).
    pub fn finish(self) -> Option<VmEnd> {
        match self {
            AnySource::InProcess(s) => Some(s.finish()),
            AnySource::Socket(_) => None,
        }
    }
}

impl VmSource for AnySource {
    fn describe(&self) -> String {
        self.inner().describe()
    }
    fn vcpu_count(&self) -> usize {
        self.inner().vcpu_count()
    }
    fn exit_stats(&mut self, reset: bool) -> Result<Vec<VcpuExitStats>, SourceError> {
        self.inner_mut().exit_stats(reset)
    }
    fn kvm_stats(&mut self) -> Result<KvmStatsSnapshot, SourceError> {
        self.inner_mut().kvm_stats()
    }
    fn drain_samples(&mut self, out: &mut Vec<Sample>, max: usize) -> Result<bool, SourceError> {
        self.inner_mut().drain_samples(out, max)
    }
    fn sample_loss(&self) -> SampleLoss {
        self.inner().sample_loss()
    }
    fn has_ended(&self) -> bool {
        self.inner().has_ended()
    }
    fn guest_kernel(&self) -> Option<PathBuf> {
        self.inner().guest_kernel()
    }
}
