//! The source's migration thread: RAM pre-copy with KVM's dirty log and the pages devices
//! wrote, the switch-over when the expected downtime fits `downtime-limit`, then the
//! rest of RAM, the vCPUs and the devices, and the destination's acknowledgement.
//!
//! It writes to the connected socket the monitor handed over (`write` only: vmm-proc
//! creates no socket). `migrate_cancel` sets the shared flag, which is looked at between
//! sections, and the monitor shuts its copy of the socket down, which ends a blocked
//! `write` or `read` at once.
//!
//! The estimator behind `expected-downtime` (docs/migration.md): after each pass, the
//! pages dirtied since the last sync, counted as normal pages (page + record header),
//! divided by the wire bandwidth the last pass achieved (or `avail-switchover-bandwidth`
//! when set), plus the time the last switch-over-sized state (vCPUs and devices) takes at
//! that bandwidth.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use ipc::vmm::{MigrationStatus, VmmEvent};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::stream::{self, PAGE, PageBatch, Section, StreamConfig};
use super::{DevicePages, MigrationInput, Shared, set_status};
use crate::control::Input;
use crate::memory::{RamMap, RamRegion};

/// How long the controller gets to stop the guest and save its state.
const SWITCH_OVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes a normal page costs on the wire: its record header and its data.
const PAGE_WIRE: u64 = PAGE as u64 + 8;

/// Everything the source thread uses.
#[derive(Debug)]
pub struct Source {
    pub sock: File,
    /// The guest-RAM memfd, for its holes.
    pub ram_file: Arc<File>,
    pub vm: Arc<VmFd>,
    pub mem: Arc<GuestMemoryMmap>,
    pub map: RamMap,
    /// Each KVM slot's guest-physical start, length and host address (slot = index).
    pub slots: Vec<(u64, u64, u64)>,
    pub devices: Arc<DevicePages>,
    pub shared: Arc<Shared>,
    pub controller: Sender<Input>,
    pub config: StreamConfig,
}

/// A failure, or the cancel flag seen.
fn cancelled() -> String {
    "migration cancelled".into()
}

/// Running totals of what went on the wire.
#[derive(Debug, Default)]
struct Totals {
    bytes: u64,
    zero: u64,
    normal: u64,
}

impl Source {
    /// Runs the migration to its end and tells the controller how it went.
    pub fn run(self) {
        let mut stopped = false;
        let result = self.migrate(&mut stopped);
        if let Err(e) = self.dirty_logging(false) {
            tracing::warn!("migration: dirty logging off: {e}");
        }
        self.devices.set_active(false);
        let _ = self
            .controller
            .send(Input::Migration(MigrationInput::SourceDone {
                result,
                stopped,
            }));
    }

    fn dirty_logging(&self, on: bool) -> Result<(), String> {
        for (slot, &(gpa, len, host)) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host,
            };
            // SAFETY: the same slot, range and live mapping that were registered at
            // start-up; only the dirty-logging flag changes.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        }
        Ok(())
    }

    fn migrate(&self, stopped: &mut bool) -> Result<(), String> {
        self.shared.start_clock();
        let total_pages = self.map.size() / PAGE as u64;
        self.shared.update(|i| {
            i.ram.total = self.map.size();
            i.ram.remaining = self.map.size();
            i.expected_downtime = self.shared.params().downtime_limit;
        });
        let mut w = BufWriter::with_capacity(1 << 20, &self.sock);
        let io = |e: stream::StreamError| self.stream_failure(e);
        stream::write_header(&mut w).map_err(io)?;
        stream::write_section(&mut w, &Section::Config(self.config)).map_err(io)?;
        self.dirty_logging(true)?;
        self.devices.set_active(true);
        let setup = self.shared.elapsed_ms();
        self.shared.update(|i| i.setup_time = setup);
        set_status(&self.shared, &self.controller, MigrationStatus::Active);

        let words = total_pages.div_ceil(64) as usize;
        let mut pending = vec![!0u64; words];
        if !total_pages.is_multiple_of(64)
            && let Some(last) = pending.last_mut()
        {
            *last = (1u64 << (total_pages % 64)) - 1;
        }
        // After dirty logging is on: a hole the guest writes from now on is dirty again.
        let mut data = Some(super::data_pages(&self.ram_file, self.map.size())?);
        let mut totals = Totals::default();
        let throttle_start = Instant::now();
        // Bytes per ms of the last pass, and the state's size at the switch-over.
        let mut bandwidth;
        let mut sync_count = 0u64;
        let mut last_sync = Instant::now();
        loop {
            let pass_start = Instant::now();
            let before = totals.bytes;
            let holes = data.take();
            self.send_pages(
                &mut w,
                &mut pending,
                &mut totals,
                Some(throttle_start),
                holes.as_deref(),
            )?;
            w.flush().map_err(|e| self.stream_failure(e.into()))?;
            let pass_ms = pass_start.elapsed().as_secs_f64() * 1000.0;
            let sent = totals.bytes - before;
            self.sync(&mut pending)?;
            sync_count += 1;
            let _ = self.controller.send(Input::Migration(MigrationInput::Event(
                VmmEvent::MigrationPass(sync_count),
            )));
            let dirty: u64 = pending.iter().map(|w| u64::from(w.count_ones())).sum();
            let since_sync = last_sync.elapsed().as_secs_f64().max(1e-3);
            last_sync = Instant::now();
            bandwidth = if sent > 0 && pass_ms > 0.0 {
                sent as f64 / pass_ms
            } else {
                f64::INFINITY
            };
            let params = self.shared.params();
            let bw = if params.avail_switchover_bandwidth > 0 {
                params.avail_switchover_bandwidth as f64 / 1000.0
            } else {
                bandwidth
            };
            let expected = estimate_ms(dirty, self.config.vcpus, bw);
            let elapsed_ms = throttle_start.elapsed().as_secs_f64() * 1000.0;
            self.shared.update(|i| {
                i.ram.dirty_sync_count = sync_count;
                i.ram.remaining = dirty * PAGE as u64;
                i.ram.dirty_pages_rate = (dirty as f64 / since_sync) as u64;
                i.ram.mbps = totals.bytes as f64 * 8.0 / elapsed_ms.max(1.0) / 1000.0;
                i.ram.pages_per_second =
                    ((totals.zero + totals.normal) as f64 / elapsed_ms.max(1.0) * 1000.0) as u64;
                i.expected_downtime = expected;
            });
            if self.shared.cancelled() {
                return Err(cancelled());
            }
            if expected <= params.downtime_limit {
                break;
            }
        }

        // The switch-over: stop the guest, send the rest.
        set_status(&self.shared, &self.controller, MigrationStatus::Device);
        let stop_at = Instant::now();
        let (tx, rx) = channel();
        let _ = self
            .controller
            .send(Input::Migration(MigrationInput::SwitchOver(tx)));
        *stopped = true;
        let saved = rx
            .recv_timeout(SWITCH_OVER_TIMEOUT)
            .map_err(|_| self.failure("the guest did not stop for the switch-over".into()))??;
        if self.shared.cancelled() {
            return Err(cancelled());
        }
        self.sync(&mut pending)?;
        for &(gpa, len) in &saved.rings {
            self.mark_gpa(&mut pending, gpa, len);
        }
        let before = totals.bytes;
        self.send_pages(&mut w, &mut pending, &mut totals, None, None)?;
        let mut state_bytes = 0u64;
        for (index, state) in saved.vcpus.into_iter().enumerate() {
            state_bytes += state.len() as u64 + 13;
            let section = Section::Vcpu {
                index: index as u32,
                state,
            };
            stream::write_section(&mut w, &section).map_err(io)?;
        }
        state_bytes += saved.devices.len() as u64 + 9;
        stream::write_section(&mut w, &Section::Devices(saved.devices)).map_err(io)?;
        stream::write_section(&mut w, &Section::End).map_err(io)?;
        w.flush().map_err(|e| self.stream_failure(e.into()))?;
        totals.bytes += state_bytes + 9;
        let downtime_bytes = totals.bytes - before;
        drop(w);
        match stream::read_section(&mut &self.sock) {
            Ok(Section::Ack(Ok(()))) => {}
            Ok(Section::Ack(Err(why))) => {
                return Err(self.failure(format!("the destination failed to load: {why}")));
            }
            Ok(other) => {
                return Err(self.failure(format!(
                    "the destination answered with {other:?} instead of an acknowledgement"
                )));
            }
            Err(e) => {
                return Err(self.failure(format!("no acknowledgement from the destination: {e}")));
            }
        }
        let downtime = stop_at.elapsed().as_millis() as u64;
        let total_time = self.shared.elapsed_ms();
        self.shared.update(|i| {
            i.downtime = downtime;
            i.total_time = total_time;
            i.ram.remaining = 0;
            i.ram.downtime_bytes = downtime_bytes;
            i.ram.precopy_bytes = totals.bytes - downtime_bytes;
            let ms = total_time.saturating_sub(i.setup_time).max(1);
            i.ram.mbps = totals.bytes as f64 * 8.0 / ms as f64 / 1000.0;
        });
        Ok(())
    }

    /// The error for `why`, or the cancellation if that is what caused it (a cancel shuts
    /// the socket down under a blocked write).
    fn failure(&self, why: String) -> String {
        if self.shared.cancelled() {
            cancelled()
        } else {
            why
        }
    }

    /// The error for a failed write: the destination's own reason if it stopped reading
    /// because the stream was bad (it sends that back before it closes), the cancellation
    /// if that is what shut the socket, else the error itself.
    fn stream_failure(&self, e: stream::StreamError) -> String {
        if self.shared.cancelled() {
            return cancelled();
        }
        if let stream::StreamError::Io(io) = &e
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
            && let Ok(Section::Ack(Err(why))) = stream::read_section(&mut &self.sock)
        {
            return format!("the destination failed to load: {why}");
        }
        e.to_string()
    }

    /// Sends every page set in `pending` (clearing it), as zero or normal pages, keeping
    /// to `max-bandwidth` from `throttle` on (no limit when `None`: the guest is stopped).
    /// Pages clear in `data` (holes of the memfd) go as zero pages unread.
    fn send_pages(
        &self,
        w: &mut impl Write,
        pending: &mut [u64],
        totals: &mut Totals,
        throttle: Option<Instant>,
        data: Option<&[u64]>,
    ) -> Result<(), String> {
        let mut batch = PageBatch::default();
        let mut page = vec![0u8; PAGE];
        let regions = self.map.regions();
        let mut flush = |batch: &mut PageBatch, totals: &mut Totals| -> Result<(), String> {
            if batch.is_empty() {
                return Ok(());
            }
            let (zero, normal) = (batch.zero, batch.normal);
            let payload = batch.take();
            batch.zero = 0;
            batch.normal = 0;
            let wire = payload.len() as u64 + 9;
            stream::write_section(w, &Section::Pages(payload))
                .map_err(|e| self.stream_failure(e))?;
            totals.bytes += wire;
            totals.zero += zero;
            totals.normal += normal;
            self.shared.update(|i| {
                i.ram.transferred = totals.bytes;
                i.ram.duplicate = totals.zero;
                i.ram.normal = totals.normal;
                i.ram.normal_bytes = totals.normal * PAGE as u64;
                i.ram.remaining = i
                    .ram
                    .remaining
                    .saturating_sub((zero + normal) * PAGE as u64);
            });
            if self.shared.cancelled() {
                return Err(cancelled());
            }
            let limit = self.shared.params().max_bandwidth;
            if let Some(start) = throttle
                && limit > 0
            {
                let due = Duration::from_secs_f64(totals.bytes as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            Ok(())
        };
        for (wi, word) in pending.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page_index = wi as u64 * 64 + bit;
                let offset = page_index * PAGE as u64;
                let Some(gpa) = gpa_of(&regions, offset) else {
                    continue;
                };
                if data.is_some_and(|d| !super::page_set(d, page_index)) {
                    if batch.push_zero(offset) {
                        flush(&mut batch, totals)?;
                    }
                    continue;
                }
                self.mem
                    .read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| format!("reading guest page {gpa:#x}: {e}"))?;
                if batch.push(offset, &page) {
                    flush(&mut batch, totals)?;
                }
            }
        }
        flush(&mut batch, totals)
    }

    /// Adds KVM's dirty log and the pages devices wrote to `pending`.
    fn sync(&self, pending: &mut [u64]) -> Result<(), String> {
        for (slot, (region, &(_, len, _))) in self.map.regions().iter().zip(&self.slots).enumerate()
        {
            let log = self
                .vm
                .get_dirty_log(slot as u32, len as usize)
                .map_err(|e| self.failure(format!("KVM_GET_DIRTY_LOG: {e}")))?;
            let base = region.file_offset / PAGE as u64;
            for (i, &bits) in log.iter().enumerate() {
                let mut bits = bits;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = base + i as u64 * 64 + bit;
                    if let Some(w) = pending.get_mut((page / 64) as usize) {
                        *w |= 1 << (page % 64);
                    }
                }
            }
        }
        self.devices.take_into(pending);
        Ok(())
    }

    /// Marks the pages of the guest-physical range `[gpa, gpa + len)` in `pending`.
    fn mark_gpa(&self, pending: &mut [u64], gpa: u64, len: u64) {
        let Some(offset) = self.map.file_offset(gpa, len) else {
            return;
        };
        let first = offset / PAGE as u64;
        let last = (offset + len.max(1) - 1) / PAGE as u64;
        for page in first..=last {
            if let Some(w) = pending.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }
}

/// The guest-physical address of the page at memfd `offset`.
fn gpa_of(regions: &[RamRegion], offset: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| offset >= r.file_offset && offset < r.file_offset + r.len)
        .map(|r| r.gpa + (offset - r.file_offset))
}

/// The expected downtime in ms: `dirty` pages as normal pages, plus `vcpus`' state (about
/// 8 KiB each) and the devices' (about 4 KiB), at `bytes_per_ms`.
pub fn estimate_ms(dirty: u64, vcpus: u32, bytes_per_ms: f64) -> u64 {
    if !bytes_per_ms.is_finite() || bytes_per_ms <= 0.0 {
        return 0;
    }
    let bytes = dirty * PAGE_WIRE + u64::from(vcpus) * 8192 + 4096;
    (bytes as f64 / bytes_per_ms).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_grows_with_dirty_pages_and_shrinks_with_bandwidth() {
        // 25 600 dirty pages (100 MiB) at 1 GB/s: about 105 ms.
        let e = estimate_ms(25_600, 1, 1_000_000.0);
        assert!((100..=110).contains(&e), "{e}");
        assert!(estimate_ms(25_600, 1, 2_000_000.0) < e);
        assert!(estimate_ms(51_200, 1, 1_000_000.0) > e);
        assert_eq!(estimate_ms(0, 1, f64::INFINITY), 0);
    }

    #[test]
    fn pages_above_4_gib_map_back_to_their_guest_address() {
        let regions = RamMap::new((3 << 30) + (1 << 20)).regions();
        assert_eq!(gpa_of(&regions, 0x1000), Some(0x1000));
        assert_eq!(gpa_of(&regions, 3 << 30), Some(1 << 32));
        assert_eq!(gpa_of(&regions, (3 << 30) + (1 << 20)), None);
    }
}
