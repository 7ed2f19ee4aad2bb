//! Counts of KVM's tracepoints (`kvm:kvm_exit`, ...) for the vCPU threads of an in-process VM, through
//! `perf_event_open`, where the host has tracefs and fires them. Some hosts never fire `kvm_exit` (PVM); then the
//! report says so instead of showing a silent zero.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::Path;

/// The tracepoints counted, in report order.
pub const TRACEPOINTS: [&str; 5] = [
    "kvm_exit",
    "kvm_userspace_exit",
    "kvm_pio",
    "kvm_mmio",
    "kvm_emulate_insn",
];
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const PERF_TYPE_TRACEPOINT: u32 = 2;
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_INHERIT: u64 = 1 << 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

#[derive(Debug, thiserror::Error)]
pub enum TracepointError {
    #[error(
        "no tracefs with KVM events (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing)"
    )]
    NoTracefs,
    #[error("perf_event_open for kvm:{name} failed")]
    Open {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the kvm:{name} counter failed")]
    Read {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0): all a counting tracepoint needs.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// Open counters; threads this thread starts afterwards (the vCPUs) are counted too.
pub struct TracepointCounters {
    counters: Vec<(&'static str, File)>,
}

impl TracepointCounters {
    /// Opens one counter per tracepoint the host has. Call before starting the VM's threads.
    pub fn open() -> Result<TracepointCounters, TracepointError> {
        let root = TRACEFS_ROOTS
            .iter()
            .map(Path::new)
            .find(|r| r.join("events/kvm").is_dir())
            .ok_or(TracepointError::NoTracefs)?;
        let mut counters = Vec::new();
        for name in TRACEPOINTS {
            let Some(id) = std::fs::read_to_string(root.join("events/kvm").join(name).join("id"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            else {
                continue;
            };
            counters.push((name, open_counter(name, id)?));
        }
        Ok(TracepointCounters { counters })
    }

    /// Current counts. Counts of threads that have exited are included (the kernel folds them in at exit), so read
    /// after the VM's threads are joined for the whole run.
    pub fn read(&mut self) -> Result<Vec<(String, u64)>, TracepointError> {
        self.counters
            .iter_mut()
            .map(|(name, file)| {
                let mut buf = [0u8; 8];
                file.read_exact(&mut buf)
                    .map_err(|source| TracepointError::Read { name, source })?;
                Ok((format!("kvm:{name}"), u64::from_ne_bytes(buf)))
            })
            .collect()
    }
}

fn open_counter(name: &'static str, id: u64) -> Result<File, TracepointError> {
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttrV0>() as u32,
        config: id,
        flags: ATTR_DISABLED | ATTR_INHERIT,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid VER0 perf_event_attr that outlives the call; pid 0 / cpu -1 counts this thread (and
    // with `inherit` its future threads) on any CPU; the return value is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TracepointError::Open {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    // SAFETY: PERF_EVENT_IOC_ENABLE takes no argument and acts on the fd just opened.
    if unsafe { libc::ioctl(fd as i32, PERF_EVENT_IOC_ENABLE as _, 0) } < 0 {
        return Err(TracepointError::Open {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// The tracepoint section of the report, with a note when `kvm_exit` stayed silent while the VM exited.
pub fn format_counts(counts: &[(String, u64)], vmm_exits: u64) -> String {
    use std::fmt::Write;
    let mut out = String::from("KVM tracepoints (perf_event_open, the VM's threads):\n\n");
    for (name, n) in counts {
        let _ = writeln!(out, "{name:>24} {n:>12}");
    }
    if counts.is_empty() {
        out.push_str("   (this host's KVM has none of them)\n");
    }
    if counts
        .iter()
        .any(|(name, n)| name == "kvm:kvm_exit" && *n == 0)
        && vmm_exits > 0
    {
        let _ = writeln!(
            out,
            "\nNote: kvm:kvm_exit never fired although {vmm_exits} exits reached the VMM: this host's KVM does not emit \
             it, so `perf kvm stat` sees no exits here."
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_kvm_exit_is_pointed_out() {
        let counts = vec![
            ("kvm:kvm_exit".to_string(), 0),
            ("kvm:kvm_pio".to_string(), 12),
        ];
        let text = format_counts(&counts, 40);
        assert!(text.contains("kvm:kvm_pio           12"), "{text}");
        assert!(
            text.contains("kvm:kvm_exit never fired although 40 exits"),
            "{text}"
        );
        assert!(!format_counts(&[("kvm:kvm_exit".to_string(), 50)], 40).contains("never fired"));
    }

    #[test]
    fn attr_is_perfs_version_0_size() {
        assert_eq!(std::mem::size_of::<PerfEventAttrV0>(), 64);
    }
}
