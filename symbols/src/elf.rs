//! One ELF file: its symbol table, its address ranges, and (lazily) its DWARF.
//!
//! The file is memory-mapped and never copied: only the pages a lookup touches are read. DWARF is indexed on the first
//! lookup that needs it, and each unit parsed once, when an address first falls in it (see `dwarf`). Relocations are
//! never applied to an executable's (ET_EXEC/ET_DYN) DWARF, which is already final, so the ~285 MB of
//! `.rela.debug_*` in a distribution vmlinux are never read; a relocatable object's (a `.ko`'s) DWARF is relocated
//! to where its sections were loaded (see `reloc`).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use object::{
    Object, ObjectKind, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SymbolKind,
};

use crate::dwarf::{DwarfIndex, FrameStyle, Slice};
use crate::search::Cursor;
use crate::symtab::{RawSymbol, SymbolTable};
use crate::Frame;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    #[error("cannot map into memory")]
    Map(#[source] std::io::Error),
    #[error("not a valid ELF file")]
    Parse(#[source] object::Error),
    #[error("unsupported object kind {0:?} (want an executable, a shared object or a relocatable object)")]
    UnsupportedKind(ObjectKind),
    #[error("has neither sections nor loadable segments: nothing to symbolize")]
    NoAddressRanges,
}

struct DwarfContext {
    // Declared before `_decompressed` so it is dropped first: it may borrow from those buffers.
    index: DwarfIndex,
    /// Units whose header or abbreviations do not parse: their code has no line info. Found on the first
    /// [`ElfObject::dwarf_problem`] call, not at load: a tenth of a cold batch nobody may ask for.
    unit_problems: OnceCell<Option<String>>,
    /// Relocations of a `.ko`'s DWARF that could not be applied, found at load.
    relocation_problem: Option<String>,
    _decompressed: Vec<Box<[u8]>>,
}

pub(crate) struct ElfObject {
    // Field order is drop order: `dwarf` holds data borrowed from `_backing`, which must outlive it.
    dwarf: OnceCell<Result<DwarfContext, String>>,
    symtab: SymbolTable,
    /// Sorted, non-overlapping link-time `[start, end)` ranges of allocated sections.
    ranges: Vec<(u64, u64)>,
    build_id: Option<Vec<u8>>,
    /// For a relocatable object: each section's load address, by section index (`None`: not loaded).
    placement: Option<Vec<Option<u64>>>,
    pub name: Arc<str>,
    pub bias: u64,
    /// `'static` is a lie confined to this module: the slice lives exactly as long as `_backing`.
    data: &'static [u8],
    _backing: Backing,
}

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Box<[u8]>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

impl ElfObject {
    /// `layout`: for a relocatable object (`.ko`), where the guest placed each section (by name); without it,
    /// `.text` is placed at `bias`. Ignored for executables, which carry their own addresses.
    pub fn open(
        path: &Path,
        bias: u64,
        layout: Option<&HashMap<String, u64>>,
    ) -> Result<Self, ElfError> {
        let file = File::open(path).map_err(ElfError::Open)?;
        // SAFETY: the mapping is read-only and private to this object. If another process truncates or rewrites the
        // file while it is mapped, reads may fault or return new bytes; that is the accepted contract of every
        // mmap-based symbolizer (addr2line, perf), and symbol files are not rewritten in place in practice.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(ElfError::Map)?;
        Self::from_backing(
            path.display().to_string(),
            Backing::Mapped(map),
            bias,
            layout,
        )
    }

    /// An ELF image already in memory (e.g. read from guest memory, or a fuzzer's input).
    pub fn from_bytes(name: String, bytes: Vec<u8>, bias: u64) -> Result<Self, ElfError> {
        Self::from_backing(name, Backing::Owned(bytes.into_boxed_slice()), bias, None)
    }

    fn from_backing(
        name: String,
        backing: Backing,
        mut bias: u64,
        layout: Option<&HashMap<String, u64>>,
    ) -> Result<Self, ElfError> {
        let bytes = backing.bytes();
        // SAFETY: both backings keep their bytes at a fixed address for their lifetime (a mapping does not move; a
        // boxed slice's heap buffer does not move when the box moves), and the backing is stored in the returned
        // object. The slice is only handed out with lifetimes bounded by `&self`, and every field borrowing it
        // (`dwarf`) is declared before `_backing` and so dropped before it.
        let data: &'static [u8] =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let obj = object::File::parse(data).map_err(ElfError::Parse)?;
        let relocatable = match obj.kind() {
            ObjectKind::Executable | ObjectKind::Dynamic => false,
            ObjectKind::Relocatable => true,
            other => return Err(ElfError::UnsupportedKind(other)),
        };
        let placement = if relocatable {
            let text_only = HashMap::from([(".text".to_owned(), bias)]);
            // Placed sections carry final addresses: no bias on top.
            bias = 0;
            Some(section_placement(&obj, layout.unwrap_or(&text_only)))
        } else {
            None
        };
        let ranges = address_ranges(&obj, placement.as_deref());
        if ranges.is_empty() {
            return Err(ElfError::NoAddressRanges);
        }
        let symtab = read_symbols(&obj, placement.as_deref());
        let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
        Ok(ElfObject {
            dwarf: OnceCell::new(),
            symtab,
            ranges,
            build_id,
            placement,
            name: Arc::from(name),
            bias,
            data,
            _backing: backing,
        })
    }

    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// Whether the (already unbiased) link-time address lies inside one of this file's allocated sections.
    pub fn contains(&self, link_addr: u64) -> bool {
        let after = self
            .ranges
            .partition_point(|&(start, _)| start <= link_addr);
        after > 0 && link_addr < self.ranges[after - 1].1
    }

    /// Every defined symbol's (name, link-time address), aliases included (the lookup table keeps one name per
    /// address). Re-reads the symbol table: meant for one-off checks, not lookups.
    pub fn named_addresses(&self) -> Vec<(&str, u64)> {
        let Ok(obj) = object::File::parse(self.data) else {
            return Vec::new();
        };
        let mut symbols: Vec<_> = obj.symbols().collect();
        if symbols.is_empty() {
            symbols = obj.dynamic_symbols().collect();
        }
        symbols
            .iter()
            .filter(|s| s.is_definition() || s.kind() == SymbolKind::Unknown)
            .filter(|s| s.section_index().is_some())
            .filter_map(|s| Some((s.name().ok()?, s.address())))
            .filter(|(name, _)| !name.is_empty())
            .collect()
    }

    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.named_addresses()
            .into_iter()
            .find(|&(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// For each link-time address of a sorted batch, its containing function from the symbol table alone (no
    /// DWARF); empty where the table has none.
    pub fn symbol_frames_batch(&self, link_addrs: &[u64], demangle: bool) -> Vec<Vec<Frame>> {
        let mut cursor = Cursor::default();
        link_addrs
            .iter()
            .map(|&a| {
                let mut frames = Vec::new();
                complete_from_symbols(&self.symtab, a, &mut frames, demangle, &mut cursor);
                frames
            })
            .collect()
    }

    /// Frames for each link-time address of a sorted, duplicate-free batch, innermost first; empty when neither
    /// DWARF nor the symbol table knows it. DWARF units are parsed on up to `threads` threads.
    pub fn frames_batch(
        &self,
        link_addrs: &[u64],
        demangle: bool,
        discriminators: bool,
        threads: usize,
    ) -> Vec<Vec<Frame>> {
        let symtab = &self.symtab;
        let complete = |link_addr: u64, frames: &mut Vec<Frame>, cursor: &mut Cursor| {
            complete_from_symbols(symtab, link_addr, frames, demangle, cursor)
        };
        match self.dwarf_index() {
            Some(index) => index.frames_batch(
                link_addrs,
                FrameStyle {
                    demangle,
                    discriminators,
                },
                &complete,
                threads,
            ),
            None => self.symbol_frames_batch(link_addrs, demangle),
        }
    }

    /// What went wrong with this file's DWARF so far: a failed parse, or lookups that hit corrupt entries.
    pub fn dwarf_problem(&self) -> Option<String> {
        let context = match self.dwarf.get() {
            Some(Err(e)) => return Some(format!("DWARF unusable, symbol table only: {e}")),
            Some(Ok(context)) => context,
            None => return None,
        };
        let units = context
            .unit_problems
            .get_or_init(|| check_unit_headers(context.index.sections()));
        match (units, &context.relocation_problem) {
            (Some(units), Some(relocations)) => return Some(format!("{units}; {relocations}")),
            (Some(problem), None) | (None, Some(problem)) => return Some(problem.clone()),
            (None, None) => {}
        }
        let (count, first) = context.index.errors();
        first.map(|first| {
            format!("{count} lookup(s) hit corrupt DWARF and fell back to the symbol table (first: {first})")
        })
    }

    fn dwarf_index(&self) -> Option<&DwarfIndex> {
        self.dwarf
            .get_or_init(|| load_dwarf(self.data, self.placement.as_deref()))
            .as_ref()
            .ok()
            .map(|context| &context.index)
    }
}

/// The symbol table's part of an address's frames: the outermost frame's name where DWARF has none (asm code has
/// line rows but no subprogram DIE; binutils and llvm-symbolizer name it from the symbol table, and so do we) and
/// its offset in the symbol; the only frame when DWARF knows nothing.
fn complete_from_symbols(
    symtab: &SymbolTable,
    link_addr: u64,
    frames: &mut Vec<Frame>,
    demangle: bool,
    cursor: &mut Cursor,
) {
    let Some(symbol) = symtab.lookup_from(link_addr, cursor) else {
        return;
    };
    match frames.last_mut() {
        Some(outer) => {
            if outer.function.is_none() {
                outer.function = Some(display_name(&symbol.name, demangle));
            }
            outer.symbol_offset = Some(link_addr - symbol.start);
        }
        None => frames.push(Frame {
            function: Some(display_name(&symbol.name, demangle)),
            symbol_offset: Some(link_addr - symbol.start),
            file: None,
            line: None,
            column: None,
            discriminator: None,
            inlined: false,
        }),
    }
}

/// A symbol-table name as printed: demangled when asked and it is a Rust or C++ name.
pub(crate) fn display_name(name: &Arc<str>, demangle: bool) -> Arc<str> {
    if demangle && maybe_mangled(name) {
        let demangled = addr2line::demangle_auto(Cow::Borrowed(name), None);
        if *demangled != **name {
            return Arc::from(demangled.as_ref());
        }
    }
    name.clone()
}

/// Whether a name could be an Itanium C++ or Rust (legacy or v0) mangled name; C names never are.
pub(crate) fn maybe_mangled(name: &str) -> bool {
    name.starts_with("_Z") || name.starts_with("__Z") || name.starts_with("_R")
}

/// `placement`: for a relocatable object, where its sections were loaded; its DWARF sections are relocated to it.
fn load_dwarf(
    data: &'static [u8],
    placement: Option<&[Option<u64>]>,
) -> Result<DwarfContext, String> {
    let obj = object::File::parse(data).map_err(|e| e.to_string())?;
    let endian = if obj.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let mut decompressed: Vec<Box<[u8]>> = Vec::new();
    let mut skipped = crate::reloc::Skipped::default();
    let mut load_section = |id: gimli::SectionId| -> Result<Slice, String> {
        let Some(section) = obj.section_by_name(id.name()) else {
            return Ok(gimli::EndianSlice::new(&[], endian));
        };
        let relocated = match placement {
            Some(placement) => {
                crate::reloc::relocated_section(&obj, &section, placement, &mut skipped)?
            }
            None => None,
        };
        let contents = match relocated {
            Some(bytes) => Ok(Cow::Owned(bytes)),
            None => section.uncompressed_data(),
        };
        let bytes: &'static [u8] = match contents {
            Ok(Cow::Borrowed(bytes)) => bytes,
            Ok(Cow::Owned(bytes)) => {
                let boxed = bytes.into_boxed_slice();
                // SAFETY: the boxed buffer's heap allocation never moves or shrinks; it is kept in `_decompressed`
                // of the same `DwarfContext`, which drops it only after `context` (declared first).
                let stable: &'static [u8] =
                    unsafe { std::slice::from_raw_parts(boxed.as_ptr(), boxed.len()) };
                decompressed.push(boxed);
                stable
            }
            Err(e) => return Err(format!("section {}: {e}", id.name())),
        };
        Ok(gimli::EndianSlice::new(bytes, endian))
    };
    let dwarf = gimli::Dwarf::load(&mut load_section)?;
    let relocation_problem = skipped.first.as_ref().map(|first| {
        format!(
            "{} DWARF relocation(s) not applied, their addresses may be wrong (first: {first})",
            skipped.count
        )
    });
    let index = DwarfIndex::new(dwarf).map_err(|e| format!("DWARF: {e}"))?;
    Ok(DwarfContext {
        index,
        unit_problems: OnceCell::new(),
        relocation_problem,
        _decompressed: decompressed,
    })
}

/// Opens every unit's header, root DIE and line program header, so that a corrupt unit, whose addresses then fall
/// back to the symbol table, is reported. Costs a few ms on a distribution vmlinux.
fn check_unit_headers(dwarf: &gimli::Dwarf<Slice>) -> Option<String> {
    let mut bad_units = 0usize;
    let mut first = None;
    let mut headers = dwarf.units();
    loop {
        match headers.next() {
            Ok(Some(header)) => {
                let offset = header.offset();
                if let Err(e) = dwarf.unit(header) {
                    bad_units += 1;
                    first.get_or_insert_with(|| format!("unit {offset:?}: {e}"));
                }
            }
            Ok(None) => break,
            Err(e) => {
                // Unit lengths chain the units together: nothing after a bad header can be found.
                bad_units += 1;
                first.get_or_insert_with(|| {
                    format!(".debug_info unit header: {e}; later units unreadable")
                });
                break;
            }
        }
    }
    first.map(|first| {
        format!("{bad_units} corrupt DWARF unit(s) skipped, their code has no line info ({first})")
    })
}

/// Load address of each section of a relocatable object, by section index; `None` = not placed (not loaded, or
/// its address unknown).
fn section_placement(obj: &object::File<'_>, layout: &HashMap<String, u64>) -> Vec<Option<u64>> {
    let mut placement = Vec::new();
    for section in obj.sections() {
        let index = section.index().0;
        if placement.len() <= index {
            placement.resize(index + 1, None);
        }
        placement[index] = section
            .name()
            .ok()
            .and_then(|name| layout.get(name))
            .copied();
    }
    placement
}

fn address_ranges(obj: &object::File<'_>, placement: Option<&[Option<u64>]>) -> Vec<(u64, u64)> {
    let relocatable = placement.is_some();
    let mut ranges: Vec<(u64, u64)> = if let Some(placement) = placement {
        obj.sections()
            .filter(|s| s.size() > 0)
            .filter_map(|s| {
                let start = placement.get(s.index().0).copied().flatten()?;
                Some((start, start.saturating_add(s.size())))
            })
            .collect()
    } else {
        obj.sections()
            .filter(|s| is_allocated(s) && s.size() > 0)
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect()
    };
    if ranges.is_empty() && !relocatable {
        ranges = obj
            .segments()
            .filter(|s| s.size() > 0)
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect();
    }
    ranges.sort_unstable();
    // Merge overlaps (e.g. TLS sections sharing addresses) so binary search stays valid.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn is_allocated(section: &object::Section<'_, '_>) -> bool {
    match section.flags() {
        object::SectionFlags::Elf { sh_flags, .. } => sh_flags.contains(object::elf::SHF_ALLOC),
        _ => !matches!(
            section.kind(),
            SectionKind::Debug | SectionKind::Metadata | SectionKind::Other
        ),
    }
}

fn read_symbols(obj: &object::File<'_>, placement: Option<&[Option<u64>]>) -> SymbolTable {
    // Per section index: (where its symbols' values are relative to, end address). Unplaced sections of a
    // relocatable object have no entry and their symbols are dropped.
    let mut sections: Vec<Option<(u64, u64)>> = Vec::new();
    for s in obj.sections() {
        let base_and_end = match placement {
            Some(placement) => placement
                .get(s.index().0)
                .copied()
                .flatten()
                .map(|start| (start, start.saturating_add(s.size()))),
            None => Some((0, s.address().saturating_add(s.size()))),
        };
        if sections.len() <= s.index().0 {
            sections.resize(s.index().0 + 1, None);
        }
        sections[s.index().0] = base_and_end;
    }
    let mut symbols: Vec<_> = obj.symbols().collect();
    if symbols.is_empty() {
        symbols = obj.dynamic_symbols().collect();
    }
    let mut raw = Vec::with_capacity(symbols.len());
    for sym in symbols {
        let rank = match sym.kind() {
            SymbolKind::Text if sym.size() > 0 => 8,
            SymbolKind::Text => 6,
            SymbolKind::Data | SymbolKind::Tls => 4,
            SymbolKind::Unknown => 2,
            _ => continue,
        };
        let (Some(index), Ok(name)) = (sym.section_index(), sym.name()) else {
            continue;
        };
        if name.is_empty() || name.starts_with(".L") {
            continue;
        }
        let Some((base, limit)) = sections.get(index.0).copied().flatten() else {
            continue;
        };
        raw.push(RawSymbol {
            start: base.wrapping_add(sym.address()),
            size: sym.size(),
            limit,
            name: Arc::from(name),
            rank: rank + u8::from(sym.is_global()),
            object: None,
        });
    }
    SymbolTable::from_raw(raw)
}
