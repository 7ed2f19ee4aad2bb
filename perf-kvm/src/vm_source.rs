//! What `record`, `stat` and `top` share at the binary's edge: Ctrl-C/SIGTERM handling and how a VM's end is told.
//! The VMs themselves come from the library (`stat::in_process`, `feed`).

use std::sync::atomic::{AtomicBool, Ordering};

use vmm::VmEnd;

/// Set by SIGINT/SIGTERM; the tools stop the VM and finish their output cleanly.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_interrupt_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Prints how the VM ended when that is worth a line (a crash report, a non-zero guest status).
pub fn report_end(end: &VmEnd) {
    match end {
        VmEnd::Crash { report, .. } => eprintln!("perf-kvm: the guest crashed\n{report}"),
        VmEnd::GuestExit(s) if *s != 0 => eprintln!("perf-kvm: the guest exited with status {s}"),
        _ => {}
    }
}

pub use perf_kvm::feed::{Feed, SampleFeed};
