//! `perf-kvm report`: reads perf.data (ours or real perf's) and prints perf's overhead table, call graphs,
//! folded stacks or a flame graph.

mod load;
mod output;
mod resolve;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

pub use load::{LoadError, Mode};
pub use resolve::SymbolSources;

use load::Profile;
use resolve::{Location, Resolver};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot load symbols from {}", path.display())]
    Symbols {
        path: PathBuf,
        #[source]
        source: symbols::SymbolsError,
    },
    #[error("unknown sort key `{0}` (known: comm, pid, dso, sym, cpu)")]
    UnknownSortKey(String),
    #[error("writing the report failed")]
    Output(#[source] std::io::Error),
    #[error("writing the flame graph {} failed", path.display())]
    FlameGraph {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SortKey {
    Comm,
    Pid,
    Dso,
    Sym,
    Cpu,
}

impl SortKey {
    pub fn parse_list(keys: &str) -> Result<Vec<SortKey>, ReportError> {
        keys.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| match k {
                "comm" => Ok(SortKey::Comm),
                "pid" => Ok(SortKey::Pid),
                "dso" => Ok(SortKey::Dso),
                "sym" | "symbol" => Ok(SortKey::Sym),
                "cpu" | "vcpu" => Ok(SortKey::Cpu),
                other => Err(ReportError::UnknownSortKey(other.to_owned())),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub input: PathBuf,
    pub symbols: SymbolSources,
    pub sort: Vec<SortKey>,
    /// Show callers under each row.
    pub call_graph: bool,
    /// perf's Children column (inclusive time); only meaningful when the file has callchains.
    pub children: bool,
    pub vcpu: Option<u32>,
    /// Print folded stacks (flamegraph.pl input) instead of the table.
    pub folded: bool,
    pub flamegraph: Option<PathBuf>,
    /// Open the files the recording names (the guest kernel image by build-id, mapped ELFs for their symbols).
    /// Off, a report reads nothing but its input and the symbol sources given.
    pub open_recorded_files: bool,
}

impl ReportOptions {
    pub fn new(input: PathBuf) -> Self {
        Self {
            input,
            symbols: SymbolSources::default(),
            sort: vec![SortKey::Comm, SortKey::Dso, SortKey::Sym],
            call_graph: false,
            children: true,
            vcpu: None,
            folded: false,
            flamegraph: None,
            open_recorded_files: true,
        }
    }
}

/// What the caller may want to tell the user besides the report itself.
#[derive(Debug, Default)]
pub struct ReportSummary {
    pub samples: usize,
    pub lost: u64,
    pub warnings: Vec<String>,
}

/// One sample after symbolization: its frames, leaf first, and the row key of each.
struct ResolvedSample {
    period: u64,
    comm: std::rc::Rc<str>,
    pid: i32,
    cpu: u32,
    locations: Vec<std::rc::Rc<Location>>,
}

/// A row key: the values of the sort keys, in order.
pub type RowKey = Vec<String>;

pub fn run_report(
    options: &ReportOptions,
    out: &mut dyn Write,
) -> Result<ReportSummary, ReportError> {
    report_profile(load::load(&options.input)?, options, out)
}

/// [`run_report`] on a perf.data already in memory (`options.input` only names it in messages).
pub fn run_report_bytes(
    bytes: Vec<u8>,
    options: &ReportOptions,
    out: &mut dyn Write,
) -> Result<ReportSummary, ReportError> {
    report_profile(load::load_bytes(bytes, &options.input)?, options, out)
}

fn report_profile(
    profile: Profile,
    options: &ReportOptions,
    out: &mut dyn Write,
) -> Result<ReportSummary, ReportError> {
    let mut recorded_image_warning = None;
    let mut sources = options.symbols.clone();
    if options.open_recorded_files
        && sources.guest_vmlinux.is_none()
        && sources.guest_kallsyms.is_none()
    {
        // Like perf's build-id cache: find the image whose build-id the recorder wrote, among the files the
        // recording names (the test guest's one ELF carries both its kernel and its ring-3 code).
        if let Some((named, id)) = &profile.guest_kernel_image {
            let mut candidates: Vec<std::path::PathBuf> = vec![named.clone()];
            for maps in profile.mappings.values() {
                for m in maps {
                    let p = std::path::PathBuf::from(&m.path);
                    if !candidates.contains(&p) {
                        candidates.push(p);
                    }
                }
            }
            let matches = |p: &std::path::Path| matches!(symbols::build_id(p), Ok(Some(found)) if found.starts_with(id) || id.starts_with(&found));
            match candidates.into_iter().find(|p| p.is_file() && matches(p)) {
                Some(p) => sources.guest_vmlinux = Some(p),
                None => {
                    recorded_image_warning = Some(format!(
                        "no guest kernel image with the recorded build-id {} was found; give --guest-vmlinux",
                        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    ))
                }
            }
        }
    }
    let mut resolver = Resolver::new(&sources, options.open_recorded_files)?;
    let samples = resolve_samples(&profile, &mut resolver, options.vcpu);
    let mut summary = ReportSummary {
        samples: samples.len(),
        lost: profile.lost,
        ..ReportSummary::default()
    };
    summary.warnings.extend(profile.unfinished.iter().cloned());
    summary.warnings.extend(recorded_image_warning);
    if profile.skipped_records > 0 {
        summary.warnings.push(format!(
            "skipped {} corrupt record(s)",
            profile.skipped_records
        ));
    }
    if !profile.unknown_records.is_empty() {
        let total: u64 = profile.unknown_records.values().sum();
        let types: Vec<String> = profile
            .unknown_records
            .iter()
            .map(|(t, n)| format!("{t} ×{n}"))
            .collect();
        summary.warnings.push(format!(
            "skipped {total} record(s) of unknown type (type {})",
            types.join(", ")
        ));
    }
    summary.warnings.append(&mut resolver.warnings);
    let io = ReportError::Output;
    for warning in &summary.warnings {
        writeln!(out, "# WARNING: {warning}").map_err(io)?;
    }
    if let Some(path) = &options.flamegraph {
        output::write_flamegraph(path, &output::folded_stacks(&samples))?;
    }
    if options.folded {
        for line in output::folded_stacks(&samples) {
            writeln!(out, "{line}").map_err(io)?;
        }
    } else if options.flamegraph.is_none() {
        let children = options.children && profile.has_callchains;
        output::write_table(out, &profile, &samples, options, children).map_err(io)?;
    }
    Ok(summary)
}

fn resolve_samples(
    profile: &Profile,
    resolver: &mut Resolver,
    vcpu: Option<u32>,
) -> Vec<ResolvedSample> {
    let mut comms: std::collections::HashMap<i32, std::rc::Rc<str>> =
        std::collections::HashMap::new();
    profile
        .samples
        .iter()
        .filter(|s| vcpu.is_none_or(|v| s.cpu == v))
        .map(|sample| ResolvedSample {
            period: sample.period,
            comm: comms
                .entry(sample.pid)
                .or_insert_with(|| {
                    profile
                        .comms
                        .get(&sample.pid)
                        .cloned()
                        .unwrap_or_else(|| format!(":{}", sample.pid))
                        .into()
                })
                .clone(),
            pid: sample.pid,
            cpu: sample.cpu,
            locations: sample
                .frames
                .iter()
                .map(|&f| resolver.resolve(profile, sample.pid, f))
                .collect(),
        })
        .collect()
}

fn row_key(sample: &ResolvedSample, location: &Location, keys: &[SortKey]) -> RowKey {
    keys.iter()
        .map(|key| match key {
            SortKey::Comm => sample.comm.to_string(),
            SortKey::Pid => sample.pid.to_string(),
            SortKey::Dso => location.dso.clone(),
            SortKey::Sym => format!("{} {}", location.mode.mark(), location.symbol),
            SortKey::Cpu => format!("{:03}", sample.cpu),
        })
        .collect()
}

/// Self and children periods per row key.
fn aggregate(samples: &[ResolvedSample], keys: &[SortKey]) -> HashMap<RowKey, (u64, u64)> {
    let mut rows = RowInterner::default();
    let mut seen: Vec<usize> = Vec::new();
    for sample in samples {
        let Some(leaf) = sample.locations.first() else {
            continue;
        };
        let leaf_row = rows.id(sample, leaf, keys);
        // Periods come from the file: a corrupt one must not overflow the sums.
        let totals = &mut rows.totals[leaf_row].1;
        totals.0 = totals.0.saturating_add(sample.period);
        // Children: every distinct key on the stack counts once, however often recursion repeats it.
        seen.clear();
        for location in &sample.locations {
            let row = rows.id(sample, location, keys);
            if !seen.contains(&row) {
                let totals = &mut rows.totals[row].1;
                totals.1 = totals.1.saturating_add(sample.period);
                seen.push(row);
            }
        }
    }
    rows.totals.into_iter().collect()
}

/// Row keys built once per distinct (place, process, vCPU), not once per sample frame: a million samples of a few
/// thousand places allocate a few thousand keys.
#[derive(Default)]
struct RowInterner {
    by_place: HashMap<(*const Location, *const u8, i32, u32), usize>,
    by_key: HashMap<RowKey, usize>,
    totals: Vec<(RowKey, (u64, u64))>,
}

impl RowInterner {
    fn id(
        &mut self,
        sample: &ResolvedSample,
        location: &std::rc::Rc<Location>,
        keys: &[SortKey],
    ) -> usize {
        let place = (
            std::rc::Rc::as_ptr(location),
            sample.comm.as_ptr(),
            sample.pid,
            sample.cpu,
        );
        if let Some(&id) = self.by_place.get(&place) {
            return id;
        }
        let key = row_key(sample, location, keys);
        let id = match self.by_key.get(&key) {
            Some(&id) => id,
            None => {
                self.totals.push((key.clone(), (0, 0)));
                self.by_key.insert(key, self.totals.len() - 1);
                self.totals.len() - 1
            }
        };
        self.by_place.insert(place, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `scripts/fuzz perf_data`: sample periods near `u64::MAX` overflowed the report's sums (a panic in
    /// checked builds, nonsense percentages otherwise). Sums saturate now.
    #[test]
    fn huge_sample_periods_do_not_overflow_the_report() {
        let bytes = include_bytes!("../../tests/data/fuzz-period-sum-overflow.perf").to_vec();
        let mut options = ReportOptions::new("crasher.perf".into());
        options.open_recorded_files = false;
        options.call_graph = true;
        let mut out = Vec::new();
        let summary = run_report_bytes(bytes, &options, &mut out).expect("a report");
        assert!(summary.samples > 1);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("# Event count (approx.): "), "{text}");
    }
}
