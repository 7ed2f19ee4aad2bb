//! One unit's line table, flattened: every sequence's rows in one array, 16 bytes a row, discriminators kept
//! aside (almost all rows have none). Row choice is addr2line's (and llvm-symbolizer's): within a sequence the
//! last row at or below the address, and among rows at one address the last one.

use std::sync::{Arc, Mutex};

use super::line_program::{self, Outcome, ProgramRow};
use super::{OffsetMap, Slice};
use crate::search::Cursor;

/// A sorted batch's position in one line table.
#[derive(Default)]
pub(crate) struct LineCursor {
    sequence: Cursor,
    /// The sequence (by its index + 1) that `row` is a position in.
    rows_of: usize,
    row: Cursor,
}

/// A row's address is stored relative to its sequence's start; a sequence longer than this is corrupt input.
const MAX_SEQUENCE_LEN: u64 = u32::MAX as u64;

struct Sequence {
    start: u64,
    end: u64,
    /// `rows[first..last]`.
    first: u32,
    last: u32,
}

struct Row {
    /// Address minus the sequence's start.
    offset: u32,
    line: u32,
    file: u32,
    column: u32,
}

#[derive(Default)]
pub(crate) struct LineTable {
    /// Rendered paths by the line program's raw file index.
    files: Vec<Arc<str>>,
    /// Sorted by start.
    sequences: Vec<Sequence>,
    rows: Vec<Row>,
    /// (row index, discriminator) for the rows whose discriminator is not zero, by row index.
    discriminators: Vec<(u32, u32)>,
}

/// Where a line row puts an address: what addr2line calls a location, plus the row's discriminator.
#[derive(Clone, Copy)]
pub(crate) struct RowLocation<'a> {
    pub file: Option<&'a Arc<str>>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub discriminator: Option<u32>,
}

impl LineTable {
    pub fn parse(unit: gimli::UnitRef<'_, Slice>, paths: &PathCache) -> Result<Self, gimli::Error> {
        let Some(program) = unit.line_program.clone() else {
            return Ok(Self::default());
        };
        let mut table = LineTable::default();
        // About one row per four bytes of line program in GCC's output: one allocation, not a dozen regrowths.
        table
            .rows
            .reserve(program.header().raw_program_buf().len() / 4);
        // The sequence being read: its start and its first row's index.
        let mut open: Option<(u64, u32)> = None;
        let outcome = line_program::run(program.header(), |row| table.add_row(row, &mut open))?;
        table.files = match outcome {
            Outcome::Done => render_files(unit, program.header(), paths)?,
            Outcome::Unsupported => {
                table.rows.clear();
                table.sequences.clear();
                table.discriminators.clear();
                open = None;
                let mut rows = program.rows();
                while let Some((_, row)) = rows.next_row()? {
                    let row = ProgramRow {
                        address: row.address(),
                        file: row.file_index(),
                        line: row.line().map_or(0, |l| l.get()),
                        column: match row.column() {
                            gimli::ColumnType::LeftEdge => 0,
                            gimli::ColumnType::Column(c) => c.get(),
                        },
                        discriminator: row.discriminator(),
                        end_sequence: row.end_sequence(),
                    };
                    table.add_row(&row, &mut open);
                }
                // Files defined by the program itself (DW_LNE_define_file) are in this header only.
                render_files(unit, rows.header(), paths)?
            }
        };
        // A program that ends without end_sequence leaves its last sequence open: addr2line drops it too.
        if let Some((_, first)) = open {
            table.drop_rows_from(first);
        }
        table.sequences.sort_unstable_by_key(|s| s.start);
        table.rows.shrink_to_fit();
        table.discriminators.shrink_to_fit();
        Ok(table)
    }

    /// One row of the program, into the sequence `open` is reading (opened by it, closed by an end row).
    fn add_row(&mut self, row: &ProgramRow, open: &mut Option<(u64, u32)>) {
        if row.end_sequence {
            if let Some((start, first)) = open.take() {
                self.close_sequence(start, first, row.address);
            }
            return;
        }
        let address = row.address;
        let (start, first) = *open.get_or_insert((address, self.rows.len() as u32));
        // Rows must not go backwards in a sequence, nor a sequence run past what a row offset can hold.
        let Some(offset) = address
            .checked_sub(start)
            .filter(|&o| o <= MAX_SEQUENCE_LEN)
        else {
            return;
        };
        let new = Row {
            offset: offset as u32,
            line: row.line as u32,
            file: u32::try_from(row.file).unwrap_or(u32::MAX),
            column: row.column as u32,
        };
        let discriminator = u32::try_from(row.discriminator).unwrap_or(u32::MAX);
        let in_sequence = self.rows.len() as u32 > first;
        if let Some(last) = self.rows.last().filter(|_| in_sequence) {
            let last_index = self.rows.len() as u32 - 1;
            let last_discriminator = match self.discriminators.last() {
                Some(&(r, d)) if r == last_index => d,
                _ => 0,
            };
            // A row that changes nothing a lookup returns (GCC emits many: views, is_stmt toggles) extends the
            // previous one; every address still finds the same file, line, column and discriminator.
            if last.offset < new.offset
                && (last.line, last.file, last.column, last_discriminator)
                    == (new.line, new.file, new.column, discriminator)
            {
                return;
            }
        }
        let index = match self.rows.last_mut() {
            Some(last) if in_sequence && last.offset == new.offset => {
                *last = new;
                let index = self.rows.len() as u32 - 1;
                if self.discriminators.last().is_some_and(|&(r, _)| r == index) {
                    self.discriminators.pop();
                }
                index
            }
            _ => {
                self.rows.push(new);
                self.rows.len() as u32 - 1
            }
        };
        if discriminator != 0 {
            self.discriminators.push((index, discriminator));
        }
    }

    fn close_sequence(&mut self, start: u64, first: u32, end: u64) {
        let last = self.rows.len() as u32;
        if start < end && end - start <= MAX_SEQUENCE_LEN && last > first {
            self.sequences.push(Sequence {
                start,
                end,
                first,
                last,
            });
        } else {
            self.drop_rows_from(first);
        }
    }

    fn drop_rows_from(&mut self, first: u32) {
        self.rows.truncate(first as usize);
        while self.discriminators.last().is_some_and(|&(r, _)| r >= first) {
            self.discriminators.pop();
        }
    }

    /// The rendered path of a raw file index (a row's, or an inlined call's `DW_AT_call_file`).
    pub fn file(&self, index: u64) -> Option<&Arc<str>> {
        self.files.get(usize::try_from(index).ok()?)
    }

    /// The row covering `addr`; `cursor` carries a sorted batch's position from one address to the next.
    /// Discriminators are looked up only when `discriminators` asks for them.
    pub fn find(
        &self,
        addr: u64,
        cursor: &mut LineCursor,
        discriminators: bool,
    ) -> Option<RowLocation<'_>> {
        let after = cursor
            .sequence
            .partition_point(&self.sequences, |s| s.start <= addr);
        let sequence = self.sequences[..after].last().filter(|s| addr < s.end)?;
        if cursor.rows_of != after {
            cursor.rows_of = after;
            cursor.row = Cursor::default();
        }
        let rows = &self.rows[sequence.first as usize..sequence.last as usize];
        let offset = (addr - sequence.start) as u32;
        let index = cursor
            .row
            .partition_point(rows, |r| r.offset <= offset)
            .checked_sub(1)?;
        let row = &rows[index];
        let row_index = sequence.first + index as u32;
        let discriminator = match discriminators {
            true => self
                .discriminators
                .binary_search_by_key(&row_index, |&(r, _)| r)
                .ok()
                .map(|i| self.discriminators[i].1),
            false => None,
        };
        let line = (row.line != 0).then_some(row.line);
        Some(RowLocation {
            file: self.files.get(row.file as usize),
            line,
            column: line.map(|_| row.column),
            discriminator,
        })
    }
}

/// Each file entry as a path: the unit's directory, the entry's directory unless it is the unit's (index 0), and
/// the name, each replacing what came before when absolute (as addr2line, llvm-symbolizer and binutils print).
fn render_files(
    unit: gimli::UnitRef<'_, Slice>,
    header: &gimli::LineProgramHeader<Slice>,
    paths: &PathCache,
) -> Result<Vec<Arc<str>>, gimli::Error> {
    let comp_dir_bytes = unit.comp_dir.map_or(&[][..], |d| d.slice());
    let comp_dir = String::from_utf8_lossy(comp_dir_bytes).into_owned();
    let mut files = Vec::new();
    // DWARF 5 numbers files from 0; earlier versions from 1, and index 0 names nothing.
    let mut index = 0;
    loop {
        let Some(file) = header.file(index) else {
            if index == 0 {
                files.push(Arc::from(""));
                index += 1;
                continue;
            }
            break;
        };
        let directory = match file.directory_index() {
            0 => None,
            _ => file
                .directory(header)
                .map(|d| unit.attr_string(d))
                .transpose()?,
        };
        let name = unit.attr_string(file.path_name())?;
        // The same strings (a header every unit includes) give the same path: render it once.
        let key = PathKey::new(comp_dir_bytes, directory.map(|d| d.slice()), name.slice());
        let path = paths.get_or_insert(key, || {
            let mut path = comp_dir.clone();
            if let Some(directory) = directory {
                push_path(&mut path, &directory.to_string_lossy());
            }
            push_path(&mut path, &name.to_string_lossy());
            Arc::from(path)
        });
        // Each unit its own copy: units are answered on different threads, and a path every unit shares would
        // have its reference count bounce between their CPUs on every frame (a warm batch ran 25% slower so).
        files.push(Arc::from(&*path));
        index += 1;
    }
    Ok(files)
}

/// Rendered file paths, keyed by where their parts lie in the mapped sections: the same bytes at the same place
/// render the same path, so a header every unit includes is rendered once.
#[derive(Default)]
pub(crate) struct PathCache(Mutex<OffsetMap<PathKey, Arc<str>>>);

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PathKey([(usize, usize); 3]);

impl PathKey {
    fn new(comp_dir: &[u8], directory: Option<&[u8]>, name: &[u8]) -> Self {
        let at = |b: &[u8]| (b.as_ptr() as usize, b.len());
        PathKey([at(comp_dir), directory.map_or((0, 0), at), at(name)])
    }
}

impl PathCache {
    fn get_or_insert(&self, key: PathKey, render: impl FnOnce() -> Arc<str>) -> Arc<str> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_insert_with(render).clone()
    }
}

fn push_path(path: &mut String, part: &str) {
    let absolute = |p: &str| {
        p.starts_with('/') || p.starts_with('\\') || matches!(p.get(1..3), Some(":/" | ":\\"))
    };
    if absolute(part) {
        part.clone_into(path);
        return;
    }
    let windows = path.starts_with('\\') || path.get(1..3) == Some(":\\");
    let separator = if windows { '\\' } else { '/' };
    if !path.is_empty() && !path.ends_with(separator) {
        path.push(separator);
    }
    path.push_str(part);
}

#[cfg(test)]
mod tests {
    use super::push_path;

    #[test]
    fn paths_join_like_addr2line() {
        let mut p = String::from("/build/linux");
        push_path(&mut p, "include/linux");
        push_path(&mut p, "list.h");
        assert_eq!(p, "/build/linux/include/linux/list.h");
        push_path(&mut p, "/usr/include/stdio.h");
        assert_eq!(p, "/usr/include/stdio.h");
        let mut empty = String::new();
        push_path(&mut empty, "a.c");
        assert_eq!(empty, "a.c");
    }
}
