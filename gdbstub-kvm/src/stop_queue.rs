//! A ready-made stop-event queue for [`DebugTarget`](crate::DebugTarget) implementations: vCPU threads push,
//! the gdb thread polls the eventfd and takes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::target::StopEvent;

/// A FIFO of [`StopEvent`]s with an eventfd that polls readable exactly while the queue is non-empty. Clones share
/// the queue, so each vCPU thread can hold one.
#[derive(Clone, Debug)]
pub struct StopQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    events: Mutex<VecDeque<StopEvent>>,
    event_fd: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the stop-event eventfd")]
pub struct StopQueueError(#[source] io::Error);

impl StopQueue {
    pub fn new() -> Result<Self, StopQueueError> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(StopQueueError(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        let event_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(StopQueue {
            inner: Arc::new(Inner {
                events: Mutex::new(VecDeque::new()),
                event_fd,
            }),
        })
    }

    fn events(&self) -> MutexGuard<'_, VecDeque<StopEvent>> {
        // Pushing and popping cannot leave the deque inconsistent, so a poisoned lock is still usable.
        self.inner
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an event and wakes the gdb thread. Callable from any thread.
    pub fn push(&self, event: StopEvent) {
        let mut events = self.events();
        events.push_back(event);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd we own. It cannot block (EFD_NONBLOCK) and
        // cannot overflow in practice (the counter saturates at 2^64-2 signals).
        unsafe {
            libc::write(
                self.inner.event_fd.as_raw_fd(),
                one.as_ptr().cast(),
                one.len(),
            )
        };
    }

    /// Takes the oldest event; resets the eventfd when the queue becomes empty.
    pub fn take(&self) -> Option<StopEvent> {
        let mut events = self.events();
        // Under the lock the eventfd is readable exactly while the queue holds events: an empty queue has a reset
        // eventfd already (no syscall needed; the stub looks at an empty queue once per stop).
        let event = events.pop_front()?;
        if events.is_empty() {
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer from the non-blocking eventfd we own; EAGAIN means
            // it was already reset.
            unsafe {
                libc::read(
                    self.inner.event_fd.as_raw_fd(),
                    counter.as_mut_ptr().cast(),
                    counter.len(),
                )
            };
        }
        Some(event)
    }

    /// Drops every queued event (e.g. stale ones before a fresh resume the VMM decides to discard).
    pub fn clear(&self) {
        while self.take().is_some() {}
    }

    /// The fd to return from [`DebugTarget::stop_event_fd`](crate::DebugTarget::stop_event_fd).
    pub fn fd(&self) -> RawFd {
        self.inner.event_fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::StopReason;

    fn readable(fd: RawFd) -> bool {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
        rc == 1 && pollfd.revents & libc::POLLIN != 0
    }

    #[test]
    fn fd_is_readable_exactly_while_events_are_queued() {
        let queue = StopQueue::new().unwrap();
        assert!(!readable(queue.fd()));
        let from_vcpu_thread = queue.clone();
        std::thread::spawn(move || {
            for vcpu in 0..2 {
                from_vcpu_thread.push(StopEvent {
                    vcpu,
                    reason: StopReason::StepDone,
                });
            }
        })
        .join()
        .unwrap();
        assert!(readable(queue.fd()));
        assert_eq!(queue.take().map(|e| e.vcpu), Some(0));
        assert!(readable(queue.fd()), "one event left");
        assert_eq!(queue.take().map(|e| e.vcpu), Some(1));
        assert!(!readable(queue.fd()));
        assert_eq!(queue.take(), None);
    }
}
