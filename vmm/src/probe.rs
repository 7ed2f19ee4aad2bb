//! Host capability probe: asked once, consulted by every feature that depends on the host.
//!
//! Besides KVM's capability bits, it runs three tiny long-mode snippets in a throw-away VM, because the facts that
//! matter most on PVM hosts (is `lock cmpxchg16b` / `xrstor` emulated at CPL0? how does a CPL0 `int3` arrive?) are not
//! reported by any capability. A hardware-KVM host passes all three, so nothing is hidden there.

use std::fmt;

use kvm_bindings::*;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::{self, EntryPoint};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open /dev/kvm (is KVM available and do you have permission?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// How a guest `int3` at CPL0 reaches the VMM when software breakpoints are enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int3Delivery {
    /// `KVM_EXIT_DEBUG`, as on VMX/SVM.
    DebugExit,
    /// `KVM_EXIT_INTERNAL_ERROR` with the instruction bytes (PVM): the VMM recovers it.
    InternalError,
    /// The guest's own #BP handler: the host's KVM does not intercept it (measured under QEMU's TCG SVM, whose
    /// `int3` skips the #BP intercept). A planted int3 would crash the guest instead of stopping it.
    Guest,
    /// Something else (the probe could not tell).
    Unknown,
}

/// Outcome of running one instruction at CPL0 in the probe VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    Runs,
    /// KVM stopped with an internal error: the guest must not be offered the feature.
    Fails,
    /// The host CPU lacks the feature; nothing to probe.
    NotOffered,
}

#[derive(Debug, Clone)]
pub struct HostCaps {
    pub api_version: i32,
    /// The `kvm_pvm` module is loaded: KVM without VMX/SVM.
    pub pvm: bool,
    pub sync_regs: u32,
    pub immediate_exit: bool,
    pub set_guest_debug: bool,
    /// `KVM_CAP_SET_GUEST_DEBUG2` flags (includes `KVM_GUESTDBG_BLOCKIRQ` when supported).
    pub guest_debug_flags: u32,
    pub hw_breakpoints: i32,
    pub readonly_mem: bool,
    pub binary_stats_fd: bool,
    /// The host's KVM offers a virtual PMU: see [`host_has_pmu`].
    pub pmu: bool,
    /// `vmm probe`'s line about the host PMU: whether a guest-only cycles event opens here
    /// (`perf-kvm record -e cycles`), decided by trying it.
    pub host_pmu: String,
    /// `KVM_CAP_PMU_CAPABILITY` offers `KVM_PMU_CAP_DISABLE`: `--no-pmu` can turn the vPMU off in KVM itself, not
    /// only in CPUID (kernels before 6.0 have no such capability).
    pub pmu_can_disable: bool,
    pub max_vcpus: usize,
    pub xsave: Emulation,
    /// The guest sees CPUID.1:ECX.XSAVE even when the VMM's CPUID table clears it (PVM answers CPUID itself), so
    /// hiding XSAVE needs the guest's cooperation (`noxsave` on a Linux command line).
    pub xsave_cpuid_leaks: bool,
    /// CPUID-gated instructions Linux patches in through alternatives (SMAP's `clac`, POPCNT, …) that this host
    /// cannot run at CPL0; they are hidden from guests.
    pub unrunnable: Vec<GatedFeature>,
    pub int3: Int3Delivery,
    /// A DR0 execute breakpoint armed with `KVM_GUESTDBG_USE_HW_BP` stops CPL0 code with `KVM_EXIT_DEBUG`
    /// (measured by a snippet: true on hardware and PVM, false under QEMU's TCG SVM). Where not, `hbreak` is refused.
    pub hw_exec_breakpoints: bool,
    /// A DR7 write watch armed with `KVM_GUESTDBG_USE_HW_BP` stops a CPL0 store with `KVM_EXIT_DEBUG` (measured
    /// by a snippet). Where not, the debugger watches memory by page protection instead.
    pub data_breakpoints: bool,
}

impl HostCaps {
    /// Command-line words a Linux guest needs on this host because CPUID cannot hide what the host cannot run.
    pub fn linux_cmdline_workarounds(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.xsave == Emulation::Fails && self.xsave_cpuid_leaks {
            v.push("noxsave".to_string());
        }
        // Linux 5.19+ dropped `nosmap`; `clearcpuid=` takes feature names (one option, comma-separated).
        let mut clear = Vec::new();
        clear.extend(
            self.unrunnable
                .iter()
                .filter(|f| f.cpuid_leaks)
                .map(|f| f.name),
        );
        if !clear.is_empty() {
            v.push(format!("clearcpuid={}", clear.join(",")));
        }
        v
    }

    pub fn has_sync_regs(&self) -> bool {
        let need = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
        self.sync_regs & need == need
    }
    pub fn has_blockirq(&self) -> bool {
        self.guest_debug_flags & KVM_GUESTDBG_BLOCKIRQ != 0
    }

    /// Probes everything, running the snippets afresh (and storing their results for `probe_cached`).
    pub fn probe(kvm: &Kvm) -> Result<HostCaps, ProbeError> {
        HostCaps::probe_with(kvm, false)
    }

    /// Like `probe`, but takes the snippets' results from an earlier run on this host when nothing they depend on
    /// changed (`probe_cache`): what `vmm run` uses, so a boot does not wait for the probe VM.
    pub fn probe_cached(kvm: &Kvm) -> Result<HostCaps, ProbeError> {
        HostCaps::probe_with(kvm, true)
    }

    fn probe_with(kvm: &Kvm, use_cache: bool) -> Result<HostCaps, ProbeError> {
        let api_version = kvm.get_api_version();
        if api_version != 12 {
            return Err(ProbeError::ApiVersion(api_version));
        }
        let cap = |c: u32| kvm.check_extension_raw(c as libc::c_ulong);
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ProbeError::SupportedCpuid)?;
        let leaf = |f: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == 0)
                .copied()
        };
        let leaf1 = leaf(1).unwrap_or_default();
        let pmu_cap = cap(KVM_CAP_PMU_CAPABILITY);
        let (has_xsave_state, leaf7_ebx) = (
            leaf(0xd).is_some_and(|e| e.eax & 3 == 3),
            leaf(7).map_or(0, |e| e.ebx),
        );
        let cache = crate::probe_cache::ProbeCache::open().zip(crate::probe_cache::key(&format!(
            "{:#x} {has_xsave_state} {leaf7_ebx:#x}",
            leaf1.ecx
        )));
        let cached = match (&cache, use_cache) {
            (Some((cache, key)), true) => cache.load(key).and_then(SnippetResults::from_json),
            _ => None,
        };
        let snippets = match cached {
            Some(snippets) => snippets,
            None => {
                let fresh = run_snippets(kvm, &cpuid, leaf1.ecx, has_xsave_state, leaf7_ebx);
                if let Some((cache, key)) = &cache {
                    cache.store(key, fresh.to_json());
                }
                fresh
            }
        };
        Ok(HostCaps {
            api_version,
            pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            sync_regs: cap(KVM_CAP_SYNC_REGS) as u32,
            immediate_exit: cap(KVM_CAP_IMMEDIATE_EXIT) > 0,
            set_guest_debug: cap(KVM_CAP_SET_GUEST_DEBUG) > 0,
            guest_debug_flags: cap(KVM_CAP_SET_GUEST_DEBUG2).max(0) as u32,
            hw_breakpoints: cap(KVM_CAP_GUEST_DEBUG_HW_BPS),
            readonly_mem: cap(KVM_CAP_READONLY_MEM) > 0,
            binary_stats_fd: cap(KVM_CAP_BINARY_STATS_FD) > 0,
            host_pmu: crate::pmu::describe_probe(&crate::pmu::probe_guest_cycles()),
            pmu: host_has_pmu(&cpuid, pmu_cap),
            pmu_can_disable: pmu_cap > 0 && pmu_cap as u32 & KVM_PMU_CAP_DISABLE != 0,
            max_vcpus: kvm.get_max_vcpus(),
            xsave: snippets.xsave,
            xsave_cpuid_leaks: snippets.xsave_cpuid_leaks,
            unrunnable: snippets.unrunnable,
            int3: snippets.int3,
            hw_exec_breakpoints: snippets.hw_exec_breakpoints,
            data_breakpoints: snippets.data_breakpoints,
        })
    }
}

impl fmt::Display for HostCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "KVM API version        {}", self.api_version)?;
        writeln!(f, "host kind              {}", host_kind())?;
        writeln!(f, "PVM (no VMX/SVM)       {}", yn(self.pvm))?;
        writeln!(
            f,
            "sync regs              {:#x} ({})",
            self.sync_regs,
            yn(self.has_sync_regs())
        )?;
        writeln!(f, "immediate exit         {}", yn(self.immediate_exit))?;
        writeln!(
            f,
            "set guest debug        {} (flags {:#x}, BLOCKIRQ {})",
            yn(self.set_guest_debug),
            self.guest_debug_flags,
            yn(self.has_blockirq())
        )?;
        writeln!(f, "hw breakpoints (cap)   {}", self.hw_breakpoints)?;
        writeln!(f, "read-only memory       {}", yn(self.readonly_mem))?;
        writeln!(f, "binary stats fd        {}", yn(self.binary_stats_fd))?;
        writeln!(
            f,
            "virtual PMU            {}",
            if self.pmu {
                "yes (guest gets it unless --no-pmu)"
            } else {
                "no (guest perf has no hardware events; sample with perf-kvm record)"
            }
        )?;
        writeln!(f, "host PMU (-e cycles)   {}", self.host_pmu)?;
        writeln!(f, "max vCPUs              {}", self.max_vcpus)?;
        writeln!(
            f,
            "CPL0 xsave/xrstor      {:?}{}",
            self.xsave,
            if self.xsave == Emulation::Fails {
                " (XSAVE/AVX hidden from guests)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "CPUID hides XSAVE      {}",
            if self.xsave_cpuid_leaks {
                "no: the host shows it anyway (Linux guests get `noxsave`)"
            } else {
                "yes"
            }
        )?;
        for g in &self.unrunnable {
            writeln!(
                f,
                "CPL0 {:<18}Fails ({} hidden from guests{})",
                g.name,
                g.name,
                if g.cpuid_leaks {
                    "; CPUID shows it anyway, so Linux guests get clearcpuid"
                } else {
                    ""
                }
            )?;
        }
        writeln!(
            f,
            "exec breakpoints (DR)  {}",
            if self.hw_exec_breakpoints {
                "yes (gdb hbreak uses DR0-3)"
            } else {
                "no: DR execute breakpoints never stop the guest here (gdb hbreak is refused)"
            }
        )?;
        writeln!(
            f,
            "data breakpoints       {}",
            if self.data_breakpoints {
                "yes (gdb watchpoints use DR0-3 where they fit)"
            } else {
                "no (gdb watchpoints use page protection)"
            }
        )?;
        write!(
            f,
            "CPL0 int3 arrives as   {}",
            match self.int3 {
                Int3Delivery::DebugExit => "KVM_EXIT_DEBUG",
                Int3Delivery::InternalError => "KVM_EXIT_INTERNAL_ERROR (recovered by the VMM)",
                Int3Delivery::Guest =>
                    "the guest's #BP handler: not intercepted by this host (gdb `break` is refused)",
                Int3Delivery::Unknown => "unknown",
            }
        )
    }
}

/// Which KVM module serves /dev/kvm, and with it the hardware it runs on, as `vmm probe` names it: read from
/// /sys/module (a host may load several KVM modules; the vendor module that is loaded is the one in use).
pub fn host_kind() -> String {
    let module = |m: &str| std::path::Path::new("/sys/module").join(m);
    let param = |m: &str, p: &str| {
        std::fs::read_to_string(module(m).join("parameters").join(p))
            .map(|v| matches!(v.trim(), "Y" | "1"))
            .ok()
    };
    let yn = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    if module("kvm_pvm").exists() {
        "PVM (kvm_pvm: KVM without VMX/SVM; guest ring 0 emulated)".into()
    } else if module("kvm_amd").exists() {
        format!(
            "AMD SVM (kvm_amd; nested paging {})",
            yn(param("kvm_amd", "npt"))
        )
    } else if module("kvm_intel").exists() {
        format!(
            "Intel VMX (kvm_intel; EPT {})",
            yn(param("kvm_intel", "ept"))
        )
    } else {
        "unknown (no kvm_pvm, kvm_amd or kvm_intel module)".into()
    }
}

/// Whether KVM gives guests a virtual PMU. KVM reports the architectural PMU (CPUID leaf 0xA, version > 0 in EAX[7:0])
/// in its supported CPUID only while its vPMU is on (`enable_pmu`), on every kernel version; AMD has no leaf 0xA, so
/// there `KVM_CAP_PMU_CAPABILITY` (Linux 6.0+, non-zero while the vPMU is on) is what tells.
pub fn host_has_pmu(supported: &CpuId, pmu_capability: i32) -> bool {
    let version = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0xa && e.index == 0)
        .map_or(0, |e| e.eax & 0xff);
    version > 0 || pmu_capability > 0
}

const SNIPPET_CODE: u64 = 0x10000;
const SNIPPET_DATA: u64 = 0x20000;
/// vCPU id of the execute-breakpoint snippet (after the gated-feature snippets, 5 + n).
const HW_EXEC_SNIPPET: u64 = 30;

/// A CPUID feature bit, and whether the host shows it to guests even when the VMM's table clears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatedFeature {
    /// Linux's name for it (`clearcpuid=` takes these).
    pub name: &'static str,
    pub leaf: u32,
    /// In EBX (else ECX) of the leaf, subleaf 0.
    pub in_ebx: bool,
    pub bit: u32,
    pub cpuid_leaks: bool,
}

/// CPUID-gated instructions Linux patches into hot paths with alternatives, and the CPL0 snippet that runs each.
struct Gated {
    name: &'static str,
    leaf: u32,
    in_ebx: bool,
    bit: u32,
    code: &'static [u8],
    cr4: u64,
}

const GATED: [Gated; 7] = [
    // lock cmpxchg16b [rdi]: Linux's this_cpu_cmpxchg_double and the slab allocator.
    Gated {
        name: "cx16",
        leaf: 1,
        in_ebx: false,
        bit: 13,
        code: &[0xf0, 0x48, 0x0f, 0xc7, 0x0f, 0xf4],
        cr4: 0,
    },
    // clac: every Linux exception entry starts with it when SMAP is on.
    Gated {
        name: "smap",
        leaf: 7,
        in_ebx: true,
        bit: 20,
        code: &[0x0f, 0x01, 0xca, 0xf4],
        cr4: 0,
    },
    // popcnt rax, rdi: hweight*() after alternatives.
    Gated {
        name: "popcnt",
        leaf: 1,
        in_ebx: false,
        bit: 23,
        code: &[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0xf4],
        cr4: 0,
    },
    // movbe eax, [rdi]
    Gated {
        name: "movbe",
        leaf: 1,
        in_ebx: false,
        bit: 22,
        code: &[0x0f, 0x38, 0xf0, 0x07, 0xf4],
        cr4: 0,
    },
    // rdrand rax
    Gated {
        name: "rdrand",
        leaf: 1,
        in_ebx: false,
        bit: 30,
        code: &[0x48, 0x0f, 0xc7, 0xf0, 0xf4],
        cr4: 0,
    },
    // rdseed rax
    Gated {
        name: "rdseed",
        leaf: 7,
        in_ebx: true,
        bit: 18,
        code: &[0x48, 0x0f, 0xc7, 0xf8, 0xf4],
        cr4: 0,
    },
    // rdfsbase rax (needs CR4.FSGSBASE)
    Gated {
        name: "fsgsbase",
        leaf: 7,
        in_ebx: true,
        bit: 0,
        code: &[0xf3, 0x48, 0x0f, 0xae, 0xc0, 0xf4],
        cr4: 1 << 16,
    },
];

/// Sets (`on`) or clears a gated feature's bit in a CPUID table.
fn set_gated_bit(cpuid: &mut CpuId, leaf: u32, in_ebx: bool, bit: u32, on: bool) {
    for e in cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(|e| e.function == leaf && e.index == 0)
    {
        let reg = if in_ebx { &mut e.ebx } else { &mut e.ecx };
        *reg = if on {
            *reg | (1 << bit)
        } else {
            *reg & !(1 << bit)
        };
    }
}
const CPUID_XSAVE: u32 = 1 << 26;

#[derive(Debug, PartialEq)]
struct SnippetResults {
    xsave: Emulation,
    xsave_cpuid_leaks: bool,
    unrunnable: Vec<GatedFeature>,
    int3: Int3Delivery,
    hw_exec_breakpoints: bool,
    data_breakpoints: bool,
}

impl SnippetResults {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "xsave": format!("{:?}", self.xsave),
            "xsave_cpuid_leaks": self.xsave_cpuid_leaks,
            "unrunnable": self.unrunnable.iter().map(|g| (g.name, g.cpuid_leaks)).collect::<Vec<_>>(),
            "int3": format!("{:?}", self.int3),
            "hw_exec_breakpoints": self.hw_exec_breakpoints,
            "data_breakpoints": self.data_breakpoints,
        })
    }

    /// `None` for anything this build would not have written: the snippets then run again.
    fn from_json(v: serde_json::Value) -> Option<SnippetResults> {
        let xsave = match v.get("xsave")?.as_str()? {
            "Runs" => Emulation::Runs,
            "Fails" => Emulation::Fails,
            "NotOffered" => Emulation::NotOffered,
            _ => return None,
        };
        let int3 = match v.get("int3")?.as_str()? {
            "DebugExit" => Int3Delivery::DebugExit,
            "InternalError" => Int3Delivery::InternalError,
            "Guest" => Int3Delivery::Guest,
            "Unknown" => Int3Delivery::Unknown,
            _ => return None,
        };
        let unrunnable = v
            .get("unrunnable")?
            .as_array()?
            .iter()
            .map(|entry| {
                let name = entry.get(0)?.as_str()?;
                let g = GATED.iter().find(|g| g.name == name)?;
                Some(GatedFeature {
                    name: g.name,
                    leaf: g.leaf,
                    in_ebx: g.in_ebx,
                    bit: g.bit,
                    cpuid_leaks: entry.get(1)?.as_bool()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SnippetResults {
            xsave,
            xsave_cpuid_leaks: v.get("xsave_cpuid_leaks")?.as_bool()?,
            unrunnable,
            int3,
            hw_exec_breakpoints: v.get("hw_exec_breakpoints")?.as_bool()?,
            data_breakpoints: v.get("data_breakpoints")?.as_bool()?,
        })
    }
}

/// Runs the snippets; a failure to even set up the probe VM leaves the answers at their safe defaults (features
/// offered, int3 unknown), since the real VM will then report its own errors clearly.
fn run_snippets(
    kvm: &Kvm,
    supported: &CpuId,
    leaf1_ecx: u32,
    has_xsave_state: bool,
    leaf7_ebx: u32,
) -> SnippetResults {
    let mut r = SnippetResults {
        xsave: Emulation::Runs,
        xsave_cpuid_leaks: false,
        unrunnable: Vec::new(),
        int3: Int3Delivery::Unknown,
        hw_exec_breakpoints: true,
        data_breakpoints: false,
    };
    let Some((vm, mem)) = probe_vm(kvm) else {
        return r;
    };
    let with_leaf1_ecx = |set: u32, clear: u32| {
        let mut c = supported.clone();
        for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx = (e.ecx | set) & !clear;
        }
        c
    };
    r.xsave = if leaf1_ecx & CPUID_XSAVE == 0 && !has_xsave_state {
        Emulation::NotOffered
    } else {
        // mov eax, 3; xor edx, edx; xsave64 [rdi]; xrstor64 [rdi]; hlt
        let code = [
            0xb8, 3, 0, 0, 0, 0x31, 0xd2, 0x48, 0x0f, 0xae, 0x27, 0x48, 0x0f, 0xae, 0x2f, 0xf4,
        ];
        let cpuid = with_leaf1_ecx(CPUID_XSAVE, 0);
        emulation(run_one(
            &vm,
            &mem,
            1,
            &code,
            Snippet {
                cpuid: Some(&cpuid),
                xsave: true,
                ..Default::default()
            },
        ))
    };
    // mov eax, 1; xor ecx, ecx; cpuid; mov [rdi], ecx; mov eax, 7; xor ecx, ecx; cpuid; mov [rdi+4], ebx; hlt —
    // with XSAVE and every gated feature cleared in the table.
    let code = [
        0xb8, 1, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0x89, 0x0f, 0xb8, 7, 0, 0, 0, 0x31, 0xc9, 0x0f,
        0xa2, 0x89, 0x5f, 0x04, 0xf4,
    ];
    let mut cpuid = with_leaf1_ecx(0, CPUID_XSAVE);
    for g in &GATED {
        set_gated_bit(&mut cpuid, g.leaf, g.in_ebx, g.bit, false);
    }
    let (mut seen1, mut seen7) = (0u32, 0u32);
    if run_one(
        &vm,
        &mem,
        2,
        &code,
        Snippet {
            cpuid: Some(&cpuid),
            ..Default::default()
        },
    ) == Some(SnippetExit::Hlt)
    {
        let seen: u32 = mem
            .read_obj(GuestAddress(SNIPPET_DATA + 2 * 0x1000))
            .unwrap_or(0);
        r.xsave_cpuid_leaks = seen & CPUID_XSAVE != 0;
        seen1 = seen;
        seen7 = mem
            .read_obj(GuestAddress(SNIPPET_DATA + 2 * 0x1000 + 4))
            .unwrap_or(0);
    }
    // Each gated instruction the host offers, or shows through a table that hides it, runs once at CPL0.
    for (n, g) in GATED.iter().enumerate() {
        let seen = if g.leaf == 1 { seen1 } else { seen7 };
        let leaks = seen & (1 << g.bit) != 0;
        let offered = if g.leaf == 1 { leaf1_ecx } else { leaf7_ebx } & (1 << g.bit) != 0;
        if !offered && !leaks {
            continue;
        }
        let mut with_bit = supported.clone();
        set_gated_bit(&mut with_bit, g.leaf, g.in_ebx, g.bit, true);
        let opts = Snippet {
            cpuid: Some(&with_bit),
            cr4: g.cr4,
            ..Default::default()
        };
        if emulation(run_one(&vm, &mem, 5 + n as u64, g.code, opts)) == Emulation::Fails {
            r.unrunnable.push(GatedFeature {
                name: g.name,
                leaf: g.leaf,
                in_ebx: g.in_ebx,
                bit: g.bit,
                cpuid_leaks: leaks,
            });
        }
    }
    r.int3 = match run_one(
        &vm,
        &mem,
        3,
        &[0xcc, 0xf4],
        Snippet {
            sw_bp: true,
            ..Default::default()
        },
    ) {
        Some(SnippetExit::Debug) => Int3Delivery::DebugExit,
        Some(SnippetExit::InternalError) => Int3Delivery::InternalError,
        Some(SnippetExit::Shutdown) => Int3Delivery::Guest,
        _ => Int3Delivery::Unknown,
    };
    // nop; nop; hlt — with DR0 an execute breakpoint on the second nop: a debug exit means they fire.
    let mut dbg = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = SNIPPET_CODE + HW_EXEC_SNIPPET * 0x100 + 1;
    dbg.arch.debugreg[7] = 0x602; // GE, G0, RW0 = 00 (execute), LEN0 = 00
    r.hw_exec_breakpoints = run_one(
        &vm,
        &mem,
        HW_EXEC_SNIPPET,
        &[0x90, 0x90, 0xf4],
        Snippet {
            guest_debug: Some(dbg),
            ..Default::default()
        },
    ) == Some(SnippetExit::Debug);
    // mov qword [rdi], 1; hlt — under an 8-byte DR0 write watch on [rdi]: a debug exit means data breakpoints fire.
    let watched = SNIPPET_DATA + 4 * 0x1000;
    let mut dbg = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = watched;
    // GE, bit 10, G0, RW0 = 01 (write), LEN0 = 10 (8 bytes).
    dbg.arch.debugreg[7] = 0x602 | (0b01 << 16) | (0b10 << 18);
    r.data_breakpoints = run_one(
        &vm,
        &mem,
        4,
        &[0x48, 0xc7, 0x07, 1, 0, 0, 0, 0xf4],
        Snippet {
            guest_debug: Some(dbg),
            ..Default::default()
        },
    ) == Some(SnippetExit::Debug);
    r
}

#[derive(Default)]
struct Snippet<'a> {
    cpuid: Option<&'a CpuId>,
    xsave: bool,
    sw_bp: bool,
    /// Guest debug to run with, instead of `sw_bp`'s.
    guest_debug: Option<kvm_guest_debug>,
    /// Extra CR4 bits the instruction needs enabled.
    cr4: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum SnippetExit {
    Hlt,
    Debug,
    InternalError,
    /// A triple fault: the snippet VM has no IDT, so an exception delivered to the guest ends here.
    Shutdown,
    Other,
}

fn emulation(exit: Option<SnippetExit>) -> Emulation {
    match exit {
        Some(SnippetExit::InternalError) => Emulation::Fails,
        _ => Emulation::Runs,
    }
}

fn probe_vm(kvm: &Kvm) -> Option<(VmFd, GuestMemoryMmap)> {
    let vm = kvm.create_vm().ok()?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).ok()?;
    boot::write_long_mode_tables(&mem).ok()?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: mem.get_host_address(region.start_addr()).ok()? as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which is returned with `vm` and outlives every vCPU run.
        unsafe { vm.set_user_memory_region(r) }.ok()?;
    }
    Some((vm, mem))
}

fn run_one(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    id: u64,
    code: &[u8],
    opts: Snippet,
) -> Option<SnippetExit> {
    let mut vcpu = vm.create_vcpu(id).ok()?;
    if let Some(cpuid) = opts.cpuid {
        vcpu.set_cpuid2(cpuid).ok()?;
    }
    let code_at = SNIPPET_CODE + id * 0x100;
    mem.write_slice(code, GuestAddress(code_at)).ok()?;
    let (mut regs, mut sregs) = boot::boot_cpu_state(
        EntryPoint::Linux64 { entry: code_at },
        vcpu.get_sregs().ok()?,
    );
    regs.rdi = SNIPPET_DATA + id * 0x1000;
    if opts.xsave {
        sregs.cr4 |= (1 << 18) | (1 << 9); // OSXSAVE | OSFXSR
    }
    sregs.cr4 |= opts.cr4;
    vcpu.set_sregs(&sregs).ok()?;
    vcpu.set_regs(&regs).ok()?;
    if opts.xsave {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 3;
        vcpu.set_xcrs(&xcrs).ok()?;
    }
    if opts.sw_bp {
        let dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
            ..Default::default()
        };
        vcpu.set_guest_debug(&dbg).ok()?;
    }
    if let Some(dbg) = &opts.guest_debug {
        vcpu.set_guest_debug(dbg).ok()?;
    }
    let exit = match vcpu.run() {
        Ok(VcpuExit::Hlt) => SnippetExit::Hlt,
        Ok(VcpuExit::Debug(_)) => SnippetExit::Debug,
        Ok(VcpuExit::InternalError) => SnippetExit::InternalError,
        Ok(VcpuExit::Shutdown) => SnippetExit::Shutdown,
        _ => SnippetExit::Other,
    };
    Some(exit)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a hardware-KVM host without quirks reports; tests change the fields they are about.
    pub(crate) fn hardware_host() -> HostCaps {
        HostCaps {
            api_version: 12,
            pvm: false,
            sync_regs: KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS,
            immediate_exit: true,
            set_guest_debug: true,
            guest_debug_flags: 0,
            hw_breakpoints: 4,
            readonly_mem: true,
            binary_stats_fd: true,
            host_pmu: String::new(),
            pmu: false,
            pmu_can_disable: false,
            max_vcpus: 1024,
            xsave: Emulation::Runs,
            xsave_cpuid_leaks: false,
            unrunnable: Vec::new(),
            int3: Int3Delivery::DebugExit,
            hw_exec_breakpoints: true,
            data_breakpoints: true,
        }
    }

    #[test]
    fn snippet_results_survive_the_probe_cache() {
        let pvm = SnippetResults {
            xsave: Emulation::Fails,
            xsave_cpuid_leaks: true,
            unrunnable: vec![GatedFeature {
                name: "popcnt",
                leaf: 1,
                in_ebx: false,
                bit: 23,
                cpuid_leaks: true,
            }],
            int3: Int3Delivery::InternalError,
            hw_exec_breakpoints: true,
            data_breakpoints: false,
        };
        assert_eq!(SnippetResults::from_json(pvm.to_json()), Some(pvm));
        // What QEMU's TCG SVM gives: int3 reaches the guest, no DR breakpoint fires.
        let tcg_svm = SnippetResults {
            xsave: Emulation::Runs,
            xsave_cpuid_leaks: false,
            unrunnable: Vec::new(),
            int3: Int3Delivery::Guest,
            hw_exec_breakpoints: false,
            data_breakpoints: false,
        };
        assert_eq!(SnippetResults::from_json(tcg_svm.to_json()), Some(tcg_svm));
        // An entry stored before the execute-breakpoint snippet existed is probed afresh.
        let older = serde_json::json!({
            "xsave": "Runs", "xsave_cpuid_leaks": false, "unrunnable": [],
            "int3": "DebugExit", "data_breakpoints": true,
        });
        assert_eq!(SnippetResults::from_json(older), None);
        let unknown_feature = serde_json::json!({
            "xsave": "Runs", "xsave_cpuid_leaks": false, "unrunnable": [["sse9", false]],
            "int3": "DebugExit", "hw_exec_breakpoints": true, "data_breakpoints": true,
        });
        assert_eq!(SnippetResults::from_json(unknown_feature), None);
    }

    fn supported(leaf_a_eax: u32) -> CpuId {
        CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 0xa,
            eax: leaf_a_eax,
            ..Default::default()
        }])
        .unwrap()
    }

    #[test]
    fn pmu_from_leaf_0xa_or_the_capability() {
        // Intel, any kernel: architectural PMU version 2 in the supported CPUID.
        assert!(host_has_pmu(&supported(0x0730_0402), 0));
        // AMD on 6.0+: no leaf 0xA, the capability says the vPMU is on.
        assert!(host_has_pmu(&supported(0), KVM_PMU_CAP_DISABLE as i32));
        // This PVM host (and `enable_pmu=0`): leaf 0xA all zero, capability 0.
        assert!(!host_has_pmu(&supported(0), 0));
        let mut caps = hardware_host();
        assert!(format!("{caps}").contains("virtual PMU            no ("));
        caps.pmu = true;
        assert!(format!("{caps}").contains("virtual PMU            yes ("));
    }
}
