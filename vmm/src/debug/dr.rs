//! The x86 debug-register slots (DR0-DR3 with DR7) shared by hardware breakpoints and, where the host delivers
//! data breakpoints, watchpoints.

use gdbstub_kvm::{StopReason, WatchKind};

pub const SLOTS: usize = 4;
/// DR7: GE plus the always-one bit 10, as the host measurements armed it.
const DR7_BASE: u64 = 0x600;
/// DR6 B0-B3: which slot fired.
const DR6_HITS: u64 = 0xf;

/// What one debug register watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotUse {
    /// Instruction fetch at the address (hbreak).
    Execute,
    /// Stores (`Write`) or loads and stores (`Access`) of `len` bytes (1, 2, 4 or 8, aligned).
    Data { kind: WatchKind, len: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub addr: u64,
    pub what: SlotUse,
}

/// Whether a watch fits one debug register: x86 has no load-only watch, and lengths are 1/2/4/8 aligned.
pub fn data_watch_fits(gva: u64, len: u64, kind: WatchKind) -> bool {
    kind != WatchKind::Read && matches!(len, 1 | 2 | 4 | 8) && gva.is_multiple_of(len)
}

/// DR0-DR3 and DR7 for these slots; DR7 is 0 when none is in use.
pub fn encode(slots: &[Option<Slot>; SLOTS]) -> ([u64; SLOTS], u64) {
    let mut addrs = [0; SLOTS];
    let mut dr7 = 0;
    for (i, slot) in slots.iter().enumerate() {
        let Some(slot) = slot else { continue };
        addrs[i] = slot.addr;
        let (rw, len) = match slot.what {
            SlotUse::Execute => (0b00, 0b00),
            SlotUse::Data { kind, len } => (
                if kind == WatchKind::Write { 0b01 } else { 0b11 },
                match len {
                    1 => 0b00,
                    2 => 0b01,
                    8 => 0b10,
                    _ => 0b11,
                },
            ),
        };
        // Gi, then RWi/LENi in the upper half.
        dr7 |= (2 << (i * 2)) | (rw << (16 + i * 4)) | (len << (18 + i * 4));
    }
    if dr7 != 0 {
        dr7 |= DR7_BASE;
    }
    (addrs, dr7)
}

/// What a debug exit with this DR6 means under the armed DR0-DR3/DR7, if a slot fired.
pub fn decode_hit(debugreg: &[u64; 8], dr6: u64) -> Option<StopReason> {
    let hits = dr6 & DR6_HITS;
    if hits == 0 {
        return None;
    }
    let slot = hits.trailing_zeros() as usize;
    let rw = (debugreg[7] >> (16 + slot * 4)) & 0b11;
    Some(match rw {
        0b00 => StopReason::HwBreakpoint,
        0b01 => StopReason::Watchpoint {
            kind: WatchKind::Write,
            addr: debugreg[slot],
        },
        _ => StopReason::Watchpoint {
            kind: WatchKind::Access,
            addr: debugreg[slot],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_slot_matches_the_measured_dr7() {
        let slots = [
            Some(Slot {
                addr: 0xffff_ffff_8010_0000,
                what: SlotUse::Execute,
            }),
            None,
            None,
            None,
        ];
        assert_eq!(encode(&slots), ([0xffff_ffff_8010_0000, 0, 0, 0], 0x602));
        assert_eq!(encode(&[None; SLOTS]).1, 0);
    }

    #[test]
    fn data_slots_round_trip_through_dr6() {
        let slots = [
            None,
            Some(Slot {
                addr: 0x1000,
                what: SlotUse::Data {
                    kind: WatchKind::Write,
                    len: 8,
                },
            }),
            None,
            Some(Slot {
                addr: 0x2002,
                what: SlotUse::Data {
                    kind: WatchKind::Access,
                    len: 2,
                },
            }),
        ];
        let (addrs, dr7) = encode(&slots);
        assert_eq!(dr7, 0x600 | 8 | 0x80 | (0b1001 << 20) | (0b0111 << 28));
        let mut debugreg = [0u64; 8];
        debugreg[..4].copy_from_slice(&addrs);
        debugreg[7] = dr7;
        assert_eq!(
            decode_hit(&debugreg, 0xffff_0ff2),
            Some(StopReason::Watchpoint {
                kind: WatchKind::Write,
                addr: 0x1000
            })
        );
        assert_eq!(
            decode_hit(&debugreg, 0x8),
            Some(StopReason::Watchpoint {
                kind: WatchKind::Access,
                addr: 0x2002
            })
        );
        assert_eq!(
            decode_hit(&debugreg, 0x4000),
            None,
            "a single-step, no slot"
        );
    }

    #[test]
    fn only_aligned_small_store_watches_fit() {
        assert!(data_watch_fits(0x1008, 8, WatchKind::Write));
        assert!(data_watch_fits(0x1001, 1, WatchKind::Access));
        assert!(!data_watch_fits(0x1004, 8, WatchKind::Write));
        assert!(!data_watch_fits(0x1000, 3, WatchKind::Write));
        assert!(!data_watch_fits(0x1000, 8, WatchKind::Read));
    }
}
