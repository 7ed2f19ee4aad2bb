//! The `--gdb` server thread: accepts one gdb at a time and serves it with the VM's debug target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use gdbstub_kvm::{
    DebugTarget, GdbAddress, GdbConnection, GdbListener, ResumeAction, SessionEnd, StopEvent,
    StopReason,
};

use super::{DebugShared, VmDebugTarget};
use crate::exit::VmEnd;
use crate::vm::VmControl;

/// How long the end of the VM waits for an attached gdb to hear about it.
const EXIT_REPORT_PATIENCE: Duration = Duration::from_secs(5);
/// What a second gdb is told, and how long it may take to say its first packet.
const SECOND_GDB_REFUSAL: &str =
    "another gdb is attached to this VM; one at a time (detach that one first)";
const REFUSAL_PATIENCE: Duration = Duration::from_secs(5);
/// How long a connection made while a session is still winding down waits for it before it is refused.
const RECONNECT_GRACE: Duration = Duration::from_secs(1);

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
        let (sessions_tx, sessions) = mpsc::sync_channel(0);
        let busy = Arc::new(AtomicBool::new(false));
        let acceptor_busy = busy.clone();
        std::thread::Builder::new()
            .name("gdb-accept".into())
            .spawn(move || accept_connections(listener, sessions_tx, acceptor_busy))
            .map_err(GdbServerError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("gdb".into())
            .spawn(move || serve_sessions(sessions, busy, target, control, ended_tx))
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

/// Accepts gdb connections for as long as the VM lives. One session at a time: a gdb that connects while
/// another is attached is turned away with a message, on a short-lived thread of its own so that a client that
/// never speaks cannot hold up the next accept. A connection that arrives just as the previous gdb leaves (a
/// quick reconnect) waits for that session to wind down rather than being refused.
fn accept_connections(
    listener: GdbListener,
    sessions: SyncSender<GdbConnection>,
    busy: Arc<AtomicBool>,
) {
    loop {
        let connection = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmm: gdb: cannot accept a connection: {e}");
                continue;
            }
        };
        if !busy.swap(true, Ordering::AcqRel) {
            if sessions.send(connection).is_err() {
                // The session thread is gone: the guest exited or gdb killed it.
                return;
            }
            continue;
        }
        let sessions = sessions.clone();
        let busy = busy.clone();
        let _ = std::thread::Builder::new()
            .name("gdb-refuse".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + RECONNECT_GRACE;
                while std::time::Instant::now() < deadline {
                    if !busy.swap(true, Ordering::AcqRel) {
                        let _ = sessions.send(connection);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                eprintln!("vmm: gdb: refusing a second connection while a debugger is attached");
                let _ = connection.refuse(SECOND_GDB_REFUSAL, REFUSAL_PATIENCE);
            });
    }
}

fn serve_sessions(
    sessions: Receiver<GdbConnection>,
    busy: Arc<AtomicBool>,
    mut target: VmDebugTarget,
    control: VmControl,
    ended: Sender<()>,
) {
    let shared = target.shared();
    for connection in sessions {
        shared.begin_session();
        let end = gdbstub_kvm::serve(connection, &mut target);
        // A vCPU that stopped after the stub resumed everything (typically one that crashed again) is parked for
        // a gdb that is gone: run it on; a crash now ends the VM.
        for held in shared.end_session() {
            let _ = target.resume(&[(held.vcpu, ResumeAction::Continue)]);
        }
        busy.store(false, Ordering::Release);
        let _ = ended.send(());
        match end {
            Ok(SessionEnd::TargetExited { .. }) => return,
            Ok(SessionEnd::KillRequested) => {
                eprintln!("vmm: gdb asked to kill the guest: stopping the VM");
                control.stop();
                return;
            }
            Ok(SessionEnd::ConnectionLost) => {
                eprintln!("vmm: gdb connection lost: the guest runs on; a new gdb may attach")
            }
            Ok(SessionEnd::Detached) => {}
            Err(e) => eprintln!("vmm: gdb session ended with an error: {e}"),
        }
    }
}
