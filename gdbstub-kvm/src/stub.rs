//! The session loop: `gdbstub`'s state machine driven by poll(2) on the gdb connection and the target's stop-event
//! fd, so the gdb thread sleeps until either has something.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStubBuilder, MultiThreadStopReason};

use crate::adapter::{report, tid_of, Adapter};
use crate::connection::GdbConnection;
use crate::target::{DebugTarget, ResumeAction, StopEvent, StopReason, TargetError};

/// Largest packet gdb may send us (`PacketSize`); a memory read of half of it fits one reply.
pub const PACKET_SIZE: usize = 64 * 1024;

/// The size `gdbstub` starts its packet buffer at (it grows the buffer for longer packets). Kept small because
/// `gdbstub` 0.7 scans from each packet's checksum to the end of that buffer (looking for another `#`): 31 µs a
/// packet with a 64 KiB buffer on our hosts, 6-7 packets per `stepi`; ~0.5 µs with 1 KiB. Memory reads do not
/// need it large: `gdbstub` answers an `m` in buffer-sized chunks within one reply (`dump memory` measured as
/// fast with 1 KiB as with 4 KiB), and the connection advertises [`PACKET_SIZE`] to gdb.
pub(crate) const PARSE_BUFFER: usize = 1024;

/// How a session ended. In every case but [`SessionEnd::TargetExited`] the target was resumed (all vCPUs
/// continuing, gdb's breakpoints and watchpoints removed) before `serve` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// gdb detached (`detach`, or quitting gdb).
    Detached,
    /// gdb sent `kill`. The VMM decides whether to shut the guest down.
    KillRequested,
    /// The connection closed or broke without a detach.
    ConnectionLost,
    /// The guest exited and gdb was told.
    TargetExited { status: u8 },
}

#[derive(Debug, thiserror::Error)]
pub enum StubError {
    #[error("the debug target failed")]
    Target(#[source] TargetError),
    #[error("gdb protocol error: {0}")]
    Protocol(String),
    #[error("waiting for gdb or the target failed")]
    Poll(#[source] io::Error),
}

/// Serves one gdb connection until it ends. Pauses the target first (gdb expects a stopped target on attach),
/// and leaves it running afterwards (see [`SessionEnd`]). Call it on the thread that may block on the target:
/// every [`DebugTarget`] method is called from here.
///
/// A protocol error (e.g. malformed packets) ends the session with [`StubError::Protocol`]; the target is still
/// resumed first.
pub fn serve<T: DebugTarget + ?Sized>(
    connection: GdbConnection,
    target: &mut T,
) -> Result<SessionEnd, StubError> {
    if target.vcpu_count() == 0 {
        return Err(StubError::Target(TargetError::refused(
            "the target has no vCPUs to debug",
        )));
    }
    target.pause_all().map_err(StubError::Target)?;
    let mut adapter = Adapter::new(target);
    let outcome = run_session(connection, &mut adapter);
    let ended_by_exit = matches!(outcome, Ok(SessionEnd::TargetExited { .. }));
    if !ended_by_exit {
        leave_running(&mut adapter)?;
    }
    outcome
}

/// Takes out what gdb installed and lets every vCPU run, whatever state the session ended in.
fn leave_running<T: DebugTarget + ?Sized>(adapter: &mut Adapter<'_, T>) -> Result<(), StubError> {
    adapter.target.pause_all().map_err(StubError::Target)?;
    adapter.remove_all_installed();
    // Stops that raced with the end of the session concern nobody now.
    while adapter.target.take_stop_event().is_some() {}
    let all: Vec<_> = (0..adapter.target.vcpu_count())
        .map(|vcpu| (vcpu, ResumeAction::Continue))
        .collect();
    adapter.target.resume(&all).map_err(StubError::Target)
}

fn run_session<T: DebugTarget + ?Sized>(
    mut connection: GdbConnection,
    adapter: &mut Adapter<'_, T>,
) -> Result<SessionEnd, StubError> {
    connection.serve_thread_list(adapter.target.vcpu_count());
    let connection_fd = connection.raw_fd();
    let event_fd = adapter.target.stop_event_fd();
    let stub = GdbStubBuilder::new(connection)
        .packet_buffer_size(PARSE_BUFFER)
        .build()
        .map_err(|e| StubError::Protocol(e.to_string()))?;
    let protocol =
        |e: gdbstub::stub::GdbStubError<TargetError, io::Error>| StubError::Protocol(e.to_string());
    let mut machine = stub.run_state_machine(adapter).map_err(protocol)?;
    let mut incoming = VecDeque::new();

    loop {
        machine = match machine {
            GdbStubStateMachine::Idle(mut inner) => {
                let Some(byte) = next_byte(inner.borrow_conn(), &mut incoming) else {
                    return Ok(SessionEnd::ConnectionLost);
                };
                let next = inner.incoming_data(adapter, byte).map_err(protocol)?;
                if matches!(next, GdbStubStateMachine::CtrlCInterrupt(_)) {
                    adapter.interrupted_while_stopped = true;
                }
                flush(next)
            }
            GdbStubStateMachine::Running(mut inner) => {
                if let Some((vcpu, message)) = adapter.refused_resume.take() {
                    // gdb prints console output that arrives while it waits for a stop.
                    let _ = inner
                        .borrow_conn()
                        .send_console_output(&format!("{message}\n"));
                    let stop = MultiThreadStopReason::SignalWithThread {
                        tid: tid_of(vcpu),
                        signal: gdbstub::common::Signal::SIGINT,
                    };
                    inner.report_stop(adapter, stop).map_err(protocol)?
                } else if let Some(byte) = incoming.pop_front() {
                    flush(inner.incoming_data(adapter, byte).map_err(protocol)?)
                } else {
                    match wait_for_either(connection_fd, event_fd).map_err(StubError::Poll)? {
                        Ready::Target => match adapter.target.take_stop_event() {
                            Some(event) => {
                                let exit = match event.reason {
                                    StopReason::Exited { status } => Some(status),
                                    _ => None,
                                };
                                if let StopReason::Crashed { description } = &event.reason {
                                    // gdb shows console output that precedes a stop reply.
                                    let line =
                                        format!("vCPU {} crashed: {description}\n", event.vcpu);
                                    let _ = inner.borrow_conn().send_console_output(&line);
                                }
                                let stop = adapter.stop_reason(event);
                                let next = match exit.is_none().then(|| adapter.expedited()) {
                                    Some(Some(regs)) => inner.report_stop_with_regs(
                                        adapter,
                                        stop,
                                        &mut regs.iter().map(|(n, v)| (*n, v.as_slice())),
                                    ),
                                    _ => inner.report_stop(adapter, stop),
                                }
                                .map_err(protocol)?;
                                if let Some(status) = exit {
                                    return Ok(SessionEnd::TargetExited { status });
                                }
                                next
                            }
                            // The fd woke us but the queue was empty (a raced event already taken): wait again.
                            None => inner.into(),
                        },
                        Ready::Connection => {
                            let n = inner.borrow_conn().read_into(&mut incoming);
                            match n {
                                Ok(0) | Err(_) => return Ok(SessionEnd::ConnectionLost),
                                Ok(_) => inner.into(),
                            }
                        }
                    }
                }
            }
            GdbStubStateMachine::CtrlCInterrupt(inner) => {
                adapter.target.pause_all().map_err(StubError::Target)?;
                // A real stop that raced with the interrupt is more useful to gdb than "interrupted".
                let event = adapter.target.take_stop_event().unwrap_or(StopEvent {
                    vcpu: adapter.focus_vcpu,
                    reason: StopReason::Paused,
                });
                let stop = adapter.stop_reason(event);
                flush(
                    inner
                        .interrupt_handled(adapter, Some(stop))
                        .map_err(protocol)?,
                )
            }
            GdbStubStateMachine::Disconnected(inner) => {
                return Ok(match inner.get_reason() {
                    DisconnectReason::Disconnect => SessionEnd::Detached,
                    DisconnectReason::Kill => SessionEnd::KillRequested,
                    DisconnectReason::TargetExited(status) => SessionEnd::TargetExited { status },
                    DisconnectReason::TargetTerminated(_) => SessionEnd::TargetExited { status: 0 },
                });
            }
        };
    }
}

/// Sends whatever the last step queued (gdbstub leaves acks of resume packets unflushed until the stop reply).
fn flush<'a, T: DebugTarget + ?Sized>(
    mut machine: GdbStubStateMachine<'a, Adapter<'a, T>, GdbConnection>,
) -> GdbStubStateMachine<'a, Adapter<'a, T>, GdbConnection> {
    let result = match &mut machine {
        GdbStubStateMachine::Idle(inner) => inner.borrow_conn().flush(),
        GdbStubStateMachine::Running(inner) => inner.borrow_conn().flush(),
        GdbStubStateMachine::CtrlCInterrupt(inner) => inner.borrow_conn().flush(),
        GdbStubStateMachine::Disconnected(inner) => inner.borrow_conn().flush(),
    };
    // A failed send means gdb is gone; the next read reports it as a lost connection.
    let _ = result;
    machine
}

/// The next byte from gdb, blocking while the target is stopped; `None` when the connection is gone.
fn next_byte(connection: &mut GdbConnection, incoming: &mut VecDeque<u8>) -> Option<u8> {
    // Line noise can make a read yield nothing for the stub: read again.
    while incoming.is_empty() {
        match connection.read_into(incoming) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    incoming.pop_front()
}

enum Ready {
    Connection,
    Target,
}

/// Blocks until the target has an event or gdb sent something; target events win ties so a stop is not starved
/// by a chatty client.
fn wait_for_either(connection_fd: RawFd, event_fd: RawFd) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: event_fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: connection_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(Ready::Target);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            report("the target's stop-event fd is invalid");
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // Hang-up and errors count as readable: the read that follows sees EOF or the error.
        if fds[1].revents != 0 {
            return Ok(Ready::Connection);
        }
    }
}
