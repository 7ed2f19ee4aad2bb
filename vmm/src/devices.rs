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

    pub fn write(&self, port: u16, data: &[u8]) -> PioOutcome {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                // A failed interrupt injection only delays the guest's view of the UART; output is not lost.
                let _ = lock(&self.serial).write((port - COM1_BASE) as u8, data[0]);
                PioOutcome::Handled
            }
            p @ (I8042_BASE | 0x64) if data.len() == 1 => {
                let _ = lock(&self.i8042).write((p - I8042_BASE) as u8, data[0]);
                if self.reset.0.swap(false, Ordering::SeqCst) {
                    PioOutcome::ResetRequested
                } else {
                    PioOutcome::Handled
                }
            }
            ACPI_PM1A_CNT_PORT..=0x605 => {
                // A 16-bit write, or one byte of it; only SLP_EN with SLP_TYP = S5 does anything.
                let shift = 8 * (port - ACPI_PM1A_CNT_PORT) as u32;
                let v = data
                    .iter()
                    .take(2)
                    .rev()
                    .fold(0u16, |a, b| a << 8 | *b as u16)
                    << shift;
                if v & PM1_CNT_SLP_EN != 0 && (v >> 10) & 7 == ACPI_SLP_TYP_S5 as u16 {
                    PioOutcome::ResetRequested
                } else {
                    PioOutcome::Handled
                }
            }
            ACPI_PM1A_EVT_PORT..=0x603 => PioOutcome::Handled,
            DEBUG_EXIT_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                PioOutcome::ExitRequested(u32::from_le_bytes(v))
            }
            _ => PioOutcome::Unclaimed,
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) -> PioOutcome {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                data[0] = lock(&self.serial).read((port - COM1_BASE) as u8);
                PioOutcome::Handled
            }
            p @ (I8042_BASE | 0x64) if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((p - I8042_BASE) as u8);
                PioOutcome::Handled
            }
            ACPI_PM1A_EVT_PORT..=0x605 => {
                // No events pending or enabled; the control register reads SCI_EN: always in ACPI mode.
                let regs = [0u8, 0, 0, 0, PM1_CNT_SCI_EN as u8, 0];
                let at = (port - ACPI_PM1A_EVT_PORT) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = regs.get(at + i).copied().unwrap_or(0xff);
                }
                PioOutcome::Handled
            }
            _ => {
                data.fill(0xff);
                PioOutcome::Unclaimed
            }
        }
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
}
