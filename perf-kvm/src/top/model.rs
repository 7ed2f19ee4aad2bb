//! `top`'s data: guest samples symbolized once per address and weighed over a decaying window, per vCPU, with
//! callers (from `-g` callchains), sample rates and the exit-rate history.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use symbols::Symbolizer;
use vmm::exit_stats::VcpuExitStats;
use vmm::{GuestMode, Sample, SampleLoss};

/// Weight kept per tick (one tick a second): a sample counts half after ~3 s, and rows of code that stopped
/// running fade out instead of staying forever.
const DECAY_PER_TICK: f64 = 0.8;
/// Weights below this are dropped at a tick so the tables stay bounded.
const FORGET_BELOW: f64 = 0.01;
/// Seconds of exit-rate history kept for the sparkline.
pub const EXIT_HISTORY: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum TopModelError {
    #[error("cannot read guest symbols from {path}")]
    Symbols {
        path: String,
        #[source]
        source: symbols::SymbolsError,
    },
}

pub type SymbolId = usize;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SymbolInfo {
    /// Function name, or the address when no symbol covers it.
    pub name: String,
    /// The object it lies in (file name), `[guest.kernel]` / `[guest.user]` when unknown.
    pub object: String,
    pub mode: GuestMode,
}

#[derive(Debug, Clone, Copy, Default)]
struct Weight {
    decayed: f64,
    /// Samples since the start or the last zeroing.
    total: u64,
}

/// Which vCPUs a view covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuView {
    All,
    One(usize),
}

/// Row order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopSort {
    /// Share of the decaying window (perf top's Overhead).
    Overhead,
    /// Samples since the start (or `z`).
    Samples,
    /// Symbol name.
    Name,
}

impl TopSort {
    pub fn next(self) -> TopSort {
        match self {
            TopSort::Overhead => TopSort::Samples,
            TopSort::Samples => TopSort::Name,
            TopSort::Name => TopSort::Overhead,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TopSort::Overhead => "overhead",
            TopSort::Samples => "samples",
            TopSort::Name => "name",
        }
    }
}

/// One displayed row.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRow {
    pub symbol: SymbolId,
    pub info: SymbolInfo,
    /// Percent of the window's weight in this view.
    pub overhead: f64,
    pub samples: u64,
}

/// The header's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TopHeader {
    pub samples_per_sec: f64,
    pub kernel_pct: f64,
    pub user_pct: f64,
    pub total_samples: u64,
    pub lost: u64,
}

pub struct TopModel {
    symbolizer: Symbolizer,
    by_address: HashMap<u64, SymbolId>,
    symbols: Vec<SymbolInfo>,
    by_info: HashMap<SymbolInfo, SymbolId>,
    /// Per vCPU: symbol weights, and caller weights per symbol.
    per_vcpu: Vec<HashMap<SymbolId, Weight>>,
    callers: Vec<HashMap<SymbolId, HashMap<SymbolId, Weight>>>,
    /// Decayed kernel / user weights per vCPU, for the header's split.
    mode_weight: Vec<[f64; 2]>,
    samples_since_tick: u64,
    samples_per_sec: f64,
    total_samples: u64,
    loss: SampleLoss,
    /// Whether any sample came with a callchain (callers need `-g`).
    pub has_callchains: bool,
    exit_rates: VecDeque<u64>,
    exit_reasons: Vec<(String, u64)>,
    last_exit_counts: Option<HashMap<String, u64>>,
}

impl TopModel {
    /// A model that symbolizes with `elf` (the guest kernel image; the test guest's covers its ring-3 code too).
    pub fn new(elf: Option<&Path>, vcpus: usize) -> Result<TopModel, TopModelError> {
        let mut symbolizer = Symbolizer::new();
        symbolizer.set_discriminators(false); // a profile never prints them
        if let Some(path) = elf {
            symbolizer
                .add_elf(path, 0)
                .map_err(|source| TopModelError::Symbols {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        Ok(TopModel {
            symbolizer,
            by_address: HashMap::new(),
            symbols: Vec::new(),
            by_info: HashMap::new(),
            per_vcpu: vec![HashMap::new(); vcpus],
            callers: vec![HashMap::new(); vcpus],
            mode_weight: vec![[0.0; 2]; vcpus],
            samples_since_tick: 0,
            samples_per_sec: 0.0,
            total_samples: 0,
            loss: SampleLoss::default(),
            has_callchains: false,
            exit_rates: VecDeque::with_capacity(EXIT_HISTORY),
            exit_reasons: Vec::new(),
            last_exit_counts: None,
        })
    }

    pub fn vcpu_count(&self) -> usize {
        self.per_vcpu.len()
    }

    pub fn symbol(&self, id: SymbolId) -> &SymbolInfo {
        &self.symbols[id]
    }

    fn resolve(&mut self, addr: u64, mode: GuestMode) -> SymbolId {
        if let Some(&id) = self.by_address.get(&addr) {
            return id;
        }
        let sym = self.symbolizer.symbolize(&[addr]).pop();
        let name = sym
            .as_ref()
            .and_then(|s| s.frames.last())
            .and_then(|f| f.function.as_deref().map(str::to_owned))
            .unwrap_or_else(|| format!("{addr:#018x}"));
        let object = sym
            .as_ref()
            .and_then(|s| s.object.as_deref())
            .map(|o| {
                Path::new(o)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| o.into())
            })
            .unwrap_or_else(|| match mode {
                GuestMode::Kernel => "[guest.kernel]".into(),
                GuestMode::User => "[guest.user]".into(),
            });
        let info = SymbolInfo { name, object, mode };
        let id = match self.by_info.get(&info) {
            Some(&id) => id,
            None => {
                self.symbols.push(info.clone());
                self.by_info.insert(info, self.symbols.len() - 1);
                self.symbols.len() - 1
            }
        };
        self.by_address.insert(addr, id);
        id
    }

    pub fn add(&mut self, sample: &Sample) {
        let vcpu = sample.vcpu as usize;
        if vcpu >= self.per_vcpu.len() {
            return;
        }
        let id = self.resolve(sample.rip, sample.mode);
        let w = self.per_vcpu[vcpu].entry(id).or_default();
        w.decayed += 1.0;
        w.total += 1;
        self.mode_weight[vcpu][(sample.mode == GuestMode::User) as usize] += 1.0;
        if let Some(&ret) = sample.callchain.first() {
            self.has_callchains = true;
            // A return address points after the call; one byte back lies inside the calling instruction.
            let caller = self.resolve(ret.wrapping_sub(1), sample.mode);
            let c = self.callers[vcpu]
                .entry(id)
                .or_default()
                .entry(caller)
                .or_default();
            c.decayed += 1.0;
            c.total += 1;
        }
        self.samples_since_tick += 1;
        self.total_samples += 1;
    }

    pub fn set_loss(&mut self, loss: SampleLoss) {
        self.loss = loss;
    }

    /// Once a second: decay the window and take the sample rate over `elapsed_secs`.
    pub fn tick(&mut self, elapsed_secs: f64) {
        self.samples_per_sec = self.samples_since_tick as f64 / elapsed_secs.max(1e-3);
        self.samples_since_tick = 0;
        for table in &mut self.per_vcpu {
            decay(table);
        }
        for table in &mut self.callers {
            for callers in table.values_mut() {
                decay(callers);
            }
            table.retain(|_, c| !c.is_empty());
        }
        for m in &mut self.mode_weight {
            m[0] *= DECAY_PER_TICK;
            m[1] *= DECAY_PER_TICK;
        }
    }

    /// Exit accounting read at a tick: the rate since the previous one goes into the history.
    pub fn observe_exits(&mut self, stats: &[VcpuExitStats], elapsed_secs: f64) {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (key, agg) in stats.iter().flat_map(|t| t.by_key.iter()) {
            *counts.entry(key.reason_name().to_string()).or_default() += agg.count;
        }
        if let Some(before) = &self.last_exit_counts {
            let per_sec = |now: u64, was: u64| {
                (now.saturating_sub(was) as f64 / elapsed_secs.max(1e-3)).round() as u64
            };
            let mut reasons: Vec<(String, u64)> = counts
                .iter()
                .map(|(k, &n)| (k.clone(), per_sec(n, before.get(k).copied().unwrap_or(0))))
                .collect();
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let total = reasons.iter().map(|r| r.1).sum();
            if self.exit_rates.len() == EXIT_HISTORY {
                self.exit_rates.pop_front();
            }
            self.exit_rates.push_back(total);
            self.exit_reasons = reasons;
        }
        self.last_exit_counts = Some(counts);
    }

    /// Exits per second, oldest first.
    pub fn exit_rates(&self) -> Vec<u64> {
        self.exit_rates.iter().copied().collect()
    }

    /// Exits per second by reason in the last interval, busiest first.
    pub fn exit_reasons(&self) -> &[(String, u64)] {
        &self.exit_reasons
    }

    /// `z`: forget every weight and count.
    pub fn zero(&mut self) {
        for t in &mut self.per_vcpu {
            t.clear();
        }
        for t in &mut self.callers {
            t.clear();
        }
        for m in &mut self.mode_weight {
            *m = [0.0; 2];
        }
        self.total_samples = 0;
        self.samples_since_tick = 0;
        self.exit_rates.clear();
    }

    pub fn header(&self, view: VcpuView) -> TopHeader {
        let [kernel, user] = self
            .mode_weight
            .iter()
            .enumerate()
            .filter(|(i, _)| includes(view, *i))
            .fold([0.0, 0.0], |acc, (_, m)| [acc[0] + m[0], acc[1] + m[1]]);
        let sum = kernel + user;
        let pct = |x: f64| if sum > 0.0 { x / sum * 100.0 } else { 0.0 };
        TopHeader {
            samples_per_sec: self.samples_per_sec,
            kernel_pct: pct(kernel),
            user_pct: pct(user),
            total_samples: self.total_samples,
            lost: self.loss.lost(),
        }
    }

    /// Rows of `view` whose symbol contains `filter` (case-insensitive), in `sort` order.
    pub fn rows(&self, view: VcpuView, filter: &str, sort: TopSort) -> Vec<TopRow> {
        let tables = self
            .per_vcpu
            .iter()
            .enumerate()
            .filter(|(i, _)| includes(view, *i))
            .map(|(_, t)| t);
        self.rows_of(tables, filter, sort)
    }

    /// Who called `symbol` (from callchains), in `view`.
    pub fn callers(&self, symbol: SymbolId, view: VcpuView) -> Vec<TopRow> {
        let tables = self
            .callers
            .iter()
            .enumerate()
            .filter(|(i, _)| includes(view, *i))
            .filter_map(|(_, t)| t.get(&symbol));
        self.rows_of(tables, "", TopSort::Overhead)
    }

    fn rows_of<'a>(
        &self,
        tables: impl Iterator<Item = &'a HashMap<SymbolId, Weight>>,
        filter: &str,
        sort: TopSort,
    ) -> Vec<TopRow> {
        let mut merged: HashMap<SymbolId, Weight> = HashMap::new();
        for table in tables {
            for (&id, w) in table {
                let m = merged.entry(id).or_default();
                m.decayed += w.decayed;
                m.total += w.total;
            }
        }
        let sum: f64 = merged.values().map(|w| w.decayed).sum();
        let needle = filter.to_lowercase();
        let mut rows: Vec<TopRow> = merged
            .into_iter()
            .filter(|(id, _)| {
                needle.is_empty() || self.symbols[*id].name.to_lowercase().contains(&needle)
            })
            .map(|(id, w)| TopRow {
                symbol: id,
                info: self.symbols[id].clone(),
                overhead: if sum > 0.0 {
                    w.decayed / sum * 100.0
                } else {
                    0.0
                },
                samples: w.total,
            })
            .collect();
        rows.sort_by(|a, b| {
            let by = match sort {
                TopSort::Overhead => b.overhead.total_cmp(&a.overhead),
                TopSort::Samples => b.samples.cmp(&a.samples),
                TopSort::Name => a.info.name.cmp(&b.info.name),
            };
            by.then_with(|| a.info.name.cmp(&b.info.name))
        });
        rows
    }
}

fn includes(view: VcpuView, vcpu: usize) -> bool {
    match view {
        VcpuView::All => true,
        VcpuView::One(v) => v == vcpu,
    }
}

fn decay(table: &mut HashMap<SymbolId, Weight>) {
    for w in table.values_mut() {
        w.decayed *= DECAY_PER_TICK;
    }
    table.retain(|_, w| w.decayed >= FORGET_BELOW);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::exit_stats::{ExitAgg, ExitKey};

    fn sample(vcpu: u32, rip: u64, mode: GuestMode, callchain: Vec<u64>) -> Sample {
        Sample {
            time_ns: 0,
            vcpu,
            rip,
            mode,
            cr3: 0,
            callchain,
            period: None,
        }
    }

    #[test]
    fn weighs_per_vcpu_filters_sorts_and_decays() {
        let mut m = TopModel::new(None, 2).unwrap();
        for _ in 0..3 {
            m.add(&sample(0, 0x1000, GuestMode::User, vec![]));
        }
        m.add(&sample(1, 0xffff_ffff_8000_0000, GuestMode::Kernel, vec![]));
        m.add(&sample(7, 0x1000, GuestMode::User, vec![])); // no such vCPU: ignored
        let all = m.rows(VcpuView::All, "", TopSort::Overhead);
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].info.name.as_str(), all[0].samples),
            ("0x0000000000001000", 3)
        );
        assert!((all[0].overhead - 75.0).abs() < 1e-9);
        assert_eq!(all[0].info.object, "[guest.user]");
        let one = m.rows(VcpuView::One(1), "", TopSort::Overhead);
        assert_eq!((one.len(), one[0].info.mode), (1, GuestMode::Kernel));
        assert!(m.rows(VcpuView::All, "FFFF", TopSort::Overhead).len() == 1);
        let h = m.header(VcpuView::All);
        assert_eq!((h.kernel_pct, h.user_pct, h.total_samples), (25.0, 75.0, 4));
        m.tick(0.5);
        assert_eq!(m.header(VcpuView::All).samples_per_sec, 8.0);
        // Decay keeps the shares and the totals; thirty quiet seconds forget the rows.
        assert!((m.rows(VcpuView::All, "", TopSort::Overhead)[0].overhead - 75.0).abs() < 1e-9);
        for _ in 0..30 {
            m.tick(1.0);
        }
        assert!(m.rows(VcpuView::All, "", TopSort::Overhead).is_empty());
        m.add(&sample(0, 0x1000, GuestMode::User, vec![]));
        m.zero();
        assert!(m.rows(VcpuView::All, "", TopSort::Samples).is_empty());
    }

    #[test]
    fn callers_come_from_the_first_return_address() {
        let mut m = TopModel::new(None, 1).unwrap();
        m.add(&sample(0, 0x1000, GuestMode::User, vec![0x2001, 0x3001]));
        m.add(&sample(0, 0x1000, GuestMode::User, vec![0x2001]));
        m.add(&sample(0, 0x1000, GuestMode::User, vec![0x4001]));
        assert!(m.has_callchains);
        let leaf = m.rows(VcpuView::All, "", TopSort::Overhead)[0].symbol;
        let callers = m.callers(leaf, VcpuView::All);
        let names: Vec<_> = callers
            .iter()
            .map(|r| (r.info.name.as_str(), r.samples))
            .collect();
        assert_eq!(
            names,
            [("0x0000000000002000", 2), ("0x0000000000004000", 1)]
        );
    }

    #[test]
    fn exit_rates_are_differences_per_second() {
        let mut m = TopModel::new(None, 1).unwrap();
        let stats = |n: u64| {
            vec![VcpuExitStats {
                by_key: vec![(
                    ExitKey::IoOut(0x3f8),
                    ExitAgg {
                        count: n,
                        ..Default::default()
                    },
                )],
            }]
        };
        m.observe_exits(&stats(100), 1.0);
        assert!(m.exit_rates().is_empty());
        m.observe_exits(&stats(300), 2.0);
        assert_eq!(m.exit_rates(), [100]);
        assert_eq!(m.exit_reasons(), [("IO_INSTRUCTION".to_string(), 100)]);
    }
}
