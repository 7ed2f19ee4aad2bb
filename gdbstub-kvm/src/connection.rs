//! Transports: a TCP or unix-socket listener that hands out one gdb connection at a time.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::stub::PACKET_SIZE;

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

/// Binds a unix socket at `path`, replacing only a stale socket file (one nobody answers on, left by a run that
/// died). A live socket (another VM serving there) is `AddrInUse`, and anything that is not a socket (a file, a
/// directory) is `AlreadyExists`: neither is ever deleted. The one implementation for the gdb and control sockets.
pub fn bind_unix_socket(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            let what = if meta.is_dir() {
                "a directory"
            } else {
                "not a socket"
            };
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is {what}; refusing to replace it",
                    path.display()
                ),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is a live socket: another process serves it",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
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
                let listener = bind_unix_socket(path).map_err(bind_error)?;
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
    /// Threads listed for `qXfer:threads:read`, which this connection answers itself (0: not offered).
    threads: usize,
    /// gdb turned acks off (`QStartNoAckMode`).
    no_ack: bool,
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

/// The most bytes one `m` packet may ask for: its hex reply fills a packet. `gdbstub` answers any length in one
/// reply, reading chunk after chunk, so `m0,ffffffffffff` would stream gigabytes while holding the session;
/// gdb itself never asks for more than its packet size allows and takes a short reply as a partial read.
const MAX_MEMORY_READ: u64 = (PACKET_SIZE / 2) as u64;

/// A whole packet `$m<addr>,<len>#xx` with `len` above [`MAX_MEMORY_READ`] becomes the same packet asking for
/// [`MAX_MEMORY_READ`] bytes; every other packet passes as it is.
fn clamp_memory_read(packet: Vec<u8>) -> Vec<u8> {
    let Some(body) = packet
        .strip_prefix(b"$m")
        .and_then(|rest| rest.get(..rest.len().checked_sub(3)?))
    else {
        return packet;
    };
    let Some((addr, len)) = std::str::from_utf8(body)
        .ok()
        .and_then(|body| body.split_once(','))
    else {
        return packet;
    };
    if u64::from_str_radix(addr, 16).is_err() {
        return packet;
    }
    match u64::from_str_radix(len, 16) {
        Ok(len) if len > MAX_MEMORY_READ => {
            let body = format!("m{addr},{MAX_MEMORY_READ:x}");
            let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
            format!("${body}#{checksum:02x}").into_bytes()
        }
        _ => packet,
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
            threads: 0,
            no_ack: false,
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
                Framed::Pass(bytes) => {
                    if bytes.starts_with(b"$QStartNoAckMode#") {
                        self.no_ack = true;
                    }
                    match self.thread_list_reply(&bytes) {
                        Some(reply) => self.send_local_reply(&reply)?,
                        None => incoming.extend(clamp_memory_read(bytes)),
                    }
                }
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

    /// Answers `qXfer:threads:read` for `count` threads (ids 1..=count) here, one round trip where `gdbstub`
    /// (which lacks it) makes gdb use two (`qfThreadInfo`, `qsThreadInfo`); gdb lists threads after every
    /// stop, `stepi` included.
    pub(crate) fn serve_thread_list(&mut self, count: usize) {
        self.threads = count;
    }

    /// The reply to a whole packet if it is a `qXfer:threads:read` this connection answers.
    fn thread_list_reply(&self, packet: &[u8]) -> Option<String> {
        if self.threads == 0 {
            return None;
        }
        let body = std::str::from_utf8(packet).ok()?;
        let request = body.strip_prefix("$qXfer:threads:read::")?;
        let (offset, length) = request.get(..request.len() - 3)?.split_once(',')?;
        let offset = usize::from_str_radix(offset, 16).ok()?;
        let length = usize::from_str_radix(length, 16).ok()?;
        let mut xml = String::from("<?xml version=\"1.0\"?>\n<threads>\n");
        for vcpu in 0..self.threads {
            // The text is the extra information `info threads` shows, as qThreadExtraInfo gives it.
            xml.push_str(&format!(
                "<thread id=\"p1.{:x}\" core=\"{vcpu}\">vCPU {vcpu}</thread>\n",
                vcpu + 1
            ));
        }
        xml.push_str("</threads>\n");
        let start = offset.min(xml.len());
        let end = start.saturating_add(length).min(xml.len());
        let marker = if end == xml.len() { 'l' } else { 'm' };
        Some(format!("{marker}{}", &xml[start..end]))
    }

    fn send_local_reply(&mut self, body: &str) -> io::Result<()> {
        let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
        let ack = if self.no_ack { "" } else { "+" };
        let packet = format!("{ack}${body}#{checksum:02x}").into_bytes();
        self.send_all(&packet)?;
        self.last_sent = packet;
        Ok(())
    }

    /// Rewrites `gdbstub`'s `qSupported` reply (which starts with `PacketSize=`, after an ack while acks are
    /// on): the packet size gdb may use is [`PACKET_SIZE`], not the size of `gdbstub`'s parse buffer (see
    /// [`crate::stub::PARSE_BUFFER`]), and the features this connection answers itself are added.
    fn advertise_local_features(&self, outgoing: &mut Vec<u8>) {
        let Some(start) = (0..=1).find(|&i| outgoing[i..].starts_with(b"$PacketSize=")) else {
            return;
        };
        let Some(hash) = outgoing
            .len()
            .checked_sub(3)
            .filter(|&h| outgoing[h] == b'#')
        else {
            return;
        };
        let features = String::from_utf8_lossy(&outgoing[start + 1..hash]).into_owned();
        let mut body = format!("PacketSize={PACKET_SIZE:06x}");
        // The first feature is gdbstub's PacketSize; keep the others as they are.
        for feature in features.split(';').skip(1) {
            body.push(';');
            body.push_str(feature);
        }
        if self.threads > 0 {
            body.push_str(";qXfer:threads:read+");
        }
        let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
        outgoing.truncate(start);
        outgoing.push(b'$');
        outgoing.extend_from_slice(body.as_bytes());
        outgoing.extend_from_slice(format!("#{checksum:02x}").as_bytes());
    }

    fn send_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
    }

    /// Turns this connection away: answers gdb's first packet (its `qSupported`) with an `E.` error carrying
    /// `reason`, which gdb prints as `Remote failure reply: E.<reason>`, then closes. Waits at most `patience`
    /// for that first packet, so a client that sends nothing cannot hold the caller.
    pub fn refuse(mut self, reason: &str, patience: std::time::Duration) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(Some(patience))?,
            Stream::Unix(s) => s.set_read_timeout(Some(patience))?,
        }
        let mut buf = [0u8; 4096];
        'first_packet: loop {
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read(&mut buf)?,
                Stream::Unix(s) => s.read(&mut buf)?,
            };
            if n == 0 {
                return Ok(());
            }
            for byte in &buf[..n] {
                if let Framed::Pass(packet) = self.framer.push(*byte) {
                    if packet.first() == Some(&b'$') {
                        break 'first_packet;
                    }
                }
            }
        }
        // Characters with a meaning in the framing cannot appear in a packet body.
        let text: String = reason
            .chars()
            .map(|c| {
                if matches!(c, '$' | '#' | '}' | '*') {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        let body = format!("E.{text}");
        let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
        self.send_all(format!("+${body}#{checksum:02x}").as_bytes())?;
        // Closing with gdb's next packets unread would reset the connection before gdb reads the reply.
        match &self.stream {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write)?,
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write)?,
        }
        loop {
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read(&mut buf),
                Stream::Unix(s) => s.read(&mut buf),
            };
            if !matches!(n, Ok(1..)) {
                return Ok(());
            }
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
        let mut outgoing = std::mem::take(&mut self.outgoing);
        self.advertise_local_features(&mut outgoing);
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
    fn thread_list_is_served_in_pieces_and_advertised() {
        let listener = GdbListener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let GdbAddress::Tcp(addr) = listener.local_address().unwrap() else {
            unreachable!()
        };
        let _client = TcpStream::connect(addr).unwrap();
        let mut connection = listener.accept().unwrap();
        assert_eq!(
            connection.thread_list_reply(b"$qXfer:threads:read::0,fff#00"),
            None
        );
        connection.serve_thread_list(2);
        let whole = connection
            .thread_list_reply(b"$qXfer:threads:read::0,fff#00")
            .unwrap();
        assert!(whole.starts_with("l<?xml"), "{whole}");
        assert!(whole.contains("<thread id=\"p1.2\" core=\"1\">vCPU 1</thread>"));
        let first = connection
            .thread_list_reply(b"$qXfer:threads:read::0,10#00")
            .unwrap();
        assert_eq!(first, format!("m{}", &whole[1..17]));
        let mut reply = b"+$PacketSize=1000;vContSupported+#00".to_vec();
        connection.advertise_local_features(&mut reply);
        let text = String::from_utf8(reply.clone()).unwrap();
        assert!(text.starts_with("+$PacketSize=010000;vContSupported+;qXfer:threads:read+#"));
        assert!(checksum_matches(&reply[1..]));
        let mut other = b"$OK#9a".to_vec();
        connection.advertise_local_features(&mut other);
        assert_eq!(other, b"$OK#9a");
    }

    #[test]
    fn memory_reads_are_clamped_to_one_reply() {
        let packet = |body: &str| {
            let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
            format!("${body}#{checksum:02x}").into_bytes()
        };
        assert_eq!(
            clamp_memory_read(packet("mffffffff80000000,ffffffff")),
            packet(&format!("mffffffff80000000,{MAX_MEMORY_READ:x}"))
        );
        for untouched in [
            "m1000,10",
            "m1000,8000",
            "mzz,ffffffff",
            "M0,ffffffff:00",
            "g",
        ] {
            assert_eq!(clamp_memory_read(packet(untouched)), packet(untouched));
        }
        assert!(checksum_matches(&clamp_memory_read(packet("m0,ffffffff"))));
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
