//! The gdb architecture: x86-64 with SSE, segment bases and system registers, in the register order of
//! `target.xml` (gdb's core and SSE sets, then fs_base/gs_base, then k_gs_base, cr0, cr2, cr3, cr4, cr8, efer).

use std::num::NonZeroUsize;

use gdbstub::arch::{Arch, RegId, Registers};

use crate::regs::GuestRegisters;

/// `gdbstub` architecture marker for a KVM x86-64 guest.
pub enum X86_64Kvm {}

impl Arch for X86_64Kvm {
    type Usize = u64;
    type Registers = GuestRegisters;
    type BreakpointKind = usize;
    type RegId = RegNumber;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// A register by its number in `target.xml` order, which is gdb's remote register number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegNumber(pub usize);

impl RegId for RegNumber {
    // Single-register access (`p`/`P`) is not offered: gdb reads and writes the whole block.
    fn from_raw_id(_id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        None
    }

    fn to_raw_id(&self) -> Option<usize> {
        Some(self.0)
    }
}

/// How many registers a stop reply carries: rax..r15, rip, eflags and the six segment selectors (0-23).
const EXPEDITED: usize = 24;

/// The registers sent with every stop reply, as (number, little-endian bytes), so that gdb need not ask for
/// them: enough to show the stop location and unwind from it without another round trip.
pub(crate) fn expedited_registers(regs: &GuestRegisters) -> Vec<(RegNumber, Vec<u8>)> {
    let mut block = Vec::with_capacity(REGISTER_BLOCK_LEN);
    regs.gdb_serialize(|b| block.push(b.unwrap_or(0)));
    let mut offset = 0;
    (0..EXPEDITED)
        .map(|number| {
            // The 16 general registers and rip are 8 bytes; eflags and the selectors 4.
            let size = if number <= 16 { 8 } else { 4 };
            let value = block[offset..offset + size].to_vec();
            offset += size;
            (RegNumber(number), value)
        })
        .collect()
}

/// The target description served to gdb.
pub const TARGET_XML: &str = include_str!("target.xml");

/// Bytes in a `g` packet for this layout.
pub const REGISTER_BLOCK_LEN: usize = 16 * 8 // gprs
    + 8 + 4 // rip, eflags
    + 6 * 4 // segment selectors
    + 8 * 10 // st0-7
    + 8 * 4 // fctrl .. fop
    + 16 * 16 + 4 // xmm0-15, mxcsr
    + 2 * 8 // fs_base, gs_base
    + 7 * 8; // k_gs_base, cr0, cr2, cr3, cr4, cr8, efer

/// FXSAVE keeps an abridged tag word (one bit per register, 1 = valid); gdb shows the full x87 one (two bits per
/// register, 3 = empty). Valid registers are reported as tag 0 ("valid") since the class is not kept.
fn full_tag_word(abridged: u8) -> u32 {
    (0..8)
        .filter(|i| abridged & (1 << i) == 0)
        .fold(0, |tags, i| tags | (3 << (2 * i)))
}

fn abridged_tag_word(full: u32) -> u8 {
    (0..8)
        .filter(|i| (full >> (2 * i)) & 3 != 3)
        .fold(0, |tags, i| tags | (1 << i))
}

impl Registers for GuestRegisters {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        let mut put = |bytes: &[u8]| bytes.iter().for_each(|b| write_byte(Some(*b)));
        self.gpr.iter().for_each(|r| put(&r.to_le_bytes()));
        put(&self.rip.to_le_bytes());
        put(&(self.rflags as u32).to_le_bytes());
        for seg in [&self.cs, &self.ss, &self.ds, &self.es, &self.fs, &self.gs] {
            put(&u32::from(seg.selector).to_le_bytes());
        }
        let fpu = &self.fpu;
        fpu.st.iter().for_each(|st| put(st));
        for word in [
            u32::from(fpu.fcw),
            u32::from(fpu.fsw),
            full_tag_word(fpu.ftw),
            (fpu.fip >> 32) as u32,
            fpu.fip as u32,
            (fpu.fdp >> 32) as u32,
            fpu.fdp as u32,
            u32::from(fpu.fop),
        ] {
            put(&word.to_le_bytes());
        }
        fpu.xmm.iter().for_each(|x| put(&x.to_le_bytes()));
        put(&fpu.mxcsr.to_le_bytes());
        for value in [
            self.fs.base,
            self.gs.base,
            self.k_gs_base,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.cr8,
            self.efer,
        ] {
            put(&value.to_le_bytes());
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() != REGISTER_BLOCK_LEN {
            return Err(());
        }
        let mut reader = LeReader { bytes };
        for r in self.gpr.iter_mut() {
            *r = reader.u64();
        }
        self.rip = reader.u64();
        // eflags is 32 bits wide in gdb's layout; the upper half of rflags is reserved (zero).
        self.rflags = u64::from(reader.u32());
        for seg in [
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.es,
            &mut self.fs,
            &mut self.gs,
        ] {
            seg.selector = reader.u32() as u16;
        }
        let fpu = &mut self.fpu;
        for st in fpu.st.iter_mut() {
            st.copy_from_slice(reader.take(10));
        }
        fpu.fcw = reader.u32() as u16;
        fpu.fsw = reader.u32() as u16;
        fpu.ftw = abridged_tag_word(reader.u32());
        let fiseg = u64::from(reader.u32());
        fpu.fip = (fiseg << 32) | u64::from(reader.u32());
        let foseg = u64::from(reader.u32());
        fpu.fdp = (foseg << 32) | u64::from(reader.u32());
        fpu.fop = reader.u32() as u16;
        for x in fpu.xmm.iter_mut() {
            *x = u128::from_le_bytes(reader.take(16).try_into().map_err(|_| ())?);
        }
        fpu.mxcsr = reader.u32();
        self.fs.base = reader.u64();
        self.gs.base = reader.u64();
        self.k_gs_base = reader.u64();
        self.cr0 = reader.u64();
        self.cr2 = reader.u64();
        self.cr3 = reader.u64();
        self.cr4 = reader.u64();
        self.cr8 = reader.u64();
        self.efer = reader.u64();
        Ok(())
    }
}

/// Little-endian cursor over a slice whose length was checked against [`REGISTER_BLOCK_LEN`] up front.
struct LeReader<'a> {
    bytes: &'a [u8],
}

impl<'a> LeReader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        head
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4));
        u32::from_le_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8));
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestRegisters {
        let mut regs = GuestRegisters::default();
        for (i, r) in regs.gpr.iter_mut().enumerate() {
            *r = 0x1111_0000_0000_0000 + i as u64;
        }
        regs.rip = 0xffff_ffff_8100_0000;
        regs.rflags = 0x246;
        regs.cs.selector = 0x10;
        regs.fs.base = 0x7f00_0000_1000;
        regs.gs.base = 0xffff_8880_0000_0000;
        regs.k_gs_base = 0x1234;
        regs.cr0 = 0x8005_0033;
        regs.cr3 = 0x10_0000;
        regs.efer = 0xd01;
        regs.fpu.ftw = 0x81;
        regs.fpu.fip = 0x0000_0001_2345_6789;
        regs.fpu.xmm[15] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
        regs.fpu.mxcsr = 0x1f80;
        regs
    }

    #[test]
    fn serialize_then_deserialize_round_trips() {
        let regs = sample();
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.expect("every register is available")));
        assert_eq!(bytes.len(), REGISTER_BLOCK_LEN);
        let mut back = GuestRegisters::default();
        back.gdb_deserialize(&bytes).unwrap();
        // Only the fields gdb sees travel; hidden segment parts stay at their defaults on both sides here.
        assert_eq!(back, regs);
    }

    #[test]
    fn efer_is_the_last_register() {
        let regs = sample();
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b.unwrap()));
        assert_eq!(&bytes[REGISTER_BLOCK_LEN - 8..], &0xd01u64.to_le_bytes());
    }

    #[test]
    fn wrong_length_is_rejected() {
        let mut regs = GuestRegisters::default();
        assert!(regs.gdb_deserialize(&[0; 10]).is_err());
    }

    #[test]
    fn tag_word_conversion_round_trips() {
        for abridged in [0u8, 1, 0x80, 0xff, 0x5a] {
            assert_eq!(abridged_tag_word(full_tag_word(abridged)), abridged);
        }
    }
}
