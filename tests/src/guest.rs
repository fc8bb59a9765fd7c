//! Hand-assembled test guests: a tiny CPL3 interpreter (`tests/guests/interp.S`, 413 bytes)
//! runs a list of operations that the test builds here, per vCPU: MMIO and memory writes,
//! checks, waits, port I/O. With the virtqueues laid out in the image's data, a test can
//! drive virtio-blk exactly, hostile descriptors included, and knows what must be on disk.
//!
//! Layout (all identity-mapped, the ABI's direct 64-bit entry):
//!
//! | address | what |
//! |---|---|
//! | 0x10_0000 | the interpreter |
//! | 0x20_0000 + i × 0x1_0000 | vCPU i's operations (32 bytes each) |
//! | 0x40_0000 and up | data: strings, buffers, request headers, status bytes, rings |
//!
//! A failed check writes `(operation number << 8) | 1` to the debug-exit port, so
//! splitvmm exits 1; a passing guest ends with [`Guest::pass`] (debug-exit value 0).
//!
//! The same guest can also be packed as a bzImage ([`Guest::bzimage`]) and booted through
//! the Linux path: the loader copies the protected-mode code to 1 MiB, so the layout is the
//! same, and a jump at 1 MiB + 0x200 (the 64-bit entry) leads to the interpreter. It then
//! runs at CPL0 with the loader's page tables, `rsi` pointing at `boot_params`, and `rdi`
//! zero: only vCPU 0 runs (the others wait for an INIT/SIPI the guest never sends).

use std::collections::BTreeMap;
use std::path::Path;

/// The interpreter, assembled from `tests/guests/interp.S`.
pub const INTERP: &[u8] = include_bytes!("../guests/interp.bin");

pub const CODE_BASE: u64 = 0x10_0000;
pub const PROGRAM_BASE: u64 = 0x20_0000;
pub const PROGRAM_STRIDE: u64 = 0x1_0000;
pub const DATA_BASE: u64 = 0x40_0000;

/// The interpreter's operations (see interp.S).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Code {
    W32 = 1,
    W16 = 2,
    W64 = 3,
    R32Eq = 4,
    R8Eq = 5,
    Wait16 = 6,
    Out8 = 7,
    Out32 = 8,
    MemEq = 9,
    Jmp = 10,
    Idle = 11,
    R32Mask = 12,
    Add16 = 13,
    Print = 14,
    Fill8 = 15,
    WaitEq16 = 16,
}

/// Spin rounds for waits: long enough for any real completion, short of forever.
pub const WAIT_ROUNDS: u64 = 1 << 34;

/// A guest under construction.
#[derive(Debug)]
pub struct Guest {
    programs: Vec<Vec<[u64; 4]>>,
    data: BTreeMap<u64, Vec<u8>>,
    next_data: u64,
}

impl Guest {
    /// A guest for `cpus` vCPUs.
    pub fn new(cpus: usize) -> Self {
        Self {
            programs: vec![Vec::new(); cpus],
            data: BTreeMap::new(),
            next_data: DATA_BASE,
        }
    }

    fn op(&mut self, cpu: usize, code: Code, a: u64, b: u64, c: u64) {
        let p = &mut self.programs[cpu];
        assert!(
            ((p.len() + 1) * 32) as u64 <= PROGRAM_STRIDE,
            "vCPU {cpu}'s program is too long"
        );
        p.push([code as u64, a, b, c]);
    }

    /// Places `bytes` in the image's data, aligned, and returns their address.
    pub fn alloc(&mut self, bytes: &[u8], align: u64) -> u64 {
        let at = self.next_data.next_multiple_of(align);
        self.next_data = at + bytes.len() as u64;
        self.data.insert(at, bytes.to_vec());
        at
    }

    /// `len` zero bytes in the image's data.
    pub fn zeroed(&mut self, len: usize, align: u64) -> u64 {
        self.alloc(&vec![0; len], align)
    }

    /// The address the next operation of `cpu` will have (a jump target).
    pub fn here(&self, cpu: usize) -> u64 {
        PROGRAM_BASE + cpu as u64 * PROGRAM_STRIDE + self.programs[cpu].len() as u64 * 32
    }

    pub fn w32(&mut self, cpu: usize, addr: u64, v: u32) {
        self.op(cpu, Code::W32, addr, v.into(), 0);
    }
    pub fn w16(&mut self, cpu: usize, addr: u64, v: u16) {
        self.op(cpu, Code::W16, addr, v.into(), 0);
    }
    pub fn w64(&mut self, cpu: usize, addr: u64, v: u64) {
        self.op(cpu, Code::W64, addr, v, 0);
    }
    /// Fails unless the u32 at `addr` is `v`.
    pub fn expect32(&mut self, cpu: usize, addr: u64, v: u32) {
        self.op(cpu, Code::R32Eq, addr, v.into(), 0);
    }
    /// Fails unless `(u32 at addr) & mask == v`.
    pub fn expect32_masked(&mut self, cpu: usize, addr: u64, mask: u32, v: u32) {
        self.op(cpu, Code::R32Mask, addr, v.into(), mask.into());
    }
    /// Fails unless the byte at `addr` is `v`.
    pub fn expect8(&mut self, cpu: usize, addr: u64, v: u8) {
        self.op(cpu, Code::R8Eq, addr, v.into(), 0);
    }
    /// Waits until the u16 at `addr` is `v` (fails after [`WAIT_ROUNDS`]).
    pub fn wait16(&mut self, cpu: usize, addr: u64, v: u16) {
        self.op(cpu, Code::Wait16, addr, v.into(), WAIT_ROUNDS);
    }
    /// Waits until the u16s at `a` and `b` are equal.
    pub fn wait_equal16(&mut self, cpu: usize, a: u64, b: u64) {
        self.op(cpu, Code::WaitEq16, a, b, WAIT_ROUNDS);
    }
    pub fn add16(&mut self, cpu: usize, addr: u64, v: u16) {
        self.op(cpu, Code::Add16, addr, v.into(), 0);
    }
    pub fn out8(&mut self, cpu: usize, port: u16, v: u8) {
        self.op(cpu, Code::Out8, port.into(), v.into(), 0);
    }
    pub fn out32(&mut self, cpu: usize, port: u16, v: u32) {
        self.op(cpu, Code::Out32, port.into(), v.into(), 0);
    }
    /// Fails unless the `len` bytes at `a` and `b` are equal.
    pub fn expect_same(&mut self, cpu: usize, a: u64, b: u64, len: u64) {
        self.op(cpu, Code::MemEq, a, b, len);
    }
    pub fn fill(&mut self, cpu: usize, addr: u64, byte: u8, len: u64) {
        self.op(cpu, Code::Fill8, addr, byte.into(), len);
    }
    pub fn jump(&mut self, cpu: usize, target: u64) {
        self.op(cpu, Code::Jmp, target, 0, 0);
    }
    /// Spins forever (a vCPU with nothing left to do).
    pub fn idle(&mut self, cpu: usize) {
        self.op(cpu, Code::Idle, 0, 0, 0);
    }
    /// Writes `text` to the serial port.
    pub fn print(&mut self, cpu: usize, text: &str) {
        let at = self.alloc(text.as_bytes(), 1);
        self.op(cpu, Code::Print, at, text.len() as u64, 0);
    }
    /// The boot-timer write.
    pub fn boot_timer(&mut self, cpu: usize) {
        self.out8(cpu, 0xe9, 1);
    }
    /// Prints `workload: PASS` and powers off with the PASS value.
    pub fn pass(&mut self, cpu: usize) {
        self.print(cpu, "workload: PASS\r\n");
        self.out32(cpu, 0xf4, 0);
        self.idle(cpu);
    }

    /// Each piece of the image: `(guest-physical address, bytes)`.
    fn segments(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = vec![(CODE_BASE, INTERP.to_vec())];
        for (i, p) in self.programs.iter().enumerate() {
            let mut bytes = Vec::new();
            for op in p {
                for w in op {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
            }
            // Running off the end is a failed check (operation 0 is unknown).
            bytes.extend_from_slice(&[0; 32]);
            out.push((PROGRAM_BASE + i as u64 * PROGRAM_STRIDE, bytes));
        }
        let mut data = vec![0u8; (self.next_data - DATA_BASE) as usize];
        for (at, bytes) in &self.data {
            let off = (at - DATA_BASE) as usize;
            data[off..off + bytes.len()].copy_from_slice(bytes);
        }
        if !data.is_empty() {
            out.push((DATA_BASE, data));
        }
        out
    }

    /// The guest as a static ELF following docs/guest-abi.md.
    pub fn elf(&self) -> Vec<u8> {
        let segments = self.segments();
        let segments: Vec<(u64, &[u8], u64)> = segments
            .iter()
            .map(|(at, bytes)| (*at, bytes.as_slice(), bytes.len() as u64))
            .collect();
        vmm_proc::loader::testing::static_elf(CODE_BASE, &segments)
    }

    /// The guest as a bzImage for the Linux path (see the module documentation).
    pub fn bzimage(&self) -> Vec<u8> {
        // The ELF's segments, placed at their address minus 1 MiB in the payload.
        let mut payload = vec![0u8; (self.next_data - CODE_BASE) as usize];
        for (at, bytes) in self.segments() {
            let off = (at - CODE_BASE) as usize;
            payload[off..off + bytes.len()].copy_from_slice(&bytes);
        }
        // The 64-bit entry, 0x200 into the code: jmp rel32 back to the interpreter.
        assert!(
            INTERP.len() <= 0x200,
            "the interpreter overlaps the 64-bit entry"
        );
        let rel = -(0x200i32 + 5);
        payload[0x200] = 0xe9;
        payload[0x201..0x205].copy_from_slice(&rel.to_le_bytes());
        vmm_proc::linux::testing::bzimage(&payload)
    }

    /// Writes the ELF to `path` (for `--kernel PATH`).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.elf()).expect("write guest image");
    }
}

/// virtio-mmio registers and status bits.
pub mod mmio {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
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
    pub const CONFIG: u64 = 0x100;
}

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_INDIRECT: u64 = 1 << 28;
pub const F_MQ: u64 = 1 << 12;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;

/// One virtqueue, laid out in the guest's data.
#[derive(Debug)]
pub struct Queue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    size: u16,
    next_desc: u16,
    /// Chains placed on the available ring (made visible by [`Disk::submit`]).
    placed: u16,
}

/// A virtio-blk disk as a test guest drives it (polling; no interrupts).
#[derive(Debug)]
pub struct Disk {
    pub base: u64,
    pub queues: Vec<Queue>,
}

/// The size of every queue the test driver sets up.
pub const QUEUE_SIZE: u16 = 64;

impl Disk {
    /// Finds disk `index`, negotiates `features` (VERSION_1 is added) and sets up `queues`
    /// queues; the driver code runs on vCPU `cpu`.
    pub fn setup(g: &mut Guest, cpu: usize, index: u64, queues: usize, features: u64) -> Self {
        let base = 0xd000_0000 + index * 0x1000;
        let features = features | F_VERSION_1;
        g.expect32(cpu, base + mmio::MAGIC, 0x7472_6976);
        g.expect32(cpu, base + mmio::VERSION, 2);
        g.expect32(cpu, base + mmio::DEVICE_ID, 2);
        g.w32(cpu, base + mmio::STATUS, 0);
        g.w32(cpu, base + mmio::STATUS, 1);
        g.w32(cpu, base + mmio::STATUS, 1 | 2);
        g.w32(cpu, base + mmio::DEVICE_FEATURES_SEL, 1);
        g.expect32_masked(cpu, base + mmio::DEVICE_FEATURES, 1, 1);
        g.w32(cpu, base + mmio::DRIVER_FEATURES_SEL, 0);
        g.w32(cpu, base + mmio::DRIVER_FEATURES, features as u32);
        g.w32(cpu, base + mmio::DRIVER_FEATURES_SEL, 1);
        g.w32(cpu, base + mmio::DRIVER_FEATURES, (features >> 32) as u32);
        g.w32(cpu, base + mmio::STATUS, 1 | 2 | 8);
        g.expect32_masked(cpu, base + mmio::STATUS, 8, 8);
        let mut qs = Vec::new();
        for q in 0..queues {
            let n = usize::from(QUEUE_SIZE);
            let desc = g.zeroed(16 * n, 16);
            // Available ring: flags = NO_INTERRUPT (the guest polls), idx 0.
            let mut avail = vec![0u8; 6 + 2 * n];
            avail[0] = 1;
            let avail = g.alloc(&avail, 2);
            let used = g.zeroed(6 + 8 * n, 4);
            g.w32(cpu, base + mmio::QUEUE_SEL, q as u32);
            g.w32(cpu, base + mmio::QUEUE_NUM, QUEUE_SIZE.into());
            for (reg, addr) in [
                (mmio::QUEUE_DESC_LOW, desc),
                (mmio::QUEUE_DRIVER_LOW, avail),
                (mmio::QUEUE_DEVICE_LOW, used),
            ] {
                g.w32(cpu, base + reg, addr as u32);
                g.w32(cpu, base + reg + 4, (addr >> 32) as u32);
            }
            g.w32(cpu, base + mmio::QUEUE_READY, 1);
            qs.push(Queue {
                desc,
                avail,
                used,
                size: QUEUE_SIZE,
                next_desc: 0,
                placed: 0,
            });
        }
        g.w32(cpu, base + mmio::STATUS, 1 | 2 | 8 | 4);
        g.expect32_masked(cpu, base + mmio::STATUS, 0x4f, 0x0f);
        Self { base, queues: qs }
    }

    /// Writes descriptors as given (`next` relative to the first one placed) into queue
    /// `q`'s table and puts the first on the available ring. Returns the head index.
    pub fn raw_chain(&mut self, g: &mut Guest, q: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let queue = &mut self.queues[q];
        let head = queue.next_desc;
        assert!(
            usize::from(head) + descs.len() <= usize::from(queue.size),
            "descriptor table full"
        );
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&head.wrapping_add(next).to_le_bytes());
            let at = queue.desc + 16 * u64::from(head + i as u16);
            patch(g, at, &d);
        }
        queue.next_desc += descs.len() as u16;
        let slot = queue.avail + 4 + 2 * u64::from(queue.placed % queue.size);
        patch(g, slot, &head.to_le_bytes());
        queue.placed += 1;
        head
    }

    /// Queues a request: a 16-byte header, `data` buffers (device-writable for reads and
    /// get-id), a status byte (0xff until the device writes it). Returns the status address.
    pub fn request(
        &mut self,
        g: &mut Guest,
        q: usize,
        kind: u32,
        sector: u64,
        data: &[(u64, u32)],
    ) -> u64 {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&kind.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&sector.to_le_bytes());
        let header = g.alloc(&header, 16);
        let status = g.alloc(&[0xff], 1);
        let writable = if matches!(kind, T_IN | T_GET_ID) {
            DESC_WRITE
        } else {
            0
        };
        let mut descs = vec![(header, 16, DESC_NEXT, 1u16)];
        for (i, &(addr, len)) in data.iter().enumerate() {
            descs.push((addr, len, writable | DESC_NEXT, i as u16 + 2));
        }
        descs.push((status, 1, DESC_WRITE, 0));
        self.raw_chain(g, q, &descs);
        status
    }

    /// Makes every chain placed so far on queue `q` available, notifies, and waits until
    /// the device has used them all.
    pub fn submit(&self, g: &mut Guest, cpu: usize, q: usize) {
        let queue = &self.queues[q];
        g.w16(cpu, queue.avail + 2, queue.placed);
        g.w32(cpu, self.base + mmio::QUEUE_NOTIFY, q as u32);
        g.wait16(cpu, queue.used + 2, queue.placed);
    }

    /// Fills every slot of queue `q`'s available ring with `head`, for a guest that reuses
    /// one chain in a loop ([`Disk::loop_once`]).
    pub fn ring_of(&mut self, g: &mut Guest, q: usize, head: u16) {
        let queue = &mut self.queues[q];
        for slot in 0..queue.size {
            patch(
                g,
                queue.avail + 4 + 2 * u64::from(slot),
                &head.to_le_bytes(),
            );
        }
    }

    /// Runtime: one more chain available on queue `q`, notify, wait until it is used.
    pub fn loop_once(&self, g: &mut Guest, cpu: usize, q: usize) {
        let queue = &self.queues[q];
        g.add16(cpu, queue.avail + 2, 1);
        g.w32(cpu, self.base + mmio::QUEUE_NOTIFY, q as u32);
        g.wait_equal16(cpu, queue.used + 2, queue.avail + 2);
    }
}

/// Overwrites bytes already allocated in the guest's data.
fn patch(g: &mut Guest, at: u64, bytes: &[u8]) {
    let (&start, region) = g
        .data
        .range_mut(..=at)
        .next_back()
        .expect("patch inside allocated data");
    let off = (at - start) as usize;
    region[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The pattern a test guest writes to block `block` (4 KiB) of a disk: recognisable in a
/// hex dump and different for every block and seed.
pub fn pattern(seed: u8, block: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(31) ^ block.wrapping_mul(97) ^ u64::from(seed)) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The checked-in interpreter is what interp.S assembles to.
    #[test]
    fn the_interpreter_matches_its_source() {
        let dir = crate::TempDir::new("interp");
        let obj = dir.join("interp.o");
        let bin = dir.join("interp.bin");
        let src = crate::repo_root().join("tests/guests/interp.S");
        crate::run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
        crate::run(
            Command::new("objcopy")
                .args(["-O", "binary", "-j", ".text"])
                .arg(&obj)
                .arg(&bin),
        );
        assert_eq!(std::fs::read(&bin).expect("read"), INTERP);
    }

    #[test]
    fn a_guest_image_loads_with_the_vmm_loader() {
        let mut g = Guest::new(2);
        g.print(0, "hello\r\n");
        g.pass(0);
        g.idle(1);
        let image = vmm_proc::loader::Image::parse(&g.elf(), 64 << 20).expect("parse");
        assert_eq!(image.entry, CODE_BASE);
        assert_eq!(image.segments.len(), 4);
    }
}
