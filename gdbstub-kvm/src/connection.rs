//! Transports: a TCP or unix-socket listener that hands out one gdb connection at a time.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;

/// Where the stub listens: `HOST:PORT` / `PORT` (TCP; a bare port means 127.0.0.1) or `unix:PATH` / a path with a
/// `/` in it (unix socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GdbAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("invalid gdb address {text:?}: expected HOST:PORT, PORT, unix:PATH or a path")]
    BadAddress {
        text: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("cannot listen for gdb on {address}")]
    Bind {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("accepting the gdb connection failed")]
    Accept(#[source] io::Error),
}

impl FromStr for GdbAddress {
    type Err = ConnectionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(GdbAddress::Unix(PathBuf::from(path)));
        }
        if text.contains('/') {
            return Ok(GdbAddress::Unix(PathBuf::from(text)));
        }
        if let Ok(port) = text.parse::<u16>() {
            return Ok(GdbAddress::Tcp(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                port,
            ))));
        }
        text.parse::<SocketAddr>()
            .map(GdbAddress::Tcp)
            .map_err(|source| ConnectionError::BadAddress {
                text: text.to_owned(),
                source,
            })
    }
}

impl std::fmt::Display for GdbAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddress::Tcp(addr) => write!(f, "{addr}"),
            GdbAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener. A unix socket file it created is removed when it is dropped.
#[derive(Debug)]
pub enum GdbListener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl GdbListener {
    pub fn bind(address: &GdbAddress) -> Result<Self, ConnectionError> {
        let bind_error = |source| ConnectionError::Bind {
            address: address.to_string(),
            source,
        };
        match address {
            GdbAddress::Tcp(addr) => TcpListener::bind(addr)
                .map(GdbListener::Tcp)
                .map_err(bind_error),
            GdbAddress::Unix(path) => {
                // A socket file left by an earlier run would make bind fail; anything else is not ours to delete.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(ConnectionError::NotASocket { path: path.clone() });
                    }
                    std::fs::remove_file(path).map_err(bind_error)?;
                }
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                Ok(GdbListener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address actually bound (with the real port when port 0 was asked for).
    pub fn local_address(&self) -> io::Result<GdbAddress> {
        match self {
            GdbListener::Tcp(listener) => listener.local_addr().map(GdbAddress::Tcp),
            GdbListener::Unix { path, .. } => Ok(GdbAddress::Unix(path.clone())),
        }
    }

    /// Blocks until gdb connects.
    pub fn accept(&self) -> Result<GdbConnection, ConnectionError> {
        let stream = match self {
            GdbListener::Tcp(listener) => {
                let (stream, _) = listener.accept().map_err(ConnectionError::Accept)?;
                // Packets are small and latency-bound (every stepi is a round trip).
                stream.set_nodelay(true).map_err(ConnectionError::Accept)?;
                Stream::Tcp(stream)
            }
            GdbListener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().map_err(ConnectionError::Accept)?;
                Stream::Unix(stream)
            }
        };
        Ok(GdbConnection::new(stream))
    }
}

impl Drop for GdbListener {
    fn drop(&mut self) {
        if let GdbListener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// One gdb connection. Writes are buffered until `flush`, so a response leaves in one segment. Incoming bytes
/// pass a framer that drops line noise and nacks corrupted packets, which `gdbstub` would treat as fatal.
#[derive(Debug)]
pub struct GdbConnection {
    stream: Stream,
    outgoing: Vec<u8>,
    /// The last flushed reply, for gdb's nack (`-`), which `gdbstub` itself treats as fatal.
    last_sent: Vec<u8>,
    framer: PacketFramer,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    #[default]
    Outside,
    Body,
    Checksum1,
    Checksum2,
}

/// Splits the byte stream into whole packets (`$body#xx`) and the single-byte acks, nacks and interrupts.
#[derive(Debug, Default)]
struct PacketFramer {
    state: FrameState,
    packet: Vec<u8>,
}

/// What one incoming byte amounts to.
#[derive(Debug, PartialEq, Eq)]
enum Framed {
    Nothing,
    Pass(Vec<u8>),
    /// A packet arrived corrupted; ask gdb to send it again.
    Nack,
    /// gdb asks for our last reply again.
    Resend,
}

impl PacketFramer {
    fn push(&mut self, byte: u8) -> Framed {
        match (self.state, byte) {
            (FrameState::Outside, b'$') => {
                self.packet.clear();
                self.packet.push(byte);
                self.state = FrameState::Body;
                Framed::Nothing
            }
            (FrameState::Outside, b'-') => Framed::Resend,
            (FrameState::Outside, b'+' | 0x03) => Framed::Pass(vec![byte]),
            (FrameState::Outside, _) => Framed::Nothing,
            (FrameState::Body, _) => {
                self.packet.push(byte);
                if byte == b'#' {
                    self.state = FrameState::Checksum1;
                }
                Framed::Nothing
            }
            (FrameState::Checksum1, _) => {
                self.packet.push(byte);
                self.state = FrameState::Checksum2;
                Framed::Nothing
            }
            (FrameState::Checksum2, _) => {
                self.packet.push(byte);
                self.state = FrameState::Outside;
                let packet = std::mem::take(&mut self.packet);
                if checksum_matches(&packet) {
                    Framed::Pass(packet)
                } else {
                    Framed::Nack
                }
            }
        }
    }
}

fn checksum_matches(packet: &[u8]) -> bool {
    let (framed, checksum) = packet.split_at(packet.len() - 2);
    let body = &framed[1..framed.len() - 1];
    let sum = body.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    std::str::from_utf8(checksum)
        .ok()
        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        == Some(sum)
}

/// A connection over an already connected unix socket (one end of a `socketpair`, for tests and the fuzzer).
impl From<UnixStream> for GdbConnection {
    fn from(stream: UnixStream) -> Self {
        GdbConnection::new(Stream::Unix(stream))
    }
}

impl GdbConnection {
    fn new(stream: Stream) -> Self {
        GdbConnection {
            stream,
            outgoing: Vec::new(),
            last_sent: Vec::new(),
            framer: PacketFramer::default(),
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match &self.stream {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Reads what is available (blocking until at least one byte or EOF) into `incoming`; returns 0 at EOF.
    pub(crate) fn read_into(&mut self, incoming: &mut VecDeque<u8>) -> io::Result<usize> {
        let mut buf = [0u8; 16 * 1024];
        let n = loop {
            let result = match &mut self.stream {
                Stream::Tcp(s) => s.read(&mut buf),
                Stream::Unix(s) => s.read(&mut buf),
            };
            match result {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        for byte in &buf[..n] {
            match self.framer.push(*byte) {
                Framed::Nothing => {}
                Framed::Pass(bytes) => incoming.extend(bytes),
                Framed::Nack => self.send_all(b"-")?,
                Framed::Resend => {
                    let last = std::mem::take(&mut self.last_sent);
                    let result = self.send_all(&last);
                    self.last_sent = last;
                    result?;
                }
            }
        }
        Ok(n)
    }

    fn send_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
    }

    /// Sends a console-output (`O`) packet; gdb prints it while it waits for a stop reply.
    pub(crate) fn send_console_output(&mut self, text: &str) -> io::Result<()> {
        let mut body = String::from("O");
        for byte in text.bytes() {
            body.push_str(&format!("{byte:02x}"));
        }
        let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
        let packet = format!("${body}#{checksum:02x}");
        self.send_all(packet.as_bytes())
    }
}

impl gdbstub::conn::Connection for GdbConnection {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.outgoing.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.outgoing.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let outgoing = std::mem::take(&mut self.outgoing);
        let result = self.send_all(&outgoing);
        self.last_sent = outgoing;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "1234".parse::<GdbAddress>().unwrap(),
            GdbAddress::Tcp("127.0.0.1:1234".parse().unwrap())
        );
        assert_eq!(
            "0.0.0.0:99".parse::<GdbAddress>().unwrap(),
            GdbAddress::Tcp("0.0.0.0:99".parse().unwrap())
        );
        assert_eq!(
            "unix:gdb.sock".parse::<GdbAddress>().unwrap(),
            GdbAddress::Unix("gdb.sock".into())
        );
        assert_eq!(
            "/tmp/x.sock".parse::<GdbAddress>().unwrap(),
            GdbAddress::Unix("/tmp/x.sock".into())
        );
        assert!("localhost:zz".parse::<GdbAddress>().is_err());
    }

    fn frame(input: &[u8]) -> Vec<Framed> {
        let mut framer = PacketFramer::default();
        input
            .iter()
            .map(|b| framer.push(*b))
            .filter(|f| *f != Framed::Nothing)
            .collect()
    }

    #[test]
    fn framer_drops_noise_and_nacks_bad_checksums() {
        assert_eq!(
            frame(b"xx+$g#67\x03$g#00-"),
            vec![
                Framed::Pass(b"+".to_vec()),
                Framed::Pass(b"$g#67".to_vec()),
                Framed::Pass(vec![3]),
                Framed::Nack,
                Framed::Resend
            ]
        );
        assert_eq!(frame(b"$m#zz"), vec![Framed::Nack]);
    }
}
