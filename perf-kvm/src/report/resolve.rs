//! Address → (shared object, symbol) for report rows, through the `symbols` crate, cached per address.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use symbols::Symbolizer;

use super::load::{Frame, Mapping, Mode, Profile};
use super::ReportError;

pub const GUEST_KERNEL_DSO: &str = "[guest.kernel.kallsyms]";
pub const HOST_KERNEL_DSO: &str = "[kernel.kallsyms]";

/// Where the symbols of each side come from.
#[derive(Debug, Clone, Default)]
pub struct SymbolSources {
    pub guest_vmlinux: Option<PathBuf>,
    pub guest_kallsyms: Option<PathBuf>,
    pub guest_modules: Option<PathBuf>,
    pub guest_user_elf: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub dso: String,
    /// Function name, or the address in perf's `0x%016x` form when unknown.
    pub symbol: String,
    pub mode: Mode,
}

/// Report rows name functions the way perf report does: from symbol tables, not DWARF (no inline frames).
pub struct Resolver {
    guest_kernel: Option<Symbolizer>,
    guest_user: Option<(Symbolizer, String)>,
    /// Mapped files symbolized on demand, keyed by (path, bias); None if the file cannot be read.
    mapped: HashMap<(String, u64), Option<Symbolizer>>,
    /// Shared, so a million samples of the same few thousand places copy no strings.
    cache: HashMap<(Mode, i32, u64), std::rc::Rc<Location>>,
    /// Whether mapped files named by the recording may be opened.
    open_mapped: bool,
    pub warnings: Vec<String>,
}

impl Resolver {
    pub fn new(sources: &SymbolSources, open_mapped: bool) -> Result<Self, ReportError> {
        let mut warnings = Vec::new();
        let guest_kernel = if sources.guest_vmlinux.is_some() || sources.guest_kallsyms.is_some() {
            let mut kernel = Symbolizer::new();
            kernel.set_discriminators(false); // a profile never prints them
            kernel.set_symbols_only(true);
            if let Some(modules) = &sources.guest_modules {
                kernel
                    .add_modules(modules)
                    .map_err(|source| symbols_error(modules, source))?;
            }
            if let Some(kallsyms) = &sources.guest_kallsyms {
                kernel
                    .add_kallsyms(kallsyms)
                    .map_err(|source| symbols_error(kallsyms, source))?;
            }
            if let Some(vmlinux) = &sources.guest_vmlinux {
                kernel
                    .add_elf(vmlinux, 0)
                    .map_err(|source| symbols_error(vmlinux, source))?;
            }
            warnings.extend(kernel.warnings());
            Some(kernel)
        } else {
            None
        };
        let guest_user = match &sources.guest_user_elf {
            Some(elf) => {
                let mut user = Symbolizer::new();
                user.set_discriminators(false); // a profile never prints them
                user.set_symbols_only(true);
                user.add_elf(elf, 0)
                    .map_err(|source| symbols_error(elf, source))?;
                warnings.extend(user.warnings());
                Some((user, basename(&elf.to_string_lossy())))
            }
            None => None,
        };
        Ok(Self {
            guest_kernel,
            guest_user,
            mapped: HashMap::new(),
            cache: HashMap::new(),
            open_mapped,
            warnings,
        })
    }

    pub fn resolve(&mut self, profile: &Profile, pid: i32, frame: Frame) -> std::rc::Rc<Location> {
        // Kernel addresses do not depend on the process.
        let pid_key = if frame.mode.is_kernel() { 0 } else { pid };
        if let Some(found) = self.cache.get(&(frame.mode, pid_key, frame.addr)) {
            return found.clone();
        }
        let found = std::rc::Rc::new(self.resolve_uncached(profile, pid, frame));
        self.cache
            .insert((frame.mode, pid_key, frame.addr), found.clone());
        found
    }

    fn resolve_uncached(&mut self, profile: &Profile, pid: i32, frame: Frame) -> Location {
        let unknown_symbol = format!("{:#018x}", frame.addr);
        match frame.mode {
            Mode::GuestKernel | Mode::HostKernel => {
                let default_dso = if frame.mode == Mode::GuestKernel {
                    GUEST_KERNEL_DSO
                } else {
                    HOST_KERNEL_DSO
                };
                let symbolizer = if frame.mode == Mode::GuestKernel {
                    self.guest_kernel.as_ref()
                } else {
                    None
                };
                let (symbol, object) = symbolize(symbolizer, frame.addr);
                // Modules come back as `[name]`; the core kernel keeps perf's pseudo file name.
                let dso = object
                    .filter(|o| o.starts_with('[') && !o.contains("kernel"))
                    .unwrap_or(default_dso.into());
                Location {
                    dso,
                    symbol: symbol.unwrap_or(unknown_symbol),
                    mode: frame.mode,
                }
            }
            Mode::GuestUser | Mode::HostUser | Mode::Unknown => {
                let mapping = find_mapping(profile, pid, frame.addr).cloned();
                if frame.mode == Mode::GuestUser {
                    if let Some((user, name)) = &self.guest_user {
                        let (symbol, object) = symbolize(Some(user), frame.addr);
                        if let (Some(symbol), Some(_)) = (symbol, object) {
                            return Location {
                                dso: name.clone(),
                                symbol,
                                mode: frame.mode,
                            };
                        }
                    }
                }
                let Some(mapping) = mapping else {
                    return Location {
                        dso: "[unknown]".into(),
                        symbol: unknown_symbol,
                        mode: frame.mode,
                    };
                };
                let dso = basename(&mapping.path);
                let symbol = self
                    .symbolize_mapped(&mapping, frame.addr)
                    .unwrap_or(unknown_symbol);
                Location {
                    dso,
                    symbol,
                    mode: frame.mode,
                }
            }
        }
    }

    fn symbolize_mapped(&mut self, mapping: &Mapping, addr: u64) -> Option<String> {
        if !self.open_mapped || !mapping.path.starts_with('/') {
            return None;
        }
        // Executables sit at their link address; shared objects and PIEs are biased by where the mapping puts
        // their file offset (exact for the usual layout where a segment's file offset equals its address).
        let bias = if is_elf_executable(Path::new(&mapping.path)) {
            0
        } else {
            mapping.start.wrapping_sub(mapping.pgoff)
        };
        let symbolizer = self
            .mapped
            .entry((mapping.path.clone(), bias))
            .or_insert_with(|| {
                let mut s = Symbolizer::new();
                s.set_discriminators(false); // a profile never prints them
                s.set_symbols_only(true);
                s.add_elf(Path::new(&mapping.path), bias).ok().map(|()| s)
            })
            .as_ref();
        symbolize(symbolizer, addr).0
    }
}

/// ELF `e_type == ET_EXEC`.
fn is_elf_executable(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 18];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    read.is_ok() && &header[..4] == b"\x7fELF" && u16::from_le_bytes([header[16], header[17]]) == 2
}

fn symbolize(symbolizer: Option<&Symbolizer>, addr: u64) -> (Option<String>, Option<String>) {
    let Some(symbolizer) = symbolizer else {
        return (None, None);
    };
    let Some(result) = symbolizer.symbolize(&[addr]).pop() else {
        return (None, None);
    };
    // Frames are innermost first; the last one is the containing real function, the one perf names.
    let function = result
        .frames
        .last()
        .and_then(|f| f.function.as_deref().map(str::to_owned));
    (function, result.object.as_deref().map(str::to_owned))
}

fn find_mapping(profile: &Profile, pid: i32, addr: u64) -> Option<&Mapping> {
    profile
        .mappings
        .get(&pid)?
        .iter()
        .rev()
        .find(|m| addr >= m.start && addr - m.start < m.len)
}

fn basename(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

fn symbols_error(path: &Path, source: symbols::SymbolsError) -> ReportError {
    ReportError::Symbols {
        path: path.to_owned(),
        source,
    }
}
