//! Rendering: perf's `--stdio` table (with call graphs), folded stacks, and the flame graph SVG.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use super::load::Profile;
use super::{aggregate, row_key, ReportError, ReportOptions, ResolvedSample, RowKey, SortKey};

fn header_name(key: SortKey) -> &'static str {
    match key {
        SortKey::Comm => "Command",
        SortKey::Pid => "Pid",
        SortKey::Dso => "Shared Object",
        SortKey::Sym => "Symbol",
        SortKey::Cpu => "CPU",
    }
}

pub fn write_table(
    out: &mut dyn Write,
    profile: &Profile,
    samples: &[ResolvedSample],
    options: &ReportOptions,
    children: bool,
) -> io::Result<()> {
    // Periods come from the file: a corrupt one must not overflow the total.
    let total = samples
        .iter()
        .fold(0u64, |sum, s| sum.saturating_add(s.period));
    writeln!(out, "#")?;
    writeln!(out, "# Total Lost Samples: {}", profile.lost)?;
    writeln!(out, "#")?;
    writeln!(
        out,
        "# Samples: {}  of event '{}'",
        samples.len(),
        profile.event_name
    )?;
    writeln!(out, "# Event count (approx.): {total}")?;
    writeln!(out, "#")?;
    let rows = aggregate(samples, &options.sort);
    let mut ordered: Vec<(&RowKey, &(u64, u64))> = rows
        .iter()
        .filter(|(_, &(own, inclusive))| if children { inclusive > 0 } else { own > 0 })
        .collect();
    ordered.sort_by(|a, b| {
        let rank = |(own, inclusive): (u64, u64)| {
            if children {
                (inclusive, own)
            } else {
                (own, inclusive)
            }
        };
        rank(*b.1).cmp(&rank(*a.1)).then_with(|| a.0.cmp(b.0))
    });
    let headers: Vec<&str> = options.sort.iter().map(|&k| header_name(k)).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for (key, _) in &ordered {
        for (width, value) in widths.iter_mut().zip(key.iter()) {
            *width = (*width).max(value.len());
        }
    }
    let percent_columns: &[&str] = if children {
        &["Children", "Self"]
    } else {
        &["Overhead"]
    };
    // perf's layout: "# " then 8-wide percent columns, then the key columns, all two spaces apart.
    let mut title = String::from("#");
    let mut rule = String::from("#");
    for (i, name) in percent_columns.iter().enumerate() {
        let gap = if i == 0 { " " } else { "  " };
        title.push_str(&format!("{gap}{name:>8}"));
        rule.push_str(&format!("{gap}{}", ".".repeat(8)));
    }
    for (header, width) in headers.iter().zip(&widths) {
        title.push_str(&format!("  {header:<width$}"));
        rule.push_str(&format!("  {}", ".".repeat(*width)));
    }
    writeln!(out, "{}", title.trim_end())?;
    writeln!(out, "{}", rule.trim_end())?;
    writeln!(out, "#")?;
    let percent = |period: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * period as f64 / total as f64
        }
    };
    for (key, &(own, inclusive)) in ordered {
        let mut line = String::new();
        if children {
            line.push_str(&format!(
                "  {:>7.2}%  {:>7.2}%",
                percent(inclusive),
                percent(own)
            ));
        } else {
            line.push_str(&format!("  {:>7.2}%", percent(own)));
        }
        for (value, width) in key.iter().zip(&widths) {
            line.push_str(&format!("  {value:<width$}"));
        }
        writeln!(out, "{}", line.trim_end())?;
        if options.call_graph && profile.has_callchains {
            write_callers(out, samples, key, &options.sort, total)?;
        }
    }
    writeln!(out, "#")?;
    Ok(())
}

/// The distinct caller chains of a row's own samples, heaviest first, perf `graph` style (percent of total).
fn write_callers(
    out: &mut dyn Write,
    samples: &[ResolvedSample],
    key: &RowKey,
    sort: &[SortKey],
    total: u64,
) -> io::Result<()> {
    let mut chains: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for sample in samples {
        let Some(leaf) = sample.locations.first() else {
            continue;
        };
        if &row_key(sample, leaf, sort) != key {
            continue;
        }
        let chain = sample.locations.iter().map(|l| l.symbol.clone()).collect();
        let sum = chains.entry(chain).or_default();
        *sum = sum.saturating_add(sample.period);
    }
    if chains.is_empty() {
        return Ok(());
    }
    let mut chains: Vec<(Vec<String>, u64)> = chains.into_iter().collect();
    chains.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let indent = " ".repeat(12);
    writeln!(out, "{indent}|")?;
    if let [(chain, _)] = &chains[..] {
        for (i, symbol) in chain.iter().enumerate() {
            let lead = if i == 0 { "---" } else { "   " };
            writeln!(out, "{indent}{lead}{symbol}")?;
        }
    } else {
        let last = chains.len() - 1;
        for (n, (chain, period)) in chains.iter().enumerate() {
            let share = 100.0 * *period as f64 / total.max(1) as f64;
            let branch = format!("--{share:.2}%--");
            let (lead, cont) = if n == last { (" ", " ") } else { ("|", "|") };
            for (i, symbol) in chain.iter().enumerate() {
                if i == 0 {
                    writeln!(out, "{indent}{lead}{branch}{symbol}")?;
                } else {
                    writeln!(out, "{indent}{cont}{}{symbol}", " ".repeat(branch.len()))?;
                }
            }
            if n != last {
                writeln!(out, "{indent}|")?;
            }
        }
    }
    writeln!(out)?;
    Ok(())
}

/// flamegraph.pl input: `comm;outermost;...;leaf count`, one line per distinct stack, sorted; counts are
/// sample counts.
pub fn folded_stacks(samples: &[ResolvedSample]) -> Vec<String> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for sample in samples {
        let mut line = sample.comm.replace(';', ":");
        for location in sample.locations.iter().rev() {
            line.push(';');
            line.push_str(&location.symbol.replace(';', ":"));
            if location.mode.is_kernel() {
                // flamegraph.pl colors `_[k]` frames as kernel code.
                line.push_str("_[k]");
            }
        }
        *stacks.entry(line).or_default() += 1;
    }
    stacks
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect()
}

pub fn write_flamegraph(path: &Path, folded: &[String]) -> Result<(), ReportError> {
    let error = |source| ReportError::FlameGraph {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::create(path).map_err(error)?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = "perf-kvm report".to_owned();
    let mut writer = io::BufWriter::new(file);
    inferno::flamegraph::from_lines(&mut options, folded.iter().map(String::as_str), &mut writer)
        .map_err(|e| error(io::Error::other(e.to_string())))?;
    writer.flush().map_err(error)
}
