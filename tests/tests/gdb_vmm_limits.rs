//! The real gdb (batch mode) against `vmm run --gdb` at the edges: many breakpoints at once, long `stepi` runs in
//! ring 0 with the timer firing, ring-3 stores caught by a watchpoint, more hardware breakpoints than the CPU has,
//! a second gdb, gdb killed while the guest is stopped or stepping, and malformed packets.

mod gdb_common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use gdb_common::{
    gdb_command, hex_value_after, host_stops_at_breakpoints, run_gdb, run_gdb_in_order, GdbProcess,
    Vmm, TO_KERNEL_CODE_BY_WATCH, TO_KERNEL_SPIN,
};
use integration_tests::guest_elf;

/// A guest that outlives any session on a slow host (its time runs while gdb holds it stopped); the tests that
/// use it end it with gdb's `kill`, which stops the VM.
const LONG_RUN: &str = "work=kernel_spin:100 secs=60";

/// The functions of the ring-0 chain `kernel_spin → kernel_stage1 → kernel_stage2 → kernel_leaf`.
const KERNEL_CHAIN: [&str; 4] = [
    "kernel_spin",
    "kernel_stage1",
    "kernel_stage2",
    "kernel_leaf",
];

/// One instruction of the guest ELF as `objdump -d` lists it.
#[derive(Debug, Clone)]
struct Instruction {
    addr: u64,
    function: String,
    text: String,
}

/// Every instruction of the guest's text, in address order, from the real objdump.
fn disassembly() -> Vec<Instruction> {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(guest_elf())
        .output()
        .expect("objdump (binutils) must be installed");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut function = String::new();
    let mut list = Vec::new();
    for line in text.lines() {
        // `ffffffff80108bf0 <kernel_leaf>:` opens a function; `ffffffff80108bf0:\tpush   %rbp` is an instruction.
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
            function = name.1.to_string();
            continue;
        }
        let Some((addr, insn)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        list.push(Instruction {
            addr,
            function: function.clone(),
            text: insn.trim().to_string(),
        });
    }
    assert!(!list.is_empty(), "objdump listed no instructions");
    list
}

/// The `$N = 0x...` values gdb printed after each `marker` line, in order.
fn hex_values_after_each(out: &str, marker: &str) -> Vec<u64> {
    out.split(marker)
        .skip(1)
        .map(|part| hex_value_after(part, ""))
        .collect()
}

#[test]
fn twenty_breakpoints_at_once_all_hit() {
    let listing = disassembly();
    // The first five instructions of each function of the chain: straight-line prologues, so every call runs
    // all of them.
    let addrs: Vec<u64> = KERNEL_CHAIN
        .iter()
        .flat_map(|name| {
            listing
                .iter()
                .filter(move |i| i.function == *name)
                .take(5)
                .map(|i| i.addr)
        })
        .collect();
    assert_eq!(addrs.len(), 20);
    let vmm = Vmm::start(LONG_RUN, "1");
    let mut commands: Vec<String> = TO_KERNEL_SPIN.iter().map(|c| c.to_string()).collect();
    // Temporary breakpoints delete themselves when hit, so each `continue` must stop at one not seen yet; all 20
    // are planted together from the first `continue` on.
    commands.extend(addrs.iter().map(|a| format!("tbreak *{a:#x}")));
    commands.push("info breakpoints".into());
    for _ in &addrs {
        commands.push("continue".into());
        commands.push("echo pc-at-stop\\n".into());
        commands.push("p/x $pc".into());
    }
    commands.push("info breakpoints".into());
    commands.push("kill".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = run_gdb(&vmm.address, &commands);

    let planted = out
        .lines()
        .filter(|l| l.contains("breakpoint     del  y"))
        .count();
    assert_eq!(planted, 20, "20 temporary breakpoints set at once");
    let hits = out
        .lines()
        .filter_map(|l| l.strip_prefix("Temporary breakpoint "))
        .filter(|rest| {
            // `Temporary breakpoint 8, 0x... in ...` is a hit; `Temporary breakpoint 8 at 0x...` the setting.
            let number = rest.split(',').next().unwrap();
            !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
        })
        .count();
    assert_eq!(hits, 20, "every continue stopped at a breakpoint");
    let stops: BTreeSet<u64> = hex_values_after_each(&out, "pc-at-stop")
        .into_iter()
        .collect();
    let wanted: BTreeSet<u64> = addrs.iter().copied().collect();
    assert_eq!(stops, wanted, "each breakpoint address was hit once");
    assert!(
        out.contains("No breakpoints or watchpoints."),
        "all used up"
    );
    let (code, _, stderr) = vmm.finish();
    assert!(stderr.contains("gdb asked to kill the guest"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
}

/// Whether `text` (objdump's or gdb's AT&T syntax) is an instruction that may go somewhere other than the next
/// one.
fn transfers_control(text: &str) -> bool {
    let mnemonic = text.split_whitespace().next().unwrap_or("");
    mnemonic.starts_with('j') || mnemonic.starts_with("call") || mnemonic.starts_with("ret")
}

/// One `x/2i $pc` listing: the current instruction's address, symbol and text, and the next one's address.
struct Listed {
    pc: u64,
    symbol: String,
    text: String,
    next: u64,
}

/// Parses gdb's `=> 0xffffffff80108d20 <kernel_spin>:\tpush   %rbp` and the line after it.
fn parse_listings(out: &str) -> Vec<Listed> {
    let lines: Vec<&str> = out.lines().collect();
    let addr_of = |line: &str| {
        let word = line.trim_start_matches("=>").split_whitespace().next()?;
        u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
    };
    lines
        .windows(2)
        .filter(|w| w[0].starts_with("=> 0x"))
        .map(|w| {
            let (head, text) = w[0].split_once(":\t").expect("address:\tinstruction");
            let symbol = head
                .split_once('<')
                .map(|(_, s)| s.trim_end_matches('>').to_string())
                .unwrap_or_default();
            Listed {
                pc: addr_of(w[0]).expect("current address"),
                symbol,
                text: text.trim().to_string(),
                next: addr_of(w[1]).expect("next address"),
            }
        })
        .collect()
}

/// `kernel_leaf` of gdb's `guest::workload::kernel_leaf+12`.
fn function_of(symbol: &str) -> &str {
    let name = symbol.split('+').next().unwrap();
    name.rsplit("::").next().unwrap()
}

#[test]
fn a_hundred_stepi_in_ring0_advance_rip_and_never_enter_the_timer_handler() {
    // A 1 kHz timer fires hundreds of times while gdb steps: a step that let interrupts in would land in
    // `timer_entry`. Where no breakpoint stops the guest (QEMU's TCG SVM), a write watch gets it into ring 0.
    // That guest runs long enough for slow steps (TCG) and is ended by gdb's `kill`; the other finishes after
    // `detach`. Both end with status 0.
    let stops = host_stops_at_breakpoints();
    let (vmm, mut commands): (_, Vec<&str>) = if stops {
        let vmm = Vmm::start("work=kernel_spin:100 secs=2 hz=1000", "1");
        (vmm, TO_KERNEL_SPIN.to_vec())
    } else {
        let vmm = Vmm::start_running("work=kernel_spin:100 secs=60 hz=1000", "1");
        (vmm, TO_KERNEL_CODE_BY_WATCH.to_vec())
    };
    commands.push("p $cs & 3");
    for _ in 0..100 {
        commands.push("x/2i $pc");
        commands.push("stepi");
    }
    commands.extend(["x/2i $pc", if stops { "detach" } else { "kill" }]);
    let out = run_gdb(&vmm.address, &commands);
    assert!(out.contains("$1 = 0"), "stepping starts in ring 0");
    let listed = parse_listings(&out);
    assert_eq!(
        listed.len(),
        101,
        "a listing before each step and after the last"
    );
    for (before, after) in listed.iter().zip(&listed[1..]) {
        assert_ne!(after.pc, before.pc, "stepi at {:#x} moved RIP", before.pc);
        let function = function_of(&after.symbol);
        assert!(
            KERNEL_CHAIN.contains(&function),
            "step from {:#x} ({}) landed in {} at {:#x}, outside the kernel_spin chain",
            before.pc,
            before.text,
            after.symbol,
            after.pc
        );
        if !transfers_control(&before.text) {
            assert_eq!(
                after.pc, before.next,
                "{} at {:#x} runs on to the next instruction",
                before.text, before.pc
            );
        }
    }
    let functions: BTreeSet<&str> = listed.iter().map(|l| function_of(&l.symbol)).collect();
    assert!(
        functions.len() >= 3,
        "100 steps went down the call chain: {functions:?}"
    );
    let (code, _, _) = vmm.finish();
    assert_eq!(code, Some(0), "the guest finished after detach");
}

#[test]
fn watch_user_counter_stops_after_the_ring3_store() {
    let listing = disassembly();
    // Where the guest's ring-3 stores to user_counter end: the address of the instruction after each.
    let after_stores: BTreeSet<u64> = listing
        .windows(2)
        .filter(|w| w[0].text.contains("<user_counter>") && w[0].text.starts_with("lock inc"))
        .map(|w| w[1].addr)
        .collect();
    assert!(
        !after_stores.is_empty(),
        "objdump shows the user_counter increments"
    );
    // Where no breakpoint stops the guest (QEMU's TCG SVM), gdb attaches to it running, paging already on; the
    // watch is then gdb's first breakpoint number rather than its second.
    let stops = host_stops_at_breakpoints();
    let (vmm, mut commands): (_, Vec<&str>) = if stops {
        let vmm = Vmm::start("work=kernel_spin:50,user_hot_a:50 secs=3", "1");
        (vmm, TO_KERNEL_SPIN.to_vec())
    } else {
        let vmm = Vmm::start_running("work=kernel_spin:50,user_hot_a:50 secs=5", "1");
        (vmm, vec!["set language c"])
    };
    commands.extend([
        "info registers fs_base cr3 efer",
        "x/16gx &kernel_counter",
        "watch *(unsigned long *)&user_counter",
        "continue",
        "echo pc-after-watch\\n",
        "p/x $pc",
        "echo cpl-after-watch\\n",
        "p $cs & 3",
        "delete",
        "detach",
    ]);
    let out = run_gdb(&vmm.address, &commands);

    let register = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in info registers"))
            .to_string()
    };
    assert!(register("fs_base").contains("0x"), "fs_base is shown");
    assert!(!register("cr3").contains(" 0x0 "), "paging is on");
    assert!(register("efer").contains("LMA"), "long mode");
    // x/16gx: 8 lines of two quadwords each, the first labelled with the symbol.
    let dump: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("0xffffffff8") && l.matches("\t0x").count() == 2)
        .collect();
    assert_eq!(dump.len(), 8, "x/16gx printed 16 quadwords");
    assert!(dump[0].contains("<kernel_counter>:"));

    let number = if stops { 2 } else { 1 };
    assert!(out.contains(&format!(
        "Hardware watchpoint {number}: *(unsigned long *)&user_counter"
    )));
    let value = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix} in gdb's output"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("New value = "),
        value("Old value = ") + 1,
        "the store added one"
    );
    let pc = hex_value_after(&out, "pc-after-watch");
    assert!(
        after_stores.contains(&pc),
        "stopped at {pc:#x}, right after one of the stores ending at {after_stores:x?}"
    );
    let cpl = out[out.find("cpl-after-watch").unwrap()..]
        .lines()
        .find(|l| l.starts_with('$'))
        .unwrap();
    assert!(cpl.ends_with("= 3"), "the store ran in ring 3: {cpl}");
    let (code, _, _) = vmm.finish();
    assert_eq!(code, Some(0), "the guest finished after detach");
}

#[test]
fn a_fifth_hardware_breakpoint_is_refused_and_the_guest_runs_on() {
    let vmm = Vmm::start(LONG_RUN, "1");
    let mut commands: Vec<&str> = TO_KERNEL_SPIN.to_vec();
    commands.extend([
        "hbreak kernel_leaf",
        "hbreak kernel_stage1",
        "hbreak kernel_stage2",
        "hbreak *kernel_leaf+4",
        "hbreak *kernel_stage1+4",
        "echo first-continue\\n",
        "continue",
        "echo after-refusal\\n",
        "p/x $pc",
        // gdb inserts in address order, so the refused one is any of them: with one fewer, the rest fit.
        "delete 6",
        "continue",
        "delete",
        "kill",
    ]);
    let out = run_gdb_in_order(&vmm.address, &commands);
    let refusal = &out[out.find("first-continue").unwrap()..out.find("after-refusal").unwrap()];
    assert!(
        refusal.contains("Cannot insert hardware breakpoint"),
        "gdb reports the refused 5th: {refusal}"
    );
    assert!(!refusal.contains("Breakpoint "), "the guest did not run");
    let after = &out[out.find("after-refusal").unwrap()..];
    assert!(after.contains("\nBreakpoint "), "the four that fit work");
    let (code, _, stderr) = vmm.finish();
    assert!(
        stderr.contains("all 4 debug registers (DR0-DR3) are in use"),
        "the VMM says why"
    );
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
}

#[test]
fn a_second_gdb_is_refused_while_the_first_keeps_working() {
    let dir = std::env::temp_dir().join(format!("gdb-second-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let go = dir.join("go");
    let vmm = Vmm::start(LONG_RUN, "1");
    let wait_for_go = format!("shell while [ ! -e {} ]; do sleep 0.1; done", go.display());
    let mut first_commands: Vec<&str> = TO_KERNEL_SPIN.to_vec();
    first_commands.extend([
        "echo first-attached\\n",
        &wait_for_go,
        "break kernel_leaf",
        "continue",
        "bt 2",
        "delete",
        "kill",
    ]);
    let mut first = GdbProcess::spawn(gdb_command(&vmm.address, &first_commands));
    first.wait_for("first-attached", gdb_common::GDB_LIMIT);

    let second = run_gdb(&vmm.address, &["info threads", "p $pc"]);
    assert!(
        second.contains("Remote failure reply: E.another gdb is attached to this VM"),
        "the second gdb is told why"
    );
    assert!(second.contains("No threads."), "and is not attached");

    std::fs::write(&go, b"").unwrap();
    let out = first.finish();
    assert!(out.contains("Breakpoint 2, "), "the first gdb still works");
    assert!(out.contains("kernel_stage2"), "its backtrace too");
    let (code, _, stderr) = vmm.finish();
    assert!(stderr.contains("refusing a second connection"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gdb_killed_while_stopped_or_stepping_leaves_the_guest_running_for_the_next_gdb() {
    let vmm = Vmm::start(LONG_RUN, "1");

    // Killed while every vCPU is stopped (gdb sits in a shell command).
    let mut stopped: Vec<&str> = TO_KERNEL_SPIN.to_vec();
    stopped.extend(["echo stopped-here\\n", "shell sleep 600"]);
    let mut gdb = GdbProcess::spawn(gdb_command(&vmm.address, &stopped));
    gdb.wait_for("stopped-here", gdb_common::GDB_LIMIT);
    println!("--- first gdb ---\n{}", gdb.kill());

    // Killed while stepping: a loop of stepi, each one a resume and a stop.
    let dir = std::env::temp_dir().join(format!("gdb-killed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("step-forever.gdb");
    std::fs::write(
        &script,
        "set $i = 0\nwhile $i < 1000000\n  stepi\n  set $i = $i + 1\nend\n",
    )
    .unwrap();
    let source = format!("source {}", script.display());
    let mut gdb = GdbProcess::spawn(gdb_command(
        &vmm.address,
        &[
            "set language c",
            "break kernel_leaf",
            "continue",
            "echo counter-before\\n",
            "p/x *(unsigned long *)&kernel_counter",
            "delete",
            "echo stepping\\n",
            &source,
        ],
    ));
    gdb.wait_for("stepping", gdb_common::GDB_LIMIT);
    // Let it get going: a few dozen steps.
    std::thread::sleep(Duration::from_millis(1500));
    let second = gdb.kill();
    println!("--- second gdb ---\n{second}");
    let before = hex_value_after(&second, "counter-before");

    let out = run_gdb(
        &vmm.address,
        &[
            "set language c",
            "info breakpoints",
            "break kernel_leaf",
            "continue",
            "echo counter-after\\n",
            "p/x *(unsigned long *)&kernel_counter",
            "bt 4",
            "kill",
        ],
    );
    assert!(
        out.contains("No breakpoints or watchpoints."),
        "a new session starts clean"
    );
    assert!(out.contains("Breakpoint 1, "), "the third gdb works");
    let after = hex_value_after(&out, "counter-after");
    assert!(
        after > before,
        "the guest ran on after gdb was killed ({before} -> {after})"
    );
    let (code, _, stderr) = vmm.finish();
    assert!(!stderr.contains("panicked"), "no panic in the VMM");
    assert_eq!(
        stderr.matches("gdb connection lost").count(),
        2,
        "both killed gdbs were noticed"
    );
    assert!(stderr.contains("gdb asked to kill the guest"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}

fn packet(body: &str) -> Vec<u8> {
    let checksum = body.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
    format!("${body}#{checksum:02x}").into_bytes()
}

/// The next `$...#xx` reply (acks and nacks skipped), or `None` when the stub closed the connection or said
/// nothing for a while.
fn read_reply(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) => {}
            _ => return None,
        }
        if reply.is_empty() && byte[0] != b'$' {
            continue;
        }
        reply.push(byte[0]);
        if reply.len() >= 3 && reply[reply.len() - 3] == b'#' {
            return Some(String::from_utf8_lossy(&reply).into_owned());
        }
    }
}

#[test]
fn malformed_and_hostile_packets_get_errors_and_gdb_still_works() {
    let vmm = Vmm::start(LONG_RUN, "1");
    let address = vmm.address.clone();
    // Line noise and a corrupted packet first, then a well-formed query: the stub is still in sync.
    let mut stream = TcpStream::connect(&address).unwrap();
    stream.write_all(b"hello\x00\xff+-").unwrap();
    stream.write_all(b"$m1234#00").unwrap();
    stream
        .write_all(&packet("qSupported:multiprocess+"))
        .unwrap();
    let reply = read_reply(&mut stream).expect("qSupported answered");
    assert!(reply.contains("PacketSize="), "{reply}");
    // Reads of unmapped and huge ranges: an error, and at most one packet's worth.
    stream.write_all(&packet("mffffc0000dead000,10")).unwrap();
    let unmapped = read_reply(&mut stream).expect("reply");
    assert!(unmapped.starts_with("$E"), "{unmapped}");
    // The guest is at its first instruction, paging off: virtual addresses are physical, the boot code is at 1 MiB.
    stream.write_all(&packet("m100000,ffffffff")).unwrap();
    let huge = read_reply(&mut stream).expect("reply");
    assert!(
        huge.len() > 1024 && huge.len() <= gdbstub_kvm::PACKET_SIZE + 4,
        "a huge read is cut to the packet size: {} bytes",
        huge.len()
    );
    drop(stream);
    // Each of these in a session of its own: the stub answers with an error or ends that session.
    for body in [
        "m zz,qq",
        "G00",
        "vCont;x",
        "Hg-5",
        "p",
        "Z9,1,1",
        "mffffffffffffffff,ffff",
        "Mffffc0000dead000,ffffffffffffffff:00",
        "Xffffc0000dead000,4:ab",
        "Hg63",
        "vCont;c:63",
        "vCont;s:63",
        "qRcmd,zz",
        "qRcmd,6e6f2073756368",
        "z1,ffffffff81004000,1",
        "Z2,0,1",
        "qXfer:features:read:target.xml:zz,1",
    ] {
        let mut stream = TcpStream::connect(&address).unwrap();
        stream.write_all(&packet(body)).unwrap();
        let reply = read_reply(&mut stream);
        println!("{body} -> {reply:?}");
        // The previous session winds down while this one connects: it waits its turn, it is not refused.
        assert!(
            !reply.unwrap_or_default().contains("another gdb"),
            "{body}: a session of its own"
        );
    }
    // The VMM is still there, and a real gdb gets a working session.
    let out = run_gdb(
        &address,
        &[
            TO_KERNEL_SPIN[0],
            TO_KERNEL_SPIN[1],
            TO_KERNEL_SPIN[2],
            TO_KERNEL_SPIN[3],
            "info symbol $pc",
            "kill",
        ],
    );
    // The guest ran on between the hostile sessions and reached kernel_spin again.
    assert!(
        out.lines()
            .any(|l| l.starts_with("kernel_spin") && l.ends_with("in section .text")),
        "{out}"
    );
    let (code, _, stderr) = vmm.finish();
    assert!(!stderr.contains("panicked"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
}

#[test]
fn a_read_watch_on_a_page_the_guest_runs_code_from_is_explained_and_recoverable() {
    // user_counter shares its page with the ring-3 code that bumps it: a read watch unmaps that page, and the
    // next instruction fetch from it is an emulation failure on PVM hosts.
    let vmm = Vmm::start("work=kernel_spin:50,user_hot_a:50 secs=60", "1");
    let mut commands: Vec<&str> = TO_KERNEL_SPIN.to_vec();
    commands.extend([
        "rwatch *(unsigned long *)&user_counter",
        "continue",
        "echo after-stop\\n",
        "delete",
        "hbreak kernel_spin",
        "continue",
        "echo cpl-after-delete\\n",
        "p $cs & 3",
        "kill",
    ]);
    let out = run_gdb_in_order(&vmm.address, &commands);
    let stop = &out[..out.find("after-stop").expect("marker")];
    // Returning to ring 3 fetches from the unmapped page before any load of user_counter: KVM cannot run code
    // from a page without a memory slot, and the stop says why instead of just "emulation failure".
    assert!(stop.contains("received signal SIGSEGV"), "{stop}");
    assert!(
        stop.contains("which a read or access watchpoint took away from the guest"),
        "{stop}"
    );
    let after = &out[out.find("cpl-after-delete").unwrap()..];
    assert!(
        after
            .lines()
            .any(|l| l.starts_with('$') && l.ends_with("= 0")),
        "with the watch deleted the guest ran on to kernel_spin: {after}"
    );
    let (code, _, stderr) = vmm.finish();
    assert!(!stderr.contains("panicked"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
}

#[test]
fn both_vcpus_hitting_one_breakpoint_are_each_reported_over_successive_continues() {
    // Both vCPUs run kernel_spin: hits often coincide in one stop. The stub reports one and drops the other's
    // event (that vCPU has not executed the int3 and hits it again when resumed), so gdb never gets a queued hit
    // while it steps over a breakpoint, and nothing is lost.
    let vmm = Vmm::start(LONG_RUN, "2");
    let mut commands: Vec<&str> = TO_KERNEL_SPIN.to_vec();
    commands.push("break kernel_leaf");
    commands.extend(std::iter::repeat_n("continue", 24));
    commands.extend(["delete", "kill"]);
    let out = run_gdb_in_order(&vmm.address, &commands);
    let hits: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" hit Breakpoint 2, "))
        .collect();
    assert_eq!(hits.len(), 24, "every continue stopped at the breakpoint");
    for thread in ["Thread 1 ", "Thread 2 "] {
        assert!(
            hits.iter().any(|h| h.starts_with(thread)),
            "{thread}reported: {hits:?}"
        );
    }
    assert!(!out.contains("internal-error"), "gdb stayed sane");
    let (code, _, stderr) = vmm.finish();
    assert!(!stderr.contains("panicked"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
}
