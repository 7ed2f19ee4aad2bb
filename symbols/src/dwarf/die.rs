//! A minimal reader of one unit's DIEs, for the functions walk: most DIEs it meets are type definitions it only
//! steps over, so stepping over is what it makes cheap. Each abbreviation whose attributes all have fixed sizes
//! (most of a kernel's: pointer types, typedefs, members) is stepped over in one add; the few attributes the walk
//! wants are decoded straight into the values it uses. Abbreviations, strings, addresses and range lists still go
//! through gimli, which owns the unit's header and bases.

use gimli::{constants as c, DwAt, DwForm, UnitOffset};

use super::bytes::Bytes;
use super::Slice;

/// A wanted attribute's value, decoded to what the walk uses.
#[derive(Clone, Copy)]
pub(crate) enum Value {
    Address(u64),
    AddressIndex(u64),
    Unsigned(u64),
    Signed(i64),
    /// Reference within the unit.
    UnitRef(UnitOffset),
    /// Reference into `.debug_info` (another unit, maybe).
    InfoRef(gimli::DebugInfoOffset),
    /// `.debug_str` / `.debug_line_str` offset, `.debug_str_offsets` index, or an inline string.
    Str(gimli::AttributeValue<Slice>),
    /// A section offset (`DW_FORM_sec_offset`), e.g. a range list.
    SecOffset(u64),
    /// `DW_FORM_rnglistx`.
    RangeListIndex(u64),
    Other,
}

impl Value {
    /// The value as an unsigned constant, as DWARF constants are read (negative ones are not).
    pub fn unsigned(self) -> Option<u64> {
        match self {
            Value::Unsigned(v) => Some(v),
            Value::Signed(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// Cursor over one unit's DIE bytes; positions are unit offsets, as DWARF references are.
pub(crate) struct DieReader<'a> {
    unit: &'a gimli::Unit<Slice>,
    /// The unit's DIE bytes; `base` is the unit offset of the first.
    input: Bytes,
    depth: isize,
    /// Per abbreviation code: 0 = not yet known, `u32::MAX` = some attribute's size varies, else size + 1.
    fixed_sizes: Vec<u32>,
}

impl<'a> DieReader<'a> {
    pub fn new(unit: &'a gimli::Unit<Slice>) -> Result<Self, gimli::Error> {
        let base = unit.header.header_size();
        let entries = unit.header.range_from(UnitOffset(base)..)?;
        Ok(DieReader {
            unit,
            input: Bytes::new(
                entries.slice(),
                gimli::Endianity::is_big_endian(gimli::Reader::endian(&entries)),
                base,
            ),
            depth: 0,
            fixed_sizes: Vec::new(),
        })
    }

    /// A reader at the DIE at `offset` (for reading that one DIE).
    pub fn at(unit: &'a gimli::Unit<Slice>, offset: UnitOffset) -> Result<Self, gimli::Error> {
        let mut reader = Self::new(unit)?;
        match offset.0.checked_sub(reader.input.base) {
            Some(pos) if pos < reader.input.data.len() => reader.input.pos = pos,
            _ => return Err(gimli::Error::OffsetOutOfBounds(offset.0 as u64)),
        }
        Ok(reader)
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    /// Depth of the next DIE (the unit's root is 0).
    pub fn depth(&self) -> isize {
        self.depth
    }

    /// Moves to a later DIE at `depth`; `false` (and no move) unless `offset` lies ahead inside the unit.
    pub fn jump(&mut self, offset: UnitOffset, depth: isize) -> bool {
        match offset.0.checked_sub(self.input.base) {
            Some(pos) if pos > self.input.pos && pos < self.input.data.len() => {
                self.input.pos = pos;
                self.depth = depth;
                true
            }
            _ => false,
        }
    }

    /// The next DIE's abbreviation, `None` for a null entry (end of a sibling list).
    pub fn next_abbreviation(
        &mut self,
    ) -> Result<Option<(u64, &'a gimli::Abbreviation)>, gimli::Error> {
        let code = self.input.uleb()?;
        if code == 0 {
            self.depth -= 1;
            return Ok(None);
        }
        let abbrev = self
            .unit
            .abbreviations
            .get(code)
            .ok_or(gimli::Error::InvalidAbbreviationCode(code))?;
        if abbrev.has_children() {
            self.depth += 1;
        }
        Ok(Some((code, abbrev)))
    }

    /// Steps over all of a DIE's attributes.
    pub fn skip_all(
        &mut self,
        code: u64,
        abbrev: &gimli::Abbreviation,
    ) -> Result<(), gimli::Error> {
        let slot = usize::try_from(code).unwrap_or(usize::MAX);
        if let Some(&known) = self.fixed_sizes.get(slot) {
            if known != 0 && known != u32::MAX {
                return self.input.advance(known as usize - 1);
            }
        }
        let start = self.input.pos;
        let mut fixed = true;
        for spec in abbrev.attributes() {
            fixed &= self.skip(spec.form())?;
        }
        if slot < 1 << 16 {
            if self.fixed_sizes.len() <= slot {
                self.fixed_sizes.resize(slot + 1, 0);
            }
            self.fixed_sizes[slot] = match fixed {
                true => (self.input.pos - start + 1) as u32,
                false => u32::MAX,
            };
        }
        Ok(())
    }

    /// Reads a DIE's attributes, handing the wanted ones to `take` and stepping over the rest.
    pub fn read(
        &mut self,
        abbrev: &gimli::Abbreviation,
        wanted: impl Fn(DwAt) -> bool,
        mut take: impl FnMut(DwAt, Value) -> Result<(), gimli::Error>,
    ) -> Result<(), gimli::Error> {
        for spec in abbrev.attributes() {
            if wanted(spec.name()) {
                let value = self.value(spec.form(), spec.implicit_const_value())?;
                take(spec.name(), value)?;
            } else {
                self.skip(spec.form())?;
            }
        }
        Ok(())
    }

    fn offset_size(&self) -> usize {
        self.unit.header.format().word_size() as usize
    }

    fn address_size(&self) -> usize {
        usize::from(self.unit.header.address_size())
    }

    fn ref_addr_size(&self) -> usize {
        match self.unit.header.version() {
            2 => self.address_size(),
            _ => self.offset_size(),
        }
    }

    /// Steps over one attribute; `true` if its form has a fixed size.
    fn skip(&mut self, form: DwForm) -> Result<bool, gimli::Error> {
        let size = match form {
            c::DW_FORM_flag_present | c::DW_FORM_implicit_const => 0,
            c::DW_FORM_data1
            | c::DW_FORM_ref1
            | c::DW_FORM_flag
            | c::DW_FORM_strx1
            | c::DW_FORM_addrx1 => 1,
            c::DW_FORM_data2 | c::DW_FORM_ref2 | c::DW_FORM_strx2 | c::DW_FORM_addrx2 => 2,
            c::DW_FORM_strx3 | c::DW_FORM_addrx3 => 3,
            c::DW_FORM_data4
            | c::DW_FORM_ref4
            | c::DW_FORM_ref_sup4
            | c::DW_FORM_strx4
            | c::DW_FORM_addrx4 => 4,
            c::DW_FORM_data8 | c::DW_FORM_ref8 | c::DW_FORM_ref_sig8 | c::DW_FORM_ref_sup8 => 8,
            c::DW_FORM_data16 => 16,
            c::DW_FORM_addr => self.address_size(),
            c::DW_FORM_ref_addr => self.ref_addr_size(),
            c::DW_FORM_strp
            | c::DW_FORM_line_strp
            | c::DW_FORM_sec_offset
            | c::DW_FORM_strp_sup
            | c::DW_FORM_GNU_ref_alt
            | c::DW_FORM_GNU_strp_alt => self.offset_size(),
            c::DW_FORM_udata
            | c::DW_FORM_sdata
            | c::DW_FORM_ref_udata
            | c::DW_FORM_strx
            | c::DW_FORM_addrx
            | c::DW_FORM_loclistx
            | c::DW_FORM_rnglistx
            | c::DW_FORM_GNU_addr_index
            | c::DW_FORM_GNU_str_index => {
                self.input.uleb()?;
                return Ok(false);
            }
            c::DW_FORM_string => {
                self.input.until_nul()?;
                return Ok(false);
            }
            c::DW_FORM_block1 => {
                let len = self.input.fixed(1)? as usize;
                self.input.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block2 => {
                let len = self.input.fixed(2)? as usize;
                self.input.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block4 => {
                let len = self.input.fixed(4)? as usize;
                self.input.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block | c::DW_FORM_exprloc => {
                let len = usize::try_from(self.input.uleb()?).map_err(|_| self.input.eof())?;
                self.input.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_indirect => {
                let form = DwForm(
                    u16::try_from(self.input.uleb()?)
                        .map_err(|_| gimli::Error::UnknownForm(form))?,
                );
                if form == c::DW_FORM_indirect {
                    return Err(gimli::Error::UnknownForm(form));
                }
                self.skip(form)?;
                return Ok(false);
            }
            other => return Err(gimli::Error::UnknownForm(other)),
        };
        self.input.advance(size)?;
        Ok(true)
    }

    fn value(&mut self, form: DwForm, implicit: Option<i64>) -> Result<Value, gimli::Error> {
        let offset_size = self.offset_size();
        Ok(match form {
            c::DW_FORM_addr => Value::Address(self.input.fixed(self.address_size())?),
            c::DW_FORM_addrx1 => Value::AddressIndex(self.input.fixed(1)?),
            c::DW_FORM_addrx2 => Value::AddressIndex(self.input.fixed(2)?),
            c::DW_FORM_addrx3 => Value::AddressIndex(self.input.fixed(3)?),
            c::DW_FORM_addrx4 => Value::AddressIndex(self.input.fixed(4)?),
            c::DW_FORM_addrx | c::DW_FORM_GNU_addr_index => Value::AddressIndex(self.input.uleb()?),
            c::DW_FORM_data1 | c::DW_FORM_flag => Value::Unsigned(self.input.fixed(1)?),
            c::DW_FORM_data2 => Value::Unsigned(self.input.fixed(2)?),
            c::DW_FORM_data4 => Value::Unsigned(self.input.fixed(4)?),
            c::DW_FORM_data8 => Value::Unsigned(self.input.fixed(8)?),
            c::DW_FORM_udata => Value::Unsigned(self.input.uleb()?),
            c::DW_FORM_sdata => Value::Signed(self.input.sleb()?),
            c::DW_FORM_implicit_const => Value::Signed(implicit.unwrap_or(0)),
            c::DW_FORM_ref1 => Value::UnitRef(UnitOffset(self.input.fixed(1)? as usize)),
            c::DW_FORM_ref2 => Value::UnitRef(UnitOffset(self.input.fixed(2)? as usize)),
            c::DW_FORM_ref4 => Value::UnitRef(UnitOffset(self.input.fixed(4)? as usize)),
            c::DW_FORM_ref8 => Value::UnitRef(UnitOffset(self.input.fixed(8)? as usize)),
            c::DW_FORM_ref_udata => Value::UnitRef(UnitOffset(self.input.uleb()? as usize)),
            c::DW_FORM_ref_addr => Value::InfoRef(gimli::DebugInfoOffset(
                self.input.fixed(self.ref_addr_size())? as usize,
            )),
            c::DW_FORM_strp => Value::Str(gimli::AttributeValue::DebugStrRef(
                gimli::DebugStrOffset(self.input.fixed(offset_size)? as usize),
            )),
            c::DW_FORM_line_strp => Value::Str(gimli::AttributeValue::DebugLineStrRef(
                gimli::DebugLineStrOffset(self.input.fixed(offset_size)? as usize),
            )),
            c::DW_FORM_strx1 => Value::Str(str_index(self.input.fixed(1)?)),
            c::DW_FORM_strx2 => Value::Str(str_index(self.input.fixed(2)?)),
            c::DW_FORM_strx3 => Value::Str(str_index(self.input.fixed(3)?)),
            c::DW_FORM_strx4 => Value::Str(str_index(self.input.fixed(4)?)),
            c::DW_FORM_strx | c::DW_FORM_GNU_str_index => Value::Str(str_index(self.input.uleb()?)),
            c::DW_FORM_string => {
                let text = self.input.until_nul()?;
                let endian = match self.input.big_endian {
                    false => gimli::RunTimeEndian::Little,
                    true => gimli::RunTimeEndian::Big,
                };
                Value::Str(gimli::AttributeValue::String(gimli::EndianSlice::new(
                    text, endian,
                )))
            }
            c::DW_FORM_sec_offset => Value::SecOffset(self.input.fixed(offset_size)?),
            c::DW_FORM_rnglistx => Value::RangeListIndex(self.input.uleb()?),
            c::DW_FORM_indirect => {
                let inner = DwForm(
                    u16::try_from(self.input.uleb()?)
                        .map_err(|_| gimli::Error::UnknownForm(form))?,
                );
                if inner == c::DW_FORM_indirect {
                    return Err(gimli::Error::UnknownForm(inner));
                }
                return self.value(inner, None);
            }
            other => {
                self.skip(other)?;
                Value::Other
            }
        })
    }
}

fn str_index(index: u64) -> gimli::AttributeValue<Slice> {
    gimli::AttributeValue::DebugStrOffsetsIndex(gimli::DebugStrOffsetsIndex(index as usize))
}
