//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the thread's `immediate_exit`.
//!
//! The signal interrupts a running `KVM_RUN` (EINTR); `immediate_exit` covers the window where the signal lands just
//! before the thread enters `KVM_RUN`, so no kick is ever lost.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// Address of this vCPU thread's `kvm_run.immediate_exit`, or null on other threads.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: SIGRTMIN + 2 (glibc reserves the first two real-time signals).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer was registered by this very thread and points into its vCPU's kvm_run mapping, which
        // lives as long as the thread's VcpuFd; the thread unregisters it before dropping the VcpuFd.
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

/// Installs the handler once per process. Without SA_RESTART so `KVM_RUN` returns EINTR.
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we set a handler that only does a volatile store.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Registers (or with null, unregisters) the calling thread's `immediate_exit` byte.
pub fn register_immediate_exit(ptr: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
}

/// A handle that can kick one thread.
#[derive(Debug, Clone, Copy)]
pub struct Kicker(libc::pthread_t);

impl Kicker {
    pub fn current() -> Self {
        // SAFETY: pthread_self has no preconditions.
        Kicker(unsafe { libc::pthread_self() })
    }

    pub fn kick(&self) {
        // SAFETY: the thread id comes from pthread_self of a vCPU thread that is joined only after its last kick.
        unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}
