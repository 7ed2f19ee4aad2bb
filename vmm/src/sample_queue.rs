//! The bounded queue between the vCPU threads (producers) and the one sample consumer.
//!
//! A channel that wakes its receiver on every send costs the vCPU thread a futex wake, and usually a cross-CPU
//! wakeup, per sample: on a VM host that was most of what full sampling cost beyond the forced exit itself at
//! 10 kHz. Like perf's ring buffer with a wakeup watermark, producers here only take an uncontended lock and append;
//! the consumer is woken when the queue reaches a watermark, or by the sampler's timer thread (`nudge`) a few
//! times per second, or when every producer is gone. The receiver mirrors `std::sync::mpsc::Receiver`'s
//! `recv_timeout`/`try_recv` so consumers read it the same way.

use std::collections::VecDeque;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Sample;

/// Queued samples that wake a waiting consumer without waiting for the timer's nudge.
const WAKEUP_WATERMARK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    /// The queue is at capacity: the sample is dropped and must be counted as lost.
    Full,
    /// The consumer is gone: nothing is listening, nothing to count.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Sample>,
    consumer_waiting: bool,
    producers_gone: bool,
    consumer_gone: bool,
}

#[derive(Debug)]
pub struct SampleQueue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
}

impl SampleQueue {
    /// A queue holding at most `capacity` samples, and its receiving end.
    pub fn new(capacity: usize) -> (Arc<SampleQueue>, SampleReceiver) {
        let queue = Arc::new(SampleQueue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        });
        let rx = SampleReceiver {
            queue: queue.clone(),
        };
        (queue, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a sample without blocking (beyond a short lock) and, except at the watermark, without a syscall.
    pub fn push(&self, sample: Sample) -> PushOutcome {
        let mut st = self.lock();
        if st.consumer_gone {
            return PushOutcome::Closed;
        }
        if st.items.len() >= self.capacity {
            return PushOutcome::Full;
        }
        st.items.push_back(sample);
        let wake = st.consumer_waiting && st.items.len() >= WAKEUP_WATERMARK.min(self.capacity);
        drop(st);
        if wake {
            self.ready.notify_one();
        }
        PushOutcome::Queued
    }

    /// Wakes a waiting consumer if anything is queued; the sampler's timer calls it a few times per second.
    pub fn nudge(&self) {
        let st = self.lock();
        let wake = st.consumer_waiting && !st.items.is_empty();
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Every producer is gone: the consumer reads what is left, then sees the end.
    pub fn close_producers(&self) {
        self.lock().producers_gone = true;
        self.ready.notify_all();
    }
}

/// The consumer's end. Dropping it makes further pushes `Closed`.
#[derive(Debug)]
pub struct SampleReceiver {
    queue: Arc<SampleQueue>,
}

impl SampleReceiver {
    /// The next sample, waiting up to `timeout`; `Disconnected` once the producers are gone and the queue is empty.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Sample, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.queue.lock();
        loop {
            if let Some(s) = st.items.pop_front() {
                return Ok(s);
            }
            if st.producers_gone {
                return Err(RecvTimeoutError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            st.consumer_waiting = true;
            let (guard, _) = self
                .queue
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.consumer_waiting = false;
        }
    }

    pub fn try_recv(&self) -> Result<Sample, TryRecvError> {
        let mut st = self.queue.lock();
        match st.items.pop_front() {
            Some(s) => Ok(s),
            None if st.producers_gone => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl Drop for SampleReceiver {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.consumer_gone = true;
        st.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMode;

    fn sample(rip: u64) -> Sample {
        Sample {
            time_ns: rip,
            vcpu: 0,
            rip,
            mode: GuestMode::User,
            cr3: 0,
            callchain: Vec::new(),
            period: None,
        }
    }

    #[test]
    fn fifo_capacity_and_end() {
        let (q, rx) = SampleQueue::new(2);
        assert_eq!(q.push(sample(1)), PushOutcome::Queued);
        assert_eq!(q.push(sample(2)), PushOutcome::Queued);
        assert_eq!(q.push(sample(3)), PushOutcome::Full);
        assert_eq!(rx.try_recv().unwrap().rip, 1);
        assert_eq!(rx.recv_timeout(Duration::from_millis(1)).unwrap().rip, 2);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Timeout)
        );
        q.push(sample(4));
        q.close_producers();
        assert_eq!(rx.try_recv().unwrap().rip, 4);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn dropped_receiver_closes_queue() {
        let (q, rx) = SampleQueue::new(8);
        q.push(sample(1));
        drop(rx);
        assert_eq!(q.push(sample(2)), PushOutcome::Closed);
    }

    #[test]
    fn nudge_and_close_wake_a_waiting_consumer() {
        let (q, rx) = SampleQueue::new(8);
        let producer = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                q.push(sample(7));
                q.nudge();
                std::thread::sleep(Duration::from_millis(50));
                q.close_producers();
            })
        };
        let start = Instant::now();
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap().rip, 7);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(start.elapsed() < Duration::from_secs(20));
        producer.join().unwrap();
    }
}
