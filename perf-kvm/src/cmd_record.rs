//! `perf-kvm record`: sample guest RIPs (and callchains with `-g`) into perf.data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use perf_kvm::perf_data::{GuestUserMap, PerfDataWriter, RecordMeta, SampledEvent};
use vmm::sampler::SamplerConfig;
use vmm::SampleLoss;

use perf_kvm::stat::in_process::InProcessSource;
use perf_kvm::stat::source::VmSource;

use crate::vm_source::{self, Feed, SampleFeed};

#[derive(clap::Args)]
pub struct RecordArgs {
    /// Sampling frequency per vCPU, in Hz.
    #[arg(short = 'F', long = "freq", default_value_t = 1000)]
    freq: u32,
    /// Record callchains (walked from the guest's frame pointers).
    #[arg(short = 'g')]
    callchains: bool,
    /// Output file.
    #[arg(short = 'o', long = "output", default_value = "perf.data")]
    output: PathBuf,
    /// Stop after this many seconds (default: when the guest ends, or on Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Event to sample: `cpu-clock` (the default: the PMU-free sampler) or `cycles` (guest-only cycles from the
    /// host PMU through perf_event_open on the vCPU threads, as `perf kvm record` does; no callchains).
    #[arg(short = 'e', long = "event", default_value = "cpu-clock")]
    event: String,
    /// Benchmarks only: kick the vCPUs at the rate but take no samples (the bare cost of the forced exits).
    #[arg(long, hide = true)]
    kick_only: bool,
    /// Attach to a running VM's control socket.
    #[arg(long = "vm")]
    vm: Option<PathBuf>,
    /// Start the VM in-process: `-- run --kernel PATH [--cmdline ...] [--cpus N] ...`.
    #[arg(last = true)]
    vmm_args: Vec<String>,
}

pub fn run(args: RecordArgs) -> anyhow::Result<i32> {
    if args.freq == 0 || args.freq > vmm::sampler::MAX_FREQUENCY_HZ {
        anyhow::bail!(
            "-F must be between 1 and {} Hz (got {})",
            vmm::sampler::MAX_FREQUENCY_HZ,
            args.freq
        );
    }
    let event = parse_event(&args.event)?;
    if event == SampledEvent::Cycles {
        if args.callchains {
            anyhow::bail!(
                "-g: the PMU reports no guest callchains; record callchains with the default sampler (no -e)"
            );
        }
        // Decided by trying: the one-line reason (no PMU, not allowed) is the error itself.
        vmm::pmu::probe_guest_cycles()?;
    }
    vm_source::install_interrupt_handlers();
    let mut pmu = None;
    let mut pmu_stats = None;
    // A file size limit (RLIMIT_FSIZE) then fails the write with EFBIG, handled like a full disk, instead of
    // killing the recorder with the file half written.
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let (vm, feed, meta) = match &args.vm {
        Some(socket) => {
            if !args.vmm_args.is_empty() {
                anyhow::bail!("give either --vm SOCKET or `-- run ...`, not both");
            }
            let mut client = vmm::control::ControlClient::connect(socket)?;
            let info = client.call(vmm::control::Request::Info)?;
            let kernel = PathBuf::from(info["info"]["kernel"].as_str().unwrap_or_default());
            let vcpus = info["info"]["vcpus"].as_u64().unwrap_or(1) as u32;
            let feed = if event == SampledEvent::Cycles {
                let tids: Vec<u32> = info["info"]["vcpu_tids"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_u64())
                            .map(|t| t as u32)
                            .collect()
                    })
                    .unwrap_or_default();
                let (session, stream) = vmm::pmu::PmuSession::start(&tids, pmu_config(&args))?;
                pmu_stats = Some(session.stats());
                pmu = Some(session);
                SampleFeed::InProcess(stream)
            } else {
                SampleFeed::attach(socket, args.freq, args.callchains)?
            };
            (None, feed, record_meta(&args, event, &kernel, vcpus))
        }
        None => {
            let sampler = SamplerConfig {
                frequency_hz: args.freq,
                callchains: args.callchains,
                queue_capacity: 1 << 16,
                kick_only: args.kick_only,
            };
            let sampler = (event == SampledEvent::CpuClock).then_some(sampler);
            let mut vm =
                InProcessSource::start(&args.vmm_args, sampler, Box::new(std::io::stdout()))?;
            let stream = match vm.take_stream() {
                Some(stream) => stream,
                None => {
                    let tids = vm.control().info().vcpu_tids.clone();
                    let (session, stream) =
                        match vmm::pmu::PmuSession::start(&tids, pmu_config(&args)) {
                            Ok(started) => started,
                            Err(e) => {
                                vm.finish();
                                return Err(e.into());
                            }
                        };
                    pmu_stats = Some(session.stats());
                    pmu = Some(session);
                    stream
                }
            };
            let meta = record_meta(&args, event, vm.kernel(), vm.control().vcpu_count() as u32);
            (Some(vm), SampleFeed::InProcess(stream), meta)
        }
    };
    let mut writer = PerfDataWriter::create(&args.output, &meta)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|d| started + Duration::from_secs_f64(d.max(0.0)));
    let mut samples = 0u64;
    let mut reported_loss = SampleLoss::default();
    let mut last_progress = Instant::now();
    let mut write_error = None;
    let mut ended = false;
    loop {
        match feed.next(Duration::from_millis(100)) {
            Feed::Sample(sample) => {
                if let Err(e) = writer.write_sample(&sample) {
                    write_error = Some(e);
                    break;
                }
                samples += 1;
            }
            Feed::Ended => ended = true,
            Feed::Idle => {}
        }
        let stop = ended
            || vm.as_ref().is_some_and(|v| v.has_ended())
            || vm_source::interrupted()
            || deadline.is_some_and(|d| Instant::now() >= d);
        if last_progress.elapsed() >= Duration::from_secs(1) || stop {
            let loss = feed.loss();
            if let Err(e) = writer
                .write_lost(
                    &loss_delta(&loss, &reported_loss),
                    started.elapsed().as_nanos() as u64,
                )
                .and_then(|_| writer.flush())
            {
                write_error = Some(e);
                break;
            }
            reported_loss = loss;
            progress(samples, &loss, started.elapsed());
            last_progress = Instant::now();
        }
        if stop {
            break;
        }
    }
    let end = vm.map(|vm| vm.finish());
    // The PMU reader drains the rings into the feed once more before it closes it.
    if let Some(session) = pmu.take() {
        session.stop();
    }
    // Samples already queued when the recording stopped still belong to it (for `--vm`: those that crossed the
    // socket; the channel holds at most 1 << 16).
    for _ in 0..1 << 16 {
        if write_error.is_some() {
            break;
        }
        let Feed::Sample(sample) = feed.next(Duration::ZERO) else {
            break;
        };
        match writer.write_sample(&sample) {
            Ok(()) => samples += 1,
            Err(e) => write_error = Some(e),
        }
    }
    if let Some(end) = end {
        eprintln!();
        vm_source::report_end(&end);
    } else {
        eprintln!();
        if let Some(err) = feed.error() {
            eprintln!("perf-kvm: the control stream broke off: {err}");
        }
    }
    let loss = feed.loss();
    let closed = match write_error {
        Some(e) => Err(writer.salvage(e)),
        None => match writer.write_lost(
            &loss_delta(&loss, &reported_loss),
            started.elapsed().as_nanos() as u64,
        ) {
            Ok(()) => writer.finish(),
            Err(e) => Err(writer.salvage(e)),
        },
    };
    // A write error (disk full) ends the recording with one line saying what the file keeps.
    closed?;
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "[ perf-kvm record: Captured and wrote {:.3} MB {} ({samples} samples, {} lost) ]",
        size as f64 / 1e6,
        args.output.display(),
        loss.lost()
    );
    if let Some(stats) = pmu_stats {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "[ perf-kvm record: PMU: {} samples landed outside the guest (dropped), {} throttles, {} malformed records ]",
            stats.host_mode.load(Relaxed),
            stats.throttled.load(Relaxed),
            stats.malformed.load(Relaxed)
        );
    }
    // The sampler's own counters behind "lost", and the idle ticks that are not losses.
    eprintln!(
        "[ perf-kvm record: sampler: {} queue full, {} ticks skipped, {} idle ticks ]",
        loss.queue_full, loss.ticks_skipped, loss.idle_ticks
    );
    Ok(0)
}

fn parse_event(name: &str) -> anyhow::Result<SampledEvent> {
    match name {
        "cpu-clock" => Ok(SampledEvent::CpuClock),
        "cycles" | "cpu-cycles" | "cycles:G" => Ok(SampledEvent::Cycles),
        other => anyhow::bail!(
            "unknown event '{other}': perf-kvm record samples cpu-clock (default, no PMU needed) or cycles (host PMU)"
        ),
    }
}

fn pmu_config(args: &RecordArgs) -> vmm::pmu::PmuConfig {
    vmm::pmu::PmuConfig {
        frequency_hz: args.freq,
        queue_capacity: 1 << 16,
    }
}

fn record_meta(args: &RecordArgs, event: SampledEvent, kernel: &Path, nr_vcpus: u32) -> RecordMeta {
    let kernel = &std::fs::canonicalize(kernel).unwrap_or_else(|_| kernel.to_path_buf());
    let (kernel_range, user_maps) = elf_layout(kernel);
    RecordMeta {
        nr_vcpus,
        freq_hz: args.freq as u64,
        callchains: args.callchains,
        guest_kernel_build_id: None,
        guest_kernel_path: Some(kernel.clone()),
        guest_kernel_range: kernel_range,
        guest_user_maps: user_maps,
        cmdline: std::env::args().collect(),
        event,
        ..Default::default()
    }
}

/// The kernel image's upper-half (kernel) range, and its lower-half executable segments as guest user maps: the
/// test guest carries its ring-3 code in the same ELF. Anything unreadable just yields no maps.
fn elf_layout(path: &Path) -> (Option<std::ops::Range<u64>>, Vec<GuestUserMap>) {
    use object::{Object, ObjectSegment};
    let Ok(data) = std::fs::read(path) else {
        return (None, Vec::new());
    };
    let Ok(file) = object::File::parse(&*data) else {
        return (None, Vec::new());
    };
    let mut kernel: Option<std::ops::Range<u64>> = None;
    let mut user = Vec::new();
    for seg in file.segments() {
        let (start, len) = (seg.address(), seg.size());
        if len == 0 {
            continue;
        }
        if start >= 0xffff_8000_0000_0000 {
            let r = kernel.get_or_insert(start..start + len);
            r.start = r.start.min(start);
            r.end = r.end.max(start + len);
        } else if (0x1000..0x0000_8000_0000_0000).contains(&start) {
            let (pgoff, _) = seg.file_range();
            user.push(GuestUserMap {
                start,
                len,
                pgoff,
                path: path.to_path_buf(),
            });
        }
    }
    (kernel, user)
}

fn loss_delta(now: &SampleLoss, before: &SampleLoss) -> SampleLoss {
    SampleLoss {
        queue_full: now.queue_full - before.queue_full,
        idle_ticks: now.idle_ticks - before.idle_ticks,
        ticks_skipped: now.ticks_skipped - before.ticks_skipped,
    }
}

fn progress(samples: u64, loss: &SampleLoss, elapsed: Duration) {
    let rate = samples as f64 / elapsed.as_secs_f64().max(1e-3);
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[ perf-kvm record: {samples} samples, {} lost, {rate:.0} samples/s ]",
        loss.lost()
    );
    let _ = err.flush();
}
