//! The destination's migration thread: reads the stream from the socket the monitor
//! accepted, writes pages straight into guest RAM (the guest is not running: state
//! `inmigrate`), collects the vCPU and device state, has the controller put them in, and
//! acknowledges. Anything wrong with the stream fails the load with a reason, which is
//! also sent back to the source.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use ipc::vmm::MigrationStatus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::state::{DeviceState, VcpuState};
use super::stream::{self, PAGE, PageIter, Section, StreamConfig};
use super::{Loaded, MigrationInput, Shared, set_status};
use crate::control::Input;
use crate::memory::RamMap;

/// How long the controller gets to put the state in.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the destination thread uses.
#[derive(Debug)]
pub struct Dest {
    pub sock: File,
    /// The guest-RAM memfd, for its holes.
    pub ram_file: Arc<File>,
    pub mem: Arc<GuestMemoryMmap>,
    pub map: RamMap,
    pub shared: Arc<Shared>,
    pub controller: Sender<Input>,
    pub config: StreamConfig,
}

impl Dest {
    pub fn run(self) {
        self.shared.start_clock();
        set_status(&self.shared, &self.controller, MigrationStatus::Active);
        let result = self.load().and_then(|loaded| {
            let (tx, rx) = channel();
            let _ = self
                .controller
                .send(Input::Migration(MigrationInput::Load(Box::new(loaded), tx)));
            rx.recv_timeout(LOAD_TIMEOUT)
                .map_err(|_| "the machine did not take the migrated state".to_string())?
        });
        let ack = stream::write_section(&mut &self.sock, &Section::Ack(result.clone()));
        let result = result
            .and_then(|()| ack.map_err(|e| format!("acknowledging the load to the source: {e}")));
        let _ = self
            .controller
            .send(Input::Migration(MigrationInput::DestDone(result)));
    }

    fn load(&self) -> Result<Loaded, String> {
        let mut r = BufReader::with_capacity(1 << 20, &self.sock);
        let e = |e: stream::StreamError| e.to_string();
        stream::read_header(&mut r).map_err(e)?;
        let mut configured = false;
        let mut vcpus: Vec<Option<VcpuState>> = (0..self.config.vcpus).map(|_| None).collect();
        let mut devices = None;
        let regions = self.map.regions();
        // Where this side's RAM may hold something (the image it booted): a zero page
        // elsewhere is a hole already, and writing it would only allocate it.
        let mut data = super::data_pages(&self.ram_file, self.map.size())?;
        let (mut bytes, mut zero, mut normal) = (12u64, 0u64, 0u64);
        loop {
            let section = stream::read_section(&mut r).map_err(e)?;
            match section {
                Section::Config(c) => {
                    if c != self.config {
                        return Err(format!(
                            "the source's machine ({} bytes of RAM, {} vCPUs, {} disks) is not \
                             this one ({} bytes, {} vCPUs, {} disks)",
                            c.ram_size,
                            c.vcpus,
                            c.disks,
                            self.config.ram_size,
                            self.config.vcpus,
                            self.config.disks
                        ));
                    }
                    configured = true;
                    continue;
                }
                _ if !configured => {
                    return Err(
                        "migration stream: the first section is not the configuration".into(),
                    );
                }
                Section::Pages(payload) => {
                    bytes += payload.len() as u64 + 9;
                    for record in PageIter::new(&payload) {
                        let record = record.map_err(e)?;
                        let gpa = regions
                            .iter()
                            .find(|g| {
                                record.offset >= g.file_offset
                                    && record.offset + PAGE as u64 <= g.file_offset + g.len
                            })
                            .map(|g| g.gpa + (record.offset - g.file_offset))
                            .ok_or_else(|| {
                                format!(
                                    "migration stream: page at {:#x} is outside guest RAM",
                                    record.offset
                                )
                            })?;
                        let page = record.offset / PAGE as u64;
                        let written = match record.data {
                            Some(bytes) => {
                                normal += 1;
                                if let Some(w) = data.get_mut((page / 64) as usize) {
                                    *w |= 1 << (page % 64);
                                }
                                self.mem.write_slice(bytes, GuestAddress(gpa))
                            }
                            None if !super::page_set(&data, page) => {
                                zero += 1;
                                Ok(())
                            }
                            None => {
                                zero += 1;
                                self.mem.write_slice(&[0u8; PAGE], GuestAddress(gpa))
                            }
                        };
                        written.map_err(|err| format!("writing guest page {gpa:#x}: {err}"))?;
                    }
                    self.shared.update(|i| {
                        i.ram.transferred = bytes;
                        i.ram.duplicate = zero;
                        i.ram.normal = normal;
                        i.ram.normal_bytes = normal * PAGE as u64;
                        i.ram.total = self.config.ram_size;
                    });
                }
                Section::Vcpu { index, state } => {
                    let slot = vcpus.get_mut(index as usize).ok_or_else(|| {
                        format!("migration stream: state for vCPU {index}, which does not exist")
                    })?;
                    *slot = Some(VcpuState::decode(&state)?);
                }
                Section::Devices(d) => devices = Some(DeviceState::decode(&d)?),
                Section::End => break,
                Section::Ack(_) => {
                    return Err("migration stream: an acknowledgement from the source".into());
                }
            }
        }
        let vcpus = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| format!("migration stream: no state for vCPU {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let devices = devices.ok_or("migration stream: no device state")?;
        if devices.disks.len() != self.config.disks as usize {
            return Err(format!(
                "migration stream: state for {} disks, this machine has {}",
                devices.disks.len(),
                self.config.disks
            ));
        }
        Ok(Loaded { vcpus, devices })
    }
}
