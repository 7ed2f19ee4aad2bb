//! A minimal reader of one unit's DIEs, for the functions walk: most DIEs it meets are type definitions it only
//! steps over, so stepping over is what it makes cheap. Each abbreviation whose attributes all have fixed sizes
//! (most of a kernel's: pointer types, typedefs, members) is stepped over in one add; the few attributes the walk
//! wants are decoded straight into the values it uses. Abbreviations, strings, addresses and range lists still go
//! through gimli, which owns the unit's header and bases.

use gimli::{constants as c, DwAt, DwForm, UnitOffset};

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
    bytes: &'static [u8],
    big_endian: bool,
    /// Unit offset of `bytes[0]`.
    base: usize,
    pos: usize,
    depth: isize,
    /// Per abbreviation code: 0 = not yet known, `u32::MAX` = some attribute's size varies, else size + 1.
    fixed_sizes: Vec<u32>,
}

fn eof(at: usize) -> gimli::Error {
    gimli::Error::UnexpectedEof(gimli::ReaderOffsetId(at as u64))
}

impl<'a> DieReader<'a> {
    pub fn new(unit: &'a gimli::Unit<Slice>) -> Result<Self, gimli::Error> {
        let base = unit.header.header_size();
        let entries = unit.header.range_from(UnitOffset(base)..)?;
        Ok(DieReader {
            unit,
            big_endian: gimli::Endianity::is_big_endian(gimli::Reader::endian(&entries)),
            bytes: entries.slice(),
            base,
            pos: 0,
            depth: 0,
            fixed_sizes: Vec::new(),
        })
    }

    /// A reader at the DIE at `offset` (for reading that one DIE).
    pub fn at(unit: &'a gimli::Unit<Slice>, offset: UnitOffset) -> Result<Self, gimli::Error> {
        let mut reader = Self::new(unit)?;
        match offset.0.checked_sub(reader.base) {
            Some(pos) if pos < reader.bytes.len() => reader.pos = pos,
            _ => return Err(gimli::Error::OffsetOutOfBounds(offset.0 as u64)),
        }
        Ok(reader)
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Depth of the next DIE (the unit's root is 0).
    pub fn depth(&self) -> isize {
        self.depth
    }

    /// Moves to a later DIE at `depth`; `false` (and no move) unless `offset` lies ahead inside the unit.
    pub fn jump(&mut self, offset: UnitOffset, depth: isize) -> bool {
        match offset.0.checked_sub(self.base) {
            Some(pos) if pos > self.pos && pos < self.bytes.len() => {
                self.pos = pos;
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
        let code = self.uleb()?;
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
                return self.advance(known as usize - 1);
            }
        }
        let start = self.pos;
        let mut fixed = true;
        for spec in abbrev.attributes() {
            fixed &= self.skip(spec.form())?;
        }
        if slot < 1 << 16 {
            if self.fixed_sizes.len() <= slot {
                self.fixed_sizes.resize(slot + 1, 0);
            }
            self.fixed_sizes[slot] = match fixed {
                true => (self.pos - start + 1) as u32,
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

    fn advance(&mut self, n: usize) -> Result<(), gimli::Error> {
        if self.bytes.len() - self.pos < n {
            return Err(eof(self.base + self.pos));
        }
        self.pos += n;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'static [u8], gimli::Error> {
        let start = self.pos;
        self.advance(n)?;
        Ok(&self.bytes[start..self.pos])
    }

    fn fixed(&mut self, n: usize) -> Result<u64, gimli::Error> {
        let bytes = self.take(n)?;
        let mut value = 0u64;
        for (i, &b) in bytes.iter().enumerate().take(8) {
            let shift = match self.big_endian {
                false => 8 * i,
                true => 8 * (bytes.len().min(8) - 1 - i),
            };
            value |= u64::from(b) << shift;
        }
        Ok(value)
    }

    fn uleb(&mut self) -> Result<u64, gimli::Error> {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let &byte = self
                .bytes
                .get(self.pos)
                .ok_or_else(|| eof(self.base + self.pos))?;
            self.pos += 1;
            if shift < 64 {
                value |= u64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    fn sleb(&mut self) -> Result<i64, gimli::Error> {
        let mut value = 0i64;
        let mut shift = 0;
        loop {
            let &byte = self
                .bytes
                .get(self.pos)
                .ok_or_else(|| eof(self.base + self.pos))?;
            self.pos += 1;
            if shift < 64 {
                value |= i64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
        }
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
                self.uleb()?;
                return Ok(false);
            }
            c::DW_FORM_string => {
                let rest = &self.bytes[self.pos..];
                let len = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| eof(self.base + self.bytes.len()))?;
                self.pos += len + 1;
                return Ok(false);
            }
            c::DW_FORM_block1 => {
                let len = self.fixed(1)? as usize;
                self.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block2 => {
                let len = self.fixed(2)? as usize;
                self.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block4 => {
                let len = self.fixed(4)? as usize;
                self.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_block | c::DW_FORM_exprloc => {
                let len = usize::try_from(self.uleb()?).map_err(|_| eof(self.base + self.pos))?;
                self.advance(len)?;
                return Ok(false);
            }
            c::DW_FORM_indirect => {
                let form = DwForm(
                    u16::try_from(self.uleb()?).map_err(|_| gimli::Error::UnknownForm(form))?,
                );
                if form == c::DW_FORM_indirect {
                    return Err(gimli::Error::UnknownForm(form));
                }
                self.skip(form)?;
                return Ok(false);
            }
            other => return Err(gimli::Error::UnknownForm(other)),
        };
        self.advance(size)?;
        Ok(true)
    }

    fn value(&mut self, form: DwForm, implicit: Option<i64>) -> Result<Value, gimli::Error> {
        let offset_size = self.offset_size();
        Ok(match form {
            c::DW_FORM_addr => Value::Address(self.fixed(self.address_size())?),
            c::DW_FORM_addrx1 => Value::AddressIndex(self.fixed(1)?),
            c::DW_FORM_addrx2 => Value::AddressIndex(self.fixed(2)?),
            c::DW_FORM_addrx3 => Value::AddressIndex(self.fixed(3)?),
            c::DW_FORM_addrx4 => Value::AddressIndex(self.fixed(4)?),
            c::DW_FORM_addrx | c::DW_FORM_GNU_addr_index => Value::AddressIndex(self.uleb()?),
            c::DW_FORM_data1 | c::DW_FORM_flag => Value::Unsigned(self.fixed(1)?),
            c::DW_FORM_data2 => Value::Unsigned(self.fixed(2)?),
            c::DW_FORM_data4 => Value::Unsigned(self.fixed(4)?),
            c::DW_FORM_data8 => Value::Unsigned(self.fixed(8)?),
            c::DW_FORM_udata => Value::Unsigned(self.uleb()?),
            c::DW_FORM_sdata => Value::Signed(self.sleb()?),
            c::DW_FORM_implicit_const => Value::Signed(implicit.unwrap_or(0)),
            c::DW_FORM_ref1 => Value::UnitRef(UnitOffset(self.fixed(1)? as usize)),
            c::DW_FORM_ref2 => Value::UnitRef(UnitOffset(self.fixed(2)? as usize)),
            c::DW_FORM_ref4 => Value::UnitRef(UnitOffset(self.fixed(4)? as usize)),
            c::DW_FORM_ref8 => Value::UnitRef(UnitOffset(self.fixed(8)? as usize)),
            c::DW_FORM_ref_udata => Value::UnitRef(UnitOffset(self.uleb()? as usize)),
            c::DW_FORM_ref_addr => Value::InfoRef(gimli::DebugInfoOffset(
                self.fixed(self.ref_addr_size())? as usize,
            )),
            c::DW_FORM_strp => Value::Str(gimli::AttributeValue::DebugStrRef(
                gimli::DebugStrOffset(self.fixed(offset_size)? as usize),
            )),
            c::DW_FORM_line_strp => Value::Str(gimli::AttributeValue::DebugLineStrRef(
                gimli::DebugLineStrOffset(self.fixed(offset_size)? as usize),
            )),
            c::DW_FORM_strx1 => Value::Str(str_index(self.fixed(1)?)),
            c::DW_FORM_strx2 => Value::Str(str_index(self.fixed(2)?)),
            c::DW_FORM_strx3 => Value::Str(str_index(self.fixed(3)?)),
            c::DW_FORM_strx4 => Value::Str(str_index(self.fixed(4)?)),
            c::DW_FORM_strx | c::DW_FORM_GNU_str_index => Value::Str(str_index(self.uleb()?)),
            c::DW_FORM_string => {
                let rest = &self.bytes[self.pos..];
                let len = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| eof(self.base + self.bytes.len()))?;
                let text = &rest[..len];
                self.pos += len + 1;
                let endian = match self.big_endian {
                    false => gimli::RunTimeEndian::Little,
                    true => gimli::RunTimeEndian::Big,
                };
                Value::Str(gimli::AttributeValue::String(gimli::EndianSlice::new(
                    text, endian,
                )))
            }
            c::DW_FORM_sec_offset => Value::SecOffset(self.fixed(offset_size)?),
            c::DW_FORM_rnglistx => Value::RangeListIndex(self.uleb()?),
            c::DW_FORM_indirect => {
                let inner = DwForm(
                    u16::try_from(self.uleb()?).map_err(|_| gimli::Error::UnknownForm(form))?,
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
