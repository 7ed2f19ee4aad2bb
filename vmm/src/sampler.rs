//! The PMU-free sampler: a timer thread kicks every vCPU at the sampling rate; each vCPU thread, on the resulting
//! exit, reads its synced registers, walks the guest stack through guest memory, and pushes a plain `Sample` into a
//! bounded queue. The vCPU never waits on the consumer: a full queue is counted as loss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::kick::Kicker;
use crate::paging::{read_virt, read_virt_u64, PagingContext};
use crate::sample_queue::{PushOutcome, SampleQueue, SampleReceiver};
use crate::{Sample, SampleLoss};

/// Deepest callchain recorded (perf's default max stack is 127).
pub const MAX_CALLCHAIN: usize = 127;
/// A frame pointer that jumps more than this is treated as garbage.
const MAX_FRAME_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    pub frequency_hz: u32,
    pub callchains: bool,
    /// Samples buffered between the vCPUs and the consumer.
    pub queue_capacity: usize,
    /// Kick the vCPUs but read nothing and record nothing: the bare cost of the forced exits, for benchmarks.
    pub kick_only: bool,
}

/// Loss counters shared by the vCPU threads and the timer thread.
#[derive(Debug, Default)]
pub struct LossCounters {
    pub queue_full: AtomicU64,
    pub idle_ticks: AtomicU64,
    pub ticks_skipped: AtomicU64,
}

impl LossCounters {
    pub fn snapshot(&self) -> SampleLoss {
        SampleLoss {
            queue_full: self.queue_full.load(Ordering::Relaxed),
            idle_ticks: self.idle_ticks.load(Ordering::Relaxed),
            ticks_skipped: self.ticks_skipped.load(Ordering::Relaxed),
        }
    }
}

/// What a vCPU thread needs to take samples.
pub struct SampleSink {
    pub queue: Arc<SampleQueue>,
    pub loss: Arc<LossCounters>,
    pub callchains: bool,
    pub epoch: Instant,
    /// CPU time per sample (1 / frequency).
    pub period_ns: u64,
    pub kick_only: bool,
}

impl SampleSink {
    pub fn push(&self, sample: Sample) {
        match self.queue.push(sample) {
            PushOutcome::Queued => {}
            PushOutcome::Full => {
                self.loss.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            // The consumer is gone (recording stopped): nothing to count against.
            PushOutcome::Closed => {}
        }
    }
}

impl Drop for SampleSink {
    /// The last vCPU thread let go of the session: the consumer reads what is queued, then sees the end.
    fn drop(&mut self) {
        self.queue.close_producers();
    }
}

/// CPU time of the calling thread, in nanoseconds (guest execution inside KVM_RUN counts as the thread's).
pub fn thread_cpu_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Turns kicks into samples by CPU time: each kick credits the CPU time the vCPU thread used since the previous one,
/// and one sample is owed per full period of credit. A halted or descheduled vCPU earns nothing, so it is not
/// sampled, exactly as perf's cpu-clock would not sample it. A vCPU that could not be interrupted for several periods
/// (inside KVM's instruction emulator, say) owes several samples at the RIP where it stopped, as perf's cpu-clock
/// would weight one sample by its period; the burst is capped so a long stall does not swamp the profile.
#[derive(Debug, Default)]
pub struct CpuTimeCredit {
    last_ns: Option<u64>,
    /// May go negative by up to half a period: a sample taken on rounding is paid back by the next kick.
    credit_ns: i64,
    /// CPU time beyond the cap, not yet counted as lost periods.
    capped_ns: u64,
    /// Periods of CPU time the cap discarded since the last `take_capped`: samples owed and lost.
    capped: u64,
}

/// Most samples one kick may owe.
pub const MAX_SAMPLES_PER_KICK: i64 = 16;

impl CpuTimeCredit {
    /// Adds the CPU time used up to `now_ns`; returns how many samples are due (and consumes their periods).
    pub fn due(&mut self, now_ns: u64, period_ns: u64) -> u32 {
        let period = period_ns.max(1) as i64;
        let used = self.last_ns.map_or(0, |last| now_ns.saturating_sub(last)) as i64;
        self.last_ns = Some(now_ns);
        let cap = MAX_SAMPLES_PER_KICK * period;
        let credit = self.credit_ns + used;
        if credit > cap {
            self.capped_ns += (credit - cap) as u64;
            self.capped += self.capped_ns / period as u64;
            self.capped_ns %= period as u64;
        }
        self.credit_ns = credit.min(cap);
        // Round to the nearest period: kicks arrive a little late or early, never exactly on the period.
        let owed = ((self.credit_ns + period / 2) / period).max(0);
        self.credit_ns -= owed * period;
        owed as u32
    }

    /// Samples the burst cap discarded since the previous call (owed by CPU time, never taken): losses.
    pub fn take_capped(&mut self) -> u64 {
        std::mem::take(&mut self.capped)
    }
}

/// Per-vCPU flag the timer sets and the vCPU thread consumes.
#[derive(Debug, Default)]
pub struct SampleRequest(AtomicBool);

impl SampleRequest {
    pub fn raise(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

/// The callchain of a sample at `rip`: the caller's return address where RIP sits on a function boundary whose
/// frame pointer does not name this function yet (or any more), then the saved frame pointers from `rbp`.
///
/// At a function's `push %rbp`, at its `mov %rsp,%rbp`, and at its `ret`, rbp still (or again) holds the caller's
/// frame, so a plain walk skips the direct caller; the return address is on the stack at [rsp] (or [rsp+8] after
/// the push). Frequent under QEMU's TCG, which delivers interrupts at translation-block starts such as function
/// entries: in the SVM lane 8% of `kernel_leaf` samples lost `kernel_stage2` this way.
pub fn walk_callchain(
    mem: &GuestMemoryMmap,
    ctx: &PagingContext,
    (rip, rsp, rbp): (u64, u64, u64),
    max_depth: usize,
) -> Vec<u64> {
    let mut code = [0u8; 3];
    let n = read_virt(mem, ctx, rip, &mut code);
    let return_slot = match &code[..n] {
        [0x55, ..] | [0xc3, ..] => Some(rsp), // push %rbp / ret
        [0x48, 0x89, 0xe5] => Some(rsp.wrapping_add(8)), // mov %rsp,%rbp just after the push
        _ => None,
    };
    let caller = return_slot
        .and_then(|at| read_virt_u64(mem, ctx, at))
        .filter(|&ret| ret != 0);
    let mut chain: Vec<u64> = caller.into_iter().take(max_depth).collect();
    chain.extend(walk_frame_pointers(mem, ctx, rbp, max_depth - chain.len()));
    chain
}

/// Walks saved frame pointers from `rbp`: each frame holds the caller's rbp at [rbp] and the return address at
/// [rbp+8]. Every read is checked; a frame that is unreadable, misaligned, or not strictly above the previous one
/// (stacks grow down) ends the chain.
pub fn walk_frame_pointers(
    mem: &GuestMemoryMmap,
    ctx: &PagingContext,
    rbp: u64,
    max_depth: usize,
) -> Vec<u64> {
    let mut chain = Vec::new();
    let mut frame = rbp;
    while chain.len() < max_depth {
        if frame == 0 || !frame.is_multiple_of(8) {
            break;
        }
        let (Some(next), Some(ret)) = (
            read_virt_u64(mem, ctx, frame),
            read_virt_u64(mem, ctx, frame.wrapping_add(8)),
        ) else {
            break;
        };
        if ret == 0 {
            break;
        }
        chain.push(ret);
        if next <= frame || next - frame > MAX_FRAME_SIZE {
            break;
        }
        frame = next;
    }
    chain
}

/// How often the timer wakes the consumer to drain the queue (the consumer is never woken per sample).
const CONSUMER_NUDGE: Duration = Duration::from_millis(20);

/// Runs the timer: every period, raises each vCPU's sample request and kicks it. Returns when `stop` is set.
/// A vCPU whose previous request is still pending (it is paused or stuck in a long exit) counts as not running.
pub fn run_timer(
    frequency_hz: u32,
    vcpus: Vec<(Arc<SampleRequest>, Kicker)>,
    loss: Arc<LossCounters>,
    queue: Arc<SampleQueue>,
    stop: Arc<AtomicBool>,
) {
    let period = Duration::from_nanos(1_000_000_000 / frequency_hz.max(1) as u64);
    let mut next = Instant::now() + period;
    let mut last_nudge = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_nudge.elapsed() >= CONSUMER_NUDGE {
            queue.nudge();
            last_nudge = Instant::now();
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Ticks the timer is behind are not lost: the vCPU's CPU-time credit owes their samples at the next
            // kick, and what exceeds the burst cap there is counted as lost by the vCPU.
            let behind = ((now - next).as_nanos() / period.as_nanos()) as u64;
            if behind > 0 {
                next += period * behind as u32;
            }
        }
        for (req, kicker) in &vcpus {
            if req.raise() {
                kicker.kick();
            } else {
                loss.idle_ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
        next += period;
    }
}

/// The consumer's side of a sampling session. Dropping it (or `VmControl::stop_sampling`) ends the session.
pub struct SampleStream {
    pub rx: SampleReceiver,
    pub loss: Arc<LossCounters>,
}

/// Where vCPU threads find the current sampling session, if any. Sessions start and stop while the VM runs.
#[derive(Default)]
pub struct SamplingSlot {
    sink: std::sync::Mutex<Option<Arc<SampleSink>>>,
}

impl SamplingSlot {
    pub fn current(&self) -> Option<Arc<SampleSink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set(&self, sink: Option<Arc<SampleSink>>) -> Option<Arc<SampleSink>> {
        std::mem::replace(
            &mut *self.sink.lock().unwrap_or_else(|e| e.into_inner()),
            sink,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("a sampling session is already running on this VM")]
    Busy,
    #[error("sampling frequency must be between 1 and {max} Hz (got {got})")]
    Frequency { got: u32, max: u32 },
    #[error("cannot start the sampler thread")]
    Thread(#[source] std::io::Error),
}

/// Highest sampling rate accepted. Kicks saturate near 15-20k exits/s on PVM hosts; far beyond that nothing is
/// gained anywhere.
pub const MAX_FREQUENCY_HZ: u32 = 50_000;

/// A running session: the timer thread and the slot it filled.
pub struct SamplingSession {
    stop: Arc<AtomicBool>,
    timer: Option<std::thread::JoinHandle<()>>,
}

impl SamplingSession {
    /// Fills the slot and starts the timer over `vcpus`.
    pub fn start(
        slot: &SamplingSlot,
        cfg: SamplerConfig,
        epoch: Instant,
        vcpus: Vec<(Arc<SampleRequest>, Kicker)>,
    ) -> Result<(SamplingSession, SampleStream), SamplerError> {
        if cfg.frequency_hz == 0 || cfg.frequency_hz > MAX_FREQUENCY_HZ {
            return Err(SamplerError::Frequency {
                got: cfg.frequency_hz,
                max: MAX_FREQUENCY_HZ,
            });
        }
        let (queue, rx) = SampleQueue::new(cfg.queue_capacity);
        let loss = Arc::new(LossCounters::default());
        let sink = Arc::new(SampleSink {
            queue: queue.clone(),
            loss: loss.clone(),
            callchains: cfg.callchains,
            epoch,
            period_ns: 1_000_000_000 / cfg.frequency_hz as u64,
            kick_only: cfg.kick_only,
        });
        {
            let mut guard = slot.sink.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_some() {
                return Err(SamplerError::Busy);
            }
            *guard = Some(sink);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (loss.clone(), stop.clone());
        let timer = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || run_timer(cfg.frequency_hz, vcpus, l, queue, s))
            .map_err(|e| {
                slot.set(None);
                SamplerError::Thread(e)
            })?;
        Ok((
            SamplingSession {
                stop,
                timer: Some(timer),
            },
            SampleStream { rx, loss },
        ))
    }

    /// Stops the timer and empties the slot; samples already queued stay readable from the stream.
    pub fn stop(mut self, slot: &SamplingSlot) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        slot.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn frame_walk_follows_chain_and_stops_on_garbage() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ctx = PagingContext::default(); // paging off: identity
                                            // Frames at 0x8000 → 0x8100 → 0x8200 → (0x100: goes down) stop.
        let frames = [
            (0x8000u64, 0x8100u64, 0x1111u64),
            (0x8100, 0x8200, 0x2222),
            (0x8200, 0x100, 0x3333),
        ];
        for (at, next, ret) in frames {
            mem.write_obj(next, GuestAddress(at)).unwrap();
            mem.write_obj(ret, GuestAddress(at + 8)).unwrap();
        }
        assert_eq!(
            walk_frame_pointers(&mem, &ctx, 0x8000, 127),
            vec![0x1111, 0x2222, 0x3333]
        );
        assert_eq!(
            walk_frame_pointers(&mem, &ctx, 0x8000, 2),
            vec![0x1111, 0x2222]
        );
        assert!(walk_frame_pointers(&mem, &ctx, 0x8001, 127).is_empty());
        assert!(walk_frame_pointers(&mem, &ctx, 0xffff_fff0, 127).is_empty());
        // A cycle (frame points to itself) ends after one frame.
        mem.write_obj(0x9000u64, GuestAddress(0x9000)).unwrap();
        mem.write_obj(0x4444u64, GuestAddress(0x9008)).unwrap();
        assert_eq!(walk_frame_pointers(&mem, &ctx, 0x9000, 127), vec![0x4444]);
    }

    #[test]
    fn callchain_at_a_function_boundary_keeps_the_direct_caller() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ctx = PagingContext::default();
        // The caller's frame at 0x8000 (its caller returns to 0x2222); the call pushed return address 0x1111.
        mem.write_obj(0x8100u64, GuestAddress(0x8000)).unwrap();
        mem.write_obj(0x2222u64, GuestAddress(0x8008)).unwrap();
        mem.write_obj(0x1111u64, GuestAddress(0x7000)).unwrap();
        let code = [0x55u8, 0x48, 0x89, 0xe5, 0x90, 0xc3];
        mem.write_slice(&code, GuestAddress(0x4000)).unwrap();
        // At `push %rbp` and at `ret`: return address at [rsp].
        assert_eq!(
            walk_callchain(&mem, &ctx, (0x4000, 0x7000, 0x8000), 127),
            vec![0x1111, 0x2222]
        );
        assert_eq!(
            walk_callchain(&mem, &ctx, (0x4005, 0x7000, 0x8000), 127),
            vec![0x1111, 0x2222]
        );
        // At `mov %rsp,%rbp`: the saved rbp is at [rsp], the return address above it.
        mem.write_obj(0x8000u64, GuestAddress(0x6ff8)).unwrap();
        assert_eq!(
            walk_callchain(&mem, &ctx, (0x4001, 0x6ff8, 0x8000), 127),
            vec![0x1111, 0x2222]
        );
        // Inside the body the frame pointer is the function's own: the plain walk.
        assert_eq!(
            walk_callchain(&mem, &ctx, (0x4004, 0x6ff0, 0x8000), 127),
            vec![0x2222]
        );
        // The depth limit holds.
        assert_eq!(
            walk_callchain(&mem, &ctx, (0x4000, 0x7000, 0x8000), 1),
            vec![0x1111]
        );
    }

    #[test]
    fn cpu_time_credit_samples_busy_vcpus_only() {
        let mut c = CpuTimeCredit::default();
        let p = 1_000_000;
        assert_eq!(c.due(0, p), 0, "first kick only starts the clock");
        assert_eq!(c.due(p, p), 1, "a full period of CPU time owes a sample");
        assert_eq!(c.due(p + 10_000, p), 0, "an idle vCPU owes nothing");
        assert_eq!(c.due(p + 20_000, p), 0);
        // Half-busy: one sample every other kick.
        let mut t = p + 20_000;
        let mut samples = 0;
        for _ in 0..100 {
            t += p / 2;
            samples += c.due(t, p);
        }
        assert!((49..=51).contains(&samples), "{samples}");
        // Three periods without a chance to sample owe three; a long stall is capped.
        t += 3 * p;
        assert_eq!(c.due(t, p), 3);
        t += 100 * p;
        assert_eq!(c.due(t, p), MAX_SAMPLES_PER_KICK as u32);
        assert_eq!(c.due(t, p), 0);
        assert_eq!(
            c.take_capped(),
            100 + 3 - 3 - MAX_SAMPLES_PER_KICK as u64,
            "what the cap discards is counted"
        );
        assert_eq!(c.take_capped(), 0);
    }

    #[test]
    fn requests_coalesce() {
        let r = SampleRequest::default();
        assert!(r.raise());
        assert!(!r.raise());
        assert!(r.take());
        assert!(!r.take());
    }
}
