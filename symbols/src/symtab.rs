//! Address-sorted symbol tables with extents, shared by ELF symbol tables and kallsyms.

/// How far back from the nearest preceding symbol a lookup searches for an enclosing sized symbol.
/// Sized symbols can nest (a local label inside a function); a short backward scan finds the outer one
/// without an interval tree.
const ENCLOSING_SCAN: usize = 16;

#[derive(Debug, Clone)]
pub(crate) struct TableSymbol {
    pub start: u64,
    /// Exclusive end. Always > `start` once the table is finished.
    pub end: u64,
    pub name: std::sync::Arc<str>,
    /// Index into the owning table's object names (for kallsyms: the module), if any.
    pub object: Option<u32>,
}

/// Symbols as read, before extents are resolved.
#[derive(Debug, Clone)]
pub(crate) struct RawSymbol {
    pub start: u64,
    /// 0 = unknown: the symbol extends to the next symbol, but never past `limit`.
    pub size: u64,
    /// Exclusive address the symbol may not extend past (end of its section / module / text).
    pub limit: u64,
    pub name: std::sync::Arc<str>,
    /// Ranks duplicates at one address: higher wins (e.g. a sized function over an asm label).
    pub rank: u8,
    pub object: Option<u32>,
}

#[derive(Debug, Default)]
pub(crate) struct SymbolTable {
    symbols: Vec<TableSymbol>,
}

impl SymbolTable {
    pub fn from_raw(mut raw: Vec<RawSymbol>) -> Self {
        // Sort by address, best-ranked first among equals, so that the first of a run of equal starts is the
        // preferred name and dedup keeps it. Among aliases of equal rank, perf's choice: fewer leading underscores
        // (`startup_64` over `_stext`), then the longer name, so reports name a spot the way perf does.
        let underscores = |name: &str| name.bytes().take_while(|&b| b == b'_').count();
        // A total order (object last), so an unstable sort is deterministic.
        raw.sort_unstable_by(|a, b| {
            // Lazily: most comparisons are settled by the address.
            a.start
                .cmp(&b.start)
                .then_with(|| b.rank.cmp(&a.rank))
                .then_with(|| b.size.cmp(&a.size))
                .then_with(|| underscores(&a.name).cmp(&underscores(&b.name)))
                .then_with(|| b.name.len().cmp(&a.name.len()))
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| a.object.cmp(&b.object))
        });
        raw.dedup_by(|later, first| later.start == first.start);
        let mut symbols = Vec::with_capacity(raw.len());
        for i in 0..raw.len() {
            let next = raw.get(i + 1).map_or(u64::MAX, |n| n.start);
            let sym = &mut raw[i];
            let end = if sym.size > 0 {
                sym.start.saturating_add(sym.size)
            } else {
                next.min(sym.limit)
            };
            if end <= sym.start {
                continue;
            }
            symbols.push(TableSymbol {
                start: sym.start,
                end,
                name: sym.name.clone(),
                object: sym.object,
            });
        }
        SymbolTable { symbols }
    }

    /// The symbol whose extent contains `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&TableSymbol> {
        self.lookup_from(addr, &mut crate::search::Cursor::default())
    }

    /// [`Self::lookup`] for one of a sorted batch of addresses, searching on from where the last one ended.
    pub fn lookup_from(
        &self,
        addr: u64,
        cursor: &mut crate::search::Cursor,
    ) -> Option<&TableSymbol> {
        let after = cursor.partition_point(&self.symbols, |s| s.start <= addr);
        self.symbols[..after]
            .iter()
            .rev()
            .take(ENCLOSING_SCAN)
            .find(|s| addr < s.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(start: u64, size: u64, limit: u64, name: &str) -> RawSymbol {
        RawSymbol {
            start,
            size,
            limit,
            name: name.into(),
            rank: 0,
            object: None,
        }
    }

    #[test]
    fn sized_symbols_do_not_reach_past_their_end() {
        let t = SymbolTable::from_raw(vec![
            raw(0x1000, 0x10, u64::MAX, "a"),
            raw(0x2000, 0x10, u64::MAX, "b"),
        ]);
        assert_eq!(t.lookup(0x100f).unwrap().name.as_ref(), "a");
        assert!(t.lookup(0x1010).is_none());
        assert!(t.lookup(0xfff).is_none());
        assert!(t.lookup(0x2010).is_none());
    }

    #[test]
    fn unsized_symbols_end_at_next_symbol_or_limit() {
        let t = SymbolTable::from_raw(vec![
            raw(0x1000, 0, 0x3000, "a"),
            raw(0x2000, 0, 0x3000, "b"),
        ]);
        assert_eq!(t.lookup(0x1fff).unwrap().name.as_ref(), "a");
        assert_eq!(t.lookup(0x2fff).unwrap().name.as_ref(), "b");
        assert!(t.lookup(0x3000).is_none());
    }

    #[test]
    fn aliases_resolve_like_perf() {
        let t = SymbolTable::from_raw(vec![
            raw(0x1000, 0, 0x2000, "_text"),
            raw(0x1000, 0, 0x2000, "_stext"),
            raw(0x1000, 0, 0x2000, "startup_64"),
        ]);
        assert_eq!(t.lookup(0x1000).unwrap().name.as_ref(), "startup_64");
    }

    #[test]
    fn nested_label_inside_sized_function_resolves_to_function() {
        let t = SymbolTable::from_raw(vec![
            raw(0x1000, 0x100, u64::MAX, "f"),
            raw(0x1010, 0x8, u64::MAX, "label"),
        ]);
        assert_eq!(t.lookup(0x1012).unwrap().name.as_ref(), "label");
        assert_eq!(t.lookup(0x1020).unwrap().name.as_ref(), "f");
    }
}
