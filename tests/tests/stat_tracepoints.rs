//! `perf-kvm stat` counting KVM's tracepoints through perf_event_open. Where tracefs is not mounted, the test
//! mounts it in a private mount namespace of its own (`unshare -m`), which needs root; the host's mounts stay as
//! they are.

mod stat_common;

use std::path::Path;
use std::process::Command;

use stat_common::{guest_elf, number_after, perf_kvm};

fn count(report: &str, tracepoint: &str) -> Option<u64> {
    report.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(tracepoint))
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

#[test]
fn tracepoint_counts_cover_the_guests_port_io() {
    let stat = format!(
        "{} stat -- run --kernel {} --cmdline 'work=user_hot_a:50,kernel_spin:50 secs=1'",
        perf_kvm().display(),
        guest_elf().display()
    );
    let script = if Path::new("/sys/kernel/tracing/events/kvm").is_dir() {
        stat
    } else {
        format!("mount -t tracefs nodev /sys/kernel/tracing && {stat}")
    };
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("KVM tracepoints (perf_event_open"), "{text}");
    // Every `in`/`out` goes through KVM's port I/O path, in-kernel PIT/PIC ones included.
    let port_writes = number_after(&text, "guest-io: port_writes=").expect("guest line");
    let pio = count(&text, "kvm:kvm_pio").expect("kvm:kvm_pio count");
    assert!(pio >= port_writes, "{text}");
    let userspace = count(&text, "kvm:kvm_userspace_exit").expect("kvm:kvm_userspace_exit count");
    let vmm_exits = number_after(&text, "Total Samples:").unwrap();
    assert!(userspace >= vmm_exits, "{text}");
    // A host that never fires kvm_exit (PVM) is named as such; one that does counts at least the VMM's exits.
    match count(&text, "kvm:kvm_exit").expect("kvm:kvm_exit count") {
        0 => assert!(text.contains("kvm:kvm_exit never fired"), "{text}"),
        n => assert!(n >= vmm_exits, "{text}"),
    }
}
