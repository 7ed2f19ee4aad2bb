//! DWARF line-table discriminators, which addr2line-the-crate does not expose but binutils prints.
//!
//! Built per compilation unit on first use and cached: one walk of the unit's line program, keeping only what
//! finding a row's discriminator needs. Row selection mirrors addr2line's: sequences are independent, and among rows at
//! one address the last one wins.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DiscriminatorError {
    #[error("line program: {0}")]
    LineProgram(#[source] gimli::Error),
}

struct Sequence {
    start: u64,
    end: u64,
    /// (row address, discriminator), sorted by address, one entry per address.
    rows: Vec<(u64, u32)>,
}

#[derive(Default)]
struct UnitDiscriminators {
    /// Sorted by start. Empty when the unit uses no discriminators (the common case, which then costs nothing).
    sequences: Vec<Sequence>,
}

impl UnitDiscriminators {
    fn lookup(&self, addr: u64) -> Option<u32> {
        let after = self.sequences.partition_point(|s| s.start <= addr);
        // Sequences may overlap (e.g. discarded COMDAT copies at address 0); check the nearest few.
        let sequence = self.sequences[..after]
            .iter()
            .rev()
            .take(4)
            .find(|s| addr < s.end)?;
        let row = sequence
            .rows
            .partition_point(|&(a, _)| a <= addr)
            .checked_sub(1)?;
        Some(sequence.rows[row].1).filter(|&d| d != 0)
    }
}

#[derive(Default)]
pub(crate) struct DiscriminatorCache {
    units: RefCell<HashMap<usize, Arc<UnitDiscriminators>>>,
}

impl DiscriminatorCache {
    /// The discriminator of the line row covering `addr` in `unit`, if it is non-zero.
    pub fn lookup<R: gimli::Reader<Offset = usize>>(
        &self,
        unit: gimli::UnitRef<'_, R>,
        addr: u64,
    ) -> Result<Option<u32>, DiscriminatorError> {
        let Some(program) = unit.line_program.as_ref() else {
            return Ok(None);
        };
        let key = program.header().offset().0;
        let cached = self.units.borrow().get(&key).cloned();
        let table = match cached {
            Some(table) => table,
            None => {
                let table = Arc::new(parse(program.clone())?);
                self.units.borrow_mut().insert(key, table.clone());
                table
            }
        };
        Ok(table.lookup(addr))
    }
}

fn parse<R: gimli::Reader>(
    program: gimli::IncompleteLineProgram<R, R::Offset>,
) -> Result<UnitDiscriminators, DiscriminatorError> {
    let mut sequences = Vec::new();
    let mut rows: Vec<(u64, u32)> = Vec::new();
    let mut any_discriminator = false;
    let mut line_rows = program.rows();
    while let Some((_, row)) = line_rows
        .next_row()
        .map_err(DiscriminatorError::LineProgram)?
    {
        if row.end_sequence() {
            if let Some(&(start, _)) = rows.first() {
                let end = row.address();
                let taken = std::mem::take(&mut rows);
                if start < end {
                    sequences.push(Sequence {
                        start,
                        end,
                        rows: taken,
                    });
                }
            }
            continue;
        }
        let discriminator = u32::try_from(row.discriminator()).unwrap_or(u32::MAX);
        any_discriminator |= discriminator != 0;
        match rows.last_mut() {
            Some(last) if last.0 == row.address() => last.1 = discriminator,
            _ => rows.push((row.address(), discriminator)),
        }
    }
    if !any_discriminator {
        return Ok(UnitDiscriminators::default());
    }
    sequences.sort_unstable_by_key(|s| s.start);
    Ok(UnitDiscriminators { sequences })
}
