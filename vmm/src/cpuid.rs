//! Guest CPUID: what KVM supports, minus what this host's KVM cannot run (from the probe), per vCPU topology.

use kvm_bindings::CpuId;

use crate::probe::{Emulation, HostCaps};

const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF_8000_0001_ECX_PERFCTR_CORE: u32 = 1 << 23;
/// Leaf 7 EBX features that need XSAVE-managed state: AVX2 and the AVX-512 family.
const LEAF7_EBX_XSAVE_STATE: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES, VPCLMULQDQ, GFNI (VEX/EVEX forms).
const LEAF7_ECX_XSAVE_STATE: u32 =
    (1 << 1) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7 EDX: AMX and AVX-512 FP16/4VNNIW/4FMAPS/VP2INTERSECT.
const LEAF7_EDX_XSAVE_STATE: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24);

/// What to change in the supported CPUID for one guest.
#[derive(Debug, Clone)]
pub struct CpuidPolicy {
    pub hide_xsave: bool,
    pub hide_pmu: bool,
    /// CPUID-gated features whose instructions the host cannot run at CPL0.
    pub hide_gated: Vec<crate::probe::GatedFeature>,
}

impl CpuidPolicy {
    /// Hides exactly what the probe saw fail, and the PMU when the host has none or the user said `--no-pmu`.
    pub fn from_caps(caps: &HostCaps, no_pmu: bool) -> Self {
        CpuidPolicy {
            hide_xsave: caps.xsave == Emulation::Fails,
            hide_pmu: no_pmu || !caps.pmu,
            hide_gated: caps.unrunnable.clone(),
        }
    }
}

/// Applies the policy and the vCPU's APIC id to a copy of the supported CPUID.
pub fn for_vcpu(supported: &CpuId, policy: &CpuidPolicy, apic_id: u32, num_cpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((num_cpus.min(255)) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if policy.hide_xsave {
                    e.ecx &= !(LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C);
                }
            }
            7 if e.index == 0 && policy.hide_xsave => {
                e.ebx &= !LEAF7_EBX_XSAVE_STATE;
                e.ecx &= !LEAF7_ECX_XSAVE_STATE;
                e.edx &= !LEAF7_EDX_XSAVE_STATE;
            }
            0xa if policy.hide_pmu => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            // AMD: core performance counter extensions and PerfMonV2.
            0x8000_0001 if policy.hide_pmu => e.ecx &= !LEAF_8000_0001_ECX_PERFCTR_CORE,
            0x8000_0022 if policy.hide_pmu => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            0xb | 0x1f => e.edx = apic_id,
            0xd if policy.hide_xsave => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            _ => {}
        }
    }
    for f in &policy.hide_gated {
        for e in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == f.leaf && e.index == 0)
        {
            let reg = if f.in_ebx { &mut e.ebx } else { &mut e.ecx };
            *reg &= !(1 << f.bit);
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    const CX16: u32 = 1 << 13;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 1,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn hides_only_what_the_policy_says() {
        let supported = CpuId::from_entries(&[
            entry(1, 0, 0, CX16 | LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | 1, 0),
            entry(7, 0, 1 << 5 | 1, 0, 0),
            entry(0xa, 0, 7, 7, 7),
            entry(0xb, 1, 0, 0, 0),
        ])
        .unwrap();
        let hide = CpuidPolicy {
            hide_xsave: true,
            hide_pmu: true,
            hide_gated: vec![
                crate::probe::GatedFeature {
                    name: "cx16",
                    leaf: 1,
                    in_ebx: false,
                    bit: 13,
                    cpuid_leaks: false,
                },
                crate::probe::GatedFeature {
                    name: "fsgsbase",
                    leaf: 7,
                    in_ebx: true,
                    bit: 0,
                    cpuid_leaks: false,
                },
            ],
        };
        let c = for_vcpu(&supported, &hide, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ecx, 1 | LEAF1_ECX_HYPERVISOR);
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!(
            s[1].ebx, 0,
            "AVX2 (xsave state) and FSGSBASE (gated) hidden"
        );
        assert_eq!((s[2].eax, s[2].ebx), (0, 0));
        assert_eq!(s[3].edx, 3);
        let keep = CpuidPolicy {
            hide_xsave: false,
            hide_pmu: false,
            hide_gated: Vec::new(),
        };
        let c = for_vcpu(&supported, &keep, 0, 1);
        assert_eq!(
            c.as_slice()[0].ecx & (CX16 | LEAF1_ECX_AVX),
            CX16 | LEAF1_ECX_AVX
        );
        assert_eq!(c.as_slice()[2].eax, 1);
    }

    /// The PMU policy end to end without KVM: the host's supported CPUID → the probe's verdict → each vCPU's CPUID.
    #[test]
    fn guest_gets_the_host_pmu_unless_no_pmu() {
        const ARCH_PERFMON_V2: u32 = 0x0730_0402; // version 2, 4 counters, 48 bits wide
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: ARCH_PERFMON_V2,
                edx: 0x603,
                ..Default::default()
            },
            entry(0x8000_0001, 0, 0, LEAF_8000_0001_ECX_PERFCTR_CORE | 1, 0),
        ])
        .unwrap();
        let caps = crate::probe::HostCaps {
            pmu: crate::probe::host_has_pmu(&supported, 0),
            ..crate::probe::tests::hardware_host()
        };
        assert!(caps.pmu, "leaf 0xA version 2 is a vPMU");

        let default = for_vcpu(&supported, &CpuidPolicy::from_caps(&caps, false), 0, 1);
        let leaf_a = default.as_slice()[0];
        assert_eq!(
            (leaf_a.eax, leaf_a.edx),
            (ARCH_PERFMON_V2, 0x603),
            "kept by default"
        );
        assert_ne!(
            default.as_slice()[1].ecx & LEAF_8000_0001_ECX_PERFCTR_CORE,
            0
        );

        let off = for_vcpu(&supported, &CpuidPolicy::from_caps(&caps, true), 0, 1);
        let leaf_a = off.as_slice()[0];
        assert_eq!(
            (leaf_a.eax, leaf_a.ebx, leaf_a.ecx, leaf_a.edx),
            (0, 0, 0, 0),
            "--no-pmu clears it"
        );
        assert_eq!(
            off.as_slice()[1].ecx,
            1,
            "and the AMD counter extensions, nothing else"
        );
    }
}
