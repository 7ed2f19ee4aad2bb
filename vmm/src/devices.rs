//! Port I/O devices: COM1 8250 UART (vm-superio) to stdout, i8042 reset (vm-superio), the debug-exit port, and the
//! ACPI PM1a registers the FADT names (so an ACPI `poweroff` ends the VM).
//!
//! Everything else is in KVM (irqchip, PIT). Unknown ports read as all-ones and ignore writes, like an empty ISA bus.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_BASE: u16 = 0x60;
/// A guest writes a 32-bit status here to end the VM; the `vmm` process exits with it (QEMU's isa-debug-exit port).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI PM1a event block (status, enable: 2 bytes each) and control block (2 bytes), as in the FADT.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// The SCI's ISA IRQ (nothing raises it: no ACPI events are generated).
pub const ACPI_SCI_IRQ: u8 = 9;
/// SLP_TYP for S5 (soft off), as the DSDT's `\_S5` package gives it.
pub const ACPI_SLP_TYP_S5: u8 = 5;
const PM1_CNT_SCI_EN: u16 = 1;
const PM1_CNT_SLP_EN: u16 = 1 << 13;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Raises the UART's interrupt through an irqfd registered on its GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Records the i8042 "pulse reset line" command; the vCPU that wrote it ends the VM.
#[derive(Default, Clone)]
pub struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What a port access asks of the VMM beyond its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioOutcome {
    Handled,
    /// No device at that port.
    Unclaimed,
    /// The guest asked to end the VM with this status (debug-exit port).
    ExitRequested(u32),
    /// The guest asked for a reset (i8042) or power-off (ACPI S5), which this VMM treats as a clean end.
    ResetRequested,
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct PioDevices {
    serial: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>>,
    i8042: Mutex<I8042Device<ResetFlag>>,
    reset: ResetFlag,
}

impl PioDevices {
    /// `out` receives the guest's serial output. The returned eventfd must be registered as an irqfd on COM1_IRQ.
    pub fn new(out: SerialOut) -> Result<(Self, EventFd), DeviceError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let irq_for_kvm = irq.try_clone().map_err(DeviceError::EventFd)?;
        let reset = ResetFlag::default();
        let devices = PioDevices {
            serial: Mutex::new(Serial::new(IrqTrigger(irq), out)),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        };
        Ok((devices, irq_for_kvm))
    }

    /// One port-I/O exit: `count` accesses of `size` bytes each at `port`, `data` holding them in order. `rep ins`
    /// and `rep outs` bring several accesses to the same port in one exit (KVM reads ahead for `rep ins`).
    pub fn pio_write(&self, port: u16, size: usize, data: &[u8]) -> PioOutcome {
        let mut outcome = PioOutcome::Unclaimed;
        for access in data.chunks(size.max(1)) {
            match self.write(port, access) {
                end @ (PioOutcome::ExitRequested(_) | PioOutcome::ResetRequested) => return end,
                PioOutcome::Handled => outcome = PioOutcome::Handled,
                PioOutcome::Unclaimed => {}
            }
        }
        outcome
    }

    /// Reads for one port-I/O exit (see `pio_write`).
    pub fn pio_read(&self, port: u16, size: usize, data: &mut [u8]) -> PioOutcome {
        let mut outcome = PioOutcome::Unclaimed;
        for access in data.chunks_mut(size.max(1)) {
            if self.read(port, access) == PioOutcome::Handled {
                outcome = PioOutcome::Handled;
            }
        }
        outcome
    }

    /// One `out` of 1, 2 or 4 bytes. The debug-exit port and the ACPI PM1a registers take the whole value; the
    /// byte-wide devices (UART, i8042) see a wider access as one byte per port from `port` up, as an ISA bus splits it.
    pub fn write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if port == DEBUG_EXIT_PORT {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            return PioOutcome::ExitRequested(u32::from_le_bytes(v));
        }
        match port {
            ACPI_PM1A_CNT_PORT..=0x605 => {
                // A 16-bit write, or one byte of it; only SLP_EN with SLP_TYP = S5 does anything.
                let shift = 8 * (port - ACPI_PM1A_CNT_PORT) as u32;
                let v = data
                    .iter()
                    .take(2)
                    .rev()
                    .fold(0u16, |a, b| a << 8 | *b as u16)
                    << shift;
                return if v & PM1_CNT_SLP_EN != 0 && (v >> 10) & 7 == ACPI_SLP_TYP_S5 as u16 {
                    PioOutcome::ResetRequested
                } else {
                    PioOutcome::Handled
                };
            }
            ACPI_PM1A_EVT_PORT..=0x603 => return PioOutcome::Handled,
            _ => {}
        }
        let mut outcome = PioOutcome::Unclaimed;
        for (i, &byte) in data.iter().enumerate() {
            let Some(p) = port.checked_add(i as u16) else {
                break;
            };
            match self.write_byte(p, byte) {
                PioOutcome::Unclaimed => {}
                PioOutcome::Handled => outcome = PioOutcome::Handled,
                end => return end,
            }
        }
        outcome
    }

    fn write_byte(&self, port: u16, byte: u8) -> PioOutcome {
        match port {
            COM1_BASE..=0x3ff => {
                // A failed interrupt injection only delays the guest's view of the UART; output is not lost.
                let _ = lock(&self.serial).write((port - COM1_BASE) as u8, byte);
                PioOutcome::Handled
            }
            I8042_BASE | 0x64 => {
                let _ = lock(&self.i8042).write((port - I8042_BASE) as u8, byte);
                if self.reset.0.swap(false, Ordering::SeqCst) {
                    PioOutcome::ResetRequested
                } else {
                    PioOutcome::Handled
                }
            }
            _ => PioOutcome::Unclaimed,
        }
    }

    /// One `in` of 1, 2 or 4 bytes, split per port like `write`; nothing there reads as all-ones.
    pub fn read(&self, port: u16, data: &mut [u8]) -> PioOutcome {
        let mut outcome = PioOutcome::Unclaimed;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0xff;
            let Some(p) = port.checked_add(i as u16) else {
                continue;
            };
            match p {
                COM1_BASE..=0x3ff => {
                    *byte = lock(&self.serial).read((p - COM1_BASE) as u8);
                    outcome = PioOutcome::Handled;
                }
                I8042_BASE | 0x64 => {
                    *byte = lock(&self.i8042).read((p - I8042_BASE) as u8);
                    outcome = PioOutcome::Handled;
                }
                ACPI_PM1A_EVT_PORT..=0x605 => {
                    // No events pending or enabled; the control register reads SCI_EN: always in ACPI mode.
                    let regs = [0u8, 0, 0, 0, PM1_CNT_SCI_EN as u8, 0];
                    *byte = regs[(p - ACPI_PM1A_EVT_PORT) as usize];
                    outcome = PioOutcome::Handled;
                }
                _ => {}
            }
        }
        outcome
    }

    /// Queues host input for the guest's UART; returns how many bytes fit in its FIFO.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush_serial(&self) {
        let _ = lock(&self.serial).writer_mut().flush();
    }
}

/// A poisoned device lock means a vCPU thread panicked mid-access; the device state is still usable for output.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_exit_reset_and_unclaimed_ports() {
        let sink = Sink::default();
        let (dev, _irq) = PioDevices::new(Box::new(sink.clone())).unwrap();
        for b in b"hi\n" {
            assert_eq!(dev.write(COM1_BASE, &[*b]), PioOutcome::Handled);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(
            dev.write(DEBUG_EXIT_PORT, &7u32.to_le_bytes()),
            PioOutcome::ExitRequested(7)
        );
        assert_eq!(
            dev.write(DEBUG_EXIT_PORT, &[3]),
            PioOutcome::ExitRequested(3)
        );
        assert_eq!(dev.write(0x64, &[0xfe]), PioOutcome::ResetRequested);
        assert_eq!(dev.write(0x64, &[0x00]), PioOutcome::Handled);
        let mut d = [0u8; 2];
        assert_eq!(dev.read(0x1234, &mut d), PioOutcome::Unclaimed);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(dev.write(0x1234, &[1]), PioOutcome::Unclaimed);
    }

    #[test]
    fn acpi_pm1_control_powers_off_on_s5_only() {
        let (dev, _irq) = PioDevices::new(Box::new(Sink::default())).unwrap();
        let mut cnt = [0u8; 2];
        assert_eq!(dev.read(ACPI_PM1A_CNT_PORT, &mut cnt), PioOutcome::Handled);
        assert_eq!(u16::from_le_bytes(cnt) & PM1_CNT_SCI_EN, PM1_CNT_SCI_EN);
        let mut sts = [0xffu8; 2];
        assert_eq!(dev.read(ACPI_PM1A_EVT_PORT, &mut sts), PioOutcome::Handled);
        assert_eq!(sts, [0, 0]);
        let s5 = PM1_CNT_SLP_EN | (ACPI_SLP_TYP_S5 as u16) << 10 | PM1_CNT_SCI_EN;
        assert_eq!(
            dev.write(ACPI_PM1A_CNT_PORT, &s5.to_le_bytes()),
            PioOutcome::ResetRequested
        );
        assert_eq!(
            dev.write(ACPI_PM1A_CNT_PORT + 1, &[(s5 >> 8) as u8]),
            PioOutcome::ResetRequested
        );
        // SLP_TYP without SLP_EN, or another sleep type: nothing happens.
        let typ_only = (ACPI_SLP_TYP_S5 as u16) << 10;
        assert_eq!(
            dev.write(ACPI_PM1A_CNT_PORT, &typ_only.to_le_bytes()),
            PioOutcome::Handled
        );
        let s1 = PM1_CNT_SLP_EN | 1 << 10;
        assert_eq!(
            dev.write(ACPI_PM1A_CNT_PORT, &s1.to_le_bytes()),
            PioOutcome::Handled
        );
        assert_eq!(
            dev.write(ACPI_PM1A_EVT_PORT, &[0xff, 0xff]),
            PioOutcome::Handled
        );
    }

    #[test]
    fn string_and_wide_accesses_split_per_element_and_per_port() {
        let sink = Sink::default();
        let (dev, _irq) = PioDevices::new(Box::new(sink.clone())).unwrap();
        // `rep outsb` of three bytes to THR: three characters.
        assert_eq!(dev.pio_write(COM1_BASE, 1, b"abc"), PioOutcome::Handled);
        assert_eq!(&*sink.0.lock().unwrap(), b"abc");
        // `rep insb` of four bytes from LSR: THR empty each time, not an unclaimed all-ones.
        let mut lsr = [0u8; 4];
        assert_eq!(
            dev.pio_read(COM1_BASE + 5, 1, &mut lsr),
            PioOutcome::Handled
        );
        assert!(
            lsr.iter().all(|&b| b & 0x60 == 0x60 && b != 0xff),
            "{lsr:x?}"
        );
        // A 16-bit read at 0x3fd covers LSR and MSR; at 0x3ff it runs off the UART into nothing.
        let mut w = [0u8; 2];
        dev.read(0x3ff, &mut w);
        assert_eq!(w[1], 0xff);
        // A 32-bit read at the top of the port space stops at 0xffff without wrapping.
        let mut top = [0u8; 4];
        assert_eq!(dev.read(0xfffe, &mut top), PioOutcome::Unclaimed);
        assert_eq!(top, [0xff; 4]);
        // Two 16-bit elements to the exit port: the first ends the VM.
        assert_eq!(
            dev.pio_write(DEBUG_EXIT_PORT, 2, &[5, 0, 6, 0]),
            PioOutcome::ExitRequested(5)
        );
        // A wide write that reaches the i8042 command port with the reset command resets.
        assert_eq!(dev.write(0x63, &[0, 0xfe]), PioOutcome::ResetRequested);
        assert_eq!(dev.pio_write(0x1234, 4, &[0; 8]), PioOutcome::Unclaimed);
    }
}
