//! Sampling guest cycles with the host PMU, as `perf kvm record -e cycles` does: one `perf_event_open` cycles event
//! per vCPU thread, counting only while the thread runs the guest (`exclude_host`), read from its ring buffer and
//! turned into the same [`crate::Sample`]s the PMU-free sampler produces.
//!
//! Whether the host has a PMU is decided by trying to open the event ([`probe_guest_cycles`]); nothing is assumed.
//! The PMU gives the guest's IP and ring only: no callchain and no CR3.

pub mod record;
pub mod ring;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use perf_event_open_sys::bindings as sys;

use crate::sample_queue::{PushOutcome, SampleQueue};
use crate::sampler::{LossCounters, SampleStream};
use record::{parse_record, PmuRecord, Rejected, SampleConverter};
use ring::RingBuffer;

/// Data pages per vCPU ring buffer (128 KiB: ~3,000 samples, 3 s at 1 kHz between two reads).
const DATA_PAGES: usize = 32;
/// How long the reader waits for a wake-up before it looks at every ring anyway.
const POLL_MS: i32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum PmuError {
    #[error(
        "this host has no hardware PMU to sample guest cycles with (perf_event_open(cycles) failed: {errno}); \
         run without -e (or with -e cpu-clock) to use the PMU-free sampler"
    )]
    NoPmu { errno: std::io::Error },
    #[error(
        "perf_event_open(cycles) was refused ({errno}; kernel.perf_event_paranoid = {paranoid}): run as root, \
         give CAP_PERFMON, or `sysctl kernel.perf_event_paranoid=1`; or run without -e to use the PMU-free sampler"
    )]
    Permission {
        errno: std::io::Error,
        paranoid: String,
    },
    #[error(
        "perf_event_open(cycles, {hz} Hz) was rejected as invalid ({errno}): is -F above \
         /proc/sys/kernel/perf_event_max_sample_rate ({max_rate})?"
    )]
    Invalid {
        errno: std::io::Error,
        hz: u32,
        max_rate: String,
    },
    #[error("perf_event_open(cycles) on vCPU {vcpu}'s thread {tid} failed")]
    Open {
        vcpu: usize,
        tid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping the perf ring buffer of vCPU {vcpu} failed (see /proc/sys/kernel/perf_event_mlock_kb)")]
    Map {
        vcpu: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM reported no vCPU thread ids to attach the PMU events to")]
    NoThreads,
    #[error("cannot start the PMU reader thread")]
    Thread(#[source] std::io::Error),
}

fn read_sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// What the events count. Only the unit tests sample anything but guest cycles: the host's own cpu-clock, to
/// exercise the ring buffers against a real kernel on hosts without a PMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    GuestCycles,
    #[cfg(test)]
    HostCpuClock,
}

/// The attribute events are opened with: guest-only CPU cycles, `hz` samples/s, CLOCK_MONOTONIC time stamps.
fn event_attr(kind: EventKind, hz: u32, wakeup_bytes: u32) -> sys::perf_event_attr {
    let (type_, config) = match kind {
        EventKind::GuestCycles => (
            sys::PERF_TYPE_HARDWARE,
            sys::PERF_COUNT_HW_CPU_CYCLES as u64,
        ),
        #[cfg(test)]
        EventKind::HostCpuClock => (sys::PERF_TYPE_SOFTWARE, sys::PERF_COUNT_SW_CPU_CLOCK as u64),
    };
    let mut attr = sys::perf_event_attr {
        type_,
        size: std::mem::size_of::<sys::perf_event_attr>() as u32,
        config,
        sample_type: record::SAMPLE_TYPE,
        clockid: libc::CLOCK_MONOTONIC,
        ..Default::default()
    };
    attr.__bindgen_anon_1.sample_freq = hz as u64;
    attr.__bindgen_anon_2.wakeup_watermark = wakeup_bytes;
    attr.set_freq(1);
    attr.set_disabled(1);
    attr.set_exclude_host((kind == EventKind::GuestCycles) as u64);
    attr.set_sample_id_all(1);
    attr.set_use_clockid(1);
    attr.set_watermark(1);
    attr
}

/// Opens the cycles event on thread `tid` (0: the calling thread), classifying the failures that mean "no PMU"
/// or "not allowed" so the caller can say so in one line.
fn open_cycles(tid: u32, hz: u32, wakeup_bytes: u32) -> Result<OwnedFd, PmuError> {
    open_event(EventKind::GuestCycles, tid, hz, wakeup_bytes)
}

fn open_event(kind: EventKind, tid: u32, hz: u32, wakeup_bytes: u32) -> Result<OwnedFd, PmuError> {
    let mut attr = event_attr(kind, hz, wakeup_bytes);
    // SAFETY: `attr` is a valid, fully initialised perf_event_attr whose size field matches its type; the kernel
    // only reads it (and may write back `size` on E2BIG).
    let fd = unsafe {
        perf_event_open_sys::perf_event_open(
            &mut attr,
            tid as libc::pid_t,
            -1,
            -1,
            sys::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        let errno = std::io::Error::last_os_error();
        return Err(match errno.raw_os_error() {
            Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) => PmuError::NoPmu { errno },
            Some(libc::EACCES | libc::EPERM) => PmuError::Permission {
                errno,
                paranoid: read_sysctl("perf_event_paranoid"),
            },
            Some(libc::EINVAL) => PmuError::Invalid {
                errno,
                hz,
                max_rate: read_sysctl("perf_event_max_sample_rate"),
            },
            _ => PmuError::Open {
                vcpu: 0,
                tid,
                source: errno,
            },
        });
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Tries to open (and closes again) a guest-only cycles sampling event on the calling thread: `Ok` when
/// `perf-kvm record -e cycles` can work on this host, else the reason it cannot.
pub fn probe_guest_cycles() -> Result<(), PmuError> {
    open_cycles(0, 1000, 4096).map(drop)
}

/// One line for `vmm probe`.
pub fn describe_probe(result: &Result<(), PmuError>) -> String {
    match result {
        Ok(()) => "yes (perf-kvm record -e cycles samples guest-only cycles)".into(),
        Err(PmuError::NoPmu { errno }) => format!(
            "no: perf_event_open(cycles) → {errno} (perf-kvm record -e cycles unavailable; the default sampler needs no PMU)"
        ),
        Err(PmuError::Permission { paranoid, .. }) => format!(
            "not allowed: perf_event_paranoid = {paranoid} (root, CAP_PERFMON or paranoid ≤ 1 for -e cycles)"
        ),
        Err(e) => format!("no: {e}"),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PmuConfig {
    pub frequency_hz: u32,
    /// Samples buffered between the reader thread and the consumer.
    pub queue_capacity: usize,
}

struct VcpuEvent {
    fd: OwnedFd,
    ring: RingBuffer,
    /// The thread is gone (POLLHUP): drained one last time, no longer polled.
    closed: bool,
}

/// What the reader saw besides the samples it delivered.
#[derive(Debug, Default)]
pub struct PmuStats {
    /// Samples whose cpumode was the host's (overflows that landed after a VM exit): not guest time, dropped.
    pub host_mode: AtomicU64,
    /// Records that did not parse, and ring walks cut short by a bad record size.
    pub malformed: AtomicU64,
    /// Times the kernel throttled an event (too many interrupts per second; lower -F).
    pub throttled: AtomicU64,
}

/// A running PMU sampling session over a VM's vCPU threads. Dropping it (or [`PmuSession::stop`]) stops the
/// events, drains their rings into the stream one last time and closes them.
pub struct PmuSession {
    stats: Arc<PmuStats>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl PmuSession {
    /// Opens one event per vCPU thread (`vcpu_tids[i]` is vCPU `i`'s host thread id) and starts the reader.
    /// The stream ends (its channel disconnects) when every vCPU thread has exited or the session stops.
    pub fn start(
        vcpu_tids: &[u32],
        cfg: PmuConfig,
    ) -> Result<(PmuSession, SampleStream), PmuError> {
        Self::start_event(EventKind::GuestCycles, vcpu_tids, cfg)
    }

    fn start_event(
        kind: EventKind,
        vcpu_tids: &[u32],
        cfg: PmuConfig,
    ) -> Result<(PmuSession, SampleStream), PmuError> {
        if vcpu_tids.is_empty() {
            return Err(PmuError::NoThreads);
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32;
        let wakeup = page * DATA_PAGES as u32 / 2;
        let base_time_ns = monotonic_ns();
        let mut events = Vec::new();
        for (vcpu, &tid) in vcpu_tids.iter().enumerate() {
            let fd = open_event(kind, tid, cfg.frequency_hz, wakeup).map_err(|e| match e {
                PmuError::Open { tid, source, .. } => PmuError::Open { vcpu, tid, source },
                other => other,
            })?;
            let ring = RingBuffer::map(&fd, DATA_PAGES)
                .map_err(|source| PmuError::Map { vcpu, source })?;
            events.push(VcpuEvent {
                fd,
                ring,
                closed: false,
            });
        }
        for ev in &events {
            // SAFETY: ENABLE on a perf event fd we own; the argument is unused.
            unsafe { perf_event_open_sys::ioctls::ENABLE(ev.fd.as_raw_fd(), 0) };
        }
        let (queue, rx) = SampleQueue::new(cfg.queue_capacity);
        let loss = Arc::new(LossCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let converter = SampleConverter::new(vcpu_tids, base_time_ns);
        let stats = Arc::new(PmuStats::default());
        let delivery = Delivery {
            converter,
            queue,
            loss: loss.clone(),
            stats: stats.clone(),
            consumer_gone: false,
        };
        let s = stop.clone();
        let reader = std::thread::Builder::new()
            .name("pmu-reader".into())
            .spawn(move || read_loop(events, delivery, s))
            .map_err(PmuError::Thread)?;
        Ok((
            PmuSession {
                stats,
                stop,
                reader: Some(reader),
            },
            SampleStream { rx, loss },
        ))
    }

    pub fn stats(&self) -> Arc<PmuStats> {
        self.stats.clone()
    }

    /// Stops the events; samples still in their rings reach the stream before it ends.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for PmuSession {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Drop for Delivery {
    /// The reader thread is done: the consumer reads what is queued, then sees the end.
    fn drop(&mut self) {
        self.queue.close_producers();
    }
}

/// Where the records of the rings go: samples to the consumer, the rest into the loss counters.
struct Delivery {
    converter: SampleConverter,
    queue: Arc<SampleQueue>,
    loss: Arc<LossCounters>,
    stats: Arc<PmuStats>,
    consumer_gone: bool,
}

impl Delivery {
    fn record(&mut self, bytes: &[u8]) {
        match parse_record(bytes) {
            Ok(PmuRecord::Sample(raw)) => match self.converter.convert(&raw) {
                Ok(sample) => match self.queue.push(sample) {
                    PushOutcome::Queued => {}
                    PushOutcome::Full => {
                        self.loss.queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    PushOutcome::Closed => self.consumer_gone = true,
                },
                Err(Rejected::HostMode | Rejected::UnknownThread(_)) => {
                    self.stats.host_mode.fetch_add(1, Ordering::Relaxed);
                }
            },
            // The kernel's ring was full: samples owed and not delivered.
            Ok(PmuRecord::Lost(n)) => {
                self.loss.queue_full.fetch_add(n, Ordering::Relaxed);
            }
            Ok(PmuRecord::Throttle) => {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(PmuRecord::Other(_)) => {}
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn read_loop(mut events: Vec<VcpuEvent>, mut delivery: Delivery, stop: Arc<AtomicBool>) {
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping {
            for ev in &events {
                // SAFETY: DISABLE on a perf event fd we own; the argument is unused.
                unsafe { perf_event_open_sys::ioctls::DISABLE(ev.fd.as_raw_fd(), 0) };
            }
        }
        let mut fds: Vec<libc::pollfd> = events
            .iter()
            .map(|ev| libc::pollfd {
                // A negative fd is skipped by poll: threads that exited hang up forever.
                fd: if ev.closed { -1 } else { ev.fd.as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if !stopping {
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        }
        for (ev, pfd) in events.iter_mut().zip(&fds) {
            // A bad record drops the rest of that ring; the next read starts clean at the head.
            if ev.ring.drain(|rec| delivery.record(rec)).is_err() {
                delivery.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
            if pfd.revents & libc::POLLHUP != 0 {
                ev.closed = true;
            }
        }
        delivery.queue.nudge();
        if stopping || delivery.consumer_gone || events.iter().all(|ev| ev.closed) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_asks_for_guest_only_cycles_with_the_parsed_layout() {
        let attr = event_attr(EventKind::GuestCycles, 1000, 4096);
        assert_eq!(attr.type_, sys::PERF_TYPE_HARDWARE);
        assert_eq!(attr.config, sys::PERF_COUNT_HW_CPU_CYCLES as u64);
        assert_eq!(attr.sample_type, record::SAMPLE_TYPE);
        assert_eq!(attr.exclude_host(), 1);
        assert_eq!(attr.exclude_guest(), 0);
        assert_eq!(attr.freq(), 1);
        // SAFETY: reading the union member we wrote.
        assert_eq!(unsafe { attr.__bindgen_anon_1.sample_freq }, 1000);
    }

    /// The whole path (open, mmap, poll, ring walk, record parsing, conversion) against this kernel, with the
    /// host's cpu-clock on a spinning thread standing in for guest cycles: every sample arrives in host mode, so it
    /// is counted as such rather than delivered, and none may be malformed.
    #[test]
    fn real_ring_buffer_delivers_parseable_records() {
        let spin_stop = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let flag = spin_stop.clone();
        let spinner = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        });
        let tid = tid_rx.recv().unwrap();
        let cfg = PmuConfig {
            frequency_hz: 1000,
            queue_capacity: 1024,
        };
        let (session, stream) = PmuSession::start_event(EventKind::HostCpuClock, &[tid], cfg)
            .expect("perf_event_open(cpu-clock) on a thread of our own");
        let stats = session.stats();
        // Generous: on a loaded 2-core host the spinner may get little CPU; 20 ms of it is enough.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while stats.host_mode.load(Ordering::Relaxed) < 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        session.stop();
        spin_stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        assert!(stats.host_mode.load(Ordering::Relaxed) >= 20, "{stats:?}");
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
        assert!(
            stream.rx.try_recv().is_err(),
            "a host-mode sample must not pass as a guest sample"
        );
    }
}
