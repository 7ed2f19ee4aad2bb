//! Bounds-checked reads of DWARF's primitive encodings (fixed-size integers in the object's byte order, LEB128,
//! NUL-terminated strings) from a mapped section: what our DIE reader and line-program interpreter share.

pub(crate) struct Bytes {
    pub data: &'static [u8],
    pub pos: usize,
    pub big_endian: bool,
    /// Where `data[0]` lies in its section (or unit), for error positions.
    pub base: usize,
}

impl Bytes {
    pub fn new(data: &'static [u8], big_endian: bool, base: usize) -> Self {
        Bytes {
            data,
            pos: 0,
            big_endian,
            base,
        }
    }

    pub fn eof(&self) -> gimli::Error {
        gimli::Error::UnexpectedEof(gimli::ReaderOffsetId((self.base + self.pos) as u64))
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn advance(&mut self, n: usize) -> Result<(), gimli::Error> {
        if self.data.len() - self.pos < n {
            return Err(self.eof());
        }
        self.pos += n;
        Ok(())
    }

    pub fn take(&mut self, n: usize) -> Result<&'static [u8], gimli::Error> {
        let start = self.pos;
        self.advance(n)?;
        Ok(&self.data[start..self.pos])
    }

    pub fn u8(&mut self) -> Result<u8, gimli::Error> {
        let byte = *self.data.get(self.pos).ok_or_else(|| self.eof())?;
        self.pos += 1;
        Ok(byte)
    }

    /// An `n`-byte unsigned integer (bytes past the eighth are read and ignored).
    pub fn fixed(&mut self, n: usize) -> Result<u64, gimli::Error> {
        let bytes = self.take(n)?;
        let used = bytes.len().min(8);
        let mut value = 0u64;
        for (i, &b) in bytes.iter().enumerate().take(8) {
            let shift = if self.big_endian {
                8 * (used - 1 - i)
            } else {
                8 * i
            };
            value |= u64::from(b) << shift;
        }
        Ok(value)
    }

    pub fn uleb(&mut self) -> Result<u64, gimli::Error> {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let byte = self.u8()?;
            if shift < 64 {
                value |= u64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    pub fn sleb(&mut self) -> Result<i64, gimli::Error> {
        let (mut value, mut shift) = (0i64, 0u32);
        loop {
            let byte = self.u8()?;
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

    /// The bytes up to the next NUL, which is consumed too.
    pub fn until_nul(&mut self) -> Result<&'static [u8], gimli::Error> {
        let rest = &self.data[self.pos..];
        let len = rest.iter().position(|&b| b == 0).ok_or_else(|| {
            gimli::Error::UnexpectedEof(gimli::ReaderOffsetId((self.base + self.data.len()) as u64))
        })?;
        self.pos += len + 1;
        Ok(&rest[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::Bytes;

    #[test]
    fn leb128_and_fixed_decode_like_the_dwarf_spec_examples() {
        let data: &'static [u8] = &[
            0x02, 0x7f, 0x80, 0x01, 0xe5, 0x8e, 0x26, 0x7f, 0x80, 0x7f, 0x34, 0x12,
        ];
        let mut b = Bytes::new(data, false, 0);
        assert_eq!(b.uleb().unwrap(), 2);
        assert_eq!(b.uleb().unwrap(), 127);
        assert_eq!(b.uleb().unwrap(), 128);
        assert_eq!(b.uleb().unwrap(), 624_485);
        assert_eq!(b.sleb().unwrap(), -1);
        assert_eq!(b.sleb().unwrap(), -128);
        assert_eq!(b.fixed(2).unwrap(), 0x1234);
        assert!(b.is_empty() && b.u8().is_err());
        let mut big = Bytes::new(&[0x12, 0x34], true, 0);
        assert_eq!(big.fixed(2).unwrap(), 0x1234);
    }
}
