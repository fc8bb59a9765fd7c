//! Port I/O and MMIO exits, dispatched to the devices (called on vCPU threads):
//!
//! | ports / addresses | device |
//! |---|---|
//! | 0x3f8-0x3ff | 16550 UART (vm-superio), output to the descriptor the monitor opened, IRQ 4 |
//! | 0x60, 0x64 | i8042, only its reset line: `0xfe` to 0x64 resets the machine (it is also the ACPI reset register the FADT names) |
//! | 0x3c0, 0x3c1 | ACPI sleep control and status registers (hardware-reduced ACPI): S5 (`0x34`) powers the VM off |
//! | 0xe9 | boot timer: the first write is logged with the time since the VM started |
//! | 0xf4 | debug exit: a write powers the VM off with that value (0 = PASS) |
//! | 0xd000_0000 + i × 0x1000 | virtio-mmio disk i |
//!
//! Anything else reads as all ones (ports) or zeros (MMIO) and ignores writes.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{SERIAL_PORT, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::linux::layout::{ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT};
use crate::virtio::mmio::BlkDevice;

/// The 16550's receive FIFO.
const SERIAL_FIFO: usize = 64;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const BOOT_TIMER_PORT: u16 = 0xe9;
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI sleep control register fields: `SLP_TYP` (bits 2-4) and `SLP_EN` (bit 5).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;
/// The `SLP_TYP` the DSDT's `\_S5_` package gives for soft-off.
const SLP_TYP_S5: u8 = 5;

/// What a port write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    None,
    PowerOff(u32),
    Reset,
}

/// Raises the serial IRQ through an irqfd (shared, so a reset can make a fresh UART on
/// the same line).
#[derive(Debug, Clone)]
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes: the monitor's descriptor, or nowhere
/// (`--serial null`). Write errors (a closed terminal) are dropped: the guest must never
/// stall on its console.
#[derive(Debug)]
pub struct SerialOut(pub Option<File>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.0
            && f.write_all(buf).is_err()
        {
            self.0 = None;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART as the bus holds it.
pub type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOut>;

/// Every device a vCPU exit can reach.
#[derive(Debug)]
pub struct Bus {
    serial: Mutex<Uart>,
    disks: Vec<Arc<Mutex<BlkDevice>>>,
    /// When the vCPUs first ran, for the boot timer; the first write to 0xe9 takes it.
    started: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bus {
    pub fn new(serial: Uart, disks: Vec<Arc<Mutex<BlkDevice>>>) -> Self {
        Self {
            serial: Mutex::new(serial),
            disks,
            started: Mutex::new(None),
        }
    }

    /// Every disk's I/O counters.
    pub fn disk_stats(&self) -> Vec<ipc::vmm::DiskStats> {
        self.disks
            .iter()
            .map(|d| {
                let d = lock(d);
                d.stats.report(&d.drive.id)
            })
            .collect()
    }

    /// Starts the boot timer (when the vCPUs first run).
    pub fn start_boot_timer(&self) {
        lock(&self.started).get_or_insert_with(Instant::now);
    }

    /// Re-arms the boot timer (at reset).
    pub fn reset_boot_timer(&self) {
        *lock(&self.started) = None;
    }

    /// Puts the UART back to its power-on registers (interrupts off, no divisor, empty
    /// FIFO), keeping its IRQ line and output, as a machine reset does.
    pub fn reset_serial(&self) {
        let mut serial = lock(&self.serial);
        let trigger = serial.interrupt_evt().clone();
        let out = SerialOut(serial.writer_mut().0.take());
        *serial = Serial::new(trigger, out);
    }

    /// The UART's registers, for migration.
    pub fn serial_state(&self) -> crate::migration::state::SerialRegs {
        lock(&self.serial).state().into()
    }

    /// Takes the source's UART registers, keeping this side's IRQ line and output.
    pub fn restore_serial(&self, s: &crate::migration::state::SerialRegs) -> Result<(), String> {
        // vm-superio's only refusal, checked first so the output is never lost.
        if s.in_buffer.len() > SERIAL_FIFO {
            return Err(format!(
                "serial: {} bytes in a 64-byte FIFO",
                s.in_buffer.len()
            ));
        }
        let mut serial = lock(&self.serial);
        let trigger = serial.interrupt_evt().clone();
        let out = SerialOut(serial.writer_mut().0.take());
        let state = vm_superio::serial::SerialState::from(s);
        *serial = Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(())
    }

    /// The disks' devices.
    pub fn disks(&self) -> &[Arc<Mutex<BlkDevice>>] {
        &self.disks
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut serial = lock(&self.serial);
                // `rep outsb` hands over several bytes for the same register.
                for &b in data {
                    if let Err(e) = serial.write((p - SERIAL_PORT) as u8, b) {
                        tracing::debug!("serial: {e:?}");
                    }
                }
                PioAction::None
            }
            I8042_COMMAND if data.first() == Some(&I8042_RESET) => PioAction::Reset,
            ACPI_SLEEP_CONTROL_PORT => match data.first() {
                Some(&v)
                    if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5 =>
                {
                    tracing::info!("guest: ACPI S5 (soft off)");
                    PioAction::PowerOff(0)
                }
                // Other sleep states are not offered (the DSDT has only \_S5_).
                _ => PioAction::None,
            },
            DEBUG_EXIT_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                PioAction::PowerOff(u32::from_le_bytes(v))
            }
            BOOT_TIMER_PORT => {
                if let Some(t) = lock(&self.started).take() {
                    tracing::info!(
                        "guest boot time: {} us (boot timer port {BOOT_TIMER_PORT:#x})",
                        t.elapsed().as_micros()
                    );
                }
                PioAction::None
            }
            _ => PioAction::None,
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut serial = lock(&self.serial);
                for b in data.iter_mut() {
                    *b = serial.read((p - SERIAL_PORT) as u8);
                }
            }
            // No key, no mouse: the output buffer is always empty.
            I8042_COMMAND | I8042_DATA => data.fill(0),
            // No wake event is ever pending.
            ACPI_SLEEP_CONTROL_PORT | ACPI_SLEEP_STATUS_PORT => data.fill(0),
            // isa-debugcon reads back its own port number.
            BOOT_TIMER_PORT => data.fill(0xe9),
            _ => data.fill(0xff),
        }
    }

    fn disk(&self, addr: u64) -> Option<(&Arc<Mutex<BlkDevice>>, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let index = usize::try_from(off / VIRTIO_MMIO_SIZE).ok()?;
        Some((self.disks.get(index)?, off % VIRTIO_MMIO_SIZE))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.disk(addr) {
            Some((d, off)) => lock(d).read(off, data),
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.disk(addr) {
            lock(d).write(off, data);
        }
    }
}
