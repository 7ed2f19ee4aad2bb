//! ACPI tables: RSDP → XSDT → FADT (→ FACS, DSDT) and MADT, so guests that take their CPUs from ACPI see every
//! vCPU. Debian's kernels are built without `CONFIG_X86_MPPARSE`: for them the MADT is the only CPU list there is.
//!
//! The FADT describes a legacy PC (PIT, 8259s, i8042) rather than a hardware-reduced one, because a hardware-reduced
//! FADT makes Linux skip the PIT and the legacy PIC, which this VMM provides and Linux's timer setup relies on here.
//! Its PM1a blocks are the VMM's ACPI PM device (`devices.rs`), the DSDT holds just `\_S5`, so `poweroff` ends the
//! VM, and the reset register is the i8042's.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_START, APIC_START, IOAPIC_START};
use crate::devices::{ACPI_PM1A_CNT_PORT, ACPI_PM1A_EVT_PORT, ACPI_SCI_IRQ, ACPI_SLP_TYP_S5};

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs do not fit in the MADT's xAPIC entries (at most 254)")]
    TooManyCpus(usize),
    #[error("writing the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const OEM_ID: &[u8; 6] = b"KVMPRF";
const OEM_TABLE_ID: &[u8; 8] = b"KVMPROF ";
const CREATOR_ID: &[u8; 4] = b"KPRF";

/// Where the tables go: RSDP first (Linux and the test guest also find it by scanning 0xE0000–0xFFFFF), then the
/// rest, each aligned as the spec wants (FACS on 64 bytes).
const RSDP_LEN: u64 = 36;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: the 36-byte header, then `body`, with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn madt(num_cpus: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present (masked by the OS)
    for cpu in 0..num_cpus {
        // Processor local APIC: UID, APIC ID (= vCPU index, as KVM assigns them), enabled.
        b.extend_from_slice(&[0, 8, cpu as u8, cpu as u8]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: same ID as in the MP table, GSIs from 0 (KVM routes ISA IRQ n to pin n, so no override for IRQ 0).
    b.extend_from_slice(&[1, 12, num_cpus as u8 + 1, 0]);
    b.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override for the SCI: ISA IRQ 9 → GSI 9, active high, level triggered.
    b.extend_from_slice(&[2, 10, 0, ACPI_SCI_IRQ]);
    b.extend_from_slice(&(ACPI_SCI_IRQ as u32).to_le_bytes());
    b.extend_from_slice(&0x000du16.to_le_bytes());
    // Local APIC NMI on LINT1 of every processor (UID 0xff).
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

/// A generic address structure for a system-I/O register.
fn gas_io(port: u16, bytes: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bytes * 8; // register bit width
    g[3] = bytes; // access size: 1 byte, 2 word, 3 dword
    if bytes == 4 {
        g[3] = 3;
    }
    g[4..12].copy_from_slice(&(port as u64).to_le_bytes());
    g
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    // ACPI 6 layout, offsets relative to the table start (the body starts at 36).
    let mut f = vec![0u8; 276 - 36];
    let mut put =
        |off: usize, bytes: &[u8]| f[off - 36..off - 36 + bytes.len()].copy_from_slice(bytes);
    put(36, &(facs as u32).to_le_bytes());
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &(ACPI_SCI_IRQ as u16).to_le_bytes());
    // SMI_CMD = 0: no SMM, the machine is always in ACPI mode.
    put(56, &(ACPI_PM1A_EVT_PORT as u32).to_le_bytes());
    put(64, &(ACPI_PM1A_CNT_PORT as u32).to_le_bytes());
    put(88, &[4, 2]); // PM1_EVT_LEN, PM1_CNT_LEN; no PM2, no PM timer, no GPE blocks
    put(96, &0x0065u16.to_le_bytes()); // P_LVL2_LAT > 100: no C2
    put(98, &0x03e9u16.to_le_bytes()); // P_LVL3_LAT > 1000: no C3
    put(109, &0x0003u16.to_le_bytes()); // IAPC_BOOT_ARCH: LEGACY_DEVICES | 8042
                                        // Flags: WBINVD, PROC_C1, PWR_BUTTON and SLP_BUTTON (none as fixed features), RESET_REG_SUP.
    let flags: u32 = 1 | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10);
    put(112, &flags.to_le_bytes());
    put(116, &gas_io(0x64, 1)); // RESET_REG: the i8042 command port …
    put(128, &[0xfe]); // … pulse reset line
    put(131, &[0]); // FADT minor version (ACPI 6.0)
    put(140, &dsdt.to_le_bytes()); // X_DSDT
    put(148, &gas_io(ACPI_PM1A_EVT_PORT, 4));
    put(172, &gas_io(ACPI_PM1A_CNT_PORT, 2));
    sdt(b"FACP", 6, &f)
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

fn dsdt() -> Vec<u8> {
    // Name (_S5, Package (4) { S5, S5, 0, 0 }): the SLP_TYP values Linux writes to PM1a_CNT to power off.
    let aml = [
        0x08,
        b'_',
        b'S',
        b'5',
        b'_',
        0x12,
        0x08,
        0x04,
        0x0a,
        ACPI_SLP_TYP_S5,
        0x0a,
        ACPI_SLP_TYP_S5,
        0x00,
        0x00,
    ];
    sdt(b"DSDT", 2, &aml)
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN as usize);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, below
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+, XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum, below
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The tables laid out from `base` (RSDP at `base`), as one image.
pub fn build(num_cpus: usize, base: u64) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let align = |v: u64, a: u64| v.div_ceil(a) * a;
    let xsdt_at = align(base + RSDP_LEN, 16);
    let xsdt_len = 36 + 2 * 8;
    let facs_at = align(xsdt_at + xsdt_len, 64);
    let dsdt = dsdt();
    let dsdt_at = align(facs_at + 64, 16);
    let fadt = fadt(facs_at, dsdt_at);
    let fadt_at = align(dsdt_at + dsdt.len() as u64, 16);
    let madt_at = align(fadt_at + fadt.len() as u64, 16);
    let madt = madt(num_cpus);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_at.to_le_bytes());
    entries.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &entries);

    let mut image = vec![0u8; (madt_at + madt.len() as u64 - base) as usize];
    for (at, bytes) in [
        (base, rsdp(xsdt_at)),
        (xsdt_at, xsdt),
        (facs_at, facs()),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
    ] {
        let off = (at - base) as usize;
        image[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(image)
}

/// Writes the tables at `ACPI_START`; returns the RSDP's address for `hvm_start_info` and `boot_params`.
pub fn write(mem: &GuestMemoryMmap, num_cpus: usize) -> Result<u64, AcpiError> {
    let image = build(num_cpus, ACPI_START)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    /// Follows RSDP → XSDT → tables the way an OS does and returns (signature, table bytes) for each.
    fn tables(image: &[u8], base: u64) -> Vec<([u8; 4], Vec<u8>)> {
        let at = |pa: u64| (pa - base) as usize;
        assert_eq!(&image[..8], b"RSD PTR ");
        assert!(sums_to_zero(&image[..20]) && sums_to_zero(&image[..36]));
        assert_eq!(image[15], 2);
        let xsdt = at(le64(image, 24));
        assert_eq!(&image[xsdt..xsdt + 4], b"XSDT");
        let len = le32(image, xsdt + 4) as usize;
        assert!(sums_to_zero(&image[xsdt..xsdt + len]));
        (xsdt + 36..xsdt + len)
            .step_by(8)
            .map(|p| {
                let t = at(le64(image, p));
                let tlen = le32(image, t + 4) as usize;
                let bytes = image[t..t + tlen].to_vec();
                assert!(sums_to_zero(&bytes));
                (bytes[..4].try_into().unwrap(), bytes)
            })
            .collect()
    }

    #[test]
    fn madt_lists_every_vcpu_enabled_with_its_apic_id() {
        for n in [1, 2, 7] {
            let image = build(n, ACPI_START).unwrap();
            let t = tables(&image, ACPI_START);
            let madt = &t.iter().find(|(s, _)| s == b"APIC").unwrap().1;
            assert_eq!(le32(madt, 36) as u64, APIC_START);
            let mut e = 44;
            let mut apic_ids = Vec::new();
            let mut ioapics = 0;
            while e < madt.len() {
                let (ty, len) = (madt[e], madt[e + 1] as usize);
                match ty {
                    0 => {
                        assert_eq!(le32(madt, e + 4) & 1, 1, "enabled");
                        apic_ids.push(madt[e + 3]);
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(le32(madt, e + 4) as u64, IOAPIC_START);
                    }
                    _ => {}
                }
                e += len;
            }
            assert_eq!(e, madt.len());
            assert_eq!(apic_ids, (0..n as u8).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn fadt_points_at_facs_and_dsdt_with_s5() {
        let image = build(2, ACPI_START).unwrap();
        let t = tables(&image, ACPI_START);
        let fadt = &t.iter().find(|(s, _)| s == b"FACP").unwrap().1;
        assert_eq!(fadt.len(), 276);
        let at = |pa: u32| (pa as u64 - ACPI_START) as usize;
        let facs = at(le32(fadt, 36));
        assert_eq!(&image[facs..facs + 4], b"FACS");
        assert_eq!(facs as u64 % 64, 0);
        let dsdt = at(le32(fadt, 40));
        assert_eq!(le64(fadt, 140), le32(fadt, 40) as u64);
        assert_eq!(&image[dsdt..dsdt + 4], b"DSDT");
        let dsdt = &image[dsdt..dsdt + le32(&image, dsdt + 4) as usize];
        assert!(sums_to_zero(dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert_eq!(le32(fadt, 56), ACPI_PM1A_EVT_PORT as u32);
        assert_eq!(le32(fadt, 64), ACPI_PM1A_CNT_PORT as u32);
        assert_eq!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0,
            "not HW_REDUCED"
        );
    }

    #[test]
    fn cpu_count_limits() {
        assert!(build(0, ACPI_START).is_err());
        assert!(build(255, ACPI_START).is_err());
        assert!(
            build(254, ACPI_START).unwrap().len() < 0x2_0000,
            "fits in 0xE0000–0xFFFFF"
        );
    }
}
