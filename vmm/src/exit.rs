//! Exit decisions as free functions, so unit tests exercise them without KVM.

use std::fmt::Write as _;

use crate::GuestRegisters;

/// KVM_INTERNAL_ERROR_EMULATION.
pub const SUBERROR_EMULATION: u32 = 1;
/// Flag in `internal.data[0]`: instruction bytes follow (`data[1]` = length, bytes from `data[2]`).
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Why the whole VM ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote a status to the debug-exit port.
    GuestExit(u32),
    /// The guest asked for a reset or power-off (i8042 pulse, KVM system event): a clean end.
    GuestReset,
    /// The guest (or KVM) failed in a way it cannot recover from; the report names the vCPU and its registers.
    Crash {
        vcpu: usize,
        reason: String,
        report: String,
    },
    /// The host side asked the VM to stop (Ctrl-C, `--duration`, the control socket).
    Stopped,
}

impl VmEnd {
    /// The `vmm` process exit status for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmEnd::GuestExit(status) => (*status).min(255) as i32,
            VmEnd::GuestReset | VmEnd::Stopped => 0,
            VmEnd::Crash { .. } => 1,
        }
    }
}

/// What to do with a `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalErrorAction {
    /// A CPL0 `int3` that this host reports as an emulation failure (PVM) and that the debugger did not plant:
    /// deliver it to the guest as the #BP it is (RIP past the int3, exception 3 injected).
    InjectBreakpoint,
    /// An `int3` the debugger planted: a breakpoint hit at RIP.
    DebuggerBreakpoint,
    /// `fwait` (0x9b), which KVM's emulator cannot run at CPL0 on PVM hosts: with no unmasked x87 exception
    /// pending it does nothing, so the VMM completes it by stepping RIP past it; otherwise the guest gets its #MF.
    CompleteFwait,
    /// Anything else: the VM cannot go on.
    Fatal,
}

/// Instruction bytes KVM attached to an emulation failure, if any.
pub fn instruction_bytes(suberror: u32, ndata: u32, data: &[u64]) -> Vec<u8> {
    if suberror != SUBERROR_EMULATION || ndata < 2 || data.len() < 2 {
        return Vec::new();
    }
    if data[0] & EMULATION_FLAG_INSTRUCTION_BYTES == 0 {
        return Vec::new();
    }
    let len = (data[1] as usize).min(15);
    let words = &data[2..(ndata as usize).min(data.len())];
    words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(len)
        .collect()
}

/// Decides what an internal error is. `byte_at_rip` is the guest byte at RIP (from the bytes KVM attached, or read
/// through the page walker when it attached none); `debugger_owns` tells whether the debugger planted an int3 there.
pub fn classify_internal_error(
    suberror: u32,
    byte_at_rip: Option<u8>,
    debugger_owns: bool,
) -> InternalErrorAction {
    match (suberror, byte_at_rip) {
        (SUBERROR_EMULATION, Some(0xcc)) if debugger_owns => {
            InternalErrorAction::DebuggerBreakpoint
        }
        (SUBERROR_EMULATION, Some(0xcc)) => InternalErrorAction::InjectBreakpoint,
        (SUBERROR_EMULATION, Some(0x9b)) => InternalErrorAction::CompleteFwait,
        _ => InternalErrorAction::Fatal,
    }
}

/// Human-readable name of an internal-error suberror.
pub fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Whether registers read after a `KVM_EXIT_SHUTDOWN` are the x86 reset state (CS 0xf000, RIP 0xfff0, paging
/// off) rather than the state that triple-faulted: SVM's KVM re-initializes the VMCB on a shutdown intercept (the
/// VMCB is undefined after one), so on AMD hosts the faulting state is gone; VMX and PVM keep it.
pub fn is_reset_state(regs: &GuestRegisters) -> bool {
    regs.rip == 0xfff0 && regs.cs.selector == 0xf000 && regs.cr0 & 1 << 31 == 0
}

/// The line a crash report gets when [`is_reset_state`] holds after a triple fault.
pub const RESET_AFTER_SHUTDOWN: &str =
    "  (these are the vCPU's reset values: this host's KVM re-initializes a vCPU \
     at a triple fault, as SVM does, so the state that faulted is lost)";

/// The crash report printed when a VM dies: every register a kernel engineer looks at first, and the code at RIP.
pub fn crash_report(
    vcpu: usize,
    reason: &str,
    regs: &GuestRegisters,
    code: &[u8],
    symbol: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "vCPU {vcpu}: {reason}");
    let at = symbol.map(|sym| format!(" <{sym}>")).unwrap_or_default();
    let _ = writeln!(
        s,
        "  RIP: {:#018x}{at}  CPL: {}  RFLAGS: {:#010x}",
        regs.rip,
        regs.cpl(),
        regs.rflags
    );
    let names = gdbstub_kvm::regs::GPR_NAMES;
    for row in 0..4 {
        let line: Vec<String> = (0..4)
            .map(|c| {
                format!(
                    "{:>3}: {:016x}",
                    names[row * 4 + c].to_uppercase(),
                    regs.gpr[row * 4 + c]
                )
            })
            .collect();
        let _ = writeln!(s, "  {}", line.join("  "));
    }
    let _ = writeln!(
        s,
        "  CS: {:04x}  SS: {:04x}  DS: {:04x}  ES: {:04x}  FS: {:04x} (base {:x})  GS: {:04x} (base {:x})",
        regs.cs.selector, regs.ss.selector, regs.ds.selector, regs.es.selector, regs.fs.selector, regs.fs.base,
        regs.gs.selector, regs.gs.base
    );
    let _ = writeln!(
        s,
        "  CR0: {:x}  CR2: {:x}  CR3: {:x}  CR4: {:x}  EFER: {:x}",
        regs.cr0, regs.cr2, regs.cr3, regs.cr4, regs.efer
    );
    if code.is_empty() {
        let _ = write!(s, "  Code: <unreadable>");
    } else {
        let hex: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
        let _ = write!(s, "  Code: {}", hex.join(" "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_internal_error_is_recovered_or_reported() {
        assert_eq!(
            classify_internal_error(1, Some(0xcc), false),
            InternalErrorAction::InjectBreakpoint
        );
        assert_eq!(
            classify_internal_error(1, Some(0xcc), true),
            InternalErrorAction::DebuggerBreakpoint
        );
        assert_eq!(
            classify_internal_error(1, Some(0x0f), false),
            InternalErrorAction::Fatal
        );
        assert_eq!(
            classify_internal_error(1, Some(0x9b), false),
            InternalErrorAction::CompleteFwait
        );
        assert_eq!(
            classify_internal_error(3, Some(0xcc), false),
            InternalErrorAction::Fatal
        );
        assert_eq!(
            classify_internal_error(1, None, false),
            InternalErrorAction::Fatal
        );
    }

    #[test]
    fn instruction_bytes_from_internal_data() {
        let data = [1u64, 3, 0x1122_33cc, 0, 0];
        assert_eq!(instruction_bytes(1, 3, &data), vec![0xcc, 0x33, 0x22]);
        assert!(instruction_bytes(1, 3, &[0, 3, 0xcc]).is_empty());
        assert!(instruction_bytes(2, 3, &data).is_empty());
        // A lying length never reads past ndata.
        assert_eq!(instruction_bytes(1, 3, &[1, 200, 0xcc]).len(), 8);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmEnd::GuestExit(0).exit_code(), 0);
        assert_eq!(VmEnd::GuestExit(3).exit_code(), 3);
        assert_eq!(VmEnd::GuestExit(4096).exit_code(), 255);
        assert_eq!(VmEnd::GuestReset.exit_code(), 0);
        let crash = VmEnd::Crash {
            vcpu: 0,
            reason: "x".into(),
            report: String::new(),
        };
        assert_eq!(crash.exit_code(), 1);
    }

    #[test]
    fn reset_state_after_an_svm_shutdown_is_recognized() {
        let mut r = GuestRegisters {
            rip: 0xfff0,
            cr0: 0x10,
            ..Default::default()
        };
        r.cs.selector = 0xf000;
        assert!(is_reset_state(&r));
        r.cr0 |= 1 << 31;
        assert!(!is_reset_state(&r), "paging on: not the reset state");
        let kernel = GuestRegisters {
            rip: 0xffff_ffff_8100_0000,
            cr0: 0x8000_0011,
            ..Default::default()
        };
        assert!(!is_reset_state(&kernel));
    }

    #[test]
    fn crash_report_names_registers() {
        let mut r = GuestRegisters {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        r.gpr[0] = 0xdead;
        let s = crash_report(
            1,
            "triple fault",
            &r,
            &[0xcc, 0x90],
            Some("kernel_leaf+0x4"),
        );
        assert!(s.contains("vCPU 1: triple fault"));
        assert!(s.contains("RAX: 000000000000dead"));
        assert!(s.contains("<kernel_leaf+0x4>"));
        assert!(s.contains("Code: cc 90"));
    }
}
