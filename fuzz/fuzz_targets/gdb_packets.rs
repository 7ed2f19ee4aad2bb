//! The gdb stub on arbitrary packets: gdbstub's state machine and every target handler of `gdbstub-kvm`
//! (registers, memory, breakpoints, watchpoints, resume and step, queries) against `FakeTarget`'s in-memory guest.
//!
//! The input is split at `\n`; each piece is sent as one well-formed packet (`$body#checksum`) so the fuzzer
//! reaches the handlers instead of the framer's checksum test. A first byte of `!` sends the rest raw instead,
//! to cover the framer itself. The fuzzer's side then closes the connection, which ends the session.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use gdbstub_kvm::testing::FakeTarget;
use libfuzzer_sys::fuzz_target;

fn framed(data: &[u8]) -> Vec<u8> {
    if let Some(raw) = data.strip_prefix(b"!") {
        return raw.to_vec();
    }
    let mut wire = Vec::new();
    for body in data.split(|&b| b == b'\n') {
        let sum = body.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
        wire.push(b'$');
        wire.extend_from_slice(body);
        wire.extend_from_slice(format!("#{sum:02x}").as_bytes());
    }
    wire
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut target) = FakeTarget::new(2) else {
        return;
    };
    let observer = target.observer();
    let (stub_end, mut gdb_end) = UnixStream::pair().expect("socketpair");
    let wire = framed(data);
    // gdb's side: send everything, hang up, and drain replies so the stub never blocks on a full socket.
    let gdb = std::thread::spawn(move || {
        let _ = gdb_end.write_all(&wire);
        let _ = gdb_end.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!(gdb_end.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = gdbstub_kvm::serve(stub_end.into(), &mut target);
    gdb.join().expect("the gdb side never panics");
    // However the session ended, gdb's breakpoints must be gone from guest memory.
    assert_eq!(observer.planted_breakpoints(), 0, "int3s left in the guest");
});
