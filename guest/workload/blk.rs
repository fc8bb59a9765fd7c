//! virtio-blk on top of [`virtio`](crate::virtio): device set-up (features, config
//! checks, one queue per vCPU or one shared), and request slots on a queue. Slot `s` owns
//! descriptors `3s` (header), `3s+1` (data), `3s+2` (status) and a 32-byte header area, so
//! a used element's id names its slot.

use crate::abi::MAX_VCPUS;
use crate::clock::{Deadline, Secs};
use crate::console::{Fail, fail};
use crate::mem::{Bump, PAGE};
use crate::virtio::{F_INDIRECT_DESC, F_VERSION_1, MAX_QUEUE_SIZE, Queue, Transport};

pub const DEVICE_ID_BLOCK: u32 = 2;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// What the guest takes when offered (docs/guest-abi.md).
const WANTED: u64 = F_VERSION_1
    | F_MQ
    | F_RO
    | F_FLUSH
    | F_BLK_SIZE
    | F_SEG_MAX
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_INDIRECT_DESC;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Written into the status byte before submission: the device must overwrite it.
const S_UNWRITTEN: u8 = 0xff;

/// Most request slots per queue (a full [`MAX_QUEUE_SIZE`] queue, 3 descriptors each).
pub const MAX_SLOTS: usize = MAX_QUEUE_SIZE as usize / 3;

/// How long a request may take before the guest gives up and says so.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// A request's kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
        }
    }
}

/// A disk as set up: what the device said, and how vCPUs reach it.
#[derive(Clone, Copy)]
pub struct DiskInfo {
    /// Position among the disks.
    pub index: usize,
    pub base: u64,
    /// Capacity in bytes.
    pub capacity: u64,
    pub blk_size: u32,
    pub read_only: bool,
    pub flush: bool,
    /// Queues set up: one per vCPU, or 1 shared by all.
    pub queues: usize,
}

impl DiskInfo {
    /// Which queue vCPU `vcpu` uses.
    pub fn queue_of(&self, vcpu: usize) -> usize {
        if self.queues > 1 { vcpu } else { 0 }
    }
}

/// A queue with its request slots.
pub struct BlkQueue {
    q: Queue,
    /// Disk index and base, for messages.
    disk: usize,
    /// Start of the slots' header areas (32 bytes each: header, then status at +16).
    headers: u64,
    slots: usize,
    /// What each slot is doing, if anything (with its sector, for messages). Plain data
    /// with no niche, so the static holding the queues starts all-zero (in `.bss`).
    busy: [Busy; MAX_SLOTS],
}

/// A slot's request: `op` 0 when the slot is free.
#[derive(Clone, Copy)]
struct Busy {
    op: u8,
    sector: u64,
}

const FREE: Busy = Busy { op: 0, sector: 0 };

impl Op {
    fn code(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Flush => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        [Self::Read, Self::Write, Self::Flush]
            .into_iter()
            .find(|o| o.code() == c)
    }
}

/// A finished request.
pub struct Done {
    pub slot: usize,
}

impl BlkQueue {
    fn new(q: Queue, disk: usize, mem: &mut Bump) -> Result<Self, Fail> {
        let slots = usize::from(q.size()) / 3;
        let headers = mem.alloc(32 * slots as u64, PAGE, "virtio-blk request headers")?;
        Ok(Self {
            q,
            disk,
            headers,
            slots,
            busy: [FREE; MAX_SLOTS],
        })
    }

    /// Requests that can be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Puts a request in slot `slot` on the ring (sent at the next [`kick`](Self::kick)).
    /// `buf`/`len` are the data (ignored for a flush).
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, buf: u64, len: u32) {
        assert!(
            slot < self.slots && self.busy[slot].op == 0,
            "slot {slot} busy or past {}",
            self.slots
        );
        let hdr = self.headers + 32 * slot as u64;
        let status = hdr + 16;
        let kind = match op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        // SAFETY: the slot's header area belongs to this queue and no request uses it
        // (the slot is free); the device reads it only after the kick.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, kind);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, sector);
            core::ptr::write_volatile(status as *mut u8, S_UNWRITTEN);
        }
        let d = (slot * 3) as u16;
        if op == Op::Flush {
            self.q.set_desc(d, hdr, 16, false, Some(d + 2));
        } else {
            self.q.set_desc(d, hdr, 16, false, Some(d + 1));
            self.q
                .set_desc(d + 1, buf, len, op == Op::Read, Some(d + 2));
        }
        self.q.set_desc(d + 2, status, 1, true, None);
        self.q.push(d);
        self.busy[slot] = Busy {
            op: op.code(),
            sector,
        };
    }

    /// Sends everything submitted since the last kick, with one notify.
    pub fn kick(&mut self) {
        self.q.kick();
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        usize::from(self.q.outstanding())
    }

    /// A finished request, if any: checks the id and the status.
    pub fn poll(&mut self) -> Option<Result<Done, Fail>> {
        let id = self.q.pop_used()?;
        Some(self.finish(id))
    }

    fn finish(&mut self, id: u32) -> Result<Done, Fail> {
        let slot = (id / 3) as usize;
        let busy = self
            .busy
            .get(slot)
            .copied()
            .filter(|_| id.is_multiple_of(3));
        let Some((op, sector)) = busy.and_then(|b| Some((Op::from_code(b.op)?, b.sector))) else {
            return fail!(
                "disk {} queue {}: device returned id {id}, which is no request in flight",
                self.disk,
                self.q.index()
            );
        };
        self.busy[slot] = FREE;
        // SAFETY: the slot's status byte, written by the device before it returned the
        // chain (we acquired the used index).
        let status = unsafe {
            core::ptr::read_volatile((self.headers + 32 * slot as u64 + 16) as *const u8)
        };
        let what = match status {
            S_OK => return Ok(Done { slot }),
            S_IOERR => "I/O error",
            S_UNSUPP => "unsupported",
            S_UNWRITTEN => "status never written",
            _ => "unknown status",
        };
        fail!(
            "disk {}: {} at sector {sector}: {what} ({status:#x})",
            self.disk,
            op.name()
        )
    }

    /// Waits for the next finished request, up to [`REQUEST_TIMEOUT_MS`].
    pub fn wait(&mut self) -> Result<Done, Fail> {
        let start = crate::clock::now();
        let deadline = Deadline::after_ms(REQUEST_TIMEOUT_MS);
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            if deadline.passed() {
                let (avail, used, seen) = self.q.indices();
                return fail!(
                    "disk {} queue {}: no request finished within {} ({} in flight; avail idx \
                     {avail}, used idx {used}, consumed {seen})",
                    self.disk,
                    self.q.index(),
                    Secs(crate::clock::now() - start),
                    self.in_flight()
                );
            }
            crate::arch::pause();
        }
    }

    /// Waits until nothing is in flight, checking each request.
    pub fn drain(&mut self, mut each: impl FnMut(Done) -> Result<(), Fail>) -> Result<(), Fail> {
        while self.in_flight() > 0 {
            let d = self.wait()?;
            each(d)?;
        }
        Ok(())
    }
}

/// Sets up the virtio-blk device behind `t` for `vcpus` vCPUs; its queues go to
/// `queues[..n]`.
pub fn setup(
    index: usize,
    t: &Transport,
    vcpus: usize,
    mem: &mut Bump,
    queues: &mut dyn FnMut(usize, BlkQueue),
) -> Result<DiskInfo, Fail> {
    t.reset()?;
    let features = t.negotiate(WANTED)?;
    let base = t.base();
    let (sectors, seg_max, blk_size, num_queues) =
        t.config(|c| (c.u64(0x00), c.u32(0x0c), c.u32(0x14), c.u16(0x22)))?;
    let capacity = sectors.saturating_mul(512);
    if sectors == 0 {
        return fail!("disk {index} at {base:#x}: capacity 0");
    }
    let blk_size = if features & F_BLK_SIZE != 0 {
        blk_size
    } else {
        512
    };
    if !blk_size.is_power_of_two() || !(512..=4096).contains(&blk_size) {
        return fail!(
            "disk {index} at {base:#x}: block size {blk_size}; the guest handles 512 to 4096"
        );
    }
    if features & F_SEG_MAX != 0 && seg_max == 0 {
        return fail!("disk {index} at {base:#x}: seg_max 0; a request needs 1 data segment");
    }
    if features & F_MQ != 0 && num_queues == 0 {
        return fail!("disk {index} at {base:#x}: VIRTIO_BLK_F_MQ with num_queues 0");
    }
    let per_vcpu = features & F_MQ != 0 && usize::from(num_queues) >= vcpus && vcpus > 1;
    let n = if per_vcpu { vcpus } else { 1 };
    debug_assert!(n <= MAX_VCPUS);
    for i in 0..n {
        let q = t.setup_queue(i as u16, mem)?;
        queues(i, BlkQueue::new(q, index, mem)?);
    }
    t.driver_ok()?;
    Ok(DiskInfo {
        index,
        base,
        capacity,
        blk_size,
        read_only: features & F_RO != 0,
        flush: features & F_FLUSH != 0,
        queues: n,
    })
}
