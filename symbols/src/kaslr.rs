//! KASLR offsets and build-id checks for a guest kernel.

use std::path::{Path, PathBuf};

use crate::elf::{ElfError, ElfObject};
use crate::kallsyms::{parse_kallsyms, KallsymsEntry, KallsymsError};

/// x86-64 kernels are relocated in units of CONFIG_PHYSICAL_ALIGN, which must be a multiple of 2 MiB.
pub const KASLR_ALIGN: u64 = 0x20_0000;

#[derive(Debug, thiserror::Error)]
pub enum KaslrError {
    #[error("{path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Kallsyms {
        path: PathBuf,
        #[source]
        source: KallsymsError,
    },
    #[error("{what} has no `{symbol}` symbol")]
    MissingSymbol { what: String, symbol: &'static str },
    #[error(
        "offset {offset:#x} (from {source_desc}) is not a multiple of {KASLR_ALIGN:#x}: \
         this vmlinux is not the guest's kernel"
    )]
    Misaligned {
        offset: u64,
        source_desc: &'static str,
    },
}

/// KASLR offset = guest kallsyms `_text` (or `_stext`) − vmlinux `_text` (or `_stext`).
pub fn kaslr_offset_from_kallsyms(vmlinux: &Path, kallsyms: &Path) -> Result<u64, KaslrError> {
    let elf = open_vmlinux(vmlinux)?;
    let text = std::fs::read_to_string(kallsyms).map_err(|source| KaslrError::Read {
        path: kallsyms.to_owned(),
        source,
    })?;
    let entries = parse_kallsyms(&text).map_err(|source| KaslrError::Kallsyms {
        path: kallsyms.to_owned(),
        source,
    })?;
    offset_from_entries(&elf, &entries, &kallsyms.display().to_string())
}

pub(crate) fn offset_from_entries(
    elf: &ElfObject,
    entries: &[KallsymsEntry],
    what: &str,
) -> Result<u64, KaslrError> {
    for anchor in ["_text", "_stext"] {
        let guest = entries
            .iter()
            .find(|e| e.module.is_none() && e.name == anchor);
        let linked = elf.address_of(anchor);
        if let (Some(guest), Some(linked)) = (guest, linked) {
            let offset = guest.address.wrapping_sub(linked);
            if offset % KASLR_ALIGN != 0 {
                return Err(KaslrError::Misaligned {
                    offset,
                    source_desc: "kallsyms _text",
                });
            }
            return Ok(offset);
        }
    }
    Err(KaslrError::MissingSymbol {
        what: format!("{what} or {}", elf.name),
        symbol: "_text",
    })
}

/// KASLR offset from a running guest's `MSR_LSTAR`, which a 64-bit Linux kernel points at `entry_SYSCALL_64`.
pub fn kaslr_offset_from_lstar(lstar: u64, vmlinux: &Path) -> Result<u64, KaslrError> {
    let elf = open_vmlinux(vmlinux)?;
    let entry = elf
        .address_of("entry_SYSCALL_64")
        .ok_or_else(|| KaslrError::MissingSymbol {
            what: vmlinux.display().to_string(),
            symbol: "entry_SYSCALL_64",
        })?;
    let offset = lstar.wrapping_sub(entry);
    if offset % KASLR_ALIGN != 0 {
        return Err(KaslrError::Misaligned {
            offset,
            source_desc: "MSR_LSTAR",
        });
    }
    Ok(offset)
}

/// The GNU build-id of an ELF file, if it has one.
pub fn build_id(elf: &Path) -> Result<Option<Vec<u8>>, KaslrError> {
    Ok(open_vmlinux(elf)?.build_id().map(<[u8]>::to_vec))
}

/// The GNU build-id in an ELF note blob such as a guest's `/sys/kernel/notes`.
pub fn build_id_from_notes(notes: &[u8]) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let mut rest = notes;
    while rest.len() >= 12 {
        let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (name_size, desc_size, kind) = (word(0) as usize, word(4) as usize, word(8));
        let name_end = 12usize.checked_add(name_size.checked_add(3)? & !3)?;
        let desc_end = name_end.checked_add(desc_size.checked_add(3)? & !3)?;
        if rest.len() < name_end || rest.len() < name_end + desc_size {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && rest.get(12..12 + name_size) == Some(b"GNU\0".as_slice()) {
            return Some(rest[name_end..name_end + desc_size].to_vec());
        }
        rest = rest.get(desc_end..)?;
    }
    None
}

fn open_vmlinux(path: &Path) -> Result<ElfObject, KaslrError> {
    ElfObject::open(path, 0, None).map_err(|source| KaslrError::Elf {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_build_id_note() {
        let mut notes = Vec::new();
        // An unrelated note first.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&1u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0abcd");
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&20u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend((0..20).map(|i| i as u8));
        assert_eq!(build_id_from_notes(&notes), Some((0..20).collect()));
        assert_eq!(build_id_from_notes(&notes[..40]), None);
        assert_eq!(build_id_from_notes(&[0xff; 13]), None);
    }
}
