//! The real gdb (batch mode) against `vmm run --gdb` with the test guest on this host's KVM.
//!
//! Every session starts with `--gdb-wait`, so the guest runs no instruction before gdb is attached. Its paging is
//! off at that point: software breakpoints on kernel addresses wait until it is on, watchpoints need it, so most
//! scripts first stop in `kernel_spin` with a hardware breakpoint (which needs no translation).

mod gdb_common;

use std::process::Stdio;
use std::time::Duration;

use gdb_common::{
    check_breakpoints_refused, collect_lines, gdb_command, hex_value_after,
    host_stops_at_breakpoints, is_pvm_host, run_gdb, Vmm, GDB_LIMIT, INTERRUPT_ATTEMPTS,
    TO_KERNEL_SPIN,
};

#[test]
fn breakpoints_backtrace_registers_memory_and_stepi_on_two_vcpus() {
    let vmm = Vmm::start("work=kernel_spin:100 secs=1", "2");
    if !host_stops_at_breakpoints() {
        return check_breakpoints_refused(vmm);
    }
    let out = run_gdb(
        &vmm.address,
        &[
            "info threads",
            // Set at the first instruction, before the guest has paging: planted once it has.
            "set language c",
            "break kernel_leaf",
            "continue",
            "bt 4",
            "info registers cr3 efer",
            "x/4gx &kernel_counter",
            "delete",
            "hbreak kernel_stage2",
            "continue",
            "info symbol $pc",
            "x/2i $pc",
            "set var $rdi = 5",
            // Registers a step's stop reply does not carry (gdb fetches them after the step): what was written
            // here must come back, not a partial snapshot's zeros. Ring-0 guest code has no SSE and no swapgs.
            "set var $xmm3.v2_int64[0] = 0x1122334455667788",
            "set var $xmm3.v2_int64[1] = 0x0102030405060708",
            "set var $k_gs_base = 0xffff888000001234",
            "stepi",
            "echo after-stepi\\n",
            "p/x $pc",
            "echo rdi-after-step\\n",
            "p $rdi",
            "echo xmm3-after-step\\n",
            "p/x $xmm3.v2_int64",
            "echo kgs-after-step\\n",
            "p/x $k_gs_base",
            "delete",
            "detach",
        ],
    );
    let threads = out
        .lines()
        .filter(|l| l.contains("Thread 1.1 (vCPU 0)") || l.contains("Thread 1.2 (vCPU 1)"))
        .count();
    assert_eq!(threads, 2, "info threads lists both vCPUs");
    assert!(out.contains("hit Breakpoint 1, guest::workload::kernel_leaf"));
    let frames: Vec<&str> = out.lines().filter(|l| l.starts_with('#')).collect();
    let names = [
        "kernel_leaf",
        "kernel_stage2",
        "kernel_stage1",
        "kernel_spin",
    ];
    assert!(frames.len() >= 4, "bt shows 4 frames");
    for (frame, name) in frames.iter().zip(names) {
        assert!(
            frame.contains(&format!("guest::workload::{name} ")),
            "{frame} is {name}"
        );
    }
    let cr3 = out
        .lines()
        .find(|l| l.starts_with("cr3 "))
        .expect("cr3 line");
    assert!(!cr3.contains(" 0x0 "), "paging is on: {cr3}");
    let efer = out
        .lines()
        .find(|l| l.starts_with("efer "))
        .expect("efer line");
    assert!(efer.contains("LMA"), "long mode: {efer}");
    assert!(
        out.contains("<kernel_counter>:\t0x"),
        "x/4gx of a kernel address"
    );
    assert!(
        out.contains("hit Breakpoint 2, "),
        "hbreak kernel_stage2 hit"
    );
    let at = out
        .lines()
        .find(|l| l.contains("in section .text"))
        .expect("info symbol");
    assert!(
        at.starts_with("kernel_stage2 + ") || at.starts_with("guest::workload::kernel_stage2 + "),
        "{at}"
    );
    // `x/2i $pc` lists the current instruction and the next one; stepi must land exactly on the second.
    let listing: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("=> 0x") || l.starts_with("   0x"))
        .collect();
    let next = listing[1].split_whitespace().next().unwrap();
    let next = u64::from_str_radix(next.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        hex_value_after(&out, "after-stepi"),
        next,
        "stepi ran one instruction"
    );
    // That instruction is `lea (%rdi,%rdi,2),%rdi`: the rdi gdb wrote reached the vCPU and was tripled.
    assert!(
        listing[0].contains("lea    (%rdi,%rdi,2),%rdi"),
        "{}",
        listing[0]
    );
    let rdi = out[out.find("rdi-after-step").unwrap()..]
        .lines()
        .find(|l| l.starts_with('$'))
        .expect("p $rdi");
    assert!(rdi.ends_with(" = 15"), "{rdi}");
    let xmm3 = out[out.find("xmm3-after-step").unwrap()..]
        .lines()
        .find(|l| l.starts_with('$'))
        .expect("p/x $xmm3.v2_int64");
    assert!(
        xmm3.ends_with(" = {0x1122334455667788, 0x102030405060708}"),
        "xmm3 after the step: {xmm3}"
    );
    assert_eq!(
        hex_value_after(&out, "kgs-after-step"),
        0xffff888000001234,
        "k_gs_base after the step"
    );
    assert!(out.contains("[Inferior 1 (process 1) detached]"));
    let (code, stdout, _) = vmm.finish();
    assert_eq!(code, Some(0), "the guest finished after detach");
    assert!(
        stdout.contains("guest-counters:"),
        "the guest ran to its end"
    );
}

#[test]
fn watchpoints_by_page_protection_report_values() {
    let vmm = Vmm::start("work=kernel_spin:100 secs=1", "1");
    if !host_stops_at_breakpoints() {
        return check_breakpoints_refused(vmm);
    }
    let out = run_gdb(
        &vmm.address,
        &[
            TO_KERNEL_SPIN[0],
            TO_KERNEL_SPIN[1],
            TO_KERNEL_SPIN[2],
            TO_KERNEL_SPIN[3],
            "watch *(long *)&kernel_counter",
            "continue",
            "x/2i $pc - 8",
            "delete",
            "rwatch *(long *)&kernel_counter",
            "continue",
            "delete",
            "detach",
        ],
    );
    assert!(out.contains("Hardware watchpoint 2: *(long *)&kernel_counter"));
    let old: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Old value = "))
        .expect("old value")
        .trim()
        .parse()
        .unwrap();
    let new: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("New value = "))
        .expect("new value")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(new, old + 1, "kernel_leaf bumps the counter by one");
    // The stop comes after the store: the instruction before RIP is the one that writes kernel_counter.
    assert!(
        out.lines()
            .any(|l| l.contains("<kernel_counter>") && !l.contains("=>")),
        "the store to kernel_counter precedes RIP"
    );
    assert!(out.contains("Hardware read watchpoint 3: *(long *)&kernel_counter"));
    assert!(out.contains("Value = "));
    let (code, _, _) = vmm.finish();
    assert_eq!(code, Some(0));
}

#[test]
fn user_breakpoints_follow_the_host_and_interrupt_stops_every_vcpu() {
    let vmm = Vmm::start("work=kernel_spin:50,user_hot_a:50 secs=2", "2");
    // Where no breakpoint can stop the guest (QEMU's TCG SVM), the guest runs from its first instruction: the
    // user breakpoint is refused, and the interrupt, threads and step are checked all the same.
    let stops = host_stops_at_breakpoints();
    let mut commands: Vec<&str> = if stops {
        TO_KERNEL_SPIN.to_vec()
    } else {
        vec!["set language c"]
    };
    commands.extend([
        "break user_leaf",
        "continue",
        "delete",
        "echo second-continue\\n",
        "continue",
        "info threads",
        "monitor info vcpus",
        "echo cpl=\n",
        "p $cs & 3",
        "stepi",
        "detach",
    ]);
    let mut gdb_cmd = gdb_command(&vmm.address, &commands);
    // One pipe for stdout and stderr keeps gdb's own order (target output such as `monitor` goes to stderr).
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut gdb = gdb_cmd
        .stdin(Stdio::null())
        .stdout(writer.try_clone().expect("pipe"))
        .stderr(writer)
        .spawn()
        .expect("gdb must be installed (/usr/bin/gdb)");
    // Close our copies of the write end (the Command holds them), so the reader sees gdb's end.
    drop(gdb_cmd);
    let gdb_out = collect_lines(reader);
    let mut seen = String::new();
    while !seen.contains("second-continue") {
        seen.push_str(
            &gdb_out
                .recv_timeout(GDB_LIMIT)
                .expect("gdb got to the second continue"),
        );
    }
    // Interrupt as a Ctrl-C in gdb's terminal does, until gdb reports the stop: a SIGINT that lands before gdb
    // has resumed the target only aborts a command in between, so send another after a quiet spell.
    'interrupt: for _ in 0..INTERRUPT_ATTEMPTS {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(gdb.id() as libc::pid_t, libc::SIGINT) };
        while let Ok(line) = gdb_out.recv_timeout(Duration::from_secs(2)) {
            seen.push_str(&line);
            if seen.contains("received signal SIGINT") {
                break 'interrupt;
            }
        }
    }
    let _ = gdb.wait();
    let out = seen + &gdb_out.iter().collect::<String>();
    println!("--- gdb output ---\n{out}");
    let (code, _, stderr) = vmm.finish();
    if !stops {
        assert!(out.contains("Cannot insert breakpoint 1"), "refused in gdb");
        assert!(
            stderr.contains("does not intercept int3"),
            "the VMM says why"
        );
    } else if is_pvm_host() {
        assert!(out.contains("Cannot insert breakpoint 2"), "refused in gdb");
    } else {
        assert!(out.contains("hit Breakpoint 2, guest::user::user_leaf"));
    }
    assert!(out.contains("received signal SIGINT"));
    let stopped = out
        .lines()
        .filter(|l| l.starts_with("vCPU ") && l.ends_with(" stopped"))
        .count();
    assert_eq!(stopped, 2, "all-stop: both vCPUs stopped");
    // The interrupted vCPU is in ring 3 (user_hot_a) or ring 0 (kernel_spin, interrupts): on PVM a step is
    // refused in ring 3 and done in ring 0.
    let cpl_line = out[out.find("cpl=").expect("cpl marker")..]
        .lines()
        .find(|l| l.starts_with('$'))
        .expect("p $cs & 3");
    let refused = out.contains("cannot be stepped from the VMM");
    if is_pvm_host() && cpl_line.ends_with("= 3") {
        assert!(refused, "a ring-3 step is refused with a message");
    } else {
        assert!(!refused, "{cpl_line}: the step is done");
    }
    if is_pvm_host() {
        assert!(
            stderr.contains("user-space (ring-3) code"),
            "the VMM says why"
        );
    }
    assert_eq!(code, Some(0), "the guest finished after detach");
}

#[test]
fn guest_exit_and_crash_reach_gdb() {
    // Over a unix socket this time.
    let dir = std::env::temp_dir().join(format!("gdb-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("gdb.sock");
    let vmm = Vmm::start_at("work=kernel_spin:100 secs=1", "1", socket.to_str().unwrap());
    let out = run_gdb(&vmm.address, &["continue"]);
    assert!(out.contains("[Inferior 1 (process 1) exited normally]"));
    assert_eq!(vmm.finish().0, Some(0));
    let _ = std::fs::remove_dir_all(&dir);

    let vmm = Vmm::start("work=kernel_spin:100 secs=1 fault=triple", "1");
    let out = run_gdb(&vmm.address, &["continue", "p/x $pc", "detach"]);
    assert!(out.contains("received signal SIGSEGV"), "crash stop");
    assert!(out.contains("crashed: triple fault"), "with the reason");
    let (code, _, stderr) = vmm.finish();
    assert_eq!(code, Some(1), "the crash ends the VM once gdb is gone");
    assert!(stderr.contains("guest crashed"));
}

/// Without any breakpoint: attach to a running guest, stop after a ring-3 store with a watchpoint (page
/// protection), then single-step there. Ring-3 steps reach the VMM on VMX/SVM hosts (the SVM lane proves it) and are
/// refused with a reason on PVM hosts, which deliver them to the guest. One step: the store is followed by
/// `user_leaf`'s epilogue, where gdb 13's `stepi` sometimes plants an internal breakpoint (`Cannot insert breakpoint
/// 0` on hosts that take none, such as QEMU's TCG SVM).
#[test]
fn ring3_steps_after_a_user_watchpoint_follow_the_host() {
    let vmm = Vmm::start_running("work=kernel_spin:20,user_hot_a:80 secs=30", "2");
    let out = run_gdb(
        &vmm.address,
        &[
            "set language c",
            "info threads",
            "watch *(unsigned long *)&user_counter",
            "continue",
            "echo cpl-after-watch\\n",
            "p $cs & 3",
            "delete",
            "echo pc-before-step\\n",
            "p/x $pc",
            "stepi",
            "echo pc-after-step\\n",
            "p/x $pc",
            "echo cpl-after-steps\\n",
            "p $cs & 3",
            "kill",
        ],
    );
    let threads = out.lines().filter(|l| l.contains("(vCPU ")).count();
    assert!(threads >= 2, "info threads lists both vCPUs");
    assert!(out.contains("Hardware watchpoint 1: *(unsigned long *)&user_counter"));
    let cpl = |marker: &str| {
        let tail = &out[out
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} in:\n{out}"))..];
        tail.lines()
            .find(|l| l.starts_with('$'))
            .expect("p $cs & 3")
            .ends_with("= 3")
    };
    assert!(
        cpl("cpl-after-watch"),
        "the watchpoint stopped the ring-3 store"
    );
    let before = hex_value_after(&out, "pc-before-step");
    let after = hex_value_after(&out, "pc-after-step");
    let refused = out.contains("cannot be stepped from the VMM");
    if is_pvm_host() {
        // The refused step comes back as an immediate stop, which gdb may show on the other vCPU: RIPs prove
        // nothing here.
        assert!(refused, "a ring-3 step is refused on PVM with the reason");
    } else {
        assert!(!refused, "ring-3 steps work on this host");
        assert!(
            after > before && after - before <= 15,
            "the ring-3 step moved RIP by one instruction: {before:#x} -> {after:#x}"
        );
        assert!(after >> 47 == 0, "the step stayed in user space");
        assert!(
            cpl("cpl-after-steps"),
            "still in ring 3 (interrupts held back)"
        );
    }
}
