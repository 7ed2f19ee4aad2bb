//! Relocating a relocatable object's (a `.ko`'s) DWARF to where the guest loaded its sections.
//!
//! In an ET_REL file every address in `.debug_info`, `.debug_line`, `.debug_ranges`/`.debug_rnglists`,
//! `.debug_addr`, … is 0 plus a `.rela.debug_*` entry naming a section symbol and an addend; string and unit
//! offsets (`.debug_str`, `.debug_str_offsets`, `.debug_line_str`, `.debug_abbrev`) are relocated the same way
//! against their (unloaded) sections. Applying them with each loaded section at its guest address, and each
//! unloaded section at 0, gives DWARF that names the addresses the guest runs at. Only the sections gimli reads are
//! copied and relocated, and only when they have relocations; executables are never touched.

use std::collections::HashMap;

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationKind, RelocationTarget,
};

/// How many relocations of a section could not be applied, and why (the first one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub count: usize,
    pub first: Option<String>,
}

impl Skipped {
    fn note(&mut self, why: String) {
        self.count += 1;
        self.first.get_or_insert(why);
    }
}

/// The contents of `section` (uncompressed) with its relocations applied, sections placed as `placement` says
/// (by section index; `None`: not loaded, counted at 0). `Ok(None)` when the section has no relocations.
pub(crate) fn relocated_section(
    obj: &object::File<'_>,
    section: &object::Section<'_, '_>,
    placement: &[Option<u64>],
    skipped: &mut Skipped,
) -> Result<Option<Vec<u8>>, String> {
    let mut relocations = section.relocations().peekable();
    if relocations.peek().is_none() {
        return Ok(None);
    }
    let name = section.name().unwrap_or("?").to_owned();
    let mut data = section
        .uncompressed_data()
        .map_err(|e| format!("section {name}: {e}"))?
        .into_owned();
    let little = obj.is_little_endian();
    // Symbol values are looked up once per symbol: a module's .debug_info has ~10^5 relocations against a
    // handful of section symbols.
    let mut symbol_values: HashMap<usize, Option<u64>> = HashMap::new();
    let base_of =
        |index: object::SectionIndex| placement.get(index.0).copied().flatten().unwrap_or(0);
    for (offset, relocation) in relocations {
        let target = match relocation.target() {
            RelocationTarget::Symbol(index) => *symbol_values.entry(index.0).or_insert_with(|| {
                let symbol = obj.symbol_by_index(index).ok()?;
                let base = symbol.section_index().map_or(0, base_of);
                Some(base.wrapping_add(symbol.address()))
            }),
            RelocationTarget::Section(index) => Some(base_of(index)),
            _ => None,
        };
        let Some(target) = target else {
            skipped.note(format!(
                "{name}+{offset:#x}: relocation against an unreadable symbol"
            ));
            continue;
        };
        // RELA carries its addend in the entry; REL (rare for x86_64 objects) in the bytes being relocated.
        let implicit = relocation.has_implicit_addend();
        let width = usize::from(relocation.size() / 8);
        let at = offset as usize;
        let Some(field) = data
            .get_mut(at..at.saturating_add(width))
            .filter(|f| f.len() == width)
        else {
            skipped.note(format!(
                "{name}+{offset:#x}: relocation past the end of the section"
            ));
            continue;
        };
        let existing = read_uint(field, little);
        let addend = relocation
            .addend()
            .wrapping_add(if implicit { existing as i64 } else { 0 });
        let value = match relocation.kind() {
            RelocationKind::Absolute => target.wrapping_add(addend as u64),
            // Debug sections are not loaded: their own place is 0 + offset.
            RelocationKind::Relative => target.wrapping_add(addend as u64).wrapping_sub(offset),
            other => {
                let flags = match relocation.flags() {
                    RelocationFlags::Elf { r_type } => format!("ELF type {r_type}"),
                    _ => format!("{other:?}"),
                };
                skipped.note(format!(
                    "{name}+{offset:#x}: unsupported relocation ({flags})"
                ));
                continue;
            }
        };
        if !matches!(width, 1 | 2 | 4 | 8) {
            skipped.note(format!("{name}+{offset:#x}: {}-bit relocation", width * 8));
            continue;
        }
        write_uint(field, value, little);
    }
    Ok(Some(data))
}

fn read_uint(field: &[u8], little: bool) -> u64 {
    let mut value = 0u64;
    for i in 0..field.len() {
        let byte = if little {
            field[field.len() - 1 - i]
        } else {
            field[i]
        };
        value = (value << 8) | u64::from(byte);
    }
    value
}

/// Writes the low `field.len()` bytes of `value` (a truncating store, as the linker's for a 32-bit field).
fn write_uint(field: &mut [u8], value: u64, little: bool) {
    let n = field.len();
    for i in 0..n {
        let byte = (value >> (8 * i)) as u8;
        if little {
            field[i] = byte;
        } else {
            field[n - 1 - i] = byte;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_in_both_byte_orders() {
        let mut f = [0u8; 4];
        write_uint(&mut f, 0x1122_3344_5566, true);
        assert_eq!(f, [0x66, 0x55, 0x44, 0x33]);
        assert_eq!(read_uint(&f, true), 0x3344_5566);
        write_uint(&mut f, 0x0102_0304, false);
        assert_eq!(f, [1, 2, 3, 4]);
        assert_eq!(read_uint(&f, false), 0x0102_0304);
    }
}
