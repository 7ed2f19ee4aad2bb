//! The gdb side of the VMM: `gdbstub_kvm::DebugTarget` over the vCPU threads, software and hardware breakpoint
//! tables, watchpoints by page protection, and the `--gdb` server thread.
//!
//! State the vCPU threads need at exit time (the software-breakpoint table, the watched pages, the stop queue)
//! lives in [`DebugShared`]; every vCPU holds it whether or not a debugger ever attaches, so the hooks in
//! `vcpu.rs` cost a lock only on the exits they handle.

mod dr;
mod server;
mod slots;
mod target;
mod vcpu_side;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use gdbstub_kvm::{GuestRegisters, StopEvent, StopQueue, StopReason, WatchKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::paging::{self, PagingContext};

pub(crate) const INT3: u8 = 0xcc;
/// CR0.PG: paging enabled.
pub(crate) const CR0_PG: u64 = 1 << 31;

pub use server::{GdbServer, GdbServerError};
pub use slots::{MemorySlots, Protection, RamRegion, SlotError, PAGE_SIZE};
pub use target::VmDebugTarget;
pub use vcpu_side::{DebugResume, VcpuDebugState};

#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    #[error(transparent)]
    StopQueue(#[from] gdbstub_kvm::StopQueueError),
}

/// A software breakpoint the debugger planted: the int3 sits at `gpa`, `original` is the byte it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwBreakpoint {
    pub gpa: u64,
    pub original: u8,
}

/// One page-sized piece of a watched range, translated once when the watchpoint was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchChunk {
    /// Which watchpoint this piece belongs to (gdb may set the same range twice and remove it once).
    pub id: u64,
    /// The watchpoint as gdb gave it (for removal).
    pub watch_gva: u64,
    pub watch_len: u64,
    pub kind: WatchKind,
    /// This piece: guest physical start, its guest virtual address, and length (within one page).
    pub gpa: u64,
    pub gva: u64,
    pub len: u64,
}

impl WatchChunk {
    /// Whether an access of `kind` at guest physical `[gpa, gpa+len)` triggers this watch; if so, the accessed
    /// guest virtual address (the first watched byte touched).
    pub fn hit(&self, gpa: u64, len: u64, is_write: bool) -> Option<u64> {
        let wanted = match self.kind {
            WatchKind::Write => is_write,
            WatchKind::Read => !is_write,
            WatchKind::Access => true,
        };
        let start = gpa.max(self.gpa);
        let end = (gpa + len).min(self.gpa + self.len);
        (wanted && start < end).then(|| self.gva + (start - self.gpa))
    }
}

/// The protection each watched page needs: no slot if any watch on it is for reads.
pub fn protections(chunks: &[WatchChunk]) -> BTreeMap<u64, Protection> {
    let mut pages = BTreeMap::new();
    for chunk in chunks {
        let protection = match chunk.kind {
            WatchKind::Write => Protection::ReadOnly,
            WatchKind::Read | WatchKind::Access => Protection::Unmapped,
        };
        let first = chunk.gpa & !(PAGE_SIZE - 1);
        let last = (chunk.gpa + chunk.len - 1) & !(PAGE_SIZE - 1);
        let mut page = first;
        while page <= last {
            let entry = pages.entry(page).or_insert(protection);
            if protection == Protection::Unmapped {
                *entry = Protection::Unmapped;
            }
            page += PAGE_SIZE;
        }
    }
    pages
}

/// What an MMIO exit on a watched page came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmioOutcome {
    /// Not a watched page: the ordinary MMIO handling applies.
    NotWatched,
    /// Served from guest memory; no watch was hit.
    Served,
    /// Served from guest memory, and a watchpoint was hit.
    Hit(StopReason),
}

/// A vCPU that parked itself to report a stop: during which resume (the gdb thread numbers them), and its
/// registers at that moment. The gdb thread then needs neither a pause request nor a register read from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParkedStop {
    pub generation: u64,
    pub registers: Option<ReportedRegisters>,
}

/// Registers a vCPU read for its stop report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReportedRegisters {
    pub regs: GuestRegisters,
    /// With the FPU/SSE state and `k_gs_base`; without them (a step's report takes what KVM's sync regs hold,
    /// which costs no ioctl) the gdb thread asks the vCPU for the rest when gdb wants it.
    pub complete: bool,
}

/// Debug state shared by the gdb thread and every vCPU thread.
pub struct DebugShared {
    queue: StopQueue,
    sw_breakpoints: Mutex<BTreeMap<u64, SwBreakpoint>>,
    /// Breakpoints set before the guest enabled paging: planted by the first vCPU that runs with paging on.
    pending_sw_breakpoints: Mutex<Vec<u64>>,
    watches: Mutex<Vec<WatchChunk>>,
    /// Whether a gdb is attached. A lock rather than an atomic: a vCPU decides to hold a crash for gdb and
    /// queues it under it, so a session cannot end in between and leave the vCPU parked for nobody.
    session_active: Mutex<bool>,
    /// Per vCPU index: its last self-reported stop (see [`ParkedStop`]).
    parked: Mutex<BTreeMap<usize, ParkedStop>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables are plain maps updated in one step: a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DebugShared {
    pub fn new() -> Result<Self, DebugError> {
        Ok(DebugShared {
            queue: StopQueue::new()?,
            sw_breakpoints: Mutex::new(BTreeMap::new()),
            pending_sw_breakpoints: Mutex::new(Vec::new()),
            watches: Mutex::new(Vec::new()),
            session_active: Mutex::new(false),
            parked: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn queue(&self) -> &StopQueue {
        &self.queue
    }

    /// A gdb is attached (between the start and the end of `serve`).
    pub fn session_active(&self) -> bool {
        *lock(&self.session_active)
    }

    pub(crate) fn begin_session(&self) {
        *lock(&self.session_active) = true;
    }

    /// Marks the session over and returns the stops queued since the stub's last look (vCPUs that parked for a
    /// gdb that is gone now).
    pub(crate) fn end_session(&self) -> Vec<StopEvent> {
        let mut active = lock(&self.session_active);
        *active = false;
        std::iter::from_fn(|| self.queue.take()).collect()
    }

    /// Queues `event` after `park` if a gdb is attached; says whether it did.
    pub(crate) fn report_if_attached(&self, event: StopEvent, park: impl FnOnce()) -> bool {
        let active = lock(&self.session_active);
        if *active {
            park();
            self.queue.push(event);
        }
        *active
    }

    /// A vCPU reports `event` and parks itself (`park`), in the resume numbered `generation`, with these
    /// registers. All under the lock [`DebugShared::parked`] takes, so the gdb thread never sees the vCPU parked
    /// by its report before the event is queued (it skips pausing such a vCPU, then drops every other breakpoint
    /// hit of the stop from the queue: one queued later would reach gdb while it steps another vCPU over its
    /// breakpoint, which gdb 13 asserts on).
    pub(crate) fn report_parked(
        &self,
        event: StopEvent,
        generation: u64,
        registers: Option<ReportedRegisters>,
        park: impl FnOnce(),
    ) {
        let mut parked = lock(&self.parked);
        parked.insert(
            event.vcpu,
            ParkedStop {
                generation,
                registers,
            },
        );
        park();
        self.queue.push(event);
    }

    /// Forgets the registers recorded with `vcpu`'s last report (they were overwritten).
    pub(crate) fn forget_parked_registers(&self, vcpu: usize) {
        if let Some(parked) = lock(&self.parked).get_mut(&vcpu) {
            parked.registers = None;
        }
    }

    pub(crate) fn parked(&self, vcpu: usize) -> Option<ParkedStop> {
        lock(&self.parked).get(&vcpu).copied()
    }

    /// Whether the debugger planted the int3 at this guest virtual address.
    pub fn owns_sw_breakpoint(&self, gva: u64) -> bool {
        lock(&self.sw_breakpoints).contains_key(&gva)
    }

    pub(crate) fn sw_breakpoints(&self) -> MutexGuard<'_, BTreeMap<u64, SwBreakpoint>> {
        lock(&self.sw_breakpoints)
    }

    pub(crate) fn pending_sw_breakpoints(&self) -> MutexGuard<'_, Vec<u64>> {
        lock(&self.pending_sw_breakpoints)
    }

    /// Writes an int3 at `gpa` for the breakpoint at `gva` and records the byte it replaced.
    pub(crate) fn plant_sw_breakpoint(&self, mem: &GuestMemoryMmap, gva: u64, gpa: u64) -> bool {
        let mut table = lock(&self.sw_breakpoints);
        if table.contains_key(&gva) {
            return true;
        }
        let Ok(original) = mem.read_obj::<u8>(GuestAddress(gpa)) else {
            return false;
        };
        if mem.write_obj(INT3, GuestAddress(gpa)).is_err() {
            return false;
        }
        table.insert(gva, SwBreakpoint { gpa, original });
        true
    }

    /// Plants the pending breakpoints that translate with `ctx`; true when none is left pending.
    pub(crate) fn plant_pending(&self, mem: &GuestMemoryMmap, ctx: &PagingContext) -> bool {
        let mut pending = lock(&self.pending_sw_breakpoints);
        pending.retain(|&gva| match paging::translate(mem, ctx, gva) {
            Ok(t) => !self.plant_sw_breakpoint(mem, gva, t.gpa),
            Err(_) => true,
        });
        pending.is_empty()
    }

    pub(crate) fn watches(&self) -> MutexGuard<'_, Vec<WatchChunk>> {
        lock(&self.watches)
    }

    /// Handles a guest access that exited as MMIO: on a watched page, performs it on guest memory (the store is
    /// applied, the load served) and says whether a watchpoint was hit.
    pub fn mmio_access(&self, mem: &GuestMemoryMmap, gpa: u64, data: MmioData<'_>) -> MmioOutcome {
        let watches = lock(&self.watches);
        let page = gpa & !(PAGE_SIZE - 1);
        let on_watched_page = watches.iter().any(|c| {
            let first = c.gpa & !(PAGE_SIZE - 1);
            let last = (c.gpa + c.len - 1) & !(PAGE_SIZE - 1);
            (first..=last).contains(&page)
        });
        if !on_watched_page {
            return MmioOutcome::NotWatched;
        }
        let (len, is_write) = match data {
            MmioData::Read(buf) => {
                if mem.read_slice(buf, GuestAddress(gpa)).is_err() {
                    buf.fill(0xff);
                }
                (buf.len() as u64, false)
            }
            MmioData::Write(bytes) => {
                let _ = mem.write_slice(bytes, GuestAddress(gpa));
                (bytes.len() as u64, true)
            }
        };
        watches
            .iter()
            .find_map(|c| c.hit(gpa, len, is_write).map(|addr| (c.kind, addr)))
            .map_or(MmioOutcome::Served, |(kind, addr)| {
                MmioOutcome::Hit(StopReason::Watchpoint { kind, addr })
            })
    }
}

/// The data of an MMIO exit.
pub enum MmioData<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: WatchKind, gpa: u64, len: u64) -> WatchChunk {
        WatchChunk {
            id: 1,
            watch_gva: 0xffff_8000_0000_0000 + gpa,
            watch_len: len,
            kind,
            gpa,
            gva: 0xffff_8000_0000_0000 + gpa,
            len,
        }
    }

    #[test]
    fn watch_hits_match_kind_and_overlap() {
        let w = chunk(WatchKind::Write, 0x2008, 8);
        assert_eq!(w.hit(0x2008, 8, true), Some(0xffff_8000_0000_2008));
        assert_eq!(w.hit(0x200c, 4, true), Some(0xffff_8000_0000_200c));
        assert_eq!(w.hit(0x2004, 8, true), Some(0xffff_8000_0000_2008));
        assert_eq!(w.hit(0x2000, 8, true), None, "next to the range");
        assert_eq!(
            w.hit(0x2008, 8, false),
            None,
            "a load does not trip a write watch"
        );
        let a = chunk(WatchKind::Access, 0x2008, 1);
        assert!(a.hit(0x2008, 1, false).is_some() && a.hit(0x2008, 1, true).is_some());
        let r = chunk(WatchKind::Read, 0x2008, 1);
        assert!(r.hit(0x2008, 1, true).is_none());
    }

    #[test]
    fn read_watches_unmap_their_page() {
        let pages = protections(&[
            chunk(WatchKind::Write, 0x2008, 8),
            chunk(WatchKind::Write, 0x5ffc, 8),
            chunk(WatchKind::Read, 0x2010, 1),
        ]);
        assert_eq!(
            pages.into_iter().collect::<Vec<_>>(),
            vec![
                (0x2000, Protection::Unmapped),
                (0x5000, Protection::ReadOnly),
                (0x6000, Protection::ReadOnly)
            ]
        );
    }
}
