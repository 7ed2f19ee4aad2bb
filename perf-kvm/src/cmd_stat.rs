//! `perf-kvm stat [record|report|live]`: VM exit statistics in `perf kvm stat`'s layout, plus KVM's own counters.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use perf_kvm::stat::file::StatRecording;
use perf_kvm::stat::in_process::AnySource;
use perf_kvm::stat::source::VmSource;
use perf_kvm::stat::table::{self, SortKey, StatEvent, VcpuFilter};
use perf_kvm::stat::tracepoints::{self, TracepointCounters};

use crate::vm_source;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct StatArgs {
    #[command(subcommand)]
    mode: Option<StatMode>,
    #[command(flatten)]
    view: ViewOptions,
    #[command(flatten)]
    target: TargetOptions,
}

#[derive(clap::Subcommand)]
enum StatMode {
    /// Run or watch the VM, then write its exit statistics to a file for `stat report`.
    Record {
        /// Output file (JSON, see docs/stat-top.md).
        #[arg(short = 'o', long = "output", default_value = "perf-kvm-stat.json")]
        output: PathBuf,
        #[command(flatten)]
        target: TargetOptions,
    },
    /// Print the table of a file written by `stat record`.
    Report {
        /// Input file.
        #[arg(short = 'i', long = "input", default_value = "perf-kvm-stat.json")]
        input: PathBuf,
        #[command(flatten)]
        view: ViewOptions,
    },
    /// Print the table of each interval while the VM runs.
    Live {
        /// Seconds between tables.
        #[arg(short = 'd', long = "display", default_value_t = 3.0)]
        display_secs: f64,
        #[command(flatten)]
        view: ViewOptions,
        #[command(flatten)]
        target: TargetOptions,
    },
}

#[derive(clap::Args, Clone)]
struct ViewOptions {
    /// What a row stands for: exit reason, I/O port, or MMIO address.
    #[arg(long = "event", value_enum, default_value_t = StatEvent::Vmexit)]
    event: StatEvent,
    /// Only this vCPU (0-based); default all.
    #[arg(long = "vcpu")]
    vcpu: Option<usize>,
    /// Row order.
    #[arg(short = 'k', long = "key", value_enum, default_value_t = SortKey::Sample)]
    key: SortKey,
}

#[derive(clap::Args, Clone)]
struct TargetOptions {
    /// Watch a running VM through its control socket.
    #[arg(long = "vm")]
    vm: Option<PathBuf>,
    /// Stop after this many seconds (default: when the VM ends, or on Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Start the VM in-process: `-- run --kernel PATH [--cmdline ...] [--cpus N] ...`.
    #[arg(last = true)]
    vmm_args: Vec<String>,
}

pub fn run(args: StatArgs) -> anyhow::Result<i32> {
    match args.mode {
        None => run_whole(&args.target, &args.view),
        Some(StatMode::Record { output, target }) => record(&target, &output),
        Some(StatMode::Report { input, view }) => report(&input, &view),
        Some(StatMode::Live {
            display_secs,
            view,
            target,
        }) => live(&target, &view, display_secs),
    }
}

/// `perf-kvm stat -- run ...`: the table of the whole run, printed when it ends.
fn run_whole(target: &TargetOptions, view: &ViewOptions) -> anyhow::Result<i32> {
    let rec = capture(target)?;
    print_recording(&rec, view)?;
    Ok(0)
}

fn record(target: &TargetOptions, output: &Path) -> anyhow::Result<i32> {
    // Find out that the file cannot be written before the VM runs, not after.
    std::fs::File::create(output).with_context(|| format!("cannot write {}", output.display()))?;
    let rec = capture(target)?;
    rec.write(output)?;
    let exits: u64 = rec
        .exit_stats
        .iter()
        .flat_map(|t| t.by_key.iter())
        .map(|(_, a)| a.count)
        .sum();
    eprintln!(
        "[ perf-kvm stat record: {exits} exits of {} vCPUs written to {} ]",
        rec.vcpus,
        output.display()
    );
    Ok(0)
}

fn report(input: &Path, view: &ViewOptions) -> anyhow::Result<i32> {
    let rec = StatRecording::read(input)?;
    print_recording(&rec, view)?;
    Ok(0)
}

/// Runs (or watches) the VM to its end, the duration or Ctrl-C, and takes its statistics.
fn capture(target: &TargetOptions) -> anyhow::Result<StatRecording> {
    vm_source::install_interrupt_handlers();
    // Opened before the VM's threads start, so that they inherit the counters.
    let mut tracepoints = match target.vm {
        None => TracepointCounters::open().map_err(|e| error_chain(&e)),
        Some(_) => Err("counted only for a VM that perf-kvm starts".to_string()),
    };
    let mut source = open_source(target)?;
    let started = Instant::now();
    let deadline = deadline(target);
    // A watched VM can vanish with its socket: poll, and keep the last statistics that could be read.
    let mut last = None;
    let mut vanished = false;
    loop {
        match source.exit_stats(false) {
            Ok(stats) => last = Some(stats),
            Err(e) if source.has_ended() && last.is_some() => {
                eprintln!(
                    "perf-kvm stat: the VM went away ({}); showing the exits read before",
                    error_chain(&e)
                );
                vanished = true;
                break;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("reading exit statistics")),
        }
        if source.has_ended()
            || vm_source::interrupted()
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(STAT_POLL_MS));
    }
    if !vanished {
        // The final read, after the VM's last exit.
        last = Some(
            source
                .exit_stats(false)
                .context("reading exit statistics")?,
        );
    }
    let mut rec = StatRecording::new(
        source.describe(),
        source.vcpu_count(),
        started.elapsed().as_nanos() as u64,
        last.unwrap_or_default(),
    );
    match source.kvm_stats() {
        Ok(k) => rec.kvm_stats = Some(k),
        Err(e) => rec.kvm_stats_missing = Some(error_chain(&e)),
    }
    finish(source);
    // After the vCPU threads are joined: the kernel folds a thread's counts into the parent's when it exits.
    match tracepoints
        .as_mut()
        .map_err(|e| e.clone())
        .and_then(|t| t.read().map_err(|e| error_chain(&e)))
    {
        Ok(counts) => rec.tracepoints = Some(counts),
        Err(why) => rec.tracepoints_missing = Some(why),
    }
    Ok(rec)
}

/// How often a running VM's statistics are read while `stat` waits for its end.
const STAT_POLL_MS: u64 = 250;

fn print_recording(rec: &StatRecording, view: &ViewOptions) -> anyhow::Result<()> {
    let vcpus = vcpu_filter(view, rec.vcpus)?;
    let mut out =
        table::format_exit_table(&rec.exit_stats, view.event, vcpus, view.key, &rec.target);
    match (&rec.kvm_stats, &rec.kvm_stats_missing) {
        (Some(kvm), _) => out.push_str(&table::format_kvm_counters(kvm, &rec.exit_stats, vcpus)),
        (None, Some(why)) => out.push_str(&format!("KVM counters: not available ({why})\n\n")),
        (None, None) => {}
    }
    match (&rec.tracepoints, &rec.tracepoints_missing) {
        (Some(counts), _) => {
            let vmm_exits = rec
                .exit_stats
                .iter()
                .flat_map(|t| t.by_key.iter())
                .map(|(_, a)| a.count)
                .sum();
            out.push_str(&tracepoints::format_counts(counts, vmm_exits));
        }
        (None, Some(why)) => out.push_str(&format!("KVM tracepoints: not counted ({why})\n\n")),
        (None, None) => {}
    }
    print_or_quiet(&out);
    Ok(())
}

fn live(target: &TargetOptions, view: &ViewOptions, display_secs: f64) -> anyhow::Result<i32> {
    if !(display_secs.is_finite() && (0.1..=3600.0).contains(&display_secs)) {
        anyhow::bail!("-d must be between 0.1 and 3600 seconds (got {display_secs})");
    }
    vm_source::install_interrupt_handlers();
    let mut source = open_source(target)?;
    let vcpus = vcpu_filter(view, source.vcpu_count())?;
    let deadline = deadline(target);
    let target_name = source.describe();
    // Each table covers one interval: exit accounting is reset on every read, KVM's counters are differenced.
    source
        .exit_stats(true)
        .context("resetting exit statistics")?;
    let mut kvm_before = source.kvm_stats().ok();
    let mut next = Instant::now() + Duration::from_secs_f64(display_secs);
    loop {
        let stop = source.has_ended()
            || vm_source::interrupted()
            || deadline.is_some_and(|d| Instant::now() >= d);
        if Instant::now() >= next || stop {
            let stats = match source.exit_stats(true) {
                Ok(stats) => stats,
                Err(e) if source.has_ended() => {
                    eprintln!("perf-kvm stat: the VM went away ({})", error_chain(&e));
                    break;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("reading exit statistics")),
            };
            let mut out = format!("\n{}", humantime_now());
            out.push_str(&table::format_exit_table(
                &stats,
                view.event,
                vcpus,
                view.key,
                &target_name,
            ));
            if let (Some(before), Ok(now)) = (&kvm_before, source.kvm_stats()) {
                out.push_str(&table::format_kvm_counters(
                    &table::counter_delta(&now, before),
                    &stats,
                    vcpus,
                ));
                kvm_before = Some(now);
            }
            print_or_quiet(&out);
            next += Duration::from_secs_f64(display_secs);
        }
        if stop {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(source);
    Ok(0)
}

fn humantime_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

fn vcpu_filter(view: &ViewOptions, vcpus: usize) -> anyhow::Result<VcpuFilter> {
    match view.vcpu {
        None => Ok(VcpuFilter::All),
        Some(v) if v < vcpus => Ok(VcpuFilter::One(v)),
        Some(v) => anyhow::bail!("--vcpu {v}: the VM has {vcpus} vCPU(s), numbered from 0"),
    }
}

fn deadline(target: &TargetOptions) -> Option<Instant> {
    target
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.clamp(0.0, 1e9)))
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly.
fn print_or_quiet(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Stat starts the VM without sampling; the guest's console goes to stdout, before the table.
fn open_source(target: &TargetOptions) -> anyhow::Result<AnySource> {
    Ok(AnySource::open(
        target.vm.as_deref(),
        &target.vmm_args,
        None,
        Box::new(std::io::stdout()),
    )?)
}

fn finish(source: AnySource) {
    if let Some(end) = source.finish() {
        vm_source::report_end(&end);
    }
}
