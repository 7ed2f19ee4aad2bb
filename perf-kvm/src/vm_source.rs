//! Where `record`, `stat` and `top` get a VM from: started in-process from `-- run ARGS`, the way `perf record --
//! CMD` starts its workload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use vmm::cli::RunArgs;
use vmm::sampler::{SampleStream, SamplerConfig};
use vmm::{HostCaps, Vm, VmEnd};

/// Set by SIGINT/SIGTERM; the tools stop the VM and finish their output cleanly.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_interrupt_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A VM started in-process, with its end reported on a flag once `run_to_end` returns.
pub struct StartedVm {
    pub control: vmm::VmControl,
    pub stream: Option<SampleStream>,
    pub run_args: RunArgs,
    ended: Arc<AtomicBool>,
    end: std::thread::JoinHandle<VmEnd>,
}

impl StartedVm {
    pub fn start(vmm_args: &[String], sampler: Option<SamplerConfig>) -> anyhow::Result<StartedVm> {
        if vmm_args.is_empty() {
            anyhow::bail!("nothing to profile: give `--vm SOCKET` or `-- run --kernel PATH ...`");
        }
        let run_args = vmm::cli::parse_run_args(vmm_args)
            .map_err(|e| anyhow::anyhow!("bad VMM arguments: {e}"))?;
        let kvm = vmm::open_kvm()?;
        let caps = HostCaps::probe(&kvm)?;
        let mut cfg = run_args.vm_config(Box::new(std::io::stdout()))?;
        cfg.sampler = sampler;
        let (vm, stream) = Vm::start(&kvm, &caps, cfg).context("starting the VM")?;
        let control = vm.control();
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let end = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let end = vm.run_to_end();
                flag.store(true, Ordering::SeqCst);
                end
            })?;
        Ok(StartedVm {
            control,
            stream,
            run_args,
            ended,
            end,
        })
    }

    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Stops the VM if it still runs and returns how it ended.
    pub fn finish(self) -> VmEnd {
        if !self.has_ended() {
            self.control.stop();
        }
        self.end.join().unwrap_or(VmEnd::Stopped)
    }
}

/// Prints how the VM ended when that is worth a line (a crash report, a non-zero guest status).
pub fn report_end(end: &VmEnd) {
    match end {
        VmEnd::Crash { report, .. } => eprintln!("perf-kvm: the guest crashed\n{report}"),
        VmEnd::GuestExit(s) if *s != 0 => eprintln!("perf-kvm: the guest exited with status {s}"),
        _ => {}
    }
}

pub use perf_kvm::feed::{Feed, SampleFeed};
