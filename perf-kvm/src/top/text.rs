//! Text shared by the TUI and `--stdio`: the perf-top-like header line and the plain-text table.

use std::fmt::Write;

use vmm::GuestMode;

use super::model::{TopHeader, TopRow, VcpuView};

pub fn mode_tag(mode: GuestMode) -> &'static str {
    match mode {
        GuestMode::Kernel => "[k]",
        GuestMode::User => "[u]",
    }
}

pub fn view_label(view: VcpuView, vcpus: usize) -> String {
    match view {
        VcpuView::All => format!("all {vcpus} vCPUs"),
        VcpuView::One(v) => format!("vCPU {v} of {vcpus}"),
    }
}

/// `PerfTop:`-style summary: rate, guest kernel/user split, loss, sampler frequency and the vCPU view.
pub fn header_line(h: &TopHeader, freq_hz: u32, view: VcpuView, vcpus: usize) -> String {
    format!(
        "PerfKvmTop: {:.0} samples/s  guest kernel: {:.1}%  guest user: {:.1}%  lost: {}/{}  [{} Hz]  ({})",
        h.samples_per_sec,
        h.kernel_pct,
        h.user_pct,
        h.lost,
        h.total_samples + h.lost,
        freq_hz,
        view_label(view, vcpus)
    )
}

/// The `--stdio` table: header, rule, then up to `max_rows` rows.
pub fn table(header: &str, rows: &[TopRow], max_rows: usize, exits: &[(String, u64)]) -> String {
    let mut out = String::new();
    let rule = "-".repeat(header.len().min(120));
    let _ = writeln!(out, "{rule}\n{header}\n{rule}");
    let _ = writeln!(
        out,
        "{:>9}  {:>9}  {:<16}  Symbol",
        "Overhead", "Samples", "Shared Object"
    );
    for r in rows.iter().take(max_rows) {
        let _ = writeln!(
            out,
            "{:>8.2}%  {:>9}  {:<16}  {} {}",
            r.overhead,
            r.samples,
            r.info.object,
            mode_tag(r.info.mode),
            r.info.name
        );
    }
    if rows.is_empty() {
        let _ = writeln!(out, "   (no samples yet)");
    }
    if !exits.is_empty() {
        let shown: Vec<String> = exits
            .iter()
            .take(4)
            .map(|(name, rate)| format!("{name} {rate}/s"))
            .collect();
        let _ = writeln!(out, "exits: {}", shown.join(", "));
    }
    out
}
