//! virtio-mmio version 2 (modern) transport and split virtqueues, driven without
//! interrupts: the guest sets `VIRTQ_AVAIL_F_NO_INTERRUPT`, publishes a batch of
//! descriptors with one notify, and polls the used ring.

use core::sync::atomic::{AtomicU16, Ordering};

use crate::arch::{mfence, mmio_read16, mmio_read32, mmio_write32, pause};
use crate::clock::Deadline;
use crate::console::{Fail, fail};
use crate::mem::{Bump, PAGE};

const MAGIC: u32 = 0x7472_6976; // "virt"

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue the guest sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Spec-bound waits (reset) give up after this.
const REGISTER_WAIT_MS: u64 = 5_000;

/// The register window of one virtio-mmio device.
pub struct Transport {
    base: u64,
}

impl Transport {
    /// A transport at `base`.
    ///
    /// # Safety
    /// `base` must be the start of a virtio-mmio register window (at least 0x200 bytes,
    /// 4-byte aligned), mapped, with nothing else there.
    pub unsafe fn new(base: u64) -> Self {
        Self { base }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    fn read(&self, off: u64) -> u32 {
        // SAFETY: `new`'s contract: the window holds the device's registers.
        unsafe { mmio_read32(self.base + off) }
    }

    fn write(&self, off: u64, v: u32) {
        // SAFETY: as in `read`.
        unsafe { mmio_write32(self.base + off, v) }
    }

    /// Checks magic and version; returns the device ID (0: no device).
    pub fn probe(&self) -> Result<u32, Fail> {
        let magic = self.read(reg::MAGIC);
        if magic != MAGIC {
            return fail!(
                "virtio-mmio at {:#x}: magic {magic:#x}, not \"virt\"",
                self.base
            );
        }
        match self.read(reg::VERSION) {
            2 => Ok(self.read(reg::DEVICE_ID)),
            1 => fail!(
                "virtio-mmio at {:#x} is legacy (version 1); the guest drives version 2 only \
                 (QEMU: -global virtio-mmio.force-legacy=false)",
                self.base
            ),
            v => fail!("virtio-mmio at {:#x}: unknown version {v}", self.base),
        }
    }

    /// Resets the device and waits for the reset to finish.
    pub fn reset(&self) -> Result<(), Fail> {
        self.write(reg::STATUS, 0);
        let deadline = Deadline::after_ms(REGISTER_WAIT_MS);
        while self.read(reg::STATUS) != 0 {
            if deadline.passed() {
                return fail!(
                    "virtio-mmio at {:#x}: status still {:#x} {} s after reset",
                    self.base,
                    self.read(reg::STATUS),
                    REGISTER_WAIT_MS / 1000
                );
            }
            pause();
        }
        Ok(())
    }

    /// Acknowledges the device and negotiates `offered & wanted`; returns the features
    /// taken. The device must offer `VIRTIO_F_VERSION_1` and accept the choice.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, Fail> {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            self.write(reg::STATUS, status::FAILED);
            return fail!(
                "virtio-mmio at {:#x} does not offer VIRTIO_F_VERSION_1 (features {offered:#x})",
                self.base
            );
        }
        let taken = offered & wanted;
        for sel in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (taken >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        let back = self.read(reg::STATUS);
        if back & status::FEATURES_OK == 0 {
            self.write(reg::STATUS, status::FAILED);
            return fail!(
                "virtio-mmio at {:#x} refused features {taken:#x} (status {back:#x})",
                self.base
            );
        }
        Ok(taken)
    }

    /// Reads device config with the generation check (retried while it changes).
    pub fn config<T>(&self, read: impl Fn(&ConfigSpace<'_>) -> T) -> Result<T, Fail> {
        for _ in 0..100 {
            let before = self.read(reg::CONFIG_GENERATION);
            let v = read(&ConfigSpace { t: self });
            if self.read(reg::CONFIG_GENERATION) == before {
                return Ok(v);
            }
        }
        fail!(
            "virtio-mmio at {:#x}: config generation keeps changing",
            self.base
        )
    }

    /// Sets up queue `index` with memory from `mem`: as large as the device allows, up to
    /// [`MAX_QUEUE_SIZE`], a power of two.
    pub fn setup_queue(&self, index: u16, mem: &mut Bump) -> Result<Queue, Fail> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            return fail!(
                "virtio-mmio at {:#x}: queue {index} is already live after reset",
                self.base
            );
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        let cap = max.min(u32::from(MAX_QUEUE_SIZE));
        if cap < 4 {
            return fail!(
                "virtio-mmio at {:#x}: queue {index} holds {max} descriptors; a request needs 3",
                self.base
            );
        }
        // The largest power of two not above `cap`.
        let size = 1u16 << (31 - cap.leading_zeros());
        let n = u64::from(size);
        let desc = mem.alloc(16 * n, PAGE, "virtqueue descriptors")?;
        let avail = mem.alloc(6 + 2 * n, PAGE, "virtqueue available ring")?;
        let used = mem.alloc(6 + 8 * n, PAGE, "virtqueue used ring")?;
        // SAFETY: `avail` was just allocated for this ring (at least 6 bytes, aligned).
        unsafe { core::ptr::write_volatile(avail as *mut u16, AVAIL_F_NO_INTERRUPT) };
        self.write(reg::QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        const _: () = assert!(reg::QUEUE_DESC_HIGH == reg::QUEUE_DESC_LOW + 4);
        const _: () = assert!(reg::QUEUE_DRIVER_HIGH == reg::QUEUE_DRIVER_LOW + 4);
        const _: () = assert!(reg::QUEUE_DEVICE_HIGH == reg::QUEUE_DEVICE_LOW + 4);
        self.write(reg::QUEUE_READY, 1);
        Ok(Queue {
            notify: self.base + reg::QUEUE_NOTIFY,
            index,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Tells the device the driver is ready; fails if it reports trouble.
    pub fn driver_ok(&self) -> Result<(), Fail> {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(reg::STATUS, s);
        self.check_status()
    }

    /// Fails if the device says it needs a reset or has failed.
    pub fn check_status(&self) -> Result<(), Fail> {
        let s = self.read(reg::STATUS);
        if s & (status::NEEDS_RESET | status::FAILED) != 0 {
            return fail!(
                "virtio-mmio at {:#x}: device status {s:#x} (needs reset or failed)",
                self.base
            );
        }
        Ok(())
    }
}

/// Reads of the device-specific config space, at natural widths (64-bit fields as two
/// 32-bit reads, as virtio-mmio requires).
pub struct ConfigSpace<'a> {
    t: &'a Transport,
}

impl ConfigSpace<'_> {
    pub fn u16(&self, off: u64) -> u16 {
        // SAFETY: config space is part of the device's register window.
        unsafe { mmio_read16(self.t.base + reg::CONFIG + off) }
    }

    pub fn u32(&self, off: u64) -> u32 {
        self.t.read(reg::CONFIG + off)
    }

    pub fn u64(&self, off: u64) -> u64 {
        u64::from(self.u32(off)) | (u64::from(self.u32(off + 4)) << 32)
    }
}

/// A split virtqueue in guest RAM, polled.
pub struct Queue {
    notify: u64,
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The available index as the guest will publish it.
    next_avail: u16,
    /// Used elements consumed so far.
    last_used: u16,
}

// SAFETY: a Queue owns its ring memory exclusively; moving it to another vCPU (under a
// lock) moves that ownership.
unsafe impl Send for Queue {}

impl Queue {
    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Writes descriptor `i`. `device_writes`: the device writes the buffer (a read).
    pub fn set_desc(
        &mut self,
        i: u16,
        addr: u64,
        len: u32,
        device_writes: bool,
        next: Option<u16>,
    ) {
        assert!(
            i < self.size,
            "descriptor {i} past queue size {}",
            self.size
        );
        let mut flags = if device_writes { DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        let d = self.desc + 16 * u64::from(i);
        // SAFETY: descriptor i lies in this queue's descriptor table; the device reads it
        // only after the available index that covers it is published (release store).
        unsafe {
            core::ptr::write_volatile(d as *mut u64, addr);
            core::ptr::write_volatile((d + 8) as *mut u32, len);
            core::ptr::write_volatile((d + 12) as *mut u16, flags);
            core::ptr::write_volatile((d + 14) as *mut u16, next.unwrap_or(0));
        }
    }

    /// Puts a descriptor chain on the available ring (not yet visible: see [`kick`](Self::kick)).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: the slot lies in this queue's available ring.
        unsafe { core::ptr::write_volatile((self.avail + 4 + 2 * slot) as *mut u16, head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: avail+2 is the 2-byte aligned `idx` of this queue's available ring,
        // shared with the device for the VM's lifetime.
        unsafe { AtomicU16::from_ptr((self.avail + 2) as *mut u16) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: as in `avail_idx`, for the used ring's `idx`.
        unsafe { AtomicU16::from_ptr((self.used + 2) as *mut u16) }
    }

    fn used_flags(&self) -> u16 {
        // SAFETY: `flags` of this queue's used ring.
        unsafe { core::ptr::read_volatile(self.used as *const u16) }
    }

    /// Publishes what was pushed and notifies the device once (unless it asked not to be).
    pub fn kick(&mut self) {
        self.avail_idx().store(self.next_avail, Ordering::Release);
        // The device may stop polling and set NO_NOTIFY=0 between our store and our read
        // of the flag: the full fence orders them (virtio spec 2.7.13.3).
        mfence();
        if self.used_flags() & USED_F_NO_NOTIFY == 0 {
            // SAFETY: the notify register of this queue's device.
            unsafe { mmio_write32(self.notify, u32::from(self.index)) };
        }
    }

    /// The head of the next chain the device returned, if any. (Its `len` is not
    /// looked at: the data itself is checked.)
    pub fn pop_used(&mut self) -> Option<u32> {
        if self.used_idx().load(Ordering::Acquire) == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: element `last_used` of this queue's used ring, written by the device
        // before it published the index we acquired above.
        let id = unsafe { core::ptr::read_volatile(e as *const u32) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(id)
    }

    /// Chains published and not yet returned.
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// The device's used index and ours, for reports.
    pub fn indices(&self) -> (u16, u16, u16) {
        (
            self.next_avail,
            self.used_idx().load(Ordering::Relaxed),
            self.last_used,
        )
    }
}
