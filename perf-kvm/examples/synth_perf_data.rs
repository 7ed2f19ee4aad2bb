//! Writes a perf.data of N synthetic guest samples (benchmarks only): RIPs spread over the given guest ELF's
//! functions, kernel ones marked guest-kernel, user ones guest-user, with short callchains.
//! Usage: synth_perf_data GUEST_ELF OUT N

use std::path::PathBuf;

use object::{Object, ObjectSymbol, SymbolKind};
use perf_kvm::perf_data::{GuestUserMap, PerfDataWriter, RecordMeta};
use vmm::{GuestMode, Sample};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: synth_perf_data GUEST_ELF OUT N");
    let elf = std::fs::canonicalize(&args[1])?;
    let out = PathBuf::from(&args[2]);
    let n: u64 = args[3].parse()?;
    let data = std::fs::read(&elf)?;
    let file = object::File::parse(&*data)?;
    let funcs: Vec<(u64, u64)> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 8)
        .map(|s| (s.address(), s.size()))
        .collect();
    anyhow::ensure!(!funcs.is_empty(), "no functions in {}", elf.display());
    let user_maps = file
        .segments()
        .filter(|s| (0x1000..0x8000_0000_0000).contains(&object::ObjectSegment::address(s)))
        .map(|s| {
            use object::ObjectSegment;
            GuestUserMap {
                start: s.address(),
                len: s.size(),
                pgoff: s.file_range().0,
                path: elf.clone(),
            }
        })
        .collect();
    let meta = RecordMeta {
        nr_vcpus: 2,
        freq_hz: 1000,
        callchains: true,
        guest_kernel_path: Some(elf.clone()),
        guest_user_maps: user_maps,
        ..Default::default()
    };
    let mut w = PerfDataWriter::create(&out, &meta)?;
    // A fixed LCG: the same file every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 17
    };
    for i in 0..n {
        let (start, size) = funcs[(next() as usize) % funcs.len()];
        let rip = start + next() % size;
        let kernel = rip >= 0xffff_8000_0000_0000;
        let chain: Vec<u64> = (0..3)
            .map(|_| {
                let (s, z) = funcs[(next() as usize) % funcs.len()];
                s + next() % z
            })
            .collect();
        w.write_sample(&Sample {
            time_ns: i * 1000,
            vcpu: (i % 2) as u32,
            rip,
            mode: if kernel {
                GuestMode::Kernel
            } else {
                GuestMode::User
            },
            cr3: if kernel {
                0x10d000
            } else {
                0x600000 + (i % 2) * 0x1000
            },
            callchain: chain,
            period: None,
        })?;
    }
    w.finish()?;
    Ok(())
}
