//! `vmm probe` describes the host as it is, on every kind of host the suite runs on: PVM here, AMD SVM inside QEMU's
//! TCG in the SVM lane (scripts/test-svm), VMX/SVM hardware elsewhere. Each kind's expected answers were measured
//! (docs/hosts.md); the kind itself is read independently of the probe, from /sys/module and /proc/cpuinfo.

use integration_tests::bins::{probe_line, vmm_probe};

#[derive(Debug, PartialEq)]
enum Kind {
    Pvm,
    /// AMD SVM as QEMU's TCG emulates it (the SVM lane): `int3` skips the #BP intercept, DR breakpoints never fire.
    TcgSvm,
    /// VMX or SVM on real hardware (or a hypervisor that passes them through).
    Hardware,
}

fn kind() -> Kind {
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if module("kvm_pvm") {
        Kind::Pvm
    } else if module("kvm_amd") && cpuinfo.contains("QEMU TCG CPU") {
        Kind::TcgSvm
    } else {
        assert!(
            module("kvm_amd") || module("kvm_intel"),
            "no kvm_pvm, kvm_amd or kvm_intel module: which KVM is this?"
        );
        Kind::Hardware
    }
}

#[test]
fn probe_describes_this_host_kind() {
    let probe = vmm_probe();
    println!("{probe}");
    let kind = kind();
    let int3 = probe_line(probe, "CPL0 int3 arrives as");
    assert_ne!(int3, "unknown", "the probe must tell how int3 arrives");
    let host = probe_line(probe, "host kind");
    let exec = probe_line(probe, "exec breakpoints (DR)");
    let data = probe_line(probe, "data breakpoints");
    match kind {
        Kind::Pvm => {
            assert!(host.starts_with("PVM"), "{host}");
            assert_eq!(probe_line(probe, "PVM (no VMX/SVM)"), "yes");
            assert!(int3.starts_with("KVM_EXIT_INTERNAL_ERROR"), "{int3}");
            assert!(exec.starts_with("yes"), "{exec}");
            assert!(data.starts_with("no"), "{data}");
        }
        Kind::TcgSvm => {
            assert!(host.starts_with("AMD SVM (kvm_amd"), "{host}");
            assert_eq!(probe_line(probe, "PVM (no VMX/SVM)"), "no");
            assert!(int3.starts_with("the guest's #BP handler"), "{int3}");
            assert!(exec.starts_with("no"), "{exec}");
            assert!(data.starts_with("no"), "{data}");
            // Nothing of PVM's is worked around here: CPL0 xsave and every gated instruction run.
            assert_eq!(probe_line(probe, "CPL0 xsave/xrstor"), "Runs");
            assert!(!probe.contains("Fails"), "{probe}");
        }
        Kind::Hardware => {
            assert!(
                host.starts_with("AMD SVM") || host.starts_with("Intel VMX"),
                "{host}"
            );
            assert_eq!(probe_line(probe, "PVM (no VMX/SVM)"), "no");
            assert_eq!(int3, "KVM_EXIT_DEBUG");
            assert!(exec.starts_with("yes"), "{exec}");
            assert!(data.starts_with("yes"), "{data}");
        }
    }
}
