//! The exit table in `perf kvm stat report`'s layout, and KVM's own counters below it.

use std::collections::BTreeMap;
use std::fmt::Write;

use vmm::exit_stats::{ExitAgg, ExitKey, VcpuExitStats};
use vmm::kvm_stats::{KvmStatKind, KvmStatsSnapshot};

/// What one table row stands for, as perf kvm stat's `--event`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum StatEvent {
    /// One row per exit reason.
    Vmexit,
    /// One row per I/O port and direction.
    Ioport,
    /// One row per MMIO address and direction.
    Mmio,
}

/// Row order, as perf kvm stat's `--key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Most exits first.
    Sample,
    /// Most handling time first.
    Time,
}

/// Which vCPUs a table covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuFilter {
    All,
    One(usize),
}

impl VcpuFilter {
    fn includes(&self, vcpu: usize) -> bool {
        match self {
            VcpuFilter::All => true,
            VcpuFilter::One(v) => *v == vcpu,
        }
    }

    fn describe(&self) -> String {
        match self {
            VcpuFilter::All => "all VCPUs".into(),
            VcpuFilter::One(v) => format!("VCPU {v}"),
        }
    }
}

/// One row: its perf-style name and the merged aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct StatRow {
    pub name: String,
    pub agg: ExitAgg,
}

/// perf's row name of `key` under `event`, or `None` when the key has no row in that view.
pub fn row_name(key: &ExitKey, event: StatEvent) -> Option<String> {
    match (event, key) {
        (StatEvent::Vmexit, k) => Some(k.reason_name().to_string()),
        (StatEvent::Ioport, ExitKey::IoOut(port)) => Some(format!("{port:#x}:POUT")),
        (StatEvent::Ioport, ExitKey::IoIn(port)) => Some(format!("{port:#x}:PIN")),
        // The VMM folds MMIO exits past its per-vCPU limit of distinct addresses into one key.
        (StatEvent::Mmio, ExitKey::MmioWrite(vmm::exit_stats::MMIO_OTHER_ADDR)) => {
            Some("other:W".to_string())
        }
        (StatEvent::Mmio, ExitKey::MmioRead(vmm::exit_stats::MMIO_OTHER_ADDR)) => {
            Some("other:R".to_string())
        }
        (StatEvent::Mmio, ExitKey::MmioWrite(addr)) => Some(format!("{addr:#x}:W")),
        (StatEvent::Mmio, ExitKey::MmioRead(addr)) => Some(format!("{addr:#x}:R")),
        _ => None,
    }
}

/// Merges the selected vCPUs' tables into rows, sorted by `sort` (ties by name).
pub fn rows(
    stats: &[VcpuExitStats],
    event: StatEvent,
    vcpus: VcpuFilter,
    sort: SortKey,
) -> Vec<StatRow> {
    let mut merged: BTreeMap<String, ExitAgg> = BTreeMap::new();
    for (_, table) in stats.iter().enumerate().filter(|(i, _)| vcpus.includes(*i)) {
        for (key, agg) in &table.by_key {
            if let Some(name) = row_name(key, event) {
                merged.entry(name).or_default().merge(agg);
            }
        }
    }
    let mut rows: Vec<StatRow> = merged
        .into_iter()
        .map(|(name, agg)| StatRow { name, agg })
        .collect();
    rows.sort_by(|a, b| {
        let (ka, kb) = match sort {
            SortKey::Sample => (a.agg.count, b.agg.count),
            SortKey::Time => (a.agg.total_ns, b.agg.total_ns),
        };
        kb.cmp(&ka).then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// perf's relative standard deviation of the mean, in percent.
fn rel_stddev_pct(agg: &ExitAgg) -> f64 {
    if agg.count < 2 {
        return 0.0;
    }
    let n = agg.count as f64;
    let mean = agg.mean_ns();
    let variance = ((agg.sum_sq_ns - n * mean * mean) / (n - 1.0)).max(0.0);
    let stddev_of_mean = (variance / n).sqrt();
    if mean > 0.0 {
        100.0 * stddev_of_mean / mean
    } else {
        0.0
    }
}

fn column_title(event: StatEvent) -> &'static str {
    match event {
        StatEvent::Vmexit => "VM-EXIT",
        StatEvent::Ioport => "IO Port Access",
        StatEvent::Mmio => "MMIO Access",
    }
}

/// The exit table and its total line, in `perf kvm stat report`'s format.
pub fn format_exit_table(
    stats: &[VcpuExitStats],
    event: StatEvent,
    vcpus: VcpuFilter,
    sort: SortKey,
    target: &str,
) -> String {
    const NAME_WIDTH: usize = 20;
    let rows = rows(stats, event, vcpus, sort);
    let total_count: u64 = rows.iter().map(|r| r.agg.count).sum();
    let total_ns: u64 = rows.iter().map(|r| r.agg.total_ns).sum();
    let pct = |part: f64, whole: f64| {
        if whole > 0.0 {
            part / whole * 100.0
        } else {
            0.0
        }
    };
    let us = |ns: f64| ns / 1000.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n\nAnalyze events for {target}, {}:\n",
        vcpus.describe()
    );
    let _ = write!(
        out,
        "{:>NAME_WIDTH$} {:>10} {:>9} {:>9} {:>11} {:>11} {:>16} \n\n",
        column_title(event),
        "Samples",
        "Samples%",
        "Time%",
        "Min Time",
        "Max Time",
        "Avg time"
    );
    for r in &rows {
        let a = &r.agg;
        let _ = writeln!(
            out,
            "{:>NAME_WIDTH$} {:>10} {:>8.2}% {:>8.2}% {:>9.2}us {:>9.2}us {:>9.2}us ( +-{:>7.2}% )",
            r.name,
            a.count,
            pct(a.count as f64, total_count as f64),
            pct(a.total_ns as f64, total_ns as f64),
            us(a.min_ns as f64),
            us(a.max_ns as f64),
            us(a.mean_ns()),
            rel_stddev_pct(a),
        );
    }
    let _ = writeln!(
        out,
        "\nTotal Samples:{total_count}, Total events handled time:{:.2}us.\n",
        us(total_ns as f64)
    );
    out
}

/// Counters always listed (when KVM has them), even at zero: the exits a reader looks for first.
const KEY_COUNTERS: [&str; 10] = [
    "exits",
    "halt_exits",
    "io_exits",
    "mmio_exits",
    "signal_exits",
    "irq_exits",
    "request_irq_exits",
    "insn_emulation",
    "insn_emulation_fail",
    "hypercalls",
];

/// One counter of the KVM section, summed over the selected vCPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    pub name: String,
    pub value: u64,
}

/// The per-vCPU cumulative counters worth showing: the key ones always, any other only when non-zero.
pub fn counter_rows(kvm: &KvmStatsSnapshot, vcpus: VcpuFilter) -> Vec<CounterRow> {
    let mut summed: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, stats) in kvm
        .vcpus
        .iter()
        .enumerate()
        .filter(|(i, _)| vcpus.includes(*i))
    {
        for s in stats.iter().filter(|s| s.kind == KvmStatKind::Cumulative) {
            *summed.entry(s.name.as_str()).or_default() += s.value;
        }
    }
    let mut rows: Vec<CounterRow> = KEY_COUNTERS
        .iter()
        .filter_map(|name| {
            summed.get(name).map(|&value| CounterRow {
                name: name.to_string(),
                value,
            })
        })
        .collect();
    rows.extend(
        summed
            .iter()
            .filter(|(name, value)| **value > 0 && !KEY_COUNTERS.contains(name))
            .map(|(name, &value)| CounterRow {
                name: name.to_string(),
                value,
            }),
    );
    rows
}

/// Counter deltas between two snapshots (cumulative counters only), for `live`.
pub fn counter_delta(now: &KvmStatsSnapshot, before: &KvmStatsSnapshot) -> KvmStatsSnapshot {
    let mut out = now.clone();
    for (v, stats) in out.vcpus.iter_mut().enumerate() {
        for s in stats
            .iter_mut()
            .filter(|s| s.kind == KvmStatKind::Cumulative)
        {
            let old = before.vcpu_value(v, &s.name).unwrap_or(0);
            s.value = s.value.saturating_sub(old);
        }
    }
    out
}

/// KVM's own counters (kernel-handled exits included), with a note where they disagree with the VMM's view.
pub fn format_kvm_counters(
    kvm: &KvmStatsSnapshot,
    stats: &[VcpuExitStats],
    vcpus: VcpuFilter,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "KVM counters (binary stats fd), {}:\n",
        vcpus.describe()
    );
    let _ = writeln!(out, "{:>20} {:>12}\n", "Counter", "Value");
    let rows = counter_rows(kvm, vcpus);
    for r in &rows {
        let _ = writeln!(out, "{:>20} {:>12}", r.name, r.value);
    }
    let vmm_io: u64 = rows_total(stats, vcpus, |k| {
        matches!(k, ExitKey::IoIn(_) | ExitKey::IoOut(_))
    });
    let kvm_io = rows.iter().find(|r| r.name == "io_exits").map(|r| r.value);
    if kvm_io == Some(0) && vmm_io > 0 {
        let _ = writeln!(
            out,
            "\nNote: this host's KVM leaves io_exits at 0 although the VMM handled {vmm_io} port I/O exits; it counts \
             them in `exits` only."
        );
    }
    out.push('\n');
    out
}

fn rows_total(stats: &[VcpuExitStats], vcpus: VcpuFilter, pick: impl Fn(&ExitKey) -> bool) -> u64 {
    stats
        .iter()
        .enumerate()
        .filter(|(i, _)| vcpus.includes(*i))
        .flat_map(|(_, t)| t.by_key.iter())
        .filter(|(k, _)| pick(k))
        .map(|(_, a)| a.count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::kvm_stats::KvmStat;

    fn agg(times: &[u64]) -> ExitAgg {
        let mut a = ExitAgg::default();
        for &t in times {
            a.add(t);
        }
        a
    }

    fn sample_stats() -> Vec<VcpuExitStats> {
        vec![
            VcpuExitStats {
                by_key: vec![
                    (ExitKey::IoOut(0x3f8), agg(&[1000, 3000])),
                    (ExitKey::IoIn(0x3fd), agg(&[500])),
                    (ExitKey::MmioWrite(0xfee0_0000), agg(&[20_000])),
                ],
            },
            VcpuExitStats {
                by_key: vec![
                    (ExitKey::IoOut(0x3f8), agg(&[2000])),
                    (ExitKey::Interrupted, agg(&[100])),
                ],
            },
        ]
    }

    #[test]
    fn mmio_overflow_key_is_named_other() {
        let other = vmm::exit_stats::MMIO_OTHER_ADDR;
        assert_eq!(
            row_name(&ExitKey::MmioRead(other), StatEvent::Mmio).as_deref(),
            Some("other:R")
        );
        assert_eq!(
            row_name(&ExitKey::MmioWrite(0xd000_0000), StatEvent::Mmio).as_deref(),
            Some("0xd0000000:W")
        );
    }

    #[test]
    fn vmexit_rows_merge_ports_and_vcpus_and_sort_by_key() {
        let by_count = rows(
            &sample_stats(),
            StatEvent::Vmexit,
            VcpuFilter::All,
            SortKey::Sample,
        );
        let names: Vec<_> = by_count
            .iter()
            .map(|r| (r.name.as_str(), r.agg.count))
            .collect();
        assert_eq!(
            names,
            [("IO_INSTRUCTION", 4), ("INTERRUPTED", 1), ("MMIO", 1)]
        );
        let by_time = rows(
            &sample_stats(),
            StatEvent::Vmexit,
            VcpuFilter::All,
            SortKey::Time,
        );
        assert_eq!(by_time[0].name, "MMIO");
        let io = rows(
            &sample_stats(),
            StatEvent::Ioport,
            VcpuFilter::One(0),
            SortKey::Sample,
        );
        let names: Vec<_> = io.iter().map(|r| (r.name.as_str(), r.agg.count)).collect();
        assert_eq!(names, [("0x3f8:POUT", 2), ("0x3fd:PIN", 1)]);
        let mmio = rows(
            &sample_stats(),
            StatEvent::Mmio,
            VcpuFilter::All,
            SortKey::Sample,
        );
        assert_eq!(mmio[0].name, "0xfee00000:W");
    }

    #[test]
    fn table_has_perfs_columns_percentages_and_total_line() {
        let text = format_exit_table(
            &sample_stats(),
            StatEvent::Ioport,
            VcpuFilter::All,
            SortKey::Sample,
            "the VM",
        );
        assert!(text.contains("Analyze events for the VM, all VCPUs:"));
        let header = text.lines().find(|l| l.contains("IO Port Access")).unwrap();
        for col in [
            "Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time",
        ] {
            assert!(header.contains(col), "{header}");
        }
        // 0x3f8:POUT: 3 of 4 exits, 6000 of 6500 ns, min 1 us, max 3 us, mean 2 us.
        let row = text.lines().find(|l| l.contains("0x3f8:POUT")).unwrap();
        let fields: Vec<_> = row.split_whitespace().collect();
        assert_eq!(
            &fields[..6],
            ["0x3f8:POUT", "3", "75.00%", "92.31%", "1.00us", "3.00us"]
        );
        assert_eq!(fields[6], "2.00us");
        // Sample stddev 1000 ns, of the mean 577.35 ns: 28.87% of 2000.
        assert!(row.ends_with("( +-  28.87% )"), "{row}");
        assert!(text.contains("Total Samples:4, Total events handled time:6.50us."));
    }

    #[test]
    fn kvm_counters_sum_vcpus_and_flag_io_exits_mismatch() {
        let stat = |name: &str, value| KvmStat {
            name: name.into(),
            kind: KvmStatKind::Cumulative,
            value,
        };
        let kvm = KvmStatsSnapshot {
            vm: vec![],
            vcpus: vec![
                vec![
                    stat("exits", 10),
                    stat("halt_exits", 0),
                    stat("io_exits", 0),
                    stat("odd_one", 3),
                ],
                vec![
                    stat("exits", 5),
                    stat("halt_exits", 2),
                    stat("io_exits", 0),
                    stat("zero_one", 0),
                ],
            ],
        };
        let r = counter_rows(&kvm, VcpuFilter::All);
        let pairs: Vec<_> = r.iter().map(|r| (r.name.as_str(), r.value)).collect();
        assert_eq!(
            pairs,
            [
                ("exits", 15),
                ("halt_exits", 2),
                ("io_exits", 0),
                ("odd_one", 3)
            ]
        );
        let text = format_kvm_counters(&kvm, &sample_stats(), VcpuFilter::One(1));
        assert!(text.contains("VCPU 1"));
        assert!(
            text.contains("leaves io_exits at 0 although the VMM handled 1 port I/O exits"),
            "{text}"
        );
        let before = KvmStatsSnapshot {
            vm: vec![],
            vcpus: vec![vec![stat("exits", 4)], vec![]],
        };
        assert_eq!(counter_delta(&kvm, &before).vcpu_value(0, "exits"), Some(6));
    }
}
