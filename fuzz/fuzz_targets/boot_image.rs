//! Boot-image parsing on arbitrary bytes: the ELF/PVH note scan, linux-loader's ELF and bzImage loaders (setup
//! header, segments), and the boot structures written for each entry protocol, into a small guest memory. No KVM.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::boot::{load_image, BootConfig};

/// Enough for the boot structures below 1 MiB and a small kernel above it.
const GUEST_MEMORY: usize = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEMORY)])
        .expect("guest memory");
    let cfg = BootConfig {
        kernel: std::path::Path::new("fuzz-kernel"),
        initrd: None,
        cmdline: "console=ttyS0",
        num_cpus: 2,
        linux_workarounds: &["noxsave".to_string()],
    };
    let _ = load_image(&mem, &mut Cursor::new(data), "fuzz-kernel", &cfg);
});
