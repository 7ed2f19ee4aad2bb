//! `perf-kvm report`.

use std::path::PathBuf;

use perf_kvm::report::{run_report, ReportError, ReportOptions, SortKey, SymbolSources};

#[derive(clap::Args)]
pub struct ReportArgs {
    /// perf.data to read (ours or real perf's).
    #[arg(short = 'i', long = "input", default_value = "perf.data")]
    input: PathBuf,
    /// Guest kernel image with symbols.
    #[arg(long)]
    guest_vmlinux: Option<PathBuf>,
    /// Copy of the guest's /proc/kallsyms.
    #[arg(long)]
    guest_kallsyms: Option<PathBuf>,
    /// Copy of the guest's /proc/modules.
    #[arg(long)]
    guest_modules: Option<PathBuf>,
    /// ELF to symbolize guest user samples with (every address space).
    #[arg(long)]
    guest_user_elf: Option<PathBuf>,
    /// Plain text output (the only output there is; accepted for perf compatibility).
    #[arg(long)]
    stdio: bool,
    /// Show the callers of each entry.
    #[arg(short = 'g', long = "call-graph")]
    call_graph: bool,
    /// Comma-separated sort keys: comm, pid, dso, sym, cpu.
    #[arg(short = 's', long, default_value = "comm,dso,sym")]
    sort: String,
    /// Self overhead only, no Children column.
    #[arg(long)]
    no_children: bool,
    /// Only samples of this vCPU.
    #[arg(long)]
    vcpu: Option<u32>,
    /// Print folded stacks (flamegraph.pl input) instead of the table.
    #[arg(long)]
    folded: bool,
    /// Write a flame graph SVG.
    #[arg(long, value_name = "OUT.svg")]
    flamegraph: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<i32> {
    let options = ReportOptions {
        symbols: SymbolSources {
            guest_vmlinux: args.guest_vmlinux,
            guest_kallsyms: args.guest_kallsyms,
            guest_modules: args.guest_modules,
            guest_user_elf: args.guest_user_elf,
        },
        sort: SortKey::parse_list(&args.sort)?,
        call_graph: args.call_graph,
        children: !args.no_children,
        vcpu: args.vcpu,
        folded: args.folded,
        flamegraph: args.flamegraph,
        ..ReportOptions::new(args.input)
    };
    let stdout = std::io::stdout();
    let summary = match run_report(&options, &mut stdout.lock()) {
        Ok(summary) => summary,
        // `perf-kvm report | head` is not an error.
        Err(ReportError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    for warning in &summary.warnings {
        eprintln!("perf-kvm report: warning: {warning}");
    }
    Ok(0)
}
