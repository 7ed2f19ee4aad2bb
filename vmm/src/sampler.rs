//! The PMU-free sampler: a timer thread kicks every vCPU at the sampling rate; each vCPU thread, on the resulting
//! exit, reads its synced registers, walks the guest stack through guest memory, and pushes a plain `Sample` into a
//! bounded queue. The vCPU never waits on the consumer: a full queue is counted as loss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::kick::Kicker;
use crate::paging::{read_virt_u64, PagingContext};
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
}

/// Loss counters shared by the vCPU threads and the timer thread.
#[derive(Debug, Default)]
pub struct LossCounters {
    pub queue_full: AtomicU64,
    pub vcpu_not_running: AtomicU64,
    pub ticks_skipped: AtomicU64,
}

impl LossCounters {
    pub fn snapshot(&self) -> SampleLoss {
        SampleLoss {
            queue_full: self.queue_full.load(Ordering::Relaxed),
            vcpu_not_running: self.vcpu_not_running.load(Ordering::Relaxed),
            ticks_skipped: self.ticks_skipped.load(Ordering::Relaxed),
        }
    }
}

/// What a vCPU thread needs to take samples.
pub struct SampleSink {
    pub tx: SyncSender<Sample>,
    pub loss: Arc<LossCounters>,
    pub callchains: bool,
    pub epoch: Instant,
}

impl SampleSink {
    pub fn push(&self, sample: Sample) {
        match self.tx.try_send(sample) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.loss.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            // The consumer is gone (recording stopped): nothing to count against.
            Err(TrySendError::Disconnected(_)) => {}
        }
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

/// Runs the timer: every period, raises each vCPU's sample request and kicks it. Returns when `stop` is set.
/// A vCPU whose previous request is still pending (it is paused or stuck in a long exit) counts as not running.
pub fn run_timer(
    frequency_hz: u32,
    vcpus: Vec<(Arc<SampleRequest>, Kicker)>,
    loss: Arc<LossCounters>,
    stop: Arc<AtomicBool>,
) {
    let period = Duration::from_nanos(1_000_000_000 / frequency_hz.max(1) as u64);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            let behind = ((now - next).as_nanos() / period.as_nanos()) as u64;
            if behind > 0 {
                loss.ticks_skipped
                    .fetch_add(behind * vcpus.len() as u64, Ordering::Relaxed);
                next += period * behind as u32;
            }
        }
        for (req, kicker) in &vcpus {
            if req.raise() {
                kicker.kick();
            } else {
                loss.vcpu_not_running.fetch_add(1, Ordering::Relaxed);
            }
        }
        next += period;
    }
}

/// The consumer's side of a sampling session.
pub struct SampleStream {
    pub rx: Receiver<Sample>,
    pub loss: Arc<LossCounters>,
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
    fn requests_coalesce() {
        let r = SampleRequest::default();
        assert!(r.raise());
        assert!(!r.raise());
        assert!(r.take());
        assert!(!r.take());
    }
}
