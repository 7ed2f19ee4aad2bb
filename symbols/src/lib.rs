//! Guest symbolization: vmlinux ELF + DWARF, kallsyms, modules, KASLR offset.
//!
//! One [`Symbolizer`] per guest address space (the guest kernel, or one guest user binary) answers batches of
//! addresses from every source it was given: ELF symbol tables and DWARF (line tables, inline frames,
//! discriminators), kallsyms or System.map text, module regions from `/proc/modules`, and `.ko` files placed by
//! `/sys/module/*/sections`. An address no source covers comes back unknown rather than as the nearest symbol far
//! away. Files are memory-mapped and DWARF is parsed lazily, per compilation unit, and cached (a large batch parses
//! its units on several threads); relocations are never applied to an executable's DWARF, so a distribution
//! vmlinux's `.rela.debug_*` are never read.
//!
//! ```no_run
//! # fn main() -> Result<(), symbols::SymbolsError> {
//! use std::path::Path;
//! let (vmlinux, kallsyms) = (Path::new("vmlinux"), Path::new("guest-kallsyms"));
//! let mut kernel = symbols::Symbolizer::new();
//! kernel.add_elf(vmlinux, symbols::kaslr_offset_from_kallsyms(vmlinux, kallsyms)?)?;
//! kernel.add_kallsyms(kallsyms)?; // module symbols; warns if the vmlinux is not the guest's
//! for warning in kernel.warnings() {
//!     eprintln!("warning: {warning}");
//! }
//! for result in kernel.symbolize(&[0xffff_ffff_8100_0000]) {
//!     print!("{}", symbols::format_addr2line(&result, symbols::Addr2lineStyle::AFIP));
//! }
//! # Ok(())
//! # }
//! ```

mod dwarf;
mod elf;
mod format;
mod kallsyms;
mod kaslr;
mod reloc;
mod search;
mod symtab;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use elf::ElfError;
pub use format::{format_addr2line, Addr2lineStyle};
pub use kallsyms::{parse_kallsyms, parse_modules, KallsymsEntry, KallsymsError, ModuleRegion};
pub use kaslr::{build_id_from_notes, kaslr_offset_from_lstar, KaslrError, KASLR_ALIGN};

/// Name perf gives the core kernel when it is known only from kallsyms.
pub const KERNEL_OBJECT_NAME: &str = "[kernel.kallsyms]";

#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
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
    #[error(transparent)]
    Kaslr(#[from] KaslrError),
}

/// One symbolized address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbolized {
    pub addr: u64,
    /// Innermost (inlined) frame first; the last is the containing real function. Empty = unknown.
    pub frames: Vec<Frame>,
    /// The ELF path, `[module]`, or [`KERNEL_OBJECT_NAME`] the address belongs to; `None` if outside all of them.
    pub object: Option<Arc<str>>,
}

impl Symbolized {
    /// A placeholder: no frames, no object.
    fn unknown() -> Self {
        Symbolized {
            addr: 0,
            frames: Vec::new(),
            object: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Demangled unless [`Symbolizer::set_demangle`] turned it off. Shared: clones are cheap.
    pub function: Option<Arc<str>>,
    /// Offset from the start of the containing symbol (outermost frame only).
    pub symbol_offset: Option<u64>,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// DWARF line-table discriminator of the innermost frame's row (binutils prints it; `None` if zero).
    pub discriminator: Option<u32>,
    pub inlined: bool,
}

struct KallsymsSource {
    path: PathBuf,
    entries: Vec<KallsymsEntry>,
    table: symtab::SymbolTable,
    /// Object names by table object index: 0 = core kernel, then modules.
    object_names: Vec<String>,
}

/// Symbolizes addresses of one address space from several sources. `Send` but not `Sync`: DWARF is parsed lazily
/// behind `&self`, so give each thread its own.
pub struct Symbolizer {
    elfs: Vec<elf::ElfObject>,
    kallsyms: Option<KallsymsSource>,
    modules: Vec<ModuleRegion>,
    warnings: Vec<String>,
    demangle: bool,
    symbols_only: bool,
    discriminators: bool,
    threads: usize,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            elfs: Vec::new(),
            kallsyms: None,
            modules: Vec::new(),
            warnings: Vec::new(),
            demangle: true,
            symbols_only: false,
            discriminators: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// How many threads a large batch may use to parse DWARF (default: the CPUs this process may run on).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Whether function names are demangled (default: yes).
    pub fn set_demangle(&mut self, demangle: bool) {
        self.demangle = demangle;
    }

    /// Name functions from ELF symbol tables alone, without DWARF (no inline frames, no file:line): what a
    /// profile's table needs, as perf report does, at a fraction of the cost (default: DWARF too).
    pub fn set_symbols_only(&mut self, symbols_only: bool) {
        self.symbols_only = symbols_only;
    }

    /// Whether [`Frame::discriminator`] is filled in (default: yes; binutils prints them, a profile table does not).
    pub fn set_discriminators(&mut self, discriminators: bool) {
        self.discriminators = discriminators;
    }

    /// An ELF (vmlinux, test guest, user binary). `bias` is added to its addresses (KASLR offset / load bias).
    /// A relocatable object (`.ko`) contributes only its `.text` symbols, with `.text` placed at `bias`
    /// (see [`Self::add_module_elf`] to place all its sections).
    pub fn add_elf(&mut self, path: &Path, bias: u64) -> Result<(), SymbolsError> {
        let object =
            elf::ElfObject::open(path, bias, None).map_err(|source| SymbolsError::Elf {
                path: path.to_owned(),
                source,
            })?;
        self.elfs.push(object);
        // Only the first ELF is the kernel image that kallsyms describe; later ones (modules) are not checked.
        if self.elfs.len() == 1 {
            self.check_kernel_consistency();
        }
        Ok(())
    }

    /// A kernel module (`.ko`) placed where the guest loaded each of its sections, by section name: see
    /// [`read_module_sections`] for a copy of the guest's `/sys/module/NAME/sections/`. Its DWARF (lines, inline
    /// frames) is relocated to those addresses on first use; sections not in the map are not loaded.
    pub fn add_module_elf(
        &mut self,
        path: &Path,
        section_addresses: &HashMap<String, u64>,
    ) -> Result<(), SymbolsError> {
        let object = elf::ElfObject::open(path, 0, Some(section_addresses)).map_err(|source| {
            SymbolsError::Elf {
                path: path.to_owned(),
                source,
            }
        })?;
        self.elfs.push(object);
        Ok(())
    }

    /// Like [`Self::add_elf`] for an ELF image already in memory (read from guest memory, say); `name` is what
    /// [`Symbolized::object`] reports.
    pub fn add_elf_bytes(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        bias: u64,
    ) -> Result<(), SymbolsError> {
        let object =
            elf::ElfObject::from_bytes(name.to_owned(), bytes, bias).map_err(|source| {
                SymbolsError::Elf {
                    path: PathBuf::from(name),
                    source,
                }
            })?;
        self.elfs.push(object);
        // Only the first ELF is the kernel image that kallsyms describe; later ones (modules) are not checked.
        if self.elfs.len() == 1 {
            self.check_kernel_consistency();
        }
        Ok(())
    }

    /// Like [`Self::add_kallsyms`] for text already in memory.
    pub fn add_kallsyms_text(&mut self, name: &str, text: &str) -> Result<(), SymbolsError> {
        let entries = parse_kallsyms(text).map_err(|source| SymbolsError::Kallsyms {
            path: PathBuf::from(name),
            source,
        })?;
        let (table, object_names) = kallsyms::build_table(&entries, &self.modules);
        self.kallsyms = Some(KallsymsSource {
            path: PathBuf::from(name),
            entries,
            table,
            object_names,
        });
        self.check_kernel_consistency();
        Ok(())
    }

    /// `/proc/kallsyms` or `System.map` text.
    pub fn add_kallsyms(&mut self, path: &Path) -> Result<(), SymbolsError> {
        let text = read_text(path)?;
        self.add_kallsyms_text(&path.display().to_string(), &text)
    }

    /// A copy of the guest's `/proc/modules`: module load regions.
    pub fn add_modules(&mut self, path: &Path) -> Result<(), SymbolsError> {
        let text = read_text(path)?;
        let modules = parse_modules(&text).map_err(|source| SymbolsError::Kallsyms {
            path: path.to_owned(),
            source,
        })?;
        self.modules.extend(modules);
        self.modules.sort_by_key(|m| m.start);
        if let Some(k) = &mut self.kallsyms {
            (k.table, k.object_names) = kallsyms::build_table(&k.entries, &self.modules);
        }
        Ok(())
    }

    /// Warns (see [`Self::warnings`]) when the first ELF's build-id differs from the guest's.
    pub fn expect_build_id(&mut self, guest_build_id: &[u8]) {
        let Some(elf) = self.elfs.first() else { return };
        match elf.build_id() {
            Some(id) if id == guest_build_id => {}
            Some(id) => self.warnings.push(format!(
                "BUILD-ID MISMATCH: {} has build-id {} but the guest kernel's is {}; symbols will be wrong",
                elf.name,
                hex(id),
                hex(guest_build_id)
            )),
            None => self.warnings.push(format!(
                "{} has no build-id; cannot check it against the guest's {}",
                elf.name,
                hex(guest_build_id)
            )),
        }
    }

    /// Problems found while loading or checking sources: build-id or kallsyms mismatches, unreadable DWARF.
    pub fn warnings(&self) -> Vec<String> {
        let mut all = self.warnings.clone();
        for elf in &self.elfs {
            if let Some(problem) = elf.dwarf_problem() {
                all.push(format!("{}: {problem}", elf.name));
            }
        }
        all
    }

    /// Batch lookup, results in input order; addresses may be unsorted. A large batch parses DWARF on several
    /// threads (see [`Self::set_threads`]).
    pub fn symbolize(&self, addrs: &[u64]) -> Vec<Symbolized> {
        // Each distinct address is looked up once, in address order (tables are then walked forward): `order` sorts
        // the input positions by address, and `runs` gives each distinct address its run of positions there.
        let mut order: Vec<(u64, usize)> = addrs.iter().copied().zip(0..).collect();
        order.sort_unstable();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::with_capacity(order.len());
        for (i, &(addr, _)) in order.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if order[run.start].0 == addr => run.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        let mut out: Vec<Symbolized> = Vec::with_capacity(addrs.len());
        out.resize_with(addrs.len(), Symbolized::unknown);
        // Puts one answer at every position of its run: moved to the last, cloned for the others.
        let mut place = |run: &std::ops::Range<usize>, answer: Symbolized| {
            for &(_, position) in &order[run.start..run.end - 1] {
                out[position] = answer.clone();
            }
            out[order[run.end - 1].1] = answer;
        };
        // Per ELF, the (run, link-time address) of the addresses it holds.
        let mut per_elf: Vec<Vec<(usize, u64)>> = vec![Vec::new(); self.elfs.len()];
        for (r, run) in runs.iter().enumerate() {
            let addr = order[run.start].0;
            let holder = self.elfs.iter().enumerate().find_map(|(e, elf)| {
                let link_addr = addr.wrapping_sub(elf.bias);
                elf.contains(link_addr).then_some((e, link_addr))
            });
            match holder {
                Some((e, link_addr)) => per_elf[e].push((r, link_addr)),
                None => place(run, self.symbolize_outside_elfs(addr)),
            }
        }
        for (elf, mut held) in self.elfs.iter().zip(per_elf) {
            if held.is_empty() {
                continue;
            }
            // The bias is one constant per ELF, but subtracting it may wrap: keep link-time order.
            held.sort_unstable_by_key(|&(_, link_addr)| link_addr);
            let link_addrs: Vec<u64> = held.iter().map(|&(_, a)| a).collect();
            let frames = if self.symbols_only {
                elf.symbol_frames_batch(&link_addrs, self.demangle)
            } else {
                elf.frames_batch(
                    &link_addrs,
                    self.demangle,
                    self.discriminators,
                    self.threads,
                )
            };
            for ((r, _), frames) in held.into_iter().zip(frames) {
                let run = &runs[r];
                let answer = Symbolized {
                    addr: order[run.start].0,
                    frames,
                    object: Some(elf.name.clone()),
                };
                place(run, answer);
            }
        }
        out
    }

    /// An address no ELF holds: from kallsyms, or at least the module it lies in.
    fn symbolize_outside_elfs(&self, addr: u64) -> Symbolized {
        if let Some(k) = &self.kallsyms {
            if let Some(sym) = k.table.lookup(addr) {
                let object = sym.object.unwrap_or(0) as usize;
                let name = if object == 0 {
                    Arc::from(KERNEL_OBJECT_NAME)
                } else {
                    Arc::from(format!("[{}]", k.object_names[object - 1]))
                };
                let frame = Frame {
                    function: Some(elf::display_name(&sym.name, self.demangle)),
                    symbol_offset: Some(addr - sym.start),
                    file: None,
                    line: None,
                    column: None,
                    discriminator: None,
                    inlined: false,
                };
                return Symbolized {
                    addr,
                    frames: vec![frame],
                    object: Some(name),
                };
            }
        }
        let module = self
            .modules
            .iter()
            .find(|m| addr >= m.start && addr - m.start < m.size);
        Symbolized {
            addr,
            frames: Vec::new(),
            object: module.map(|m| Arc::from(format!("[{}]", m.name))),
        }
    }

    /// With both a kernel ELF and kallsyms: the ELF's bias must equal the kallsyms-derived KASLR offset, and core
    /// kernel symbols must sit where the ELF says, shifted by it. Otherwise the vmlinux is not the guest's.
    fn check_kernel_consistency(&mut self) {
        let (Some(k), Some(elf)) = (&self.kallsyms, self.elfs.first()) else {
            return;
        };
        let offset =
            match kaslr::offset_from_entries(elf, &k.entries, &k.path.display().to_string()) {
                Ok(offset) => offset,
                Err(e) => {
                    self.warnings.push(format!(
                        "cannot check {} against {}: {e}",
                        elf.name,
                        k.path.display()
                    ));
                    return;
                }
            };
        if offset != elf.bias {
            self.warnings.push(format!(
                "{} was added with offset {:#x} but kallsyms {} imply KASLR offset {offset:#x}",
                elf.name,
                elf.bias,
                k.path.display()
            ));
        }
        let named = elf.named_addresses();
        let by_name: std::collections::HashMap<&str, u64> = named.iter().copied().collect();
        let (mut compared, mut differing) = (0usize, 0usize);
        let mut example = None;
        for entry in k
            .entries
            .iter()
            .filter(|e| e.module.is_none() && matches!(e.kind, 'T' | 't'))
        {
            if let Some(&linked) = by_name.get(entry.name.as_str()) {
                compared += 1;
                if linked.wrapping_add(offset) != entry.address {
                    differing += 1;
                    example.get_or_insert_with(|| (entry.name.clone(), entry.address, linked));
                }
            }
        }
        // Duplicate local names (static functions in several files) legitimately differ; a real mismatch moves
        // nearly everything.
        if compared == 0 || differing * 20 > compared {
            let detail = example.map_or(String::new(), |(name, guest, linked)| {
                format!(" (e.g. {name}: guest {guest:#x}, vmlinux {linked:#x} + {offset:#x})")
            });
            self.warnings.push(format!(
                "{} does not match the guest's kallsyms {}: {differing} of {compared} text symbols disagree{detail}; \
                 it is not the guest's kernel",
                elf.name,
                k.path.display()
            ));
        }
    }
}

/// KASLR offset = guest kallsyms `_text`/`_stext` − vmlinux `_text`/`_stext`.
pub fn kaslr_offset_from_kallsyms(vmlinux: &Path, kallsyms: &Path) -> Result<u64, SymbolsError> {
    Ok(kaslr::kaslr_offset_from_kallsyms(vmlinux, kallsyms)?)
}

/// Section load addresses from a copy of a guest's `/sys/module/NAME/sections/` directory: one file per section
/// (`.text`, `.init.text`, `.data`, ...) holding its address in hex.
pub fn read_module_sections(dir: &Path) -> Result<HashMap<String, u64>, SymbolsError> {
    let read_error = |source| SymbolsError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut sections = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let path = entry.path();
        let text = read_text(&path)?;
        let value = text.trim();
        let digits = value.strip_prefix("0x").unwrap_or(value);
        let address = u64::from_str_radix(digits, 16).map_err(|_| SymbolsError::Read {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected a hex section address, got {value:?}"),
            ),
        })?;
        sections.insert(entry.file_name().to_string_lossy().into_owned(), address);
    }
    if !sections.is_empty() && sections.values().all(|&a| a == 0) {
        return Err(SymbolsError::Kallsyms {
            path: dir.to_owned(),
            source: KallsymsError::AddressesHidden,
        });
    }
    Ok(sections)
}

/// A kernel module's name from its `.modinfo` (`name=...`, which modpost writes), or `None` when the file has none
/// (then the kernel's rule applies: the file name up to its first '.', '-' turned into '_').
pub fn module_name(ko: &Path) -> Result<Option<String>, SymbolsError> {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(ko).map_err(|source| SymbolsError::Read {
        path: ko.to_owned(),
        source,
    })?;
    let file = object::File::parse(&*bytes).map_err(|e| SymbolsError::Elf {
        path: ko.to_owned(),
        source: ElfError::Parse(e),
    })?;
    let Some(modinfo) = file.section_by_name(".modinfo") else {
        return Ok(None);
    };
    let data = modinfo.data().unwrap_or_default();
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"name="))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .next())
}

/// The GNU build-id of an ELF file, if it has one.
pub fn build_id(elf: &Path) -> Result<Option<Vec<u8>>, SymbolsError> {
    Ok(kaslr::build_id(elf)?)
}

fn read_text(path: &Path) -> Result<String, SymbolsError> {
    let bytes = std::fs::read(path).map_err(|source| SymbolsError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn symbolizer_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<super::Symbolizer>();
    }
}
