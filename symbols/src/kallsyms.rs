//! `/proc/kallsyms`, `System.map` and `/proc/modules` text.

use crate::symtab::{RawSymbol, SymbolTable};

/// Module symbols have no size in kallsyms; when the module's extent is unknown (no `/proc/modules`), the last symbol
/// of a module is assumed to cover at most this much, instead of reaching to the next module.
const UNBOUNDED_MODULE_SYMBOL_SPAN: u64 = 4096;

/// Core kernel markers that end a region rather than start a function; they get no extent of their own, so the
/// gap after them is unknown instead of belonging to them.
const END_MARKERS: &[&str] = &[
    "_etext",
    "_edata",
    "_end",
    "__end_rodata",
    "_einittext",
    "__init_end",
    "__bss_stop",
    "__end_of_kernel_reserve",
];

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("line {line}: expected `ADDRESS TYPE NAME [\\t[MODULE]]`, got {text:?}")]
    Malformed { line: usize, text: String },
    #[error("line {line}: bad address {text:?}")]
    BadAddress { line: usize, text: String },
    #[error("no symbols found")]
    Empty,
    #[error(
        "every address is zero: the guest hid them (kernel.kptr_restrict); read kallsyms as root"
    )]
    AddressesHidden,
    #[error("line {line}: expected `NAME SIZE REFCOUNT DEPS STATE ADDRESS`, got {text:?}")]
    MalformedModule { line: usize, text: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KallsymsEntry {
    pub address: u64,
    /// nm-style type letter (`T`, `t`, `D`, ...).
    pub kind: char,
    pub name: String,
    pub module: Option<String>,
}

/// A loaded module's core region, from `/proc/modules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRegion {
    pub name: String,
    pub start: u64,
    pub size: u64,
}

/// Parses `/proc/kallsyms` or `System.map` text. Undefined, absolute and debugging entries are dropped: they name no
/// code or data at an address.
pub fn parse_kallsyms(text: &str) -> Result<Vec<KallsymsEntry>, KallsymsError> {
    let mut entries = Vec::new();
    let mut nonzero = false;
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        if raw_line.trim().is_empty() {
            continue;
        }
        let malformed = || KallsymsError::Malformed {
            line,
            text: truncate(raw_line),
        };
        let (main, module) = match raw_line.split_once('\t') {
            Some((main, rest)) => {
                let rest = rest.trim();
                let module = rest
                    .strip_prefix('[')
                    .and_then(|m| m.strip_suffix(']'))
                    .ok_or_else(malformed)?;
                (main, Some(module.to_owned()))
            }
            None => (raw_line, None),
        };
        let mut fields = main.split_ascii_whitespace();
        let (Some(addr_text), Some(kind_text), Some(name), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed());
        };
        let mut kind_chars = kind_text.chars();
        let (Some(kind), None) = (kind_chars.next(), kind_chars.next()) else {
            return Err(malformed());
        };
        if !kind.is_ascii_alphabetic() && kind != '?' {
            return Err(malformed());
        }
        if addr_text.len() > 16 {
            return Err(KallsymsError::BadAddress {
                line,
                text: truncate(addr_text),
            });
        }
        let address =
            u64::from_str_radix(addr_text, 16).map_err(|_| KallsymsError::BadAddress {
                line,
                text: truncate(addr_text),
            })?;
        nonzero |= address != 0;
        if matches!(kind, 'U' | 'a' | 'A' | 'N' | 'n' | 'w' | 'v') {
            continue;
        }
        entries.push(KallsymsEntry {
            address,
            kind,
            name: name.to_owned(),
            module,
        });
    }
    if entries.is_empty() && !nonzero {
        return Err(if text.lines().any(|l| !l.trim().is_empty()) {
            KallsymsError::AddressesHidden
        } else {
            KallsymsError::Empty
        });
    }
    if !nonzero {
        return Err(KallsymsError::AddressesHidden);
    }
    Ok(entries)
}

/// Parses `/proc/modules`: `name size refcount deps state address [taints]`.
pub fn parse_modules(text: &str) -> Result<Vec<ModuleRegion>, KallsymsError> {
    let mut modules = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        if raw_line.trim().is_empty() {
            continue;
        }
        let malformed = || KallsymsError::MalformedModule {
            line,
            text: truncate(raw_line),
        };
        let fields: Vec<&str> = raw_line.split_ascii_whitespace().collect();
        if fields.len() < 6 {
            return Err(malformed());
        }
        let size: u64 = fields[1].parse().map_err(|_| malformed())?;
        let addr_text = fields[5].strip_prefix("0x").ok_or_else(malformed)?;
        let start = u64::from_str_radix(addr_text, 16).map_err(|_| malformed())?;
        modules.push(ModuleRegion {
            name: fields[0].to_owned(),
            start,
            size,
        });
    }
    if !modules.is_empty() && modules.iter().all(|m| m.start == 0) {
        return Err(KallsymsError::AddressesHidden);
    }
    Ok(modules)
}

/// Symbol table over kallsyms entries. Object index 0 is the core kernel; `i + 1` is `module_names[i]`.
pub(crate) fn build_table(
    entries: &[KallsymsEntry],
    modules: &[ModuleRegion],
) -> (SymbolTable, Vec<String>) {
    let mut module_names: Vec<String> = Vec::new();
    let mut module_index = std::collections::HashMap::new();
    for entry in entries {
        if let Some(m) = &entry.module {
            module_index.entry(m.as_str()).or_insert_with(|| {
                module_names.push(m.clone());
                module_names.len() as u32
            });
        }
    }
    // Per-module sorted starts, to bound each module symbol by the next symbol of the same module.
    let mut module_starts: Vec<Vec<u64>> = vec![Vec::new(); module_names.len() + 1];
    for entry in entries {
        let object = entry.module.as_deref().map_or(0, |m| module_index[m]);
        module_starts[object as usize].push(entry.address);
    }
    for starts in &mut module_starts {
        starts.sort_unstable();
        starts.dedup();
    }
    let core_end = entries
        .iter()
        .filter(|e| e.module.is_none() && e.name == "_end")
        .map(|e| e.address)
        .next()
        .unwrap_or(u64::MAX);
    let raw = entries
        .iter()
        .map(|entry| {
            let object = entry.module.as_deref().map_or(0, |m| module_index[m]);
            let limit = if END_MARKERS.contains(&entry.name.as_str()) && object == 0 {
                entry.address
            } else if object == 0 {
                if entry.address < core_end {
                    core_end
                } else {
                    u64::MAX
                }
            } else {
                let region = modules.iter().find(|r| {
                    r.name == module_names[object as usize - 1]
                        && entry.address >= r.start
                        && entry.address - r.start < r.size
                });
                match region {
                    Some(r) => r.start + r.size,
                    None => {
                        let starts = &module_starts[object as usize];
                        let next = starts.partition_point(|&s| s <= entry.address);
                        starts.get(next).copied().unwrap_or_else(|| {
                            entry.address.saturating_add(UNBOUNDED_MODULE_SYMBOL_SPAN)
                        })
                    }
                }
            };
            RawSymbol {
                start: entry.address,
                size: 0,
                limit,
                name: std::sync::Arc::from(entry.name.as_str()),
                rank: u8::from(entry.kind.is_ascii_uppercase())
                    + 2 * u8::from(matches!(entry.kind, 'T' | 't')),
                object: Some(object),
            }
        })
        .collect();
    (SymbolTable::from_raw(raw), module_names)
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kallsyms_with_modules() {
        let text =
            "ffffffff81000000 T _text\nffffffff81000010 t foo\nffffffffc0000000 t bar\t[kvm]\n";
        let entries = parse_kallsyms(text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].module.as_deref(), Some("kvm"));
    }

    #[test]
    fn rejects_garbage_and_hidden_addresses() {
        assert!(matches!(
            parse_kallsyms("hello world\n"),
            Err(KallsymsError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse_kallsyms("zz T foo\n"),
            Err(KallsymsError::BadAddress { .. })
        ));
        assert!(matches!(
            parse_kallsyms("0000000000000000 T foo\n0000000000000000 T bar\n"),
            Err(KallsymsError::AddressesHidden)
        ));
        assert!(matches!(parse_kallsyms(""), Err(KallsymsError::Empty)));
    }

    #[test]
    fn parses_proc_modules() {
        let text = "kvm_intel 397312 0 - Live 0xffffffffc0a7d000\nkvm 1142784 1 kvm_intel, Live 0xffffffffc08f0000 (E)\n";
        let m = parse_modules(text).unwrap();
        assert_eq!(
            m[1],
            ModuleRegion {
                name: "kvm".into(),
                start: 0xffffffffc08f0000,
                size: 1142784
            }
        );
        assert!(parse_modules("kvm 12 0 - Live\n").is_err());
    }
}
