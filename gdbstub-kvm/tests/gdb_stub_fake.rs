//! The stub against the real gdb (batch mode), serving a `FakeTarget` in this process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use gdbstub_kvm::testing::{
    data_address, initial_cr3, initial_fs_base, program_address, FakeObserver, FakeTarget,
    EXIT_STUB, HOLE, INITIAL_EFER, LOAD_OFFSET, STORE_OFFSET,
};
use gdbstub_kvm::{DebugTarget, GdbAddress, GdbListener, SessionEnd, StubError};

/// Only guards against a hung test; nothing is asserted about how long anything takes.
const PATIENCE: Duration = Duration::from_secs(60);

struct Server {
    address: String,
    observer: FakeObserver,
    thread: JoinHandle<(Result<SessionEnd, StubError>, FakeTarget)>,
}

impl Server {
    fn start(vcpus: usize) -> Server {
        Self::start_at(vcpus, &"127.0.0.1:0".parse().unwrap())
    }

    fn start_at(vcpus: usize, address: &GdbAddress) -> Server {
        let mut target = FakeTarget::new(vcpus).unwrap();
        let observer = target.observer();
        let listener = GdbListener::bind(address).unwrap();
        let address = match listener.local_address().unwrap() {
            GdbAddress::Tcp(addr) => addr.to_string(),
            GdbAddress::Unix(path) => path.display().to_string(),
        };
        let thread = std::thread::spawn(move || {
            let connection = listener.accept().unwrap();
            let end = gdbstub_kvm::serve(connection, &mut target);
            (end, target)
        });
        Server {
            address,
            observer,
            thread,
        }
    }

    fn finish(self) -> (Result<SessionEnd, StubError>, FakeTarget) {
        self.thread.join().expect("the stub thread panicked")
    }
}

fn gdb_command(address: &str, commands: &[&str]) -> Command {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set confirm off"]);
    cmd.args(["-ex", &format!("target remote {address}")]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    cmd
}

/// Runs gdb to completion; returns stdout and stderr interleaved as gdb wrote them.
fn run_gdb(address: &str, commands: &[&str]) -> String {
    let child = spawn_gdb(address, commands);
    collect_output(child)
}

fn spawn_gdb(address: &str, commands: &[&str]) -> (Child, std::io::PipeReader) {
    let (reader, writer) = std::io::pipe().unwrap();
    let child = gdb_command(address, commands)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .expect("gdb must be installed (/usr/bin/gdb)");
    (child, reader)
}

fn collect_output((mut child, mut reader): (Child, std::io::PipeReader)) -> String {
    let mut output = String::new();
    reader.read_to_string(&mut output).unwrap();
    child.wait().unwrap();
    println!("--- gdb output ---\n{output}");
    output
}

fn hex(value: u64) -> String {
    format!("{value:#x}")
}

#[test]
fn info_threads_lists_every_vcpu() {
    let server = Server::start(3);
    let out = run_gdb(&server.address, &["info threads", "detach"]);
    for vcpu in 0..3 {
        let line = format!(
            "Thread 1.{} (vCPU {vcpu}) {}",
            vcpu + 1,
            hex(program_address(vcpu))
        );
        assert!(out.contains(&line), "missing {line:?}");
    }
    assert!(!out.contains("Thread 1.4"));
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
}

#[test]
fn registers_include_segment_bases_and_system_registers() {
    let server = Server::start(2);
    let out = run_gdb(
        &server.address,
        &[
            "info registers rip cr3 efer fs_base",
            "p/x $cr0",
            "p/x $mxcsr",
            "thread 2",
            "p/x $cr3",
            "p/x $fs_base",
            "detach",
        ],
    );
    assert!(out.contains(&format!("rip            {}", hex(program_address(0)))));
    assert!(out.contains(&format!("cr3            {}", hex(initial_cr3(0)))));
    assert!(out.contains(&format!("efer           {}", hex(INITIAL_EFER))));
    assert!(
        out.contains("[ NXE LMA LME SCE ]"),
        "efer flags are decoded"
    );
    assert!(out.contains(&format!("fs_base        {}", hex(initial_fs_base(0)))));
    assert!(out.contains("$1 = 0x80050033"));
    assert!(out.contains("$2 = 0x1f80"));
    assert!(out.contains(&format!("$3 = {}", hex(initial_cr3(1)))));
    assert!(out.contains(&format!("$4 = {}", hex(initial_fs_base(1)))));
    assert!(server.finish().0.is_ok());
}

#[test]
fn register_writes_reach_the_target() {
    let server = Server::start(1);
    let out = run_gdb(
        &server.address,
        &[
            "set $rbx = 0x1234",
            "set $cr3 = 0xabc000",
            "set $fs_base = 0x7777000",
            "set $efer = (long)0x501",
            "maint flush register-cache",
            "p/x $rbx",
            "p/x $cr3",
            "detach",
        ],
    );
    assert!(out.contains("$1 = 0x1234"));
    assert!(out.contains("$2 = 0xabc000"));
    let (end, mut target) = server.finish();
    assert!(matches!(end, Ok(SessionEnd::Detached)));
    let regs = target.read_registers(0).unwrap();
    assert_eq!(regs.gpr[1], 0x1234);
    assert_eq!(regs.cr3, 0xabc000);
    assert_eq!(regs.fs.base, 0x7777000);
    assert_eq!(regs.efer, 0x501);
    // Hidden segment state gdb never sees is kept.
    assert_eq!(regs.cs.selector, 0x10);
}

#[test]
fn memory_reads_stop_at_an_unmapped_page() {
    let server = Server::start(1);
    let out = run_gdb(
        &server.address,
        &[
            &format!("x/3xb {}", hex(program_address(0))),
            &format!("x/16xb {}", hex(HOLE - 8)),
            &format!("x/2i {}", hex(program_address(0) + STORE_OFFSET)),
            "detach",
        ],
    );
    assert!(out.contains(&format!("{}:\t0x90\t0x48\t0xff", hex(program_address(0)))));
    assert!(out.contains(&format!(
        "{}:\t0x00\t0x00\t0x00\t0x00\t0x00\t0x00\t0x00\t0x00",
        hex(HOLE - 8)
    )));
    assert!(out.contains(&format!("Cannot access memory at address {}", hex(HOLE))));
    assert!(out.contains(&format!("mov    %al,{}", hex(data_address(0)))));
    assert!(server.finish().0.is_ok());
}

#[test]
fn memory_writes_reach_the_target() {
    let server = Server::start(1);
    let scratch = data_address(0) + 0x100;
    let out = run_gdb(
        &server.address,
        &[
            &format!("set {{int}}{} = 0x11223344", hex(scratch)),
            &format!("x/xw {}", hex(scratch)),
            "detach",
        ],
    );
    assert!(out.contains("0x11223344"));
    let (_, mut target) = server.finish();
    let mut buf = [0u8; 4];
    assert_eq!(target.read_memory(0, scratch, &mut buf).unwrap(), 4);
    assert_eq!(u32::from_le_bytes(buf), 0x11223344);
}

#[test]
fn breakpoint_stops_the_vcpu_that_hit_it() {
    let server = Server::start(2);
    let bp = program_address(1) + STORE_OFFSET;
    let out = run_gdb(
        &server.address,
        &[
            &format!("break *{}", hex(bp)),
            "continue",
            "p/x $rax",
            "continue",
            "p/x $rax",
            "info threads",
            "detach",
        ],
    );
    assert!(
        out.contains(&format!("Thread 2 hit Breakpoint 1, {}", hex(bp))),
        "stop on vCPU 1"
    );
    // One loop iteration (one `inc rax`) between the two hits.
    assert!(out.contains("$1 = 0x101") && out.contains("$2 = 0x102"));
    assert!(out.contains(&format!("* 2    Thread 1.2 (vCPU 1) {}", hex(bp))));
    let observer = server.observer.clone();
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
    assert_eq!(
        observer.planted_breakpoints(),
        0,
        "gdb removed its breakpoint before detaching"
    );
}

#[test]
fn hardware_breakpoint_stops_the_vcpu() {
    let server = Server::start(2);
    let bp = program_address(0) + LOAD_OFFSET;
    let out = run_gdb(
        &server.address,
        &[
            &format!("hbreak *{}", hex(bp)),
            "continue",
            "p/x $pc",
            "detach",
        ],
    );
    assert!(out.contains(&format!("Hardware assisted breakpoint 1 at {}", hex(bp))));
    assert!(out.contains(&format!("Thread 1 hit Breakpoint 1, {}", hex(bp))));
    assert!(server.finish().0.is_ok());
}

#[test]
fn stepi_executes_one_instruction_with_scheduler_locking() {
    let server = Server::start(2);
    let out = run_gdb(
        &server.address,
        &[
            "set scheduler-locking on",
            "stepi",
            "p/x $pc",
            "stepi",
            "p/x $pc",
            "p/x $rax",
            "thread 2",
            "p/x $pc",
            "detach",
        ],
    );
    assert!(out.contains(&format!("$1 = {}", hex(program_address(0) + 1))));
    assert!(out.contains(&format!("$2 = {}", hex(program_address(0) + STORE_OFFSET))));
    assert!(out.contains("$3 = 0x1"), "inc rax executed once");
    assert!(
        out.contains(&format!("$4 = {}", hex(program_address(1)))),
        "vCPU 1 did not move"
    );
    assert!(server.finish().0.is_ok());
}

#[test]
fn watchpoints_report_the_accessed_address() {
    let server = Server::start(2);
    let data = data_address(1);
    let out = run_gdb(
        &server.address,
        &[
            &format!("watch *(char*){}", hex(data)),
            "continue",
            "p/x $pc",
            "delete",
            &format!("rwatch *(char*){}", hex(data)),
            "continue",
            "p/x $pc",
            "delete",
            &format!("awatch *(char*){}", hex(data)),
            "continue",
            "detach",
        ],
    );
    assert!(out.contains(&format!(
        "Thread 2 hit Hardware watchpoint 1: *(char*){}",
        hex(data)
    )));
    assert!(out.contains("Old value = 0 '\\000'") && out.contains("New value = 1 '\\001'"));
    assert!(
        out.contains(&format!("$1 = {}", hex(program_address(1) + LOAD_OFFSET))),
        "stopped after the store"
    );
    assert!(out.contains(&format!(
        "Thread 2 hit Hardware read watchpoint 2: *(char*){}",
        hex(data)
    )));
    assert!(
        out.contains(&format!(
            "$2 = {}",
            hex(program_address(1) + LOAD_OFFSET + 7)
        )),
        "stopped after the load"
    );
    assert!(out.contains(&format!(
        "Thread 2 hit Hardware access (read/write) watchpoint 3: *(char*){}",
        hex(data)
    )));
    assert!(server.finish().0.is_ok());
}

#[test]
fn interrupt_stops_a_running_guest() {
    let server = Server::start(2);
    let gdb = spawn_gdb(
        &server.address,
        &["continue", "info threads", "monitor info vcpus", "detach"],
    );
    assert!(
        server.observer.wait_until_running(PATIENCE),
        "gdb never resumed the target"
    );
    // What a Ctrl-C in gdb's terminal does: gdb turns it into an interrupt request to the stub.
    // SAFETY: kill(2) with a pid of a child we spawned and have not reaped.
    unsafe { libc::kill(gdb.0.id() as libc::pid_t, libc::SIGINT) };
    let out = collect_output(gdb);
    assert!(out.contains("received signal SIGINT, Interrupt."));
    assert!(out.contains("Thread 1.1 (vCPU 0)") && out.contains("Thread 1.2 (vCPU 1)"));
    // All-stop: the interrupt stopped every vCPU, not only the reported one.
    let stopped = out
        .lines()
        .filter(|l| l.starts_with("vCPU ") && l.ends_with(" stopped"))
        .count();
    assert_eq!(stopped, 2, "both vCPUs stopped");
    let (end, _) = server.finish();
    assert!(matches!(end, Ok(SessionEnd::Detached)));
}

#[test]
fn detach_leaves_the_guest_running() {
    let server = Server::start(2);
    let out = run_gdb(
        &server.address,
        &[
            &format!("break *{}", hex(program_address(0) + 1)),
            "continue",
            "detach",
        ],
    );
    assert!(out.contains("Thread 1 hit Breakpoint 1"));
    assert!(out.contains("[Inferior 1 (process 1) detached]"));
    let observer = server.observer.clone();
    let (end, _target) = server.finish();
    assert!(matches!(end, Ok(SessionEnd::Detached)));
    assert_eq!(observer.planted_breakpoints(), 0);
    assert!(
        observer.wait_for_progress(10_000, PATIENCE),
        "the guest must keep running after detach"
    );
}

#[test]
fn guest_exit_ends_the_session() {
    let server = Server::start(1);
    let out = run_gdb(
        &server.address,
        &[
            "set $rax = 7",
            &format!("set $pc = {}", hex(EXIT_STUB)),
            "continue",
        ],
    );
    assert!(out.contains("exited with code 07"));
    assert!(matches!(
        server.finish().0,
        Ok(SessionEnd::TargetExited { status: 7 })
    ));
}

#[test]
fn refused_step_is_explained_and_the_session_goes_on() {
    let server = Server::start(1);
    let out = run_gdb(
        &server.address,
        &["set $cs = 0x33", "stepi", "p/x $pc", "detach"],
    );
    assert!(out.contains("single-stepping user code is impossible on this host"));
    assert!(
        out.contains(&format!("$1 = {}", hex(program_address(0)))),
        "nothing executed"
    );
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
}

#[test]
fn unix_socket_transport_works() {
    let dir = std::env::temp_dir().join(format!("gdbstub-kvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gdb.sock");
    let server = Server::start_at(2, &GdbAddress::Unix(path.clone()));
    let out = run_gdb(
        &server.address,
        &["info threads", "monitor info vcpus", "detach"],
    );
    assert!(out.contains("Thread 1.2 (vCPU 1)"));
    assert!(out.contains(&format!(
        "vCPU 1 (thread 2): rip={} cpl=0 cr3={}",
        hex(program_address(1)),
        hex(initial_cr3(1))
    )));
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
    let _ = std::fs::remove_dir_all(dir);
}

fn packet(body: &str) -> Vec<u8> {
    let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
    format!("${body}#{checksum:02x}").into_bytes()
}

/// Reads until a full `$...#xx` reply arrived (skipping acks).
fn read_reply(stream: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).unwrap() == 0 {
            break;
        }
        reply.push(byte[0]);
        if reply.len() >= 3 && reply[reply.len() - 3] == b'#' {
            break;
        }
    }
    decode_run_length(&String::from_utf8_lossy(&reply))
}

/// Expands the protocol's run-length encoding (`X*n` = X repeated n - 29 more times).
fn decode_run_length(reply: &str) -> String {
    let mut out = String::new();
    let mut chars = reply.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let count = chars.next().map_or(0, |n| n as usize - 29);
            let last = out.chars().last().unwrap_or(' ');
            out.extend(std::iter::repeat_n(last, count));
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn garbage_and_a_dropped_connection_mid_step_do_not_panic() {
    let server = Server::start(2);
    let mut stream = TcpStream::connect(&server.address).unwrap();
    stream.write_all(b"hello\x00\xff+-").unwrap();
    stream
        .write_all(&packet("qSupported:multiprocess+"))
        .unwrap();
    let reply = read_reply(&mut stream);
    assert!(
        reply.contains("PacketSize=010000;"),
        "64 KiB packets advertised: {reply}"
    );
    stream.write_all(b"$m1234#00").unwrap(); // bad checksum: nacked, not fatal
    stream.write_all(&packet("Z0,ffffffff81000001,1")).unwrap();
    assert!(read_reply(&mut stream).contains("OK"));
    stream.write_all(&packet("vCont;s:1;c")).unwrap();
    drop(stream);
    let observer = server.observer.clone();
    let (end, _target) = server.finish();
    // Either way the session ended cleanly and gave the guest back.
    assert!(
        matches!(
            end,
            Ok(SessionEnd::ConnectionLost) | Err(StubError::Protocol(_))
        ),
        "{end:?}"
    );
    assert_eq!(
        observer.planted_breakpoints(),
        0,
        "the stub takes its breakpoints out"
    );
    assert!(observer.wait_for_progress(1_000, PATIENCE));
}

/// Each packet gets a fresh session: the stub may answer it with an error or end the session, but
/// must not panic, and must give the guest back either way.
#[test]
fn malformed_and_hostile_packets_never_panic_the_stub() {
    for body in [
        "m zz,qq",
        "G00",
        "vCont;x",
        "Hg-5",
        "p",
        "Z9,1,1",
        "qXfer:features:read:target.xml:zz,1",
        "qXfer:features:read:nosuch.xml:0,fff",
        "mffffffffffffffff,ffff",
        "M0,ffffffffffffffff:00",
        "Xffffffff81000000,4:ab",
        "Hg63",
        "vCont;c:63",
        "vCont;s:63",
        "T63",
        "qRcmd,zz",
        "qRcmd,696e666f",
        "z2,ffffffff81004000,1",
        "Z2,0,1",
        "vKill;1",
    ] {
        let server = Server::start(1);
        let mut stream = TcpStream::connect(&server.address).unwrap();
        // Select the nonexistent thread first so register/memory packets target it.
        let _ = stream.write_all(&packet("Hg63"));
        let _ = stream.write_all(&packet(body));
        let _ = stream.write_all(&packet("g"));
        drop(stream);
        let observer = server.observer.clone();
        let (end, _target) = server.finish();
        assert!(
            matches!(
                end,
                Ok(SessionEnd::ConnectionLost | SessionEnd::KillRequested)
                    | Err(StubError::Protocol(_))
            ),
            "{body}: {end:?}"
        );
        assert!(
            observer.wait_for_progress(100, PATIENCE),
            "{body}: guest given back"
        );
    }
}

#[test]
fn a_crashed_vcpu_is_reported_as_sigsegv_and_stays_inspectable() {
    let server = Server::start(2);
    let out = run_gdb(
        &server.address,
        &[
            "set {char}$pc = 0x0f",
            "continue",
            "p/x $pc",
            "info threads",
            "detach",
        ],
    );
    assert!(out.contains("Thread 1 received signal SIGSEGV"));
    let reason = format!(
        "vCPU 0 crashed: undefined opcode 0x0f at {}",
        hex(program_address(0))
    );
    assert!(out.contains(&reason), "the reason is shown in gdb");
    assert!(out.contains(&format!("$1 = {}", hex(program_address(0)))));
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
}

#[test]
fn kill_is_handed_to_the_vmm_and_the_guest_keeps_running() {
    let server = Server::start(1);
    let out = run_gdb(&server.address, &["kill"]);
    assert!(
        !out.contains("Traceback") && !out.contains("internal-error"),
        "gdb handled kill"
    );
    let observer = server.observer.clone();
    let (end, _target) = server.finish();
    assert!(matches!(end, Ok(SessionEnd::KillRequested)), "{end:?}");
    assert!(observer.wait_for_progress(1_000, PATIENCE));
}

#[test]
fn a_refused_hardware_breakpoint_fails_in_gdb_without_ending_the_session() {
    let server = Server::start(1);
    let mut commands: Vec<String> = (0..5)
        .map(|i| format!("hbreak *{}", hex(program_address(0) + 0x20 + i)))
        .collect();
    commands.extend([
        "continue".to_owned(),
        "delete".to_owned(),
        "stepi".to_owned(),
        "p/x $pc".to_owned(),
        "detach".to_owned(),
    ]);
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = run_gdb(&server.address, &commands);
    assert!(out.contains("Cannot insert hardware breakpoint 5."));
    assert!(
        out.contains(&format!("$1 = {}", hex(program_address(0) + 1))),
        "the session went on"
    );
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
}

#[test]
fn large_reads_use_large_packets() {
    let server = Server::start(1);
    let dump = std::env::temp_dir().join(format!("gdbstub-kvm-dump-{}.bin", std::process::id()));
    let start = program_address(0);
    let len = 0x8000u64; // everything below the hole
    let out = run_gdb(
        &server.address,
        &[
            "set debug remote 1",
            &format!(
                "dump binary memory {} {} {}",
                dump.display(),
                hex(start),
                hex(start + len)
            ),
            "set debug remote 0",
            "detach",
        ],
    );
    let memory_reads = out
        .lines()
        .filter(|l| l.contains("Sending packet: $m"))
        .count();
    assert!(
        (1..=2).contains(&memory_reads),
        "32 KiB in at most two packets, got {memory_reads}"
    );
    let dumped = std::fs::read(&dump).unwrap();
    let _ = std::fs::remove_file(&dump);
    let (_, mut target) = server.finish();
    let mut expected = vec![0u8; len as usize];
    assert_eq!(
        target.read_memory(0, start, &mut expected).unwrap(),
        len as usize
    );
    assert_eq!(dumped.len(), expected.len());
    // Stop before the data the guest keeps storing to now that it runs again.
    let code = (data_address(0) - start) as usize;
    assert!(
        dumped[..code] == expected[..code],
        "dumped bytes differ from guest memory"
    );
}

#[test]
fn scheduler_locking_continues_only_the_selected_vcpu() {
    let server = Server::start(2);
    // vCPU 0 reaches its breakpoint after one instruction, vCPU 1 only after three: without
    // locking vCPU 0 would stop first.
    let out = run_gdb(
        &server.address,
        &[
            &format!("break *{}", hex(program_address(0) + 1)),
            &format!("break *{}", hex(program_address(1) + LOAD_OFFSET)),
            "set scheduler-locking on",
            "thread 2",
            "continue",
            "thread 1",
            "p/x $pc",
            "detach",
        ],
    );
    let bp = hex(program_address(1) + LOAD_OFFSET);
    assert!(out.contains(&format!("Thread 2 hit Breakpoint 2, {bp}")));
    assert!(
        out.contains(&format!("$1 = {}", hex(program_address(0)))),
        "vCPU 0 stayed put"
    );
    assert!(matches!(server.finish().0, Ok(SessionEnd::Detached)));
}

#[test]
fn serve_accepts_a_trait_object() {
    let listener = GdbListener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.local_address().unwrap().to_string();
    let mut fake = FakeTarget::new(1).unwrap();
    let server = std::thread::spawn(move || {
        let target: &mut dyn DebugTarget = &mut fake;
        gdbstub_kvm::serve(listener.accept().unwrap(), target)
    });
    let out = run_gdb(&address, &["p/x $efer", "detach"]);
    assert!(out.contains(&format!("$1 = {}", hex(INITIAL_EFER))));
    assert!(matches!(server.join().unwrap(), Ok(SessionEnd::Detached)));
}
