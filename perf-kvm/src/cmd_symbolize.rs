//! `perf-kvm symbolize`: guest addresses to `function at file:line`, in binutils `addr2line -a -f -i -p` format.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use symbols::{format_addr2line, Addr2lineStyle, Symbolizer};

#[derive(clap::Args)]
pub struct SymbolizeArgs {
    /// The guest kernel's vmlinux (ELF with DWARF), or any guest ELF.
    #[arg(long, value_name = "PATH")]
    guest_vmlinux: Option<PathBuf>,
    /// A copy of the guest's /proc/kallsyms (or its System.map): module symbols and the KASLR offset.
    #[arg(long, value_name = "PATH")]
    guest_kallsyms: Option<PathBuf>,
    /// A copy of the guest's /proc/modules: module load regions.
    #[arg(long, value_name = "PATH")]
    guest_modules: Option<PathBuf>,
    /// A guest kernel module's `.ko` (with DWARF: func, file:line, inline frames), placed where the guest loaded
    /// it: by --guest-sysmodule, else its `.text` at its --guest-modules address. Repeatable.
    #[arg(long = "guest-ko", value_name = "PATH")]
    guest_ko: Vec<PathBuf>,
    /// A copy of the guest's /sys/module: DIR/NAME/sections/ holds each section's load address.
    #[arg(long, value_name = "DIR")]
    guest_sysmodule: Option<PathBuf>,
    /// KASLR offset added to vmlinux addresses (default: from --guest-kallsyms, else from --vm, else 0).
    #[arg(long, value_name = "HEX", value_parser = parse_hex)]
    kaslr_offset: Option<u64>,
    /// A running VM's control socket: the KASLR offset comes from its MSR_LSTAR against `entry_SYSCALL_64`.
    #[arg(long, value_name = "SOCKET")]
    vm: Option<PathBuf>,
    /// The guest kernel's build-id (hex); a vmlinux with another one is reported loudly.
    #[arg(long, value_name = "HEX")]
    guest_build_id: Option<String>,
    /// A copy of the guest's /sys/kernel/notes, to check the vmlinux build-id against.
    #[arg(long, value_name = "PATH", conflicts_with = "guest_build_id")]
    guest_notes: Option<PathBuf>,
    /// Demangle function names (like addr2line -C).
    #[arg(short = 'C', long)]
    demangle: bool,
    /// Addresses (hex, `0x` optional); read from stdin when none are given.
    #[arg(value_name = "ADDR")]
    addresses: Vec<String>,
}

fn parse_hex(text: &str) -> Result<u64, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|e| format!("{text:?} is not a hex address: {e}"))
}

pub fn run(args: SymbolizeArgs) -> anyhow::Result<i32> {
    let symbolizer = build_symbolizer(&args)?;
    let initial_warnings = symbolizer.warnings().len();
    for warning in symbolizer.warnings() {
        eprintln!("perf-kvm: warning: {warning}");
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if !args.addresses.is_empty() {
        let addrs = args
            .addresses
            .iter()
            .map(|a| parse_hex(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        write_results(&symbolizer, &addrs, &mut out)?;
    } else {
        // Line by line, so an interactive caller (or a pipe partner waiting for each answer) gets them promptly.
        let interactive = std::io::stdin().is_terminal();
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading addresses from stdin")?;
            let addrs = line
                .split_whitespace()
                .map(parse_hex)
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            write_results(&symbolizer, &addrs, &mut out)?;
            if interactive {
                out.flush()?;
            }
        }
    }
    out.flush()?;
    // Lookups can uncover more (corrupt DWARF units are only met when first used).
    for warning in symbolizer.warnings().into_iter().skip(initial_warnings) {
        eprintln!("perf-kvm: warning: {warning}");
    }
    Ok(0)
}

fn build_symbolizer(args: &SymbolizeArgs) -> anyhow::Result<Symbolizer> {
    if args.guest_vmlinux.is_none() && args.guest_kallsyms.is_none() && args.guest_ko.is_empty() {
        bail!(
            "nothing to symbolize with: give --guest-vmlinux, --guest-kallsyms and/or --guest-ko"
        );
    }
    let mut symbolizer = Symbolizer::new();
    symbolizer.set_demangle(args.demangle);
    if let Some(modules) = &args.guest_modules {
        symbolizer.add_modules(modules)?;
    }
    if let Some(vmlinux) = &args.guest_vmlinux {
        let offset = match (args.kaslr_offset, &args.guest_kallsyms) {
            (Some(offset), _) => offset,
            (None, Some(kallsyms)) => symbols::kaslr_offset_from_kallsyms(vmlinux, kallsyms)
                .with_context(|| format!("KASLR offset from {}", kallsyms.display()))?,
            (None, None) => match &args.vm {
                Some(socket) => kaslr_offset_from_running_guest(socket, vmlinux)?,
                None => 0,
            },
        };
        symbolizer.add_elf(vmlinux, offset)?;
        let guest_build_id = match (&args.guest_build_id, &args.guest_notes) {
            (Some(hex), _) => Some(parse_build_id(hex)?),
            (None, Some(notes)) => {
                let bytes =
                    std::fs::read(notes).with_context(|| format!("reading {}", notes.display()))?;
                let id = symbols::build_id_from_notes(&bytes);
                if id.is_none() {
                    eprintln!(
                        "perf-kvm: warning: {} holds no GNU build-id note",
                        notes.display()
                    );
                }
                id
            }
            (None, None) => None,
        };
        if let Some(id) = guest_build_id {
            symbolizer.expect_build_id(&id);
        }
    }
    if let Some(kallsyms) = &args.guest_kallsyms {
        symbolizer.add_kallsyms(kallsyms)?;
    }
    for ko in &args.guest_ko {
        let layout = module_layout(args, ko)?;
        symbolizer.add_module_elf(ko, &layout)?;
    }
    Ok(symbolizer)
}

/// Where the guest loaded the module in `ko`: every section from `--guest-sysmodule`, or `.text` alone at the
/// module's `--guest-modules` address (where Linux puts the first executable section of the module's core).
fn module_layout(
    args: &SymbolizeArgs,
    ko: &std::path::Path,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    // Without a `name=` in .modinfo, the kernel names a module after its file, '-' turned into '_'.
    let name = match symbols::module_name(ko)? {
        Some(name) => name,
        None => {
            let file_name = ko.file_name().unwrap_or_default().to_string_lossy();
            file_name
                .split('.')
                .next()
                .unwrap_or_default()
                .replace('-', "_")
        }
    };
    if let Some(sysmodule) = &args.guest_sysmodule {
        let sections = sysmodule.join(&name).join("sections");
        if sections.is_dir() {
            return Ok(symbols::read_module_sections(&sections)?);
        }
    }
    if let Some(modules) = &args.guest_modules {
        let text = std::fs::read_to_string(modules)
            .with_context(|| format!("reading {}", modules.display()))?;
        if let Some(region) = symbols::parse_modules(&text)
            .with_context(|| format!("parsing {}", modules.display()))?
            .into_iter()
            .find(|m| m.name == name)
        {
            return Ok(std::collections::HashMap::from([(
                ".text".to_owned(),
                region.start,
            )]));
        }
    }
    bail!(
        "no load address for module {name} ({}): give --guest-sysmodule (a copy of the guest's /sys/module) \
         or --guest-modules (its /proc/modules) that lists it",
        ko.display()
    )
}

fn parse_build_id(hex: &str) -> anyhow::Result<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--guest-build-id {hex:?} is not an even number of hex digits");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&hex[i..i + 2], 16)?))
        .collect()
}

fn write_results(
    symbolizer: &Symbolizer,
    addrs: &[u64],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    for result in symbolizer.symbolize(addrs) {
        out.write_all(format_addr2line(&result, Addr2lineStyle::AFIP).as_bytes())?;
    }
    Ok(())
}

/// MSR_LSTAR of vCPU 0 (the guest kernel's syscall entry) against the vmlinux's `entry_SYSCALL_64`.
fn kaslr_offset_from_running_guest(
    socket: &std::path::Path,
    vmlinux: &std::path::Path,
) -> anyhow::Result<u64> {
    const MSR_LSTAR: u32 = 0xc000_0082;
    let mut client = vmm::control::ControlClient::connect(socket)?;
    let reply = client.call(vmm::control::Request::Msr {
        vcpu: 0,
        index: MSR_LSTAR,
    })?;
    let lstar = reply["value"].as_u64().filter(|&v| v != 0).ok_or_else(|| {
        anyhow::anyhow!("the guest has not set MSR_LSTAR yet (no syscall entry installed)")
    })?;
    symbols::kaslr_offset_from_lstar(lstar, vmlinux)
        .with_context(|| format!("KASLR offset from the guest's MSR_LSTAR {lstar:#x}"))
}
