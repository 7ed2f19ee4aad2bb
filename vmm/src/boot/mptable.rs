//! Intel MultiProcessor Specification 1.4 tables, so Linux (and any guest that scans for `_MP_`) finds every vCPU,
//! the I/O APIC and the ISA interrupt routing without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    APIC_START, BDA_BASE_MEMORY_KIB, BDA_EBDA_SEGMENT, EBDA_START, IOAPIC_START, MPTABLE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(usize),
    #[error("writing the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer + configuration table for `num_cpus` processors, ready to be placed at `base`.
pub fn build(num_cpus: usize, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8 + 1;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // cpu signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU + APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT type, default polarity/trigger, bus 0 irq → I/O APIC pin irq.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0, NMI to LINT1 on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_base = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"KVMPROF ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_base as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table into the EBDA, and the BIOS data area words that point scanners there.
pub fn write(mem: &GuestMemoryMmap, num_cpus: usize) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)?;
    mem.write_obj((EBDA_START >> 4) as u16, GuestAddress(BDA_EBDA_SEGMENT))
        .map_err(MptableError::Write)?;
    mem.write_obj((EBDA_START >> 10) as u16, GuestAddress(BDA_BASE_MEMORY_KIB))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(3, MPTABLE_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            3 + 1 + 1 + 16 + 2
        );
        assert!(build(0, 0).is_err() && build(255, 0).is_err());
    }

    #[test]
    fn bios_data_area_points_scanners_at_the_table() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let segment: u16 = mem.read_obj(GuestAddress(BDA_EBDA_SEGMENT)).unwrap();
        let base_kib: u16 = mem.read_obj(GuestAddress(BDA_BASE_MEMORY_KIB)).unwrap();
        assert_eq!(base_kib, 639);
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress((segment as u64) << 4))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
