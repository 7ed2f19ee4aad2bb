//! The control socket: a unix stream socket (mode 0600) speaking newline-delimited JSON, protocol version 1.
//! See `vmm/docs/control-protocol.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::exit_stats::VcpuExitStats;
use crate::vcpu::VcpuError;
use crate::vm::{VmControl, VmInfo};
use crate::GuestRegisters;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted; anything longer is garbage.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot bind control socket {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set permissions on control socket {path}")]
    Permissions {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O")]
    Io(#[from] std::io::Error),
    #[error("malformed control reply: {0}")]
    BadReply(String),
    #[error("the VM refused: {0}")]
    Refused(String),
}

/// A request, tagged by `cmd`. Every request carries `"v": 1`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Info,
    Pause,
    Resume,
    Regs {
        vcpu: usize,
    },
    /// Exit statistics per vCPU; `reset` zeroes them after reading.
    ExitStats {
        #[serde(default)]
        reset: bool,
    },
    /// One MSR of one vCPU.
    Msr {
        vcpu: usize,
        index: u32,
    },
    /// Start sampling: the reply is followed by a stream of `{"sample":…}` lines, a `{"loss":…}` line every
    /// 100 ms, and `{"end":"…"}` when the VM ends. Closing the connection stops sampling.
    Sample {
        freq: u32,
        #[serde(default)]
        callchain: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    req: Request,
}

/// Removes the socket file when the server goes away.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket (replacing only a stale socket, never a file the user owns), restricts it to the owner, and
/// serves connections on a thread.
pub fn serve(path: &Path, vm: VmControl) -> Result<ControlServer, ControlError> {
    let p = path.display().to_string();
    // Create the socket with no group/other bits at all, so there is no window where it is wider than 0600.
    // SAFETY: umask only changes this process's file-creation mask; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let listener = gdbstub_kvm::connection::bind_unix_socket(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|source| ControlError::Bind {
        path: p.clone(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ControlError::Permissions { path: p, source })?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let vm = vm.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(conn, vm));
            }
        })?;
    Ok(ControlServer {
        path: path.to_path_buf(),
    })
}

fn serve_conn(conn: UnixStream, vm: VmControl) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(MAX_REQUEST as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match parse_request(line.trim_end()) {
            Ok(Request::Sample { freq, callchain }) => {
                stream_samples(&mut out, &vm, freq, callchain);
                return;
            }
            Ok(request) => handle_request(request, &vm),
            Err(message) => error_reply(&message),
        };
        if writeln!(out, "{reply}").is_err() || line.len() > MAX_REQUEST {
            return;
        }
    }
}

/// Serves one sampling session on this connection until the client goes away or the VM ends.
fn stream_samples(out: &mut UnixStream, vm: &VmControl, freq: u32, callchains: bool) {
    let cfg = crate::sampler::SamplerConfig {
        frequency_hz: freq,
        callchains,
        queue_capacity: 1 << 16,
        kick_only: false,
    };
    // A client that just went away (a `top` quit a moment ago) still holds the session until its stream notices,
    // which takes at most one loss-line period: wait that long before calling the VM busy.
    let mut waited = std::time::Duration::ZERO;
    let stream = loop {
        match vm.start_sampling(cfg) {
            Ok(s) => break s,
            Err(crate::sampler::SamplerError::Busy) if waited < BUSY_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                waited += std::time::Duration::from_millis(50);
            }
            Err(e) => {
                let _ = writeln!(out, "{}", error_reply(&e.to_string()));
                return;
            }
        }
    };
    // A client that stops reading would hold the VM's one sampling session for as long as it stays connected.
    let _ = out.set_write_timeout(Some(STALLED_CLIENT));
    let peer = out.try_clone().ok();
    let mut w = std::io::BufWriter::new(out);
    let mut ok = writeln!(w, "{}", json!({ "ok": true, "vcpus": vm.vcpu_count() })).is_ok()
        && w.flush().is_ok();
    let mut last_loss = std::time::Instant::now();
    while ok {
        match stream
            .rx
            .recv_timeout(std::time::Duration::from_millis(100))
        {
            Ok(sample) => ok = writeln!(w, "{}", json!({ "sample": sample })).is_ok(),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = writeln!(w, "{}", json!({ "loss": stream.loss.snapshot() }));
                let _ = writeln!(w, "{}", json!({ "end": "the VM ended" }));
                let _ = w.flush();
                return;
            }
        }
        if ok && last_loss.elapsed() >= std::time::Duration::from_millis(100) {
            ok = writeln!(w, "{}", json!({ "loss": stream.loss.snapshot() })).is_ok()
                && w.flush().is_ok()
                && !peer.as_ref().is_some_and(peer_hung_up);
            last_loss = std::time::Instant::now();
        }
    }
    vm.stop_sampling();
}

/// How long a stream write may block on a client that does not read before the session is ended.
const STALLED_CLIENT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a sampling request waits for a departing client's session to end.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the client closed its end (writes into a half-closed socket can still succeed for a while).
fn peer_hung_up(sock: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a socket we own, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn error_reply(msg: &str) -> Value {
    json!({ "ok": false, "error": msg })
}

/// What the control socket asks of a VM: [`VmControl`] in the VMM, a fake one in tests and the fuzzer.
pub trait ControlTarget {
    fn info(&self) -> &VmInfo;
    fn vcpu_count(&self) -> usize;
    fn pause_all(&self) -> Result<(), VcpuError>;
    fn resume_all(&self) -> Result<(), VcpuError>;
    fn registers(&self, vcpu: usize) -> Result<GuestRegisters, VcpuError>;
    fn read_msr(&self, vcpu: usize, index: u32) -> Result<Option<u64>, VcpuError>;
    /// Exit statistics per vCPU; `reset` zeroes them as they are read, under one lock.
    fn exit_stats(&self, reset: bool) -> Vec<VcpuExitStats>;
}

impl ControlTarget for VmControl {
    fn info(&self) -> &VmInfo {
        VmControl::info(self)
    }
    fn vcpu_count(&self) -> usize {
        VmControl::vcpu_count(self)
    }
    fn pause_all(&self) -> Result<(), VcpuError> {
        VmControl::pause_all(self)
    }
    fn resume_all(&self) -> Result<(), VcpuError> {
        VmControl::resume_all(self)
    }
    fn registers(&self, vcpu: usize) -> Result<GuestRegisters, VcpuError> {
        VmControl::registers(self, vcpu, false)
    }
    fn read_msr(&self, vcpu: usize, index: u32) -> Result<Option<u64>, VcpuError> {
        VmControl::read_msr(self, vcpu, index)
    }
    fn exit_stats(&self, reset: bool) -> Vec<VcpuExitStats> {
        if reset {
            self.take_exit_stats()
        } else {
            VmControl::exit_stats(self)
        }
    }
}

/// Parses one request line (newline stripped): all of the protocol's input checking, with no VM involved. The
/// error is the message the client gets.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err("request too long".into());
    }
    let env: Envelope = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    if env.v != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version {} (this VMM speaks {PROTOCOL_VERSION})",
            env.v
        ));
    }
    Ok(env.req)
}

/// Answers one request line; garbage is refused before it reaches the VM.
pub fn handle_line<T: ControlTarget + ?Sized>(line: &str, vm: &T) -> Value {
    match parse_request(line) {
        Ok(request) => handle_request(request, vm),
        Err(message) => error_reply(&message),
    }
}

/// Answers one parsed request (a `sample` request is refused: it needs a connection of its own).
pub fn handle_request<T: ControlTarget + ?Sized>(request: Request, vm: &T) -> Value {
    let result = match request {
        Request::Info => Ok(json!({ "info": vm.info(), "protocol": PROTOCOL_VERSION })),
        Request::Pause => vm.pause_all().map(|_| json!({})),
        Request::Resume => vm.resume_all().map(|_| json!({})),
        Request::Regs { vcpu } if vcpu >= vm.vcpu_count() => {
            return error_reply(&format!("no vCPU {vcpu} (the VM has {})", vm.vcpu_count()))
        }
        Request::Regs { vcpu } => vm.registers(vcpu).map(|r| json!({ "regs": regs_json(&r) })),
        Request::Sample { .. } => {
            return error_reply("sample streams only on their own connection")
        }
        Request::Msr { vcpu, .. } if vcpu >= vm.vcpu_count() => {
            return error_reply(&format!("no vCPU {vcpu} (the VM has {})", vm.vcpu_count()))
        }
        Request::Msr { vcpu, index } => vm.read_msr(vcpu, index).map(|v| json!({ "value": v })),
        Request::ExitStats { reset } => Ok(json!({ "exit_stats": vm.exit_stats(reset) })),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => error_reply(&e.to_string()),
    }
}

fn regs_json(r: &GuestRegisters) -> Value {
    let mut m = serde_json::Map::new();
    for (name, v) in gdbstub_kvm::regs::GPR_NAMES.iter().zip(r.gpr) {
        m.insert(name.to_string(), json!(v));
    }
    for (name, v) in [
        ("rip", r.rip),
        ("rflags", r.rflags),
        ("cr0", r.cr0),
        ("cr2", r.cr2),
        ("cr3", r.cr3),
        ("cr4", r.cr4),
        ("efer", r.efer),
        ("fs_base", r.fs.base),
        ("gs_base", r.gs.base),
    ] {
        m.insert(name.into(), json!(v));
    }
    m.insert("cs".into(), json!(r.cs.selector));
    m.insert("cpl".into(), json!(r.cpl()));
    Value::Object(m)
}

/// One line of a sampling stream.
#[derive(Debug)]
pub enum StreamEvent {
    Sample(crate::Sample),
    /// Running totals of the session.
    Loss(crate::SampleLoss),
}

/// A blocking client for the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(ControlClient {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Starts a sampling session on this connection (see `Request::Sample`); read it with `next_event`.
    pub fn start_sampling(&mut self, freq: u32, callchain: bool) -> Result<usize, ControlError> {
        let reply = self.call(Request::Sample { freq, callchain })?;
        Ok(reply["vcpus"].as_u64().unwrap_or(0) as usize)
    }

    /// Next line of a sampling stream; `None` at its end or when the VMM went away.
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, ControlError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        parse_stream_event(&line)
    }

    pub fn call(&mut self, req: Request) -> Result<Value, ControlError> {
        let line = serde_json::to_string(&Envelope {
            v: PROTOCOL_VERSION,
            req,
        })
        .expect("requests serialize");
        writeln!(self.writer, "{line}")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        parse_reply(&reply)
    }
}

/// One reply line from the VMM: its fields when `ok`, the VMM's message as an error otherwise.
pub fn parse_reply(line: &str) -> Result<Value, ControlError> {
    let v: Value = serde_json::from_str(line).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}

/// One line of a sampling stream; `None` for its end.
pub fn parse_stream_event(line: &str) -> Result<Option<StreamEvent>, ControlError> {
    let v: Value = serde_json::from_str(line).map_err(|e| ControlError::BadReply(e.to_string()))?;
    let bad = |e: serde_json::Error| ControlError::BadReply(e.to_string());
    if let Some(s) = v.get("sample") {
        Ok(Some(StreamEvent::Sample(
            serde_json::from_value(s.clone()).map_err(bad)?,
        )))
    } else if let Some(l) = v.get("loss") {
        Ok(Some(StreamEvent::Loss(
            serde_json::from_value(l.clone()).map_err(bad)?,
        )))
    } else if v.get("end").is_some() {
        Ok(None)
    } else {
        Err(ControlError::BadReply(line.trim().to_string()))
    }
}
