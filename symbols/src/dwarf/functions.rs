//! One unit's functions and their inlined calls, from a single walk of its DIE tree that jumps over what cannot
//! hold code (type definitions, parameters, variables, call sites) by their `DW_AT_sibling`, which GCC emits:
//! most of a kernel unit's `.debug_info` is type definitions, never read here.
//!
//! Frame semantics are addr2line's (and llvm-symbolizer's): a function is a `DW_TAG_subprogram` with code, named by
//! its linkage name, else its name, else its abstract origin's or specification's; the inline chain at an address is
//! found depth by depth among the function's `DW_TAG_inlined_subroutine` ranges.

use std::sync::Arc;

use gimli::{AttributeValue, UnitOffset};

use super::die::{DieReader, Value};
use super::{DwarfIndex, OffsetMap, Slice};
use crate::search::Cursor;

/// How many `DW_AT_abstract_origin` / `DW_AT_specification` links a name lookup follows (cycles in bad input).
const NAME_LINKS: usize = 16;

/// Tags whose children never hold a function or an inlined call: skipped whole.
fn holds_no_code(tag: gimli::DwTag) -> bool {
    matches!(
        tag,
        gimli::DW_TAG_structure_type
            | gimli::DW_TAG_union_type
            | gimli::DW_TAG_class_type
            | gimli::DW_TAG_enumeration_type
            | gimli::DW_TAG_array_type
            | gimli::DW_TAG_subroutine_type
            | gimli::DW_TAG_formal_parameter
            | gimli::DW_TAG_variable
            | gimli::DW_TAG_call_site
            | gimli::DW_TAG_GNU_call_site
            | gimli::DW_TAG_variant_part
    )
}

struct AddressRange {
    start: u64,
    end: u64,
    /// Index into `functions` (for function ranges) or `inlines` (for inline ranges).
    target: u32,
    /// Inline ranges only: nesting depth within the function, 0 = called from the function itself.
    depth: u32,
}

pub(crate) struct Function {
    pub name: Option<Arc<str>>,
    /// `inline_ranges[inlines.0..inlines.1]`, sorted by (depth, start).
    inlines: (u32, u32),
}

pub(crate) struct Inline {
    pub name: Option<Arc<str>>,
    /// Raw line-program file index of the call site.
    pub call_file: Option<u64>,
    pub call_line: u32,
    pub call_column: u32,
}

#[derive(Default)]
pub(crate) struct Functions {
    pub language: Option<gimli::DwLang>,
    functions: Vec<Function>,
    /// Function ranges, sorted by start.
    ranges: Vec<AddressRange>,
    inlines: Vec<Inline>,
    inline_ranges: Vec<AddressRange>,
}

impl Functions {
    /// The function whose code holds `addr`, with its inlined calls holding it, outermost first, into `chain`
    /// (indexes for [`Self::inline`]). `cursor` carries a sorted batch's position from one address to the next.
    pub fn find(&self, addr: u64, cursor: &mut Cursor, chain: &mut Vec<u32>) -> Option<&Function> {
        chain.clear();
        let after = cursor.partition_point(&self.ranges, |r| r.start <= addr);
        let range = self.ranges[..after].last().filter(|r| addr < r.end)?;
        let function = &self.functions[range.target as usize];
        let mut ranges =
            &self.inline_ranges[function.inlines.0 as usize..function.inlines.1 as usize];
        loop {
            let depth = chain.len() as u32;
            let found = ranges.binary_search_by(|r| {
                r.depth.cmp(&depth).then(if addr < r.start {
                    std::cmp::Ordering::Greater
                } else if addr >= r.end {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Equal
                })
            });
            let Ok(index) = found else { break };
            chain.push(ranges[index].target);
            ranges = &ranges[index + 1..];
        }
        Some(function)
    }

    pub fn inline(&self, index: u32) -> &Inline {
        &self.inlines[index as usize]
    }
}

#[derive(Clone, Copy)]
enum Scope {
    /// A function's DIE, whose inline ranges `open` collects until it closes.
    Function,
    /// An inlined call inside the current function.
    Inline,
    /// Anything else we look inside (the unit, namespaces, lexical blocks).
    Transparent,
}

#[derive(Default)]
struct Attributes {
    low_pc: Option<u64>,
    high_pc: Option<u64>,
    size: Option<u64>,
    ranges: Option<gimli::RangeListsOffset>,
    linkage_name: Option<AttributeValue<Slice>>,
    name: Option<AttributeValue<Slice>>,
    sibling: Option<UnitOffset>,
    origin: Option<AttributeValue<Slice>>,
    call_file: Option<u64>,
    call_line: u32,
    call_column: u32,
    language: Option<gimli::DwLang>,
}

pub(crate) fn parse(
    index: &DwarfIndex,
    unit: gimli::UnitRef<'_, Slice>,
) -> Result<Functions, gimli::Error> {
    let mut walk = Walk {
        index,
        unit,
        out: Functions::default(),
        names: OffsetMap::default(),
        ranges_scratch: Vec::new(),
    };
    walk.run()?;
    let mut out = walk.out;
    out.ranges.sort_unstable_by_key(|r| r.start);
    Ok(out)
}

struct Walk<'a, 'u> {
    index: &'a DwarfIndex,
    unit: gimli::UnitRef<'u, Slice>,
    out: Functions,
    /// Names already resolved, by the DIE (unit offset, or `.debug_info` offset for other units) they came from.
    names: OffsetMap<(bool, usize), Option<Arc<str>>>,
    ranges_scratch: Vec<(u64, u64)>,
}

impl Walk<'_, '_> {
    fn run(&mut self) -> Result<(), gimli::Error> {
        let mut entries = DieReader::new(self.unit.unit)?;
        let mut scopes: Vec<(isize, Scope)> = Vec::new();
        // Inside a skipped subtree that has no DW_AT_sibling: its depth.
        let mut skipping_below: Option<isize> = None;
        // Functions whose DIE is open, innermost last, each with the inline ranges read so far (a function nested
        // in another has its own; the outer one's continue after it).
        let mut open: Vec<(u32, Vec<AddressRange>)> = Vec::new();
        while !entries.is_empty() {
            let depth = entries.depth();
            let Some((code, abbrev)) = entries.next_abbreviation()? else {
                continue;
            };
            if let Some(limit) = skipping_below {
                if depth > limit {
                    entries.skip_all(code, abbrev)?;
                    continue;
                }
                skipping_below = None;
            }
            while let Some(&(d, scope)) = scopes.last() {
                if d < depth {
                    break;
                }
                scopes.pop();
                if let Scope::Function = scope {
                    self.finish_function(open.pop());
                }
            }
            let tag = abbrev.tag();
            let children = abbrev.has_children();
            match tag {
                gimli::DW_TAG_subprogram
                | gimli::DW_TAG_inlined_subroutine
                | gimli::DW_TAG_compile_unit
                | gimli::DW_TAG_partial_unit => {
                    let mut attrs = Attributes::default();
                    entries.read(abbrev, wanted, |name, value| {
                        self.note_attribute(&mut attrs, name, value)
                    })?;
                    if matches!(tag, gimli::DW_TAG_compile_unit | gimli::DW_TAG_partial_unit) {
                        self.out.language = attrs.language;
                        if children {
                            scopes.push((depth, Scope::Transparent));
                        }
                        continue;
                    }
                    self.collect_ranges(&attrs)?;
                    if tag == gimli::DW_TAG_subprogram {
                        if self.ranges_scratch.is_empty() {
                            // A declaration or an abstract instance: no code, nothing inside can have any.
                            if children && !attrs.sibling.is_some_and(|s| entries.jump(s, depth)) {
                                skipping_below = Some(depth);
                            }
                            continue;
                        }
                        let function = self.out.functions.len() as u32;
                        let name = self.name(&attrs)?;
                        self.out.functions.push(Function {
                            name,
                            inlines: (0, 0),
                        });
                        for &(start, end) in &self.ranges_scratch {
                            self.out.ranges.push(AddressRange {
                                start,
                                end,
                                target: function,
                                depth: 0,
                            });
                        }
                        if children {
                            scopes.push((depth, Scope::Function));
                            open.push((function, Vec::new()));
                        }
                    } else if let Some((_, inline_ranges)) = open.last_mut() {
                        let inline_depth = scopes
                            .iter()
                            .rev()
                            .take_while(|(_, s)| !matches!(s, Scope::Function))
                            .filter(|(_, s)| matches!(s, Scope::Inline))
                            .count();
                        let inline = self.out.inlines.len() as u32;
                        let name = self.name(&attrs)?;
                        self.out.inlines.push(Inline {
                            name,
                            call_file: attrs.call_file,
                            call_line: attrs.call_line,
                            call_column: attrs.call_column,
                        });
                        for &(start, end) in &self.ranges_scratch {
                            inline_ranges.push(AddressRange {
                                start,
                                end,
                                target: inline,
                                depth: inline_depth as u32,
                            });
                        }
                        if children {
                            scopes.push((depth, Scope::Inline));
                        }
                    } else if children {
                        // An inlined call outside any function with code: nothing to attach it to.
                        skipping_below = Some(depth);
                    }
                }
                _ if children && holds_no_code(tag) => {
                    let mut sibling = None;
                    entries.read(
                        abbrev,
                        |name| name == gimli::DW_AT_sibling,
                        |_, value| {
                            if let Value::UnitRef(offset) = value {
                                sibling = Some(offset);
                            }
                            Ok(())
                        },
                    )?;
                    if !sibling.is_some_and(|s| entries.jump(s, depth)) {
                        skipping_below = Some(depth);
                    }
                }
                _ => {
                    entries.skip_all(code, abbrev)?;
                    if children {
                        scopes.push((depth, Scope::Transparent));
                    }
                }
            }
        }
        while let Some(function) = open.pop() {
            self.finish_function(Some(function));
        }
        Ok(())
    }

    /// Files a closed function's inline ranges, sorted by (depth, start) as `Functions::find` searches them.
    fn finish_function(&mut self, open: Option<(u32, Vec<AddressRange>)>) {
        let Some((function, mut ranges)) = open else {
            return;
        };
        ranges.sort_unstable_by_key(|r| (r.depth, r.start));
        let start = self.out.inline_ranges.len() as u32;
        self.out.inline_ranges.append(&mut ranges);
        let end = self.out.inline_ranges.len() as u32;
        self.out.functions[function as usize].inlines = (start, end);
    }

    fn note_attribute(
        &self,
        attrs: &mut Attributes,
        name: gimli::DwAt,
        value: Value,
    ) -> Result<(), gimli::Error> {
        let unit = self.unit;
        match (name, value) {
            (gimli::DW_AT_low_pc, Value::Address(a)) => attrs.low_pc = Some(a),
            (gimli::DW_AT_low_pc, Value::AddressIndex(i)) => {
                attrs.low_pc = Some(unit.address(gimli::DebugAddrIndex(i as usize))?)
            }
            (gimli::DW_AT_high_pc, Value::Address(a)) => attrs.high_pc = Some(a),
            (gimli::DW_AT_high_pc, Value::AddressIndex(i)) => {
                attrs.high_pc = Some(unit.address(gimli::DebugAddrIndex(i as usize))?)
            }
            (gimli::DW_AT_high_pc, value) => attrs.size = value.unsigned(),
            (gimli::DW_AT_ranges, Value::SecOffset(offset)) => {
                attrs.ranges = unit.attr_ranges_offset(AttributeValue::RangeListsRef(
                    gimli::RawRangeListsOffset(offset as usize),
                ))?
            }
            (gimli::DW_AT_ranges, Value::RangeListIndex(index)) => {
                attrs.ranges = unit.attr_ranges_offset(AttributeValue::DebugRngListsIndex(
                    gimli::DebugRngListsIndex(index as usize),
                ))?
            }
            (gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name, Value::Str(s)) => {
                attrs.linkage_name = Some(s)
            }
            (gimli::DW_AT_name, Value::Str(s)) => attrs.name = Some(s),
            (gimli::DW_AT_sibling, Value::UnitRef(offset)) => attrs.sibling = Some(offset),
            (gimli::DW_AT_abstract_origin | gimli::DW_AT_specification, Value::UnitRef(o)) => {
                attrs.origin = Some(AttributeValue::UnitRef(o))
            }
            (gimli::DW_AT_abstract_origin | gimli::DW_AT_specification, Value::InfoRef(o)) => {
                attrs.origin = Some(AttributeValue::DebugInfoRef(o))
            }
            // DWARF 5 numbers files from 0, so 0 is a file there; before, it meant none.
            (gimli::DW_AT_call_file, value) => {
                attrs.call_file = value
                    .unsigned()
                    .filter(|&file| file > 0 || unit.header.version() >= 5)
            }
            (gimli::DW_AT_call_line, value) => {
                attrs.call_line = value.unsigned().unwrap_or(0) as u32
            }
            (gimli::DW_AT_call_column, value) => {
                attrs.call_column = value.unsigned().unwrap_or(0) as u32
            }
            (gimli::DW_AT_language, value) => {
                attrs.language = value
                    .unsigned()
                    .and_then(|l| u16::try_from(l).ok())
                    .map(gimli::DwLang)
            }
            _ => {}
        }
        Ok(())
    }

    /// The DIE's code ranges into `ranges_scratch` (empty ranges dropped).
    fn collect_ranges(&mut self, attrs: &Attributes) -> Result<(), gimli::Error> {
        self.ranges_scratch.clear();
        let mut add = |begin: u64, end: u64| {
            if begin < end {
                self.ranges_scratch.push((begin, end));
            }
        };
        if let Some(offset) = attrs.ranges {
            let mut list = self.unit.ranges(offset)?;
            while let Some(range) = list.next()? {
                add(range.begin, range.end);
            }
        } else if let (Some(low), Some(high)) = (attrs.low_pc, attrs.high_pc) {
            add(low, high);
        } else if let (Some(low), Some(size)) = (attrs.low_pc, attrs.size) {
            // A -1 tombstone (discarded code) wraps and is dropped.
            add(low, low.wrapping_add(size));
        }
        Ok(())
    }

    fn name(&mut self, attrs: &Attributes) -> Result<Option<Arc<str>>, gimli::Error> {
        let string = |value: Option<AttributeValue<Slice>>| {
            value.and_then(|v| self.unit.attr_string(v).ok())
        };
        if let Some(name) = string(attrs.linkage_name).or_else(|| string(attrs.name)) {
            return Ok(Some(to_arc(name)));
        }
        match attrs.origin {
            Some(origin) => self.name_at(origin, NAME_LINKS),
            None => Ok(None),
        }
    }

    /// The name of the DIE an abstract origin or specification points at, following further links.
    fn name_at(
        &mut self,
        target: AttributeValue<Slice>,
        links: usize,
    ) -> Result<Option<Arc<str>>, gimli::Error> {
        if links == 0 {
            return Ok(None);
        }
        let key = match target {
            AttributeValue::UnitRef(offset) => (false, offset.0),
            AttributeValue::DebugInfoRef(offset) => (true, offset.0),
            _ => return Ok(None),
        };
        if let Some(cached) = self.names.get(&key) {
            return Ok(cached.clone());
        }
        let (linkage_name, name, next) = match target {
            AttributeValue::UnitRef(offset) => read_name_attributes(self.unit, offset)?,
            AttributeValue::DebugInfoRef(offset) => {
                // Another unit's DIE (DW_FORM_ref_addr): open that unit just for this.
                let Some(other) = self.index.unit_at(offset)? else {
                    return Ok(None);
                };
                let other_ref = gimli::UnitRef::new(self.unit.dwarf, &other);
                let Some(in_unit) = offset.to_unit_offset(&other.header) else {
                    return Ok(None);
                };
                let (l, n, next) = read_name_attributes(other_ref, in_unit)?;
                // Links onward from there are relative to that unit: resolve them now, as .debug_info offsets.
                let next = match next {
                    Some(AttributeValue::UnitRef(o)) => o
                        .to_debug_info_offset(&other.header)
                        .map(AttributeValue::DebugInfoRef),
                    other => other,
                };
                (l, n, next)
            }
            _ => return Ok(None),
        };
        let resolved = match linkage_name.or(name) {
            Some(found) => Some(to_arc(found)),
            None => match next {
                Some(next) => self.name_at(next, links - 1)?,
                None => None,
            },
        };
        self.names.insert(key, resolved.clone());
        Ok(resolved)
    }
}

/// The attributes a function or inlined call is read for; the others are skipped unparsed.
fn wanted(name: gimli::DwAt) -> bool {
    matches!(
        name,
        gimli::DW_AT_low_pc
            | gimli::DW_AT_high_pc
            | gimli::DW_AT_ranges
            | gimli::DW_AT_linkage_name
            | gimli::DW_AT_MIPS_linkage_name
            | gimli::DW_AT_name
            | gimli::DW_AT_abstract_origin
            | gimli::DW_AT_specification
            | gimli::DW_AT_call_file
            | gimli::DW_AT_call_line
            | gimli::DW_AT_call_column
            | gimli::DW_AT_language
            | gimli::DW_AT_sibling
    )
}

type NameAttributes = (Option<Slice>, Option<Slice>, Option<AttributeValue<Slice>>);

/// (linkage name, name, abstract origin or specification) of the DIE at `offset`.
fn read_name_attributes(
    unit: gimli::UnitRef<'_, Slice>,
    offset: UnitOffset,
) -> Result<NameAttributes, gimli::Error> {
    let mut entries = DieReader::at(unit.unit, offset)?;
    let (_, abbrev) = entries
        .next_abbreviation()?
        .ok_or(gimli::Error::NoEntryAtGivenOffset(offset.0 as u64))?;
    let (mut linkage_name, mut name, mut next) = (None, None, None);
    let string = |value| match value {
        Value::Str(s) => unit.attr_string(s).ok(),
        _ => None,
    };
    entries.read(
        abbrev,
        |at| {
            matches!(
                at,
                gimli::DW_AT_linkage_name
                    | gimli::DW_AT_MIPS_linkage_name
                    | gimli::DW_AT_name
                    | gimli::DW_AT_abstract_origin
                    | gimli::DW_AT_specification
            )
        },
        |at, value| {
            match at {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Some(s) = string(value) {
                        linkage_name = Some(s);
                    }
                }
                gimli::DW_AT_name => {
                    if let Some(s) = string(value) {
                        name = Some(s);
                    }
                }
                _ => {
                    next = match value {
                        Value::UnitRef(o) => Some(AttributeValue::UnitRef(o)),
                        Value::InfoRef(o) => Some(AttributeValue::DebugInfoRef(o)),
                        _ => None,
                    }
                }
            }
            Ok(())
        },
    )?;
    Ok((linkage_name, name, next))
}

fn to_arc(s: Slice) -> Arc<str> {
    Arc::from(s.to_string_lossy().as_ref())
}
