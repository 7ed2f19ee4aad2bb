//! `perf-kvm top`: a live view of the hottest guest symbols (ratatui), or periodic text tables with `--stdio`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use perf_kvm::stat::in_process::AnySource;
use perf_kvm::stat::source::VmSource;
use perf_kvm::top::model::{TopModel, VcpuView};
use perf_kvm::top::terminal::TerminalGuard;
use perf_kvm::top::text;
use perf_kvm::top::ui::{self, KeyOutcome, UiState};
use ratatui::crossterm::event::{self, Event};
use vmm::sampler::SamplerConfig;
use vmm::Sample;

use crate::vm_source;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Guest kernel ELF for symbols (default: the VM's kernel image).
    #[arg(long = "guest-vmlinux")]
    guest_vmlinux: Option<PathBuf>,
    /// Sampling frequency per vCPU, in Hz.
    #[arg(short = 'F', long = "freq", default_value_t = 1000)]
    freq: u32,
    /// Record callchains, for the callers view (Enter).
    #[arg(short = 'g')]
    callchains: bool,
    /// Print a text table every --delay seconds instead of the interactive screen.
    #[arg(long)]
    stdio: bool,
    /// Seconds between `--stdio` tables.
    #[arg(short = 'd', long = "delay", default_value_t = 2.0)]
    delay: f64,
    /// Rows per `--stdio` table.
    #[arg(long = "rows", default_value_t = 20)]
    rows: usize,
    /// Stop after this many seconds (default: q, Ctrl-C, or the VM's end with --stdio).
    #[arg(long)]
    duration: Option<f64>,
    /// Attach to a running VM's control socket.
    #[arg(long = "vm")]
    vm: Option<PathBuf>,
    /// Start the VM in-process: `-- run --kernel PATH [--cmdline ...] [--cpus N] ...`.
    #[arg(last = true)]
    vmm_args: Vec<String>,
}

/// Same bound as `record`: kicks saturate near 15-20k exits/s on PVM.
const MAX_FREQ: u32 = 50_000;
/// Samples taken from the queue per batch; between batches the loop checks keys and the clock.
const BATCH: usize = 4096;
/// Longest stretch spent draining samples before keys and frames get a turn.
const DRAIN_BUDGET: Duration = Duration::from_millis(30);
const FRAME_INTERVAL: Duration = Duration::from_millis(200);
const TICK: Duration = Duration::from_secs(1);

pub fn run(args: TopArgs) -> anyhow::Result<i32> {
    if args.freq == 0 || args.freq > MAX_FREQ {
        anyhow::bail!("-F must be between 1 and {MAX_FREQ} Hz (got {})", args.freq);
    }
    if !(args.delay.is_finite() && (0.1..=3600.0).contains(&args.delay)) {
        anyhow::bail!(
            "-d must be between 0.1 and 3600 seconds (got {})",
            args.delay
        );
    }
    vm_source::install_interrupt_handlers();
    // Refuse before booting anything when there is no terminal to draw on.
    let guard = if args.stdio {
        None
    } else {
        Some(TerminalGuard::enter()?)
    };
    let console = LastLine::default();
    let serial: vmm::devices::SerialOut = if args.stdio {
        Box::new(std::io::stderr())
    } else {
        Box::new(console.clone())
    };
    let sampler = SamplerConfig {
        frequency_hz: args.freq,
        callchains: args.callchains,
        queue_capacity: 1 << 16,
        kick_only: false,
    };
    let mut source = AnySource::open(args.vm.as_deref(), &args.vmm_args, Some(sampler), serial)?;
    let mut pump = Pump::new();
    let mut symbol_warning = None;
    let outcome =
        symbol_model(&args, &source, &mut symbol_warning).and_then(|mut model| match guard {
            Some(guard) => run_tui(
                guard,
                &args,
                &mut source,
                &mut model,
                &mut pump,
                &console,
                symbol_warning,
            ),
            None => {
                if let Some(w) = symbol_warning {
                    eprintln!("perf-kvm top: {w}");
                }
                run_stdio(&args, &mut source, &mut model, &mut pump)
            }
        });
    // After the screen is restored: what was taken and what was lost, by cause.
    let loss = source.sample_loss();
    if outcome.is_ok() {
        eprintln!(
            "[ perf-kvm top: {} samples; lost: {} queue full, {} ticks skipped; {} idle ticks ]",
            pump.samples, loss.queue_full, loss.ticks_skipped, loss.idle_ticks
        );
    }
    if let Some(end) = source.finish() {
        vm_source::report_end(&end);
    }
    outcome.map(|_| 0)
}

/// Moves queued samples into the model and, once a second, decays it and reads the exit counters.
struct Pump {
    buf: Vec<Sample>,
    last_tick: Instant,
    stream_open: bool,
    /// Samples taken since the start (the model's count restarts at `z`).
    samples: u64,
}

impl Pump {
    fn new() -> Pump {
        Pump {
            buf: Vec::with_capacity(BATCH),
            last_tick: Instant::now(),
            stream_open: true,
            samples: 0,
        }
    }

    fn run(&mut self, source: &mut AnySource, model: &mut TopModel) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.stream_open {
            self.buf.clear();
            self.stream_open = source
                .drain_samples(&mut self.buf, BATCH)
                .context("reading samples")?;
            for s in &self.buf {
                model.add(s);
            }
            self.samples += self.buf.len() as u64;
            if self.buf.len() < BATCH || started.elapsed() >= DRAIN_BUDGET {
                break;
            }
        }
        let dt = self.last_tick.elapsed();
        if dt >= TICK {
            self.last_tick = Instant::now();
            model.tick(dt.as_secs_f64());
            model.set_loss(source.sample_loss());
            if let Ok(stats) = source.exit_stats(false) {
                model.observe_exits(&stats, dt.as_secs_f64());
            }
        }
        Ok(())
    }
}

fn deadline(args: &TopArgs) -> Option<Instant> {
    args.duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.clamp(0.0, 1e9)))
}

/// The model with symbols from --guest-vmlinux (which must load) or else the VM's kernel image, when that is an
/// ELF: a bzImage has no symbols, so top then shows addresses and says why.
fn symbol_model(
    args: &TopArgs,
    source: &AnySource,
    warning: &mut Option<String>,
) -> anyhow::Result<TopModel> {
    let vcpus = source.vcpu_count();
    match (&args.guest_vmlinux, source.guest_kernel()) {
        (Some(path), _) => Ok(TopModel::new(Some(path), vcpus)?),
        (None, Some(kernel)) => Ok(TopModel::new(Some(&kernel), vcpus).or_else(|e| {
            *warning = Some(format!(
                "{:#}; showing addresses (give --guest-vmlinux PATH for symbols)",
                anyhow::Error::from(e)
            ));
            TopModel::new(None, vcpus)
        })?),
        (None, None) => Ok(TopModel::new(None, vcpus)?),
    }
}

fn run_tui(
    mut guard: TerminalGuard,
    args: &TopArgs,
    source: &mut AnySource,
    model: &mut TopModel,
    pump: &mut Pump,
    console: &LastLine,
    symbol_warning: Option<String>,
) -> anyhow::Result<()> {
    let mut ui_state = UiState::new(args.freq);
    ui_state.notice = symbol_warning;
    let deadline = deadline(args);
    let mut next_frame = Instant::now();
    let mut end_noted = false;
    loop {
        pump.run(source, model)?;
        if !end_noted && source.has_ended() && !pump.stream_open {
            end_noted = true;
            let last = console.last();
            ui_state.notice = Some(if last.is_empty() {
                "The VM has ended.".to_string()
            } else {
                format!("The VM has ended. Guest: {last}")
            });
        }
        if vm_source::interrupted() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // Frames are dropped, never samples: drawing happens at most every FRAME_INTERVAL.
        if Instant::now() >= next_frame {
            guard
                .terminal
                .draw(|f| ui::draw(f, model, &mut ui_state))
                .context("drawing")?;
            next_frame = Instant::now() + FRAME_INTERVAL;
        }
        if event::poll(Duration::from_millis(20)).context("reading the terminal")? {
            match event::read().context("reading the terminal")? {
                Event::Key(key) => {
                    // A start-up warning gives way to the key hints; the VM's end stays on screen.
                    if !end_noted {
                        ui_state.notice = None;
                    }
                    if ui_state.handle_key(key, model) == KeyOutcome::Quit {
                        break;
                    }
                    next_frame = Instant::now();
                }
                Event::Resize(..) => next_frame = Instant::now(),
                _ => {}
            }
        }
    }
    drop(guard);
    Ok(())
}

fn run_stdio(
    args: &TopArgs,
    source: &mut AnySource,
    model: &mut TopModel,
    pump: &mut Pump,
) -> anyhow::Result<()> {
    let deadline = deadline(args);
    let period = Duration::from_secs_f64(args.delay);
    let mut next_print = Instant::now() + period;
    loop {
        pump.run(source, model)?;
        let ended = source.has_ended() && !pump.stream_open;
        let stop =
            ended || vm_source::interrupted() || deadline.is_some_and(|d| Instant::now() >= d);
        if Instant::now() >= next_print || stop {
            let header = text::header_line(
                &model.header(VcpuView::All),
                args.freq,
                VcpuView::All,
                model.vcpu_count(),
            );
            let rows = model.rows(VcpuView::All, "", perf_kvm::top::model::TopSort::Overhead);
            let table = text::table(&header, &rows, args.rows, model.exit_reasons());
            let mut out = std::io::stdout().lock();
            // A closed pipe ends the output quietly, like `perf top --stdio | head`.
            if out
                .write_all(table.as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush())
                .is_err()
            {
                break;
            }
            next_print += period;
        }
        if stop {
            if ended {
                eprintln!("perf-kvm top: the VM has ended");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The guest's console while the TUI owns the screen: only its last complete line is kept, for the status line.
#[derive(Clone, Default)]
struct LastLine {
    inner: Arc<Mutex<(Vec<u8>, String)>>,
}

impl LastLine {
    fn last(&self) -> String {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

impl Write for LastLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (partial, last) = &mut *guard;
        for &b in buf {
            match b {
                b'\n' => {
                    *last = String::from_utf8_lossy(partial).trim_end().to_string();
                    partial.clear();
                }
                _ if partial.len() < 512 => partial.push(b),
                _ => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
