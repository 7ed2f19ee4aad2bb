//! The one register snapshot type of the project.
//!
//! It lives here, at the bottom of the dependency graph, because the gdb stub needs it and knows nothing of KVM;
//! `vmm` fills it from `kvm_regs`/`kvm_sregs`/sync regs/FPU state and re-exports it, and the sampler and crash
//! reports use the same type.

/// General-purpose registers in gdb's x86-64 order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15.
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// A segment register: selector plus the hidden part KVM keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Access rights as KVM reports them (type, s, dpl, present, avl, l, db, g), packed like VMX AR bytes.
    pub attrib: u32,
}

impl Segment {
    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attrib >> 5) & 3) as u8
    }
}

/// x87/SSE state; present only where it was read (the sampler never reads it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FpuState {
    /// st0..st7, 80-bit values in the low 10 bytes.
    pub st: [[u8; 10]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
}

/// One vCPU's architectural state at a stop or a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub k_gs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub fpu: FpuState,
}

impl GuestRegisters {
    pub fn rsp(&self) -> u64 {
        self.gpr[7]
    }
    pub fn rbp(&self) -> u64 {
        self.gpr[6]
    }
    /// Current privilege level, from CS (SS.DPL equals it in long mode).
    pub fn cpl(&self) -> u8 {
        (self.cs.selector & 3) as u8
    }
    /// Long mode active (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.efer & (1 << 10) != 0
    }
}
