//! vCPU 0's set-up: the start info and command line, the TSC frequency, every virtio-blk
//! device, the checks that the program can run, and the RAM layout each vCPU works in
//! (buffers, write records, its share of the free RAM).

use crate::abi::{self, MAX_DISKS, MAX_VCPUS};
use crate::blk::{self, BlkQueue, DEVICE_ID_BLOCK, DiskInfo};
use crate::cmdline::{self, Config, Program};
use crate::console::{Fail, fail, say};
use crate::mem::{Bump, PAGE, image_end};
use crate::pattern::BLOCK_SIZE;
use crate::programs;
use crate::sync::{SpinGuard, SpinLock};
use crate::virtio::Transport;
use crate::{boot, clock};

/// Queue `q` of disk `d` is `QUEUES[d * MAX_VCPUS + q]`.
static QUEUES: [SpinLock<Option<BlkQueue>>; MAX_DISKS * MAX_VCPUS] =
    [const { SpinLock::new(None) }; MAX_DISKS * MAX_VCPUS];

/// The smallest register window the guest accepts (QEMU's is 0x200).
const MIN_WINDOW: u64 = 0x200;

/// One vCPU's RAM.
#[derive(Clone, Copy, Default)]
pub struct Area {
    /// Request buffers: `buf_count` of `buf_len` bytes each.
    pub bufs: u64,
    pub buf_count: usize,
    pub buf_len: u64,
    /// Per disk, the `u32` generation record of each block of the share (write-verify-loop).
    pub records: [u64; MAX_DISKS],
    /// Free RAM for `dirty`: [start, end), page-aligned.
    pub free: (u64, u64),
}

/// Everything the vCPUs share, written once by vCPU 0.
pub struct Setup {
    pub cfg: Config,
    pub vcpus: usize,
    disks: [Option<DiskInfo>; MAX_DISKS],
    pub areas: [Area; MAX_VCPUS],
}

impl Setup {
    /// The disks, in command-line order.
    pub fn disks(&self) -> impl Iterator<Item = &DiskInfo> {
        self.disks.iter().map_while(Option::as_ref)
    }

    /// The bytes of `disk` the program uses, from its start.
    pub fn region(&self, disk: &DiskInfo) -> u64 {
        region(&self.cfg, disk)
    }

    /// The queue vCPU `vcpu` uses on `disk`, locked (waiting for another vCPU sharing it
    /// at most twice the request timeout).
    pub fn queue(
        &self,
        disk: &DiskInfo,
        vcpu: usize,
    ) -> Result<SpinGuard<'static, Option<BlkQueue>>, Fail> {
        let q = disk.queue_of(vcpu);
        let deadline = clock::Deadline::after_ms(2 * blk::REQUEST_TIMEOUT_MS);
        match QUEUES[disk.index * MAX_VCPUS + q].lock_until(|| deadline.passed()) {
            Some(g) if g.is_some() => Ok(g),
            Some(_) => fail!("disk {} has no queue {q}", disk.index),
            None => fail!(
                "disk {} queue {q}: another vCPU held it for {} s",
                disk.index,
                2 * blk::REQUEST_TIMEOUT_MS / 1000
            ),
        }
    }
}

fn region(cfg: &Config, disk: &DiskInfo) -> u64 {
    cfg.bytes
        .unwrap_or(disk.capacity / BLOCK_SIZE as u64 * BLOCK_SIZE as u64)
}

/// Does vCPU 0's set-up.
pub fn run(start_info: u64, vcpus: usize) -> Result<Setup, Fail> {
    let info = boot::read(start_info)?;
    say!(
        0,
        "workload: {vcpus} vCPU(s), RAM to {} MiB, command line \"{}\"",
        info.ram_top >> 20,
        info.cmdline
    );
    let cfg = match cmdline::parse(info.cmdline) {
        Ok(c) => c,
        Err(e) => return fail!("command line: {}: {}", e.word, e.why),
    };
    let (hz, source) = clock::calibrate(cfg.tsc_khz);
    say!(0, "tsc: {} kHz from {}", hz / 1000, source.name());

    let mut mem = Bump::new(info.ram_top);
    let mut disks: [Option<DiskInfo>; MAX_DISKS] = [None; MAX_DISKS];
    let mut n = 0;
    for d in cfg.devices() {
        if d.base % 4 != 0 || d.size < MIN_WINDOW || d.base.saturating_add(d.size) > 1 << 32 {
            return fail!(
                "virtio_mmio.device={:#x}@{:#x}: the window must be 4-byte aligned, at least \
                 {MIN_WINDOW:#x} bytes and below 4 GiB",
                d.size,
                d.base
            );
        }
        // SAFETY: the VMM names this window as a virtio-mmio device; it lies in the
        // identity-mapped 0-4 GiB (checked above) and the guest uses it for nothing else.
        let t = unsafe { Transport::new(d.base) };
        match t.probe()? {
            DEVICE_ID_BLOCK => {}
            0 => return fail!("virtio-mmio at {:#x}: no device behind it (id 0)", d.base),
            id => {
                say!(
                    0,
                    "virtio-mmio at {:#x}: device id {id}, not a block device; skipped",
                    d.base
                );
                continue;
            }
        }
        let disk = blk::setup(n, &t, vcpus, &mut mem, &mut |q, bq| {
            *QUEUES[n * MAX_VCPUS + q].lock() = Some(bq);
        })?;
        say!(
            0,
            "disk {n}: virtio-blk at {:#x}, {} MiB, block size {}, {} queue(s){}{}",
            disk.base,
            disk.capacity >> 20,
            disk.blk_size,
            disk.queues,
            if disk.read_only { ", read-only" } else { "" },
            if disk.flush { ", flush" } else { "" },
        );
        disks[n] = Some(disk);
        n += 1;
    }
    check_program(&cfg, vcpus, disks.iter().map_while(Option::as_ref))?;
    let areas = layout(&cfg, vcpus, &disks, &mut mem)?;
    Ok(Setup {
        cfg,
        vcpus,
        disks,
        areas,
    })
}

/// Refuses what the program cannot do with these disks, before any vCPU starts on it.
fn check_program<'a>(
    cfg: &Config,
    vcpus: usize,
    disks: impl Iterator<Item = &'a DiskInfo> + Clone,
) -> Result<(), Fail> {
    let p = cfg.program;
    if p.needs_disk() && disks.clone().next().is_none() {
        return fail!(
            "run={} needs a virtio-blk disk; the command line names none (virtio_mmio.device=)",
            p.name()
        );
    }
    for d in disks {
        if p.writes(cfg.mode) && d.read_only {
            return fail!("run={} writes, and disk {} is read-only", p.name(), d.index);
        }
        let bytes = region(cfg, d);
        if p.needs_disk() && (bytes > d.capacity || bytes == 0) {
            return fail!(
                "disk {}: bytes={bytes} but the disk holds {} (whole 4 KiB blocks: {})",
                d.index,
                d.capacity,
                d.capacity / BLOCK_SIZE as u64 * BLOCK_SIZE as u64
            );
        }
        if p == Program::Bench {
            if !cfg.bs.is_multiple_of(u64::from(d.blk_size)) {
                return fail!(
                    "bs={} is not a multiple of disk {}'s block size {}",
                    cfg.bs,
                    d.index,
                    d.blk_size
                );
            }
            if bytes / cfg.bs < vcpus as u64 {
                return fail!(
                    "disk {}: {bytes} bytes hold fewer than one bs={} request per vCPU",
                    d.index,
                    cfg.bs
                );
            }
            if vcpus > 1 && d.queues == 1 {
                return fail!(
                    "run=bench with {vcpus} vCPUs needs a queue per vCPU (VIRTIO_BLK_F_MQ); \
                     disk {} has one queue",
                    d.index
                );
            }
        }
    }
    Ok(())
}

/// Lays out each vCPU's buffers and records, then shares out what RAM is left.
fn layout(
    cfg: &Config,
    vcpus: usize,
    disks: &[Option<DiskInfo>; MAX_DISKS],
    mem: &mut Bump,
) -> Result<[Area; MAX_VCPUS], Fail> {
    let mut areas = [Area::default(); MAX_VCPUS];
    let (buf_count, buf_len) = programs::buffers(cfg);
    for (vcpu, area) in areas.iter_mut().enumerate().take(vcpus) {
        area.buf_count = buf_count;
        area.buf_len = buf_len;
        if buf_count > 0 {
            area.bufs = mem.alloc(buf_count as u64 * buf_len, PAGE, "request buffers")?;
        }
        if cfg.program == Program::WriteVerifyLoop {
            for d in disks.iter().map_while(Option::as_ref) {
                let blocks = region(cfg, d) / BLOCK_SIZE as u64;
                let (a, b) = abi::share(blocks, vcpus, vcpu);
                area.records[d.index] = mem.alloc(4 * (b - a), PAGE, "write records")?;
            }
        }
    }
    let (free, top) = mem.rest();
    let pages = (top - free) / PAGE;
    for (vcpu, area) in areas.iter_mut().enumerate().take(vcpus) {
        let (a, b) = abi::share(pages, vcpus, vcpu);
        area.free = (free + a * PAGE, free + b * PAGE);
    }
    say!(
        0,
        "ram: image to {:#x}, work areas to {free:#x}, {} MiB free",
        image_end(),
        (top - free) >> 20
    );
    Ok(areas)
}
