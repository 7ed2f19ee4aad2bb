//! Our own DWARF lookup index: which unit holds an address (from `.debug_aranges`, else the unit's own ranges),
//! and per unit, parsed on first use and kept, a flattened line table and the functions with their inlined calls.
//!
//! Built for batches: [`DwarfIndex::frames_batch`] groups a sorted batch by unit and parses and answers the units
//! on several threads, each unit by one thread, so a cold batch over a whole distribution vmlinux takes a fraction
//! of one core's time. Answers are those of addr2line (the crate) and llvm-symbolizer, row for row and frame for
//! frame; what differs is the work: a unit's DIE walk jumps over type definitions, line rows are 16 bytes, names
//! are shared, and the sections' bytes are read where they lie in the mapped file.

mod bytes;
mod die;
mod functions;
mod line_program;
mod lines;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::search::Cursor;
use crate::Frame;
use functions::Functions;
use lines::{LineCursor, LineTable};

pub(crate) type Slice = gimli::EndianSlice<'static, gimli::RunTimeEndian>;

/// Maps keyed by offsets and addresses inside the mapped file: no attacker picks them, so a multiply-and-rotate
/// hash does, at a fraction of SipHash's cost (it shows in a cold batch's name and path lookups).
pub(crate) type OffsetMap<K, V> = HashMap<K, V, BuildHasherDefault<OffsetHasher>>;

#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }
}

/// Below this many addresses a batch is answered on the calling thread alone.
const PARALLEL_MIN_ADDRESSES: usize = 64;
/// Threads a batch may use at most.
const MAX_THREADS: usize = 8;
/// Units with overlapping ranges tried for one address (overlaps are rare: discarded or folded code).
const MAX_CANDIDATES: usize = 8;

/// What a batch's caller adds to DWARF's frames for an address (the symbol table's name and offset), on the
/// thread that found them, with that thread's position in its own table.
pub(crate) type Complete<'a> = &'a (dyn Fn(u64, &mut Vec<Frame>, &mut Cursor) + Sync);

/// A sorted batch's positions in the tables it searches, carried from one address to the next.
#[derive(Default)]
pub(crate) struct Cursors {
    ranges: Cursor,
    /// The unit `lines` and `functions` are positions in.
    unit: Option<usize>,
    lines: LineCursor,
    functions: Cursor,
    /// For the caller's [`Complete`].
    symbols: Cursor,
    /// Scratch for a function's chain of inlined calls.
    chain: Vec<u32>,
}

/// How frames are written.
#[derive(Clone, Copy)]
pub(crate) struct FrameStyle {
    pub demangle: bool,
    pub discriminators: bool,
}

struct ParsedUnit {
    lines: LineTable,
    functions: Functions,
}

struct UnitSlot {
    offset: gimli::DebugInfoOffset,
    parsed: OnceLock<Result<ParsedUnit, gimli::Error>>,
}

struct UnitRange {
    start: u64,
    end: u64,
    unit: usize,
    /// The greatest `end` of this and every earlier range: where a backward scan for overlaps can stop.
    max_end: u64,
}

pub(crate) struct DwarfIndex {
    dwarf: gimli::Dwarf<Slice>,
    units: Vec<UnitSlot>,
    /// Sorted by start.
    ranges: Vec<UnitRange>,
    /// (address, error) of lookups that hit corrupt DWARF: how many, and the first.
    errors: Mutex<(usize, Option<String>)>,
    paths: lines::PathCache,
}

impl DwarfIndex {
    pub fn new(dwarf: gimli::Dwarf<Slice>) -> Result<Self, gimli::Error> {
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        let mut header_list = Vec::new();
        while let Some(header) = headers.next()? {
            let Some(offset) = header.debug_info_offset() else {
                continue;
            };
            if matches!(
                header.type_(),
                gimli::UnitType::Type { .. } | gimli::UnitType::SplitType { .. }
            ) {
                continue;
            }
            units.push(UnitSlot {
                offset,
                parsed: OnceLock::new(),
            });
            header_list.push(header);
        }
        let mut index = DwarfIndex {
            dwarf,
            units,
            ranges: Vec::new(),
            errors: Mutex::new((0, None)),
            paths: lines::PathCache::default(),
        };
        index.ranges = index.unit_ranges(&header_list)?;
        Ok(index)
    }

    /// Each unit's code ranges: its `.debug_aranges` set, or, for a unit without one, its root DIE's ranges.
    fn unit_ranges(
        &self,
        headers: &[gimli::UnitHeader<Slice>],
    ) -> Result<Vec<UnitRange>, gimli::Error> {
        let mut by_unit: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.units.len()];
        let mut sets = self.dwarf.debug_aranges.headers();
        while let Some(set) = sets.next()? {
            let Some(unit) = self.unit_index(set.debug_info_offset()) else {
                continue;
            };
            let mut entries = set.entries();
            // An entry that does not parse (an address overflow, say) is skipped, not the set.
            while let Some(entry) = entries.next().transpose() {
                if let Ok(entry) = entry {
                    let range = entry.range();
                    if range.begin < range.end {
                        by_unit[unit].push((range.begin, range.end));
                    }
                }
            }
        }
        for (unit, header) in headers.iter().enumerate() {
            if !by_unit[unit].is_empty() || header.type_() == gimli::UnitType::Partial {
                continue;
            }
            // No aranges for this unit: its root DIE says. A unit that does not parse has no code we can name.
            let Ok(parsed) = self.dwarf.unit(*header) else {
                continue;
            };
            let mut ranges = self.dwarf.unit_ranges(&parsed)?;
            while let Some(range) = ranges.next()? {
                if range.begin < range.end {
                    by_unit[unit].push((range.begin, range.end));
                }
            }
        }
        let mut ranges: Vec<UnitRange> = by_unit
            .into_iter()
            .enumerate()
            .flat_map(|(unit, list)| {
                list.into_iter().map(move |(start, end)| UnitRange {
                    start,
                    end,
                    unit,
                    max_end: 0,
                })
            })
            .collect();
        ranges.sort_by_key(|r| (r.start, r.unit));
        let mut max_end = 0;
        for range in &mut ranges {
            max_end = max_end.max(range.end);
            range.max_end = max_end;
        }
        Ok(ranges)
    }

    /// The sections this index reads.
    pub fn sections(&self) -> &gimli::Dwarf<Slice> {
        &self.dwarf
    }

    fn unit_index(&self, offset: gimli::DebugInfoOffset) -> Option<usize> {
        self.units.binary_search_by_key(&offset, |u| u.offset).ok()
    }

    /// The unit holding a `.debug_info` offset, opened (header and abbreviations) for reading one DIE.
    fn unit_at(
        &self,
        offset: gimli::DebugInfoOffset,
    ) -> Result<Option<gimli::Unit<Slice>>, gimli::Error> {
        let after = self.units.partition_point(|u| u.offset <= offset);
        let Some(slot) = after.checked_sub(1).map(|i| &self.units[i]) else {
            return Ok(None);
        };
        let header = self.dwarf.debug_info.header_from_offset(slot.offset)?;
        self.dwarf.unit(header).map(Some)
    }

    /// Up to [`MAX_CANDIDATES`] units whose ranges hold `addr`, in range order, into `out`; returns how many.
    fn units_holding(
        &self,
        addr: u64,
        out: &mut [usize; MAX_CANDIDATES],
        cursor: &mut Cursor,
    ) -> usize {
        let after = cursor.partition_point(&self.ranges, |r| r.start <= addr);
        let mut count = 0;
        for range in self.ranges[..after].iter().rev() {
            if range.max_end <= addr || count == MAX_CANDIDATES {
                break;
            }
            if addr < range.end {
                out[count] = range.unit;
                count += 1;
            }
        }
        out[..count].reverse();
        count
    }

    fn parsed(&self, unit: usize) -> Result<&ParsedUnit, &gimli::Error> {
        self.units[unit]
            .parsed
            .get_or_init(|| {
                let header = self
                    .dwarf
                    .debug_info
                    .header_from_offset(self.units[unit].offset)?;
                let dw_unit = self.dwarf.unit(header)?;
                let unit_ref = gimli::UnitRef::new(&self.dwarf, &dw_unit);
                Ok(ParsedUnit {
                    lines: LineTable::parse(unit_ref, &self.paths)?,
                    functions: functions::parse(self, unit_ref)?,
                })
            })
            .as_ref()
    }

    fn note_error(&self, addr: u64, error: &gimli::Error) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        errors.0 += 1;
        errors
            .1
            .get_or_insert_with(|| format!("{addr:#x}: {error}"));
    }

    /// How many lookups hit corrupt DWARF, and the first of them.
    pub fn errors(&self) -> (usize, Option<String>) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Frames, innermost first, for one address of a sorted batch; empty when no unit knows it.
    fn frames(&self, addr: u64, style: FrameStyle, cursors: &mut Cursors) -> Vec<Frame> {
        let mut candidates = [0; MAX_CANDIDATES];
        let count = self.units_holding(addr, &mut candidates, &mut cursors.ranges);
        for &unit in &candidates[..count] {
            if cursors.unit != Some(unit) {
                cursors.unit = Some(unit);
                cursors.lines = LineCursor::default();
                cursors.functions = Cursor::default();
            }
            match self.parsed(unit) {
                Ok(parsed) => {
                    if let Some(frames) = frames_in(parsed, addr, style, cursors) {
                        return frames;
                    }
                }
                Err(e) => {
                    self.note_error(addr, e);
                    return Vec::new();
                }
            }
        }
        Vec::new()
    }

    /// Frames for each of `addrs` (sorted, distinct), in order, each passed through `complete`. Units are parsed
    /// on up to `threads` threads.
    pub fn frames_batch(
        &self,
        addrs: &[u64],
        style: FrameStyle,
        complete: Complete<'_>,
        threads: usize,
    ) -> Vec<Vec<Frame>> {
        let answer = |addr: u64, cursors: &mut Cursors| {
            let mut frames = self.frames(addr, style, cursors);
            complete(addr, &mut frames, &mut cursors.symbols);
            frames
        };
        let threads = threads.clamp(1, MAX_THREADS);
        if threads == 1 || addrs.len() < PARALLEL_MIN_ADDRESSES {
            let mut cursors = Cursors::default();
            return addrs.iter().map(|&a| answer(a, &mut cursors)).collect();
        }
        // Runs of addresses that share their first unit, in address order: one job each.
        let mut jobs: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut ranges = Cursor::default();
        for (i, &addr) in addrs.iter().enumerate() {
            let mut candidates = [0; MAX_CANDIDATES];
            let unit = match self.units_holding(addr, &mut candidates, &mut ranges) {
                0 => usize::MAX,
                _ => candidates[0],
            };
            match jobs.last_mut() {
                Some((u, run)) if *u == unit => run.end = i + 1,
                _ => jobs.push((unit, i..i + 1)),
            }
        }
        let next_job = AtomicUsize::new(0);
        let work = || {
            let mut done = Vec::new();
            let mut cursors = Cursors::default();
            loop {
                let j = next_job.fetch_add(1, Ordering::Relaxed);
                let Some((_, run)) = jobs.get(j) else { break };
                let frames: Vec<Vec<Frame>> = addrs[run.clone()]
                    .iter()
                    .map(|&a| answer(a, &mut cursors))
                    .collect();
                done.push((run.start, frames));
            }
            done
        };
        let mut results: Vec<Vec<Frame>> = Vec::new();
        results.resize_with(addrs.len(), Vec::new);
        let finished: Vec<Vec<(usize, Vec<Vec<Frame>>)>> = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads.min(jobs.len()))
                .map(|_| scope.spawn(work))
                .collect();
            let mut all = vec![work()];
            for helper in helpers {
                // A helper that panicked leaves its jobs' addresses unanswered (empty), never the batch lost.
                all.push(helper.join().unwrap_or_default());
            }
            all
        });
        for (start, frames) in finished.into_iter().flatten() {
            for (slot, f) in results[start..].iter_mut().zip(frames) {
                *slot = f;
            }
        }
        results
    }
}

/// The frames for `addr` from one unit, or `None` when the unit has neither a function nor a line row there.
fn frames_in(
    unit: &ParsedUnit,
    addr: u64,
    style: FrameStyle,
    cursors: &mut Cursors,
) -> Option<Vec<Frame>> {
    let row = unit
        .lines
        .find(addr, &mut cursors.lines, style.discriminators);
    let mut chain = std::mem::take(&mut cursors.chain);
    let found = unit
        .functions
        .find(addr, &mut cursors.functions, &mut chain);
    let frames = frames_at(unit, found, &chain, row, style);
    cursors.chain = chain;
    frames
}

/// The frames at one address from its line row and its function with the chain of inlined calls there.
fn frames_at(
    unit: &ParsedUnit,
    found: Option<&functions::Function>,
    chain: &[u32],
    row: Option<lines::RowLocation<'_>>,
    style: FrameStyle,
) -> Option<Vec<Frame>> {
    let language = unit.functions.language;
    let discriminator_of = |row: &lines::RowLocation<'_>| {
        row.discriminator
            .filter(|_| style.discriminators && row.line.is_some())
    };
    let frame = |function: Option<&Arc<str>>, file, line, column, discriminator, inlined| Frame {
        function: function.map(|name| function_name(name, language, style.demangle)),
        symbol_offset: None,
        file,
        line,
        column,
        discriminator,
        inlined,
    };
    let Some(function) = found else {
        let row = row?;
        return Some(vec![frame(
            None,
            row.file.cloned(),
            row.line,
            row.column,
            discriminator_of(&row),
            false,
        )]);
    };
    let mut frames = Vec::with_capacity(chain.len() + 1);
    // The innermost frame is where the line table puts the address; each caller is where its callee was called.
    let (mut file, mut line, mut column, mut discriminator) = match &row {
        Some(r) => (r.file.cloned(), r.line, r.column, discriminator_of(r)),
        None => (None, None, None, None),
    };
    for inline in chain.iter().rev().map(|&i| unit.functions.inline(i)) {
        frames.push(frame(
            inline.name.as_ref(),
            file.take(),
            line,
            column,
            discriminator.take(),
            true,
        ));
        file = inline.call_file.and_then(|f| unit.lines.file(f)).cloned();
        line = (inline.call_line != 0).then_some(inline.call_line);
        column = (inline.call_column != 0).then_some(inline.call_column);
    }
    frames.push(frame(
        function.name.as_ref(),
        file,
        line,
        column,
        discriminator,
        false,
    ));
    Some(frames)
}

/// A DWARF function name as printed: demangled by its unit's language when asked (C names are left alone).
fn function_name(name: &Arc<str>, language: Option<gimli::DwLang>, demangle: bool) -> Arc<str> {
    if !demangle || !crate::elf::maybe_mangled(name) {
        return name.clone();
    }
    let demangled = match language {
        Some(language) => addr2line::demangle(name, language),
        None => {
            let demangled = addr2line::demangle_auto(std::borrow::Cow::Borrowed(name), None);
            (*demangled != **name).then(|| demangled.into_owned())
        }
    };
    demangled.map_or_else(|| name.clone(), Arc::from)
}
