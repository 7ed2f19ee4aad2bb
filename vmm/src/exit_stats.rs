//! Exit accounting: every userspace exit counted by reason and key, with how long the VMM took to handle it.
//!
//! Each vCPU thread records into its own table behind an uncontended mutex; readers take snapshots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuExit;
use serde::{Deserialize, Serialize};

/// Why a vCPU left `KVM_RUN`, with the detail perf kvm stat keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "reason", content = "key", rename_all = "snake_case")]
pub enum ExitKey {
    IoIn(u16),
    IoOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Hlt,
    Debug,
    Shutdown,
    InternalError,
    FailEntry,
    SystemEvent,
    /// Kicked out of the guest by a signal: sampling, pause, or a register request.
    Interrupted,
    Other,
}

impl ExitKey {
    pub fn of(res: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> ExitKey {
        match res {
            Ok(VcpuExit::IoIn(port, _)) => ExitKey::IoIn(*port),
            Ok(VcpuExit::IoOut(port, _)) => ExitKey::IoOut(*port),
            Ok(VcpuExit::MmioRead(addr, _)) => ExitKey::MmioRead(*addr),
            Ok(VcpuExit::MmioWrite(addr, _)) => ExitKey::MmioWrite(*addr),
            Ok(VcpuExit::Hlt) => ExitKey::Hlt,
            Ok(VcpuExit::Debug(_)) => ExitKey::Debug,
            Ok(VcpuExit::Shutdown) => ExitKey::Shutdown,
            Ok(VcpuExit::InternalError) => ExitKey::InternalError,
            Ok(VcpuExit::FailEntry(..)) => ExitKey::FailEntry,
            Ok(VcpuExit::SystemEvent(..)) => ExitKey::SystemEvent,
            Err(e) if e.errno() == libc::EINTR => ExitKey::Interrupted,
            _ => ExitKey::Other,
        }
    }

    /// perf kvm stat's name for the exit reason.
    pub fn reason_name(&self) -> &'static str {
        match self {
            ExitKey::IoIn(_) | ExitKey::IoOut(_) => "IO_INSTRUCTION",
            ExitKey::MmioRead(_) | ExitKey::MmioWrite(_) => "MMIO",
            ExitKey::Hlt => "HLT",
            ExitKey::Debug => "DEBUG",
            ExitKey::Shutdown => "SHUTDOWN",
            ExitKey::InternalError => "INTERNAL_ERROR",
            ExitKey::FailEntry => "FAIL_ENTRY",
            ExitKey::SystemEvent => "SYSTEM_EVENT",
            ExitKey::Interrupted => "INTERRUPTED",
            ExitKey::Other => "OTHER",
        }
    }
}

/// Count and handling time of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitAgg {
    pub count: u64,
    pub total_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Sum of squared times, for the standard deviation.
    pub sum_sq_ns: f64,
}

impl ExitAgg {
    pub fn add(&mut self, ns: u64) {
        self.min_ns = if self.count == 0 {
            ns
        } else {
            self.min_ns.min(ns)
        };
        self.max_ns = self.max_ns.max(ns);
        self.count += 1;
        self.total_ns += ns;
        self.sum_sq_ns += (ns as f64) * (ns as f64);
    }

    pub fn merge(&mut self, o: &ExitAgg) {
        if o.count == 0 {
            return;
        }
        self.min_ns = if self.count == 0 {
            o.min_ns
        } else {
            self.min_ns.min(o.min_ns)
        };
        self.max_ns = self.max_ns.max(o.max_ns);
        self.count += o.count;
        self.total_ns += o.total_ns;
        self.sum_sq_ns += o.sum_sq_ns;
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total_ns as f64 / self.count as f64
        }
    }

    pub fn stddev_ns(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let mean = self.mean_ns();
        (self.sum_sq_ns / self.count as f64 - mean * mean)
            .max(0.0)
            .sqrt()
    }
}

/// One vCPU's exit table.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct VcpuExitStats {
    pub by_key: Vec<(ExitKey, ExitAgg)>,
}

/// Distinct MMIO addresses one vCPU's table keeps. The guest picks the addresses, and a table keyed by every one of
/// them would grow without bound (a guest storming random addresses added ~80 bytes per exit, and an `exit_stats`
/// reply of megabytes); exits at further addresses are counted under `MMIO_OTHER_ADDR`.
pub const MAX_MMIO_KEYS: usize = 1024;
/// The address key of MMIO exits beyond `MAX_MMIO_KEYS` distinct addresses ("all other addresses").
pub const MMIO_OTHER_ADDR: u64 = u64::MAX;

/// The live tables of every vCPU.
#[derive(Debug, Default)]
pub struct ExitTable(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    map: HashMap<ExitKey, ExitAgg>,
    mmio_keys: usize,
}

impl ExitTable {
    pub fn record(&self, key: ExitKey, ns: u64) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = match key {
            ExitKey::MmioRead(a) | ExitKey::MmioWrite(a)
                if a != MMIO_OTHER_ADDR && !t.map.contains_key(&key) =>
            {
                if t.mmio_keys < MAX_MMIO_KEYS {
                    t.mmio_keys += 1;
                    key
                } else if matches!(key, ExitKey::MmioRead(_)) {
                    ExitKey::MmioRead(MMIO_OTHER_ADDR)
                } else {
                    ExitKey::MmioWrite(MMIO_OTHER_ADDR)
                }
            }
            _ => key,
        };
        t.map.entry(key).or_default().add(ns);
    }

    pub fn snapshot(&self) -> VcpuExitStats {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_key: Vec<_> = t.map.iter().map(|(k, v)| (*k, *v)).collect();
        by_key.sort_by_key(|(k, _)| *k);
        VcpuExitStats { by_key }
    }

    /// Snapshot and zero under one lock, so that no exit falls between the read and the reset.
    pub fn take(&self) -> VcpuExitStats {
        let t = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_key: Vec<_> = t.map.into_iter().collect();
        by_key.sort_by_key(|(k, _)| *k);
        VcpuExitStats { by_key }
    }
}

pub type SharedExitTable = Arc<ExitTable>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_the_table_and_zeroes_it() {
        let t = ExitTable::default();
        t.record(ExitKey::IoOut(0xf4), 7);
        assert_eq!(t.take().by_key.len(), 1);
        assert!(t.snapshot().by_key.is_empty());
    }

    #[test]
    fn guest_chosen_mmio_addresses_cannot_grow_the_table_without_bound() {
        let t = ExitTable::default();
        for a in 0..(MAX_MMIO_KEYS as u64 + 500) {
            t.record(ExitKey::MmioRead(0xd000_0000 + a * 8), 1);
            t.record(ExitKey::MmioWrite(0x1_0000_0000 + a * 8), 1);
        }
        // An address already in the table keeps its own key after the cap.
        t.record(ExitKey::MmioRead(0xd000_0000), 1);
        t.record(ExitKey::IoOut(0x3f8), 1);
        let s = t.snapshot();
        assert_eq!(s.by_key.len(), MAX_MMIO_KEYS + 2 + 1);
        let count = |k: ExitKey| s.by_key.iter().find(|(x, _)| *x == k).map(|(_, a)| a.count);
        assert_eq!(count(ExitKey::MmioRead(0xd000_0000)), Some(2));
        let other_r = count(ExitKey::MmioRead(MMIO_OTHER_ADDR)).unwrap();
        let other_w = count(ExitKey::MmioWrite(MMIO_OTHER_ADDR)).unwrap();
        let recorded = 2 * (MAX_MMIO_KEYS + 500);
        assert_eq!(
            (other_r + other_w) as usize,
            recorded - MAX_MMIO_KEYS,
            "every exit past the cap is counted"
        );
        // take() starts a fresh table with a fresh allowance.
        assert_eq!(t.take().by_key.len(), MAX_MMIO_KEYS + 3);
        t.record(ExitKey::MmioRead(0x1234), 1);
        assert_eq!(t.snapshot().by_key[0].0, ExitKey::MmioRead(0x1234));
    }

    #[test]
    fn aggregates_min_max_mean_stddev() {
        let t = ExitTable::default();
        for ns in [10, 20, 30] {
            t.record(ExitKey::IoOut(0x3f8), ns);
        }
        t.record(ExitKey::Hlt, 5);
        let s = t.snapshot();
        assert_eq!(s.by_key.len(), 2);
        let (_, io) = s
            .by_key
            .iter()
            .find(|(k, _)| *k == ExitKey::IoOut(0x3f8))
            .unwrap();
        assert_eq!(
            (io.count, io.min_ns, io.max_ns, io.total_ns),
            (3, 10, 30, 60)
        );
        assert!((io.mean_ns() - 20.0).abs() < 1e-9);
        assert!((io.stddev_ns() - (200.0f64 / 3.0).sqrt()).abs() < 1e-9);
        let mut m = *io;
        m.merge(&ExitAgg {
            count: 1,
            total_ns: 2,
            min_ns: 2,
            max_ns: 2,
            sum_sq_ns: 4.0,
        });
        assert_eq!((m.count, m.min_ns), (4, 2));
        assert_eq!(ExitKey::IoIn(1).reason_name(), "IO_INSTRUCTION");
    }
}
