//! Guest symbolization: vmlinux ELF + DWARF, kallsyms, modules, KASLR offset.
