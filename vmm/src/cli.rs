//! The `vmm run` arguments, shared with `perf-kvm ... -- run ARGS` so both start VMs the same way.

use std::path::PathBuf;

use crate::devices::SerialOut;
use crate::vm::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("kernel {0} does not exist")]
    NoKernel(String),
    #[error("initrd {0} does not exist")]
    NoInitrd(String),
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Kernel image: an ELF with a PVH note, an ELF vmlinux, or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Serve the control socket (unix, mode 0600) at this path.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Do not give the guest a virtual PMU even where the host has one.
    #[arg(long)]
    pub no_pmu: bool,
    /// Serve the gdb remote protocol at HOST:PORT, a bare PORT (127.0.0.1), or a unix socket path.
    #[arg(long, value_name = "ADDR")]
    pub gdb: Option<gdbstub_kvm::GdbAddress>,
    /// With --gdb: stop every vCPU before the first guest instruction, until gdb resumes them.
    #[arg(long, requires = "gdb")]
    pub gdb_wait: bool,
}

impl RunArgs {
    pub fn vm_config(&self, serial_out: SerialOut) -> Result<VmConfig, CliError> {
        if !self.kernel.exists() {
            return Err(CliError::NoKernel(self.kernel.display().to_string()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.exists() {
                return Err(CliError::NoInitrd(initrd.display().to_string()));
            }
        }
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            mem_mib: self.mem,
            no_pmu: self.no_pmu,
            serial_out,
            sampler: None,
            symbolize: Some(kernel_symbolizer(self.kernel.clone())),
            start_paused: false,
        })
    }
}

#[derive(clap::Parser)]
#[command(name = "vmm", no_binary_name = true)]
struct RunCommandLine {
    #[command(subcommand)]
    command: RunSubcommand,
}

#[derive(clap::Subcommand)]
enum RunSubcommand {
    Run(RunArgs),
}

/// Parses the VMM arguments another tool passes after `--` (`run --kernel ...`; the leading `run` is optional).
pub fn parse_run_args(args: &[String]) -> Result<RunArgs, clap::Error> {
    use clap::Parser;
    let mut words: Vec<&str> = args.iter().map(String::as_str).collect();
    if words.first() != Some(&"run") {
        words.insert(0, "run");
    }
    let RunSubcommand::Run(run) = RunCommandLine::try_parse_from(words)?.command;
    Ok(run)
}

/// Names a guest address from the kernel image's own symbols, for crash reports. Built only when a crash happens,
/// so a VM that never crashes never parses its kernel's symbol table; images without symbols just give nothing.
fn kernel_symbolizer(kernel: PathBuf) -> crate::vm::SymbolizeFn {
    std::sync::Arc::new(move |addr| {
        let mut symbolizer = symbols::Symbolizer::new();
        symbolizer.add_elf(&kernel, 0).ok()?;
        let found = symbolizer.symbolize(&[addr]).pop()?;
        let outer = found.frames.last()?;
        let name = outer.function.clone()?;
        Some(match outer.symbol_offset {
            Some(off) => format!("{name}+{off:#x}"),
            None => name.to_string(),
        })
    })
}
