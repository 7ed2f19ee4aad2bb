//! The `--gdb` server thread: accepts one gdb at a time and serves it with the VM's debug target.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use gdbstub_kvm::{
    DebugTarget, GdbAddress, GdbListener, ResumeAction, SessionEnd, StopEvent, StopReason,
};

use super::{DebugShared, VmDebugTarget};
use crate::exit::VmEnd;
use crate::vm::VmControl;

/// How long the end of the VM waits for an attached gdb to hear about it.
const EXIT_REPORT_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum GdbServerError {
    #[error("cannot listen for gdb on {address}")]
    Listen {
        address: String,
        #[source]
        source: gdbstub_kvm::ConnectionError,
    },
    #[error("cannot start the gdb server thread")]
    Thread(#[source] std::io::Error),
}

/// A running gdb server. Sessions come and go; the VM keeps running between them.
pub struct GdbServer {
    address: GdbAddress,
    shared: Arc<DebugShared>,
    session_ended: Receiver<()>,
    _thread: JoinHandle<()>,
}

impl GdbServer {
    /// Binds `address` and serves gdb sessions on a thread of its own.
    pub fn start(address: &GdbAddress, target: VmDebugTarget) -> Result<GdbServer, GdbServerError> {
        let listener = GdbListener::bind(address).map_err(|source| GdbServerError::Listen {
            address: address.to_string(),
            source,
        })?;
        let bound = listener.local_address().unwrap_or_else(|_| address.clone());
        let shared = target.shared();
        let control = target.control();
        let (ended_tx, session_ended) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gdb".into())
            .spawn(move || serve_sessions(listener, target, control, ended_tx))
            .map_err(GdbServerError::Thread)?;
        Ok(GdbServer {
            address: bound,
            shared,
            session_ended,
            _thread: thread,
        })
    }

    /// Where gdb connects (with the real port when asked to bind port 0).
    pub fn address(&self) -> &GdbAddress {
        &self.address
    }

    /// Tells an attached gdb how the VM ended and gives it a moment to hear it.
    pub fn report_end(&self, end: &VmEnd) {
        if !self.shared.session_active() {
            return;
        }
        let reason = match end {
            VmEnd::GuestExit(status) => StopReason::Exited {
                status: (*status).min(255) as u8,
            },
            VmEnd::Crash { reason, .. } => StopReason::Crashed {
                description: reason.clone(),
            },
            VmEnd::GuestReset | VmEnd::Stopped => StopReason::Exited { status: 0 },
        };
        let vcpu = match end {
            VmEnd::Crash { vcpu, .. } => *vcpu,
            _ => 0,
        };
        self.shared.queue().push(StopEvent { vcpu, reason });
        let _ = self.session_ended.recv_timeout(EXIT_REPORT_PATIENCE);
    }
}

fn serve_sessions(
    listener: GdbListener,
    mut target: VmDebugTarget,
    control: VmControl,
    ended: Sender<()>,
) {
    let shared = target.shared();
    loop {
        let connection = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmm: gdb: cannot accept a connection: {e}");
                continue;
            }
        };
        shared.begin_session();
        let end = gdbstub_kvm::serve(connection, &mut target);
        // A vCPU that stopped after the stub resumed everything (typically one that crashed again) is parked for
        // a gdb that is gone: run it on; a crash now ends the VM.
        for held in shared.end_session() {
            let _ = target.resume(&[(held.vcpu, ResumeAction::Continue)]);
        }
        let _ = ended.send(());
        match end {
            Ok(SessionEnd::TargetExited { .. }) => return,
            Ok(SessionEnd::KillRequested) => {
                eprintln!("vmm: gdb asked to kill the guest: stopping the VM");
                control.stop();
                return;
            }
            Ok(_) => {}
            Err(e) => eprintln!("vmm: gdb session ended with an error: {e}"),
        }
    }
}
