//! Conversions between KVM's register structs and the project's one snapshot type, `GuestRegisters`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use crate::{FpuState, GuestRegisters, Segment};

fn seg_from(s: &kvm_segment) -> Segment {
    let attrib = (s.type_ as u32)
        | (s.s as u32) << 4
        | (s.dpl as u32) << 5
        | (s.present as u32) << 7
        | (s.avl as u32) << 12
        | (s.l as u32) << 13
        | (s.db as u32) << 14
        | (s.g as u32) << 15
        | (s.unusable as u32) << 16;
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attrib,
    }
}

fn seg_into(s: &Segment, k: &mut kvm_segment) {
    k.selector = s.selector;
    k.base = s.base;
    k.limit = s.limit;
    k.type_ = (s.attrib & 0xf) as u8;
    k.s = ((s.attrib >> 4) & 1) as u8;
    k.dpl = ((s.attrib >> 5) & 3) as u8;
    k.present = ((s.attrib >> 7) & 1) as u8;
    k.avl = ((s.attrib >> 12) & 1) as u8;
    k.l = ((s.attrib >> 13) & 1) as u8;
    k.db = ((s.attrib >> 14) & 1) as u8;
    k.g = ((s.attrib >> 15) & 1) as u8;
    k.unusable = ((s.attrib >> 16) & 1) as u8;
}

pub fn from_kvm(
    r: &kvm_regs,
    s: &kvm_sregs,
    fpu: Option<&kvm_fpu>,
    k_gs_base: u64,
) -> GuestRegisters {
    let mut g = GuestRegisters {
        gpr: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        cs: seg_from(&s.cs),
        ss: seg_from(&s.ss),
        ds: seg_from(&s.ds),
        es: seg_from(&s.es),
        fs: seg_from(&s.fs),
        gs: seg_from(&s.gs),
        k_gs_base,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        fpu: FpuState::default(),
    };
    if let Some(f) = fpu {
        for i in 0..8 {
            g.fpu.st[i].copy_from_slice(&f.fpr[i][..10]);
        }
        g.fpu.fcw = f.fcw;
        g.fpu.fsw = f.fsw;
        g.fpu.ftw = f.ftwx;
        g.fpu.fop = f.last_opcode;
        g.fpu.fip = f.last_ip;
        g.fpu.fdp = f.last_dp;
        for i in 0..16 {
            g.fpu.xmm[i] = u128::from_le_bytes(f.xmm[i]);
        }
        g.fpu.mxcsr = f.mxcsr;
    }
    g
}

/// Writes `g` over KVM's structs (fields KVM has but the snapshot lacks are kept).
pub fn into_kvm(g: &GuestRegisters, r: &mut kvm_regs, s: &mut kvm_sregs, f: &mut kvm_fpu) {
    let p = &g.gpr;
    (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
        (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
        (p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]);
    r.rip = g.rip;
    r.rflags = g.rflags;
    seg_into(&g.cs, &mut s.cs);
    seg_into(&g.ss, &mut s.ss);
    seg_into(&g.ds, &mut s.ds);
    seg_into(&g.es, &mut s.es);
    seg_into(&g.fs, &mut s.fs);
    seg_into(&g.gs, &mut s.gs);
    (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) = (g.cr0, g.cr2, g.cr3, g.cr4, g.cr8, g.efer);
    for i in 0..8 {
        f.fpr[i][..10].copy_from_slice(&g.fpu.st[i]);
    }
    f.fcw = g.fpu.fcw;
    f.fsw = g.fpu.fsw;
    f.ftwx = g.fpu.ftw;
    f.last_opcode = g.fpu.fop;
    f.last_ip = g.fpu.fip;
    f.last_dp = g.fpu.fdp;
    for i in 0..16 {
        f.xmm[i] = g.fpu.xmm[i].to_le_bytes();
    }
    f.mxcsr = g.fpu.mxcsr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut r = kvm_regs {
            rax: 1,
            r15: 15,
            rip: 0x1234,
            rflags: 0x202,
            ..Default::default()
        };
        let mut s = kvm_sregs {
            cr3: 0x9000,
            efer: 0x500,
            ..Default::default()
        };
        s.cs = kvm_segment {
            selector: 0x33,
            dpl: 3,
            l: 1,
            present: 1,
            type_: 0xb,
            s: 1,
            ..Default::default()
        };
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[3][0] = 9;
        let g = from_kvm(&r, &s, Some(&f), 7);
        assert_eq!(
            (g.cpl(), g.cs.dpl(), g.fpu.xmm[3], g.k_gs_base),
            (3, 3, 9, 7)
        );
        let (r0, s0, f0) = (r, s, f);
        into_kvm(&g, &mut r, &mut s, &mut f);
        assert_eq!(
            (r, s.cs, s.cr3, f.xmm, f.mxcsr),
            (r0, s0.cs, s0.cr3, f0.xmm, f0.mxcsr)
        );
    }
}
