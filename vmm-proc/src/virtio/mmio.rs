//! One virtio-blk device behind a virtio-mmio version 2 register window (virtio 1.2
//! §4.2.2): feature negotiation, queue set-up, status and interrupt registers, and the
//! `virtio_blk_config` space. vCPU threads read and write the registers; the I/O thread
//! pops requests and completes them through the same lock.
//!
//! Queue notifications arrive on ioeventfds (one per queue, matched on the queue index
//! written to `QueueNotify`), so a notify costs the vCPU no exit to user space; a notify
//! that still reaches [`BlkDevice::write`] is forwarded to the same eventfd.

use std::sync::Arc;
use std::time::Instant;

use ipc::block::OnError;
use ipc::vmm::{DiskStats, OpStats};
use ipc::vmm_block::GuestDrive;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::blk::{self, Acct, DiskInfo, MAX_RANGES, Parsed, SECTOR};
use super::features::*;
use crate::memory::RamMap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_ID_BLOCK: u32 = 2;
/// "SVMM".
const VENDOR_ID: u32 = 0x4d4d_5653;
/// Every queue's size.
pub const QUEUE_SIZE: u16 = 256;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The register offsets of virtio-mmio version 2.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Per-device I/O counters (`query-blockstats`).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub rd: OpStats,
    pub wr: OpStats,
    pub flush: OpStats,
    pub unmap: OpStats,
    pub wr_highest_offset: u64,
    /// When the last request completed.
    pub last_io: Option<Instant>,
}

impl Stats {
    /// The counters of `acct`, if it has any.
    pub fn of(&mut self, acct: Acct) -> Option<&mut OpStats> {
        match acct {
            Acct::Read => Some(&mut self.rd),
            Acct::Write => Some(&mut self.wr),
            Acct::Flush => Some(&mut self.flush),
            Acct::Unmap => Some(&mut self.unmap),
            Acct::None => None,
        }
    }

    /// The counters as `query-blockstats` reports them for disk `id`.
    pub fn report(&self, id: &str) -> DiskStats {
        DiskStats {
            id: id.to_string(),
            rd: self.rd,
            wr: self.wr,
            flush: self.flush,
            unmap: self.unmap,
            wr_highest_offset: self.wr_highest_offset,
            idle_ns: self
                .last_io
                .map(|t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        }
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct BlkDevice {
    pub index: usize,
    pub drive: GuestDrive,
    mem: Arc<GuestMemoryMmap>,
    ram: RamMap,
    avail_features: u64,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    interrupt_status: u32,
    activated: bool,
    /// Bumped at every reset: completions of requests from before it are dropped.
    generation: u64,
    irq: EventFd,
    notify: Vec<EventFd>,
    config: Vec<u8>,
    pub stats: Stats,
    /// What a failed write (or flush, discard, write-zeroes) does.
    pub werror: OnError,
    /// What a failed read does.
    pub rerror: OnError,
}

impl BlkDevice {
    /// A device for `drive` with `queues` queues (one per vCPU: `VIRTIO_BLK_F_MQ`), raising
    /// `irq` and notified through `notify` (one eventfd per queue).
    pub fn new(
        index: usize,
        drive: GuestDrive,
        mem: Arc<GuestMemoryMmap>,
        ram: RamMap,
        irq: EventFd,
        notify: Vec<EventFd>,
    ) -> Result<Self, virtio_queue::Error> {
        let n = notify.len().max(1);
        let queues = (0..n)
            .map(|_| Queue::new(QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()?;
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES;
        if drive.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        if n > 1 {
            avail_features |= VIRTIO_BLK_F_MQ;
        }
        let config = config_space(drive.size_bytes / SECTOR, n as u16);
        Ok(Self {
            index,
            drive,
            mem,
            ram,
            avail_features,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues,
            status: 0,
            interrupt_status: 0,
            activated: false,
            generation: 0,
            irq,
            notify,
            config,
            stats: Stats::default(),
            werror: OnError::Enospc,
            rerror: OnError::Report,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Back to the state before the driver found the device (status 0, or machine reset).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.generation += 1;
    }

    /// The transport's state, for migration (the VM is paused and drained).
    pub fn save_state(&self) -> crate::migration::state::BlkRegs {
        use crate::migration::state::{BlkRegs, QueueRegs};
        BlkRegs {
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueRegs {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Takes the source's transport state (on the destination, before the guest runs).
    /// The queues are validated as a driver's would be; the device keeps its own features
    /// offer, and the driver's must be a subset of it.
    pub fn restore_state(&mut self, s: &crate::migration::state::BlkRegs) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "disk {}: {} queues on the source, {} here",
                self.index,
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.acked_features & !self.avail_features != 0 {
            return Err(format!(
                "disk {}: the source's driver acked features {:#x} not offered here",
                self.index, s.acked_features
            ));
        }
        let mut queues = Vec::new();
        for (i, q) in s.queues.iter().enumerate() {
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(
                Queue::try_from(state)
                    .map_err(|e| format!("disk {}: queue {i}: {e}", self.index))?,
            );
        }
        self.queues = queues;
        self.acked_features = s.acked_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.activated = s.activated;
        Ok(())
    }

    /// The guest-physical ranges of every ready queue's rings: the device writes the used
    /// ring from the I/O thread, which KVM's dirty log does not see.
    pub fn ring_ranges(&self) -> Vec<(u64, u64)> {
        let n = u64::from(QUEUE_SIZE);
        self.queues
            .iter()
            .filter(|q| q.ready())
            .flat_map(|q| {
                [
                    (q.desc_table(), 16 * n),
                    (q.avail_ring(), 6 + 2 * n),
                    (q.used_ring(), 6 + 8 * n),
                ]
            })
            .collect()
    }

    fn info(&self) -> DiskInfo {
        DiskInfo {
            capacity_sectors: self.drive.size_bytes / SECTOR,
            read_only: self.drive.read_only,
            features: self.acked_features,
            ram: self.ram,
        }
    }

    /// Takes every request the driver made available on queue `q`, with notifications
    /// suppressed meanwhile. They are re-armed at the end (and the ring looked at once
    /// more, so none is missed) only if the queue is left with nothing in flight: `busy`
    /// says requests of this queue were in flight already, and any request taken now is
    /// too. While a queue has requests in flight the I/O thread looks at it again at each
    /// of their completions, so the driver need not notify (each notify is a guest exit).
    pub fn pop_requests(&mut self, q: usize, busy: bool) -> Vec<Parsed> {
        let info = self.info();
        let mut out = Vec::new();
        if !self.activated {
            return out;
        }
        let mem = &*self.mem;
        let Some(queue) = self.queues.get_mut(q).filter(|q| q.ready()) else {
            return out;
        };
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("disk {}: queue {q}: {e}", self.index);
            }
            let iter = match queue.iter(mem) {
                Ok(i) => i,
                Err(e) => {
                    // A corrupt available index: the driver broke the ring.
                    tracing::warn!("disk {}: queue {q}: {e}; device needs reset", self.index);
                    self.status |= STATUS_NEEDS_RESET;
                    self.interrupt_status |= INT_CONFIG;
                    let _ = self.irq.write(1);
                    return out;
                }
            };
            for chain in iter {
                out.push(blk::parse(mem, chain, &info));
            }
            if busy || out.iter().any(|p| matches!(p, Parsed::Submit(_))) {
                break;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("disk {}: queue {q}: {e}", self.index);
                    break;
                }
            }
        }
        out
    }

    /// Asks the driver not to notify queue `q` (`VIRTQ_USED_F_NO_NOTIFY`): the I/O thread
    /// is looking at it anyway. [`BlkDevice::pop_requests`] turns notifications back on.
    pub fn suppress_notifications(&mut self, q: usize) {
        let mem = &*self.mem;
        if let Some(queue) = self.queues.get_mut(q).filter(|q| q.ready())
            && self.activated
            && let Err(e) = queue.disable_notification(mem)
        {
            tracing::warn!("disk {}: queue {q}: {e}", self.index);
        }
    }

    /// Whether the driver has made requests available on queue `q` that are not popped yet.
    pub fn has_available(&self, q: usize) -> bool {
        let Some(queue) = self.queues.get(q).filter(|q| q.ready()) else {
            return false;
        };
        self.activated
            && queue
                .avail_idx(&*self.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Finishes request `head` of queue `q`: writes its status byte (unless `status_gpa`
    /// is `None`) and puts it on the used ring with `used_len`.
    pub fn complete(&mut self, q: usize, head: u16, status: Option<(u64, u8)>, used_len: u32) {
        let mem = &*self.mem;
        if let Some((gpa, s)) = status
            && let Err(e) = mem.write_obj(s, GuestAddress(gpa))
        {
            tracing::warn!("disk {}: status byte at {gpa:#x}: {e}", self.index);
        }
        if let Some(queue) = self.queues.get_mut(q)
            && let Err(e) = queue.add_used(mem, head, used_len)
        {
            tracing::warn!("disk {}: queue {q}: used ring: {e}", self.index);
        }
    }

    /// Interrupts the guest if it wants to hear about used buffers on queue `q` (event
    /// idx, or no `VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn signal_used(&mut self, q: usize) {
        let mem = &*self.mem;
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        let wanted = if queue.event_idx_enabled() {
            queue.needs_notification(mem).unwrap_or(true)
        } else {
            let flags: u16 = mem.read_obj(GuestAddress(queue.avail_ring())).unwrap_or(0);
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        if wanted {
            self.interrupt_status |= INT_USED_RING;
            if let Err(e) = self.irq.write(1) {
                tracing::warn!("disk {}: irqfd: {e}", self.index);
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read by the guest.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            // Any width; bytes past the structure read as zero.
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let features_page = |f: u64, sel: u32| match sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        };
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => DEVICE_ID_BLOCK,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => features_page(self.avail_features, self.device_features_sel),
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A register write by the guest.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            return; // the config space is read-only (no writeback toggle is offered)
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        // Queue registers may change only while the queue is off and the driver not live.
        let queue_setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                let (mask, shift) = match self.driver_features_sel {
                    0 => (0xffff_ffffu64, 0),
                    1 => (0xffff_ffff << 32, 32),
                    _ => return,
                };
                self.acked_features = (self.acked_features & !mask) | (u64::from(v) << shift);
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; forward what was not.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            _ if !queue_setup => {}
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    reg::QUEUE_NUM if !q.ready() => q.set_size(v as u16),
                    reg::QUEUE_READY => q.set_ready(v == 1),
                    reg::QUEUE_DESC_LOW if !q.ready() => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH if !q.ready() => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_DRIVER_LOW if !q.ready() => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_DRIVER_HIGH if !q.ready() => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_DEVICE_LOW if !q.ready() => q.set_used_ring_address(Some(v), None),
                    reg::QUEUE_DEVICE_HIGH if !q.ready() => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut new = v;
        if new & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let unknown = self.acked_features & !self.avail_features;
            if unknown != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                // The driver reads FEATURES_OK back and gives up.
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && !self.activated {
            let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
            let mem = &*self.mem;
            let mut ok = new & STATUS_FEATURES_OK != 0;
            for q in self.queues.iter_mut().filter(|q| q.ready()) {
                q.set_event_idx(event_idx);
                ok &= q.is_valid(mem);
            }
            if ok {
                self.activated = true;
            } else {
                tracing::warn!(
                    "disk {}: driver set DRIVER_OK with unusable queues",
                    self.index
                );
                new |= STATUS_NEEDS_RESET;
                self.interrupt_status |= INT_CONFIG;
                let _ = self.irq.write(1);
            }
        }
        self.status = new | (self.status & STATUS_NEEDS_RESET);
    }
}

/// `struct virtio_blk_config` (virtio 1.2 §5.2.4), as far as the offered features use it.
fn config_space(capacity: u64, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 0x3c];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x00, &capacity.to_le_bytes());
    put(0x0c, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
    put(0x14, &(SECTOR as u32).to_le_bytes()); // blk_size
    put(0x22, &queues.to_le_bytes()); // num_queues
    put(0x24, &(1u32 << 22).to_le_bytes()); // max_discard_sectors (2 GiB)
    put(0x28, &MAX_RANGES.to_le_bytes()); // max_discard_seg
    put(0x2c, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    put(0x30, &(1u32 << 22).to_le_bytes()); // max_write_zeroes_sectors
    put(0x34, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(0x38, &[1]); // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(read_only: bool, queues: usize) -> BlkDevice {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let efd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        BlkDevice::new(
            0,
            GuestDrive {
                id: "disk0".into(),
                size_bytes: 1 << 20,
                read_only,
            },
            Arc::new(mem),
            RamMap::new(1 << 20),
            efd(),
            (0..queues).map(|_| efd()).collect(),
        )
        .expect("device")
    }

    fn r(d: &mut BlkDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &mut BlkDevice, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identifies_as_a_modern_block_device() {
        let mut d = device(true, 2);
        assert_eq!((r(&mut d, 0), r(&mut d, 4), r(&mut d, 8)), (MAGIC, 2, 2));
        w(&mut d, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut d, reg::DEVICE_FEATURES), 1, "VERSION_1");
        w(&mut d, reg::DEVICE_FEATURES_SEL, 0);
        let f = r(&mut d, reg::DEVICE_FEATURES);
        assert_ne!(f & (1 << 5), 0, "RO");
        assert_ne!(f & (1 << 12), 0, "MQ");
        assert_eq!(r(&mut d, reg::CONFIG), 2048, "capacity in sectors");
        let mut nq = [0u8; 2];
        d.read(reg::CONFIG + 0x22, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 2);
        assert_eq!(r(&mut d, reg::QUEUE_NUM_MAX), 256);
        w(&mut d, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut d, reg::QUEUE_NUM_MAX), 0, "no third queue");
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let mut d = device(false, 1);
        w(&mut d, reg::STATUS, 1 | 2);
        w(&mut d, reg::DRIVER_FEATURES, 1 << 9);
        w(&mut d, reg::STATUS, 1 | 2 | 8);
        assert_eq!(r(&mut d, reg::STATUS) & 8, 0, "legacy driver refused");
        w(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut d, reg::DRIVER_FEATURES, 1 | (1 << 20));
        w(&mut d, reg::STATUS, 1 | 2 | 8);
        assert_eq!(r(&mut d, reg::STATUS) & 8, 0, "unknown feature refused");
        w(&mut d, reg::DRIVER_FEATURES, 1);
        w(&mut d, reg::STATUS, 1 | 2 | 8);
        assert_ne!(r(&mut d, reg::STATUS) & 8, 0);
        // DRIVER_OK with a queue whose rings lie outside RAM: needs reset.
        w(&mut d, reg::QUEUE_NUM, 16);
        w(&mut d, reg::QUEUE_DESC_LOW, 0xfff0_0000);
        w(&mut d, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut d, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut d, reg::QUEUE_READY, 1);
        w(&mut d, reg::STATUS, 1 | 2 | 8 | 4);
        assert_ne!(r(&mut d, reg::STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(d.pop_requests(0, false).is_empty());
        let g = d.generation();
        w(&mut d, reg::STATUS, 0);
        assert_eq!((r(&mut d, reg::STATUS), d.generation()), (0, g + 1));
        assert_eq!(r(&mut d, reg::QUEUE_READY), 0);
    }

    #[test]
    fn odd_register_accesses_are_harmless() {
        let mut d = device(false, 1);
        let mut b = [0xaau8; 2];
        d.read(reg::STATUS, &mut b);
        assert_eq!(b, [0, 0]);
        d.write(reg::STATUS, &[1, 2]);
        d.write(reg::STATUS + 1, &[1, 2, 3, 4]);
        d.write(reg::CONFIG, &[0xff; 8]);
        w(&mut d, reg::QUEUE_SEL, u32::MAX);
        w(&mut d, reg::QUEUE_NUM, 7);
        w(&mut d, reg::QUEUE_NOTIFY, u32::MAX);
        let mut big = [0u8; 8];
        d.read(0xfff, &mut big);
        assert_eq!(r(&mut d, reg::STATUS), 0);
    }
}
