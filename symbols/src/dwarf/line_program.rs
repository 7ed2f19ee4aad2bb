//! A line-number program interpreter for the common case (one operation per instruction, no
//! `DW_LNE_define_file`), with gimli's semantics to the letter, tombstones included, but without its
//! general-purpose instruction decoding: a cold batch over a distribution vmlinux runs four million rows through it.
//! Anything outside the common case reports [`Outcome::Unsupported`] and the caller runs gimli's rows instead.

use super::bytes::Bytes;
use super::Slice;

/// One row of the program's matrix, as the table keeps it.
pub(crate) struct ProgramRow {
    pub address: u64,
    pub file: u64,
    pub line: u64,
    pub column: u64,
    pub discriminator: u64,
    pub end_sequence: bool,
}

pub(crate) enum Outcome {
    Done,
    /// The program needs what only gimli's interpreter does (VLIW op indexes, files defined mid-program).
    Unsupported,
}

struct State {
    address: u64,
    file: u64,
    line: u64,
    column: u64,
    discriminator: u64,
    /// After a `DW_LNE_set_address` backwards or to a tombstone value: rows are dropped until the next good one.
    tombstone: bool,
}

impl State {
    fn new() -> Self {
        State {
            address: 0,
            file: 1,
            line: 1,
            column: 0,
            discriminator: 0,
            tombstone: false,
        }
    }

    fn advance_line(&mut self, increment: i64) {
        if increment < 0 {
            self.line = self.line.saturating_sub(increment.unsigned_abs());
        } else {
            self.line = self.line.wrapping_add(increment as u64);
        }
    }
}

/// Runs the program, handing each row to `emit`.
pub(crate) fn run(
    header: &gimli::LineProgramHeader<Slice>,
    mut emit: impl FnMut(&ProgramRow),
) -> Result<Outcome, gimli::Error> {
    let encoding = header.line_encoding();
    let opcode_base = header.opcode_base();
    if encoding.maximum_operations_per_instruction > 1
        || encoding.line_range == 0
        || opcode_base == 0
    {
        return Ok(Outcome::Unsupported);
    }
    let program = header.raw_program_buf();
    let big_endian = gimli::Endianity::is_big_endian(gimli::Reader::endian(&program));
    let eof = || gimli::Error::UnexpectedEof(gimli::ReaderOffsetId(0));
    let opcode_lengths = header.standard_opcode_lengths().slice();
    let address_size = header.address_size();
    let address_mask = match address_size {
        1..=7 => (1u64 << (8 * u32::from(address_size))) - 1,
        _ => u64::MAX,
    };
    let min_tombstone = address_mask.wrapping_sub(1);
    let min_length = u64::from(encoding.minimum_instruction_length);
    let (line_base, line_range) = (i64::from(encoding.line_base), encoding.line_range);
    let mut input = Bytes::new(program.slice(), big_endian, 0);
    let mut state = State::new();
    // Address arithmetic as gimli's: overflow past the address size is an error.
    let add = |state: &mut State, advance: u64| -> Result<(), gimli::Error> {
        if !state.tombstone {
            let address = state
                .address
                .checked_add(advance)
                .ok_or(gimli::Error::AddressOverflow)?;
            if address & !address_mask != 0 {
                return Err(gimli::Error::AddressOverflow);
            }
            state.address = address;
        }
        Ok(())
    };
    let emit_row = |state: &mut State, end_sequence: bool, emit: &mut dyn FnMut(&ProgramRow)| {
        if !state.tombstone {
            emit(&ProgramRow {
                address: state.address,
                file: state.file,
                line: state.line,
                column: state.column,
                discriminator: state.discriminator,
                end_sequence,
            });
        }
        if end_sequence {
            *state = State::new();
        } else {
            state.discriminator = 0;
        }
    };
    while !input.is_empty() {
        let opcode = input.u8()?;
        if opcode >= opcode_base {
            let adjusted = opcode - opcode_base;
            state.advance_line(line_base + i64::from(adjusted % line_range));
            add(
                &mut state,
                min_length.wrapping_mul(u64::from(adjusted / line_range)),
            )?;
            emit_row(&mut state, false, &mut emit);
            continue;
        }
        match opcode {
            0 => {
                let length = usize::try_from(input.uleb()?).map_err(|_| eof())?;
                let mut instruction = Bytes::new(input.take(length)?, big_endian, 0);
                match instruction.u8()? {
                    1 => emit_row(&mut state, true, &mut emit),
                    2 => {
                        let address = instruction.fixed(usize::from(address_size))?;
                        state.tombstone = address < state.address || address >= min_tombstone;
                        if !state.tombstone {
                            state.address = address;
                        }
                    }
                    3 if header.version() <= 4 => return Ok(Outcome::Unsupported),
                    4 => state.discriminator = instruction.uleb()?,
                    _ => {}
                }
            }
            1 => emit_row(&mut state, false, &mut emit),
            2 => {
                let advance = input.uleb()?;
                add(&mut state, min_length.wrapping_mul(advance))?;
            }
            3 => {
                let increment = input.sleb()?;
                state.advance_line(increment);
            }
            4 => state.file = input.uleb()?,
            5 => state.column = input.uleb()?,
            6 | 7 | 10 | 11 => {}
            8 => {
                let adjusted = 255 - opcode_base;
                add(
                    &mut state,
                    min_length.wrapping_mul(u64::from(adjusted / line_range)),
                )?;
            }
            9 => {
                let advance = input.fixed(2)?;
                add(&mut state, advance)?;
            }
            12 => {
                input.uleb()?;
            }
            other => {
                let arguments = *opcode_lengths.get(usize::from(other) - 1).ok_or_else(eof)?;
                for _ in 0..arguments {
                    input.uleb()?;
                }
            }
        }
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::{run, Outcome};
    use object::{Object, ObjectSection};

    /// Every unit of this test binary's own DWARF (rustc's and the C runtime's line programs): our interpreter
    /// yields exactly gimli's rows.
    #[test]
    fn rows_equal_gimlis_on_every_unit_of_this_binary() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let file = object::File::parse(bytes).unwrap();
        let dwarf = gimli::Dwarf::load(|id| -> Result<_, gimli::Error> {
            let data = file
                .section_by_name(id.name())
                .and_then(|s| s.data().ok())
                .unwrap_or(&[]);
            Ok(gimli::EndianSlice::new(data, gimli::RunTimeEndian::Little))
        })
        .unwrap();
        let (mut units, mut rows_compared) = (0, 0);
        let mut headers = dwarf.units();
        while let Some(header) = headers.next().unwrap() {
            let unit = dwarf.unit(header).unwrap();
            let Some(program) = unit.line_program.clone() else {
                continue;
            };
            let mut ours = Vec::new();
            let outcome = run(program.header(), |r| {
                ours.push((
                    r.address,
                    r.file,
                    r.line,
                    r.column,
                    r.discriminator,
                    r.end_sequence,
                ))
            })
            .unwrap();
            assert!(matches!(outcome, Outcome::Done));
            let mut theirs = Vec::new();
            let mut rows = program.rows();
            while let Some((_, r)) = rows.next_row().unwrap() {
                let column = match r.column() {
                    gimli::ColumnType::LeftEdge => 0,
                    gimli::ColumnType::Column(c) => c.get(),
                };
                let line = r.line().map_or(0, |l| l.get());
                theirs.push((
                    r.address(),
                    r.file_index(),
                    line,
                    column,
                    r.discriminator(),
                    r.end_sequence(),
                ));
            }
            assert_eq!(ours, theirs, "unit {:?}", unit.header.offset());
            units += 1;
            rows_compared += ours.len();
        }
        assert!(
            units > 10 && rows_compared > 10_000,
            "{units} units, {rows_compared} rows"
        );
    }
}
