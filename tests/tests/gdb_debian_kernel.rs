//! The real gdb on Debian's stock kernel under `vmm run --gdb`: a hardware breakpoint on `start_kernel`, the
//! backtrace and `linux_banner` through the -dbg vmlinux's DWARF.
//!
//! The VMM boots the -dbg vmlinux itself (the same build as the package's bzImage payload: same build-id, and
//! its loadable segments are the kernel; the DWARF is only in sections nobody loads). `nokaslr` keeps the kernel
//! at its link address, so gdb needs no offset. gdb reads the 590 MB file's symbols for ~10-20 s.

mod gdb_common;
mod symbolize_common;

use gdb_common::{gdb_command_for, run_gdb_command, Vmm};

#[test]
fn hbreak_start_kernel_then_backtrace_and_linux_banner() {
    let vmlinux = symbolize_common::debian_vmlinux();
    let release = vmlinux
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinux-"))
        .expect("vmlinux-RELEASE")
        .to_string();
    let vmm = Vmm::start_kernel(
        &vmlinux,
        "earlyprintk=serial console=ttyS0 nokaslr",
        "1",
        "127.0.0.1:0",
    );
    let out = run_gdb_command(gdb_command_for(
        &vmlinux,
        &vmm.address,
        &[
            "hbreak start_kernel",
            "continue",
            "bt",
            "print linux_banner",
            "kill",
        ],
    ));
    assert!(
        out.contains("Breakpoint 1, start_kernel () at init/main.c:"),
        "stopped in start_kernel"
    );
    let frames: Vec<&str> = out.lines().filter(|l| l.starts_with('#')).collect();
    assert!(
        frames[0].starts_with("#0  start_kernel () at init/main.c:"),
        "{frames:?}"
    );
    // head_64.S jumps to x86_64_start_kernel, which tail-calls on to start_kernel: DWARF names the caller
    // secondary_startup_64.
    assert!(
        frames[1].contains(" in secondary_startup_64 () at ")
            || frames[1].contains(" x86_64_start_"),
        "{frames:?}"
    );
    // Read from guest memory (gdb does not trust the file for writable or read-only sections by default).
    let banner = out
        .lines()
        .find(|l| l.starts_with("$1 = "))
        .expect("print linux_banner");
    assert!(
        banner.contains(&format!("<linux_banner> \"Linux version {release} (")),
        "{banner}"
    );
    let (code, stdout, stderr) = vmm.finish();
    assert!(stderr.contains("gdb asked to kill the guest"));
    assert_eq!(code, Some(0), "kill stops the VM cleanly");
    // The kernel had not printed its banner yet: start_kernel does that after the breakpoint.
    assert!(
        !stdout.contains("Linux version"),
        "stopped before the banner"
    );
}
