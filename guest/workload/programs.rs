//! The programs the command line chooses, run by every vCPU on its share: `write`,
//! `verify`, `write-verify-loop`, `dirty`, `idle`, `bench`; their statistics and the
//! summary vCPU 0 prints in the final line.

use core::fmt;

use crate::abi::{MAX_DISKS, share};
use crate::blk::{BlkQueue, DiskInfo, MAX_SLOTS, Op};
use crate::clock::{self, Deadline, Rate, Secs};
use crate::cmdline::{Config, Program};
use crate::console::{Fail, fail, say};
use crate::mem::PAGE;
use crate::pattern::{BLOCK_SIZE, Mismatch, Stamp, XorShift};
use crate::setup::{Area, Setup};

/// Requests in flight per batch for the pattern programs.
const DEPTH: usize = 16;
/// Blocks per request of `write`/`verify` sweeps (64 KiB).
const CHUNK_BLOCKS: u64 = 16;
/// `write-verify-loop`: a read-back batch after every this many write batches.
const VERIFY_EVERY: u64 = 4;
/// Progress lines of long runs, this often.
const PROGRESS_MS: u64 = 1_000;
/// Progress lines of `dirty`, this often.
const DIRTY_PROGRESS_MS: u64 = 10_000;
/// Tag of `dirty`'s page stamps (xored with the page's address).
const DIRTY_TAG: u64 = 0x4449_5254_5950_4147; // "DIRTYPAG"

const BLOCK: u64 = BLOCK_SIZE as u64;

/// How a vCPU runs: its index and the shared set-up.
pub struct Ctx<'a> {
    pub vcpu: usize,
    pub setup: &'a Setup,
}

impl Ctx<'_> {
    fn cfg(&self) -> &Config {
        &self.setup.cfg
    }

    fn area(&self) -> &Area {
        &self.setup.areas[self.vcpu]
    }

    /// This vCPU's share of `disk` in 4 KiB blocks.
    fn block_share(&self, disk: &DiskInfo) -> (u64, u64) {
        share(self.setup.region(disk) / BLOCK, self.setup.vcpus, self.vcpu)
    }

    /// The write records of this vCPU's share of each disk (write-verify-loop).
    ///
    /// # Safety
    /// At most one set may exist per vCPU at a time.
    // The slices are RAM set aside for this vCPU, not data behind `&self`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn records(&self) -> [&mut [u32]; MAX_DISKS] {
        core::array::from_fn(|d| match self.setup.disks().nth(d) {
            Some(disk) => {
                let (a, b) = self.block_share(disk);
                // SAFETY: set-up allocated `b - a` zeroed u32s for this vCPU and disk;
                // only this vCPU touches them and it holds one set (the caller's
                // contract).
                unsafe {
                    core::slice::from_raw_parts_mut(
                        self.area().records[d] as *mut u32,
                        (b - a) as usize,
                    )
                }
            }
            None => &mut [],
        })
    }

    fn stop_if_aborted(&self) -> Result<(), Fail> {
        if crate::aborted() {
            return fail!("stopped: another vCPU failed");
        }
        Ok(())
    }
}

/// This vCPU's request buffers. The device writes into a buffer while a read is in
/// flight, so blocks are handed out only before a request is submitted or after it
/// finished, through `&mut self` (one slice at a time).
struct Buffers {
    base: u64,
    count: usize,
    len: u64,
}

impl Buffers {
    /// # Safety
    /// At most one `Buffers` may exist per vCPU, made from that vCPU's area.
    unsafe fn new(area: &Area) -> Self {
        Self {
            base: area.bufs,
            count: area.buf_count,
            len: area.buf_len,
        }
    }

    /// Guest-physical address of buffer `i`, for a request of `len` bytes.
    fn addr(&self, i: usize, len: u64) -> u64 {
        assert!(
            i < self.count && len <= self.len,
            "{len} bytes in buffer {i}: there are {} of {} bytes",
            self.count,
            self.len
        );
        self.base + i as u64 * self.len
    }

    /// Block `b` (4 KiB) of buffer `i`.
    fn block(&mut self, i: usize, b: u64) -> &mut [u8] {
        assert!(
            (b + 1) * BLOCK <= self.len,
            "block {b} past buffer of {}",
            self.len
        );
        // SAFETY: the buffer lies in this vCPU's area, which only this (sole) `Buffers`
        // hands out, one slice at a time; no request is in flight on it (see above).
        unsafe {
            core::slice::from_raw_parts_mut((self.addr(i, 0) + b * BLOCK) as *mut u8, BLOCK_SIZE)
        }
    }
}

/// What a vCPU did, summed over vCPUs for the final line.
#[derive(Clone, Copy, Default)]
pub struct Stats {
    /// Bytes written and read.
    pub written: u64,
    pub read: u64,
    /// write-verify-loop: writes acknowledged, blocks verified in the loop and at the end.
    pub writes: u64,
    pub verified: u64,
    pub verified_end: u64,
    /// bench: requests finished.
    pub requests: u64,
    /// dirty: pages touched.
    pub pages: u64,
    /// How long the vCPU ran (the longest, once summed).
    pub ticks: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.written += o.written;
        self.read += o.read;
        self.writes += o.writes;
        self.verified += o.verified;
        self.verified_end += o.verified_end;
        self.requests += o.requests;
        self.pages += o.pages;
        self.ticks = self.ticks.max(o.ticks);
    }
}

/// Request buffers each vCPU needs: (count, bytes each).
pub fn buffers(cfg: &Config) -> (usize, u64) {
    match cfg.program {
        // write-verify-loop writes single blocks but verifies with sweeps at the end.
        Program::Write | Program::Verify | Program::WriteVerifyLoop => {
            (DEPTH, CHUNK_BLOCKS * BLOCK)
        }
        Program::Bench => ((cfg.qd as usize).min(MAX_SLOTS), cfg.bs),
        Program::Dirty | Program::Idle => (0, 0),
    }
}

/// Runs the program on this vCPU's share.
pub fn run(ctx: &Ctx<'_>) -> Result<Stats, Fail> {
    let start = clock::now();
    // SAFETY: the only `Buffers` of this vCPU; `run` is called once per vCPU.
    let bufs = &mut unsafe { Buffers::new(ctx.area()) };
    let mut stats = match ctx.cfg().program {
        Program::Write => write_or_verify(ctx, bufs, Op::Write)?,
        Program::Verify => write_or_verify(ctx, bufs, Op::Read)?,
        Program::WriteVerifyLoop => write_verify_loop(ctx, bufs)?,
        Program::Dirty => dirty(ctx)?,
        Program::Idle => idle(ctx)?,
        Program::Bench => bench(ctx, bufs)?,
    };
    if stats.ticks == 0 {
        stats.ticks = clock::now() - start;
    }
    Ok(stats)
}

/// Takes vCPU `ctx.vcpu`'s queue on `disk` and runs `f` with it.
fn with_queue<T>(
    ctx: &Ctx<'_>,
    disk: &DiskInfo,
    f: impl FnOnce(&mut BlkQueue) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let mut guard = ctx.setup.queue(disk, ctx.vcpu)?;
    match guard.as_mut() {
        Some(q) => f(q),
        None => fail!("disk {}: queue missing", disk.index),
    }
}

/// Describes a block that is not what it should be.
fn mismatch(disk: &DiskInfo, want: Stamp, m: Mismatch) -> Result<(), Fail> {
    let (i, off, g) = (disk.index, want.off, want.generation);
    match m {
        Mismatch::Header { found: Some(s) } => fail!(
            "disk {i} block at {off:#x}: holds seed {} offset {:#x} generation {}, expected seed \
             {} generation {g}{}",
            s.seed,
            s.off,
            s.generation,
            want.seed,
            if s.seed == want.seed && s.off == off && s.generation < g {
                " (an older generation: a lost write?)"
            } else {
                ""
            }
        ),
        Mismatch::Header { found: None } => fail!(
            "disk {i} block at {off:#x}: no pattern header, expected seed {} generation {g}",
            want.seed
        ),
        Mismatch::Data { at } => fail!(
            "disk {i} block at {off:#x} (seed {} generation {g}): data differs at byte {at}",
            want.seed
        ),
    }
}

/// What [`sweep`] does with each block.
type BlockFn<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), Fail> + 'a;

/// Reads or writes blocks `[first, end)` of `disk` in batches of up to [`DEPTH`] requests
/// of [`CHUNK_BLOCKS`]; `each(off, block)` fills every block before a write or checks it
/// after a read. The queue is held for one batch at a time (it may be shared).
fn sweep(
    ctx: &Ctx<'_>,
    bufs: &mut Buffers,
    disk: &DiskInfo,
    op: Op,
    (first, end): (u64, u64),
    each: &mut BlockFn<'_>,
) -> Result<(), Fail> {
    let mut next = first;
    while next < end {
        ctx.stop_if_aborted()?;
        let mut batch = [(0u64, 0u64); DEPTH];
        let n = with_queue(ctx, disk, |q| {
            let mut n = 0;
            while n < DEPTH.min(q.slots()) && next < end {
                let count = CHUNK_BLOCKS.min(end - next);
                if op == Op::Write {
                    for b in 0..count {
                        each((next + b) * BLOCK, bufs.block(n, b))?;
                    }
                }
                q.submit(
                    n,
                    op,
                    next * (BLOCK / 512),
                    bufs.addr(n, count * BLOCK),
                    (count * BLOCK) as u32,
                );
                batch[n] = (next, count);
                next += count;
                n += 1;
            }
            q.kick();
            q.drain(|_| Ok(()))?;
            Ok(n)
        })?;
        if op == Op::Read {
            for (i, (start, count)) in batch.iter().enumerate().take(n) {
                for b in 0..*count {
                    each((start + b) * BLOCK, bufs.block(i, b))?;
                }
            }
        }
    }
    Ok(())
}

/// Sends a flush and waits for it.
fn flush(ctx: &Ctx<'_>, disk: &DiskInfo) -> Result<(), Fail> {
    with_queue(ctx, disk, |q| {
        q.submit(0, Op::Flush, 0, 0, 0);
        q.kick();
        q.drain(|_| Ok(()))
    })
}

/// `write` (`op` Write: fills every block of the share with generation `gen`, then
/// flushes) and `verify` (`op` Read: checks every block), on every disk.
fn write_or_verify(ctx: &Ctx<'_>, bufs: &mut Buffers, op: Op) -> Result<Stats, Fail> {
    let cfg = ctx.cfg();
    let mut stats = Stats::default();
    for disk in ctx.setup.disks() {
        let range = ctx.block_share(disk);
        let t = clock::now();
        sweep(ctx, bufs, disk, op, range, &mut |off, block| {
            let want = Stamp {
                seed: cfg.seed,
                off,
                generation: cfg.generation,
            };
            if op == Op::Write {
                want.fill(block);
                Ok(())
            } else {
                want.check(block).or_else(|m| mismatch(disk, want, m))
            }
        })?;
        if op == Op::Write && disk.flush {
            flush(ctx, disk)?;
        }
        let bytes = (range.1 - range.0) * BLOCK;
        let ticks = clock::now() - t;
        say!(
            ctx.vcpu,
            "{}: disk {}: {} KiB at {:#x} in {} ({} MB/s)",
            cfg.program.name(),
            disk.index,
            bytes >> 10,
            range.0 * BLOCK,
            Secs(ticks),
            Rate {
                amount: bytes,
                unit: 1_000_000,
                ticks
            }
        );
        if op == Op::Write {
            stats.written += bytes;
        } else {
            stats.read += bytes;
        }
    }
    Ok(stats)
}

/// Up to [`DEPTH`] distinct blocks of `[0, blocks)` for which `eligible(block)` holds.
fn pick(rng: &mut XorShift, blocks: u64, eligible: impl Fn(u64) -> bool) -> ([u64; DEPTH], usize) {
    let mut picked = [0u64; DEPTH];
    let mut n = 0;
    for _ in 0..2 * DEPTH {
        if n == DEPTH.min(blocks as usize) {
            break;
        }
        let b = rng.below(blocks);
        if eligible(b) && !picked[..n].contains(&b) {
            picked[n] = b;
            n += 1;
        }
    }
    (picked, n)
}

/// Writes random blocks of the share, one batch at a time (never two writes to one block
/// in flight), records each acknowledged generation, reads back recorded blocks every few
/// batches, and verifies every recorded block at the end.
fn write_verify_loop(ctx: &Ctx<'_>, bufs: &mut Buffers) -> Result<Stats, Fail> {
    let cfg = ctx.cfg();
    let seed = cfg.seed;
    let deadline = Deadline::after_secs(cfg.duration());
    let mut rng = XorShift::new(seed ^ ((ctx.vcpu as u64 + 1) << 48));
    let mut stats = Stats::default();
    let start = clock::now();
    let mut report = Deadline::after_ms(PROGRESS_MS);
    let mut round = 0u64;
    // SAFETY: the only set of records this vCPU makes.
    let records = unsafe { ctx.records() };
    while !deadline.passed() {
        ctx.stop_if_aborted()?;
        for disk in ctx.setup.disks() {
            let (first, end) = ctx.block_share(disk);
            let blocks = end - first;
            if blocks == 0 {
                continue;
            }
            let records = &mut *records[disk.index];
            let stamp = |b: u64, generation: u64| Stamp {
                seed,
                off: (first + b) * BLOCK,
                generation,
            };
            let read_back = round % VERIFY_EVERY == VERIFY_EVERY - 1;
            let (picked, n) = if read_back {
                pick(&mut rng, blocks, |b| records[b as usize] != 0)
            } else {
                pick(&mut rng, blocks, |_| true)
            };
            if n == 0 {
                continue;
            }
            with_queue(ctx, disk, |q| {
                for (i, b) in picked.iter().take(n).enumerate() {
                    let sector = (first + b) * (BLOCK / 512);
                    if read_back {
                        q.submit(i, Op::Read, sector, bufs.addr(i, BLOCK), BLOCK as u32);
                    } else {
                        let generation = u64::from(records[*b as usize]) + 1;
                        stamp(*b, generation).fill(bufs.block(i, 0));
                        q.submit(i, Op::Write, sector, bufs.addr(i, BLOCK), BLOCK as u32);
                    }
                }
                q.kick();
                q.drain(|_| Ok(()))
            })?;
            for (i, b) in picked.iter().take(n).enumerate() {
                let r = &mut records[*b as usize];
                if read_back {
                    let want = stamp(*b, u64::from(*r));
                    want.check(bufs.block(i, 0))
                        .or_else(|m| mismatch(disk, want, m))?;
                } else {
                    *r += 1; // acknowledged: this is now the block's generation
                }
            }
            if read_back {
                stats.verified += n as u64;
            } else {
                stats.writes += n as u64;
            }
        }
        round += 1;
        if report.passed() {
            say!(
                ctx.vcpu,
                "write-verify-loop: {}: {} writes, {} verified",
                Secs(clock::now() - start),
                stats.writes,
                stats.verified
            );
            report = Deadline::after_ms(PROGRESS_MS);
        }
    }
    stats.ticks = clock::now() - start;
    for disk in ctx.setup.disks() {
        let (first, end) = ctx.block_share(disk);
        let records = &*records[disk.index];
        let mut checked = 0u64;
        sweep(
            ctx,
            bufs,
            disk,
            Op::Read,
            (first, end),
            &mut |off, block| {
                let g = records[(off / BLOCK - first) as usize];
                if g == 0 {
                    return Ok(());
                }
                checked += 1;
                let want = Stamp {
                    seed,
                    off,
                    generation: u64::from(g),
                };
                want.check(block).or_else(|m| mismatch(disk, want, m))
            },
        )?;
        say!(
            ctx.vcpu,
            "write-verify-loop: disk {}: all {checked} written blocks verified",
            disk.index
        );
        stats.verified_end += checked;
    }
    Ok(stats)
}

/// Touches `rate` bytes of pages per second of this vCPU's free RAM, cycling through
/// it. Each page carries a stamp (its address and the pass number); before it is
/// rewritten the stamp must be the previous pass's, so a page a migration lost shows.
fn dirty(ctx: &Ctx<'_>) -> Result<Stats, Fail> {
    let cfg = ctx.cfg();
    let (lo, hi) = ctx.area().free;
    let pages = (hi - lo) / PAGE;
    if pages == 0 {
        return fail!("dirty: vCPU {} has no free RAM", ctx.vcpu);
    }
    // `rate` is the whole guest's; each vCPU does its part.
    let rate_pages = cfg.rate.map(|r| (r / ctx.setup.vcpus as u64 / PAGE).max(1));
    if let Some(r) = rate_pages
        && r > pages
    {
        say!(
            ctx.vcpu,
            "dirty: {r} pages/s asked, {pages} pages here: pages repeat within a second"
        );
    }
    let deadline = Deadline::after_secs(cfg.duration());
    let start = clock::now();
    let hz = u128::from(clock::hz());
    let mut report = Deadline::after_ms(DIRTY_PROGRESS_MS);
    let (mut done, mut cursor, mut pass) = (0u64, 0u64, 1u64);
    while !deadline.passed() {
        ctx.stop_if_aborted()?;
        let due = match rate_pages {
            Some(r) => u64::try_from(u128::from(r) * u128::from(clock::now() - start) / hz)
                .unwrap_or(u64::MAX),
            None => done + 1024,
        };
        if done >= due {
            crate::arch::pause();
            continue;
        }
        // A bounded step, so the deadline is looked at often.
        for _ in 0..(due - done).min(4096) {
            let page = lo + cursor * PAGE;
            let w = page as *mut u64;
            // SAFETY: the page lies in this vCPU's share of the free RAM, which nothing
            // else uses.
            let (tag, seen) = unsafe { (w.read_volatile(), w.add(1).read_volatile()) };
            if pass > 1 && (tag != page ^ DIRTY_TAG || seen != pass - 1) {
                return fail!(
                    "dirty: page {page:#x} holds pass {seen} (tag {tag:#x}), expected pass {}: \
                     a write to it was lost",
                    pass - 1
                );
            }
            // SAFETY: as above.
            unsafe {
                w.write_volatile(page ^ DIRTY_TAG);
                w.add(1).write_volatile(pass);
            }
            done += 1;
            cursor += 1;
            if cursor == pages {
                cursor = 0;
                pass += 1;
            }
        }
        if report.passed() {
            let ticks = clock::now() - start;
            say!(
                ctx.vcpu,
                "dirty: {}: {done} pages, {} MiB/s",
                Secs(ticks),
                Rate {
                    amount: done * PAGE,
                    unit: 1 << 20,
                    ticks
                }
            );
            report = Deadline::after_ms(DIRTY_PROGRESS_MS);
        }
    }
    Ok(Stats {
        pages: done,
        ticks: clock::now() - start,
        ..Stats::default()
    })
}

fn idle(ctx: &Ctx<'_>) -> Result<Stats, Fail> {
    let deadline = Deadline::after_secs(ctx.cfg().duration());
    while !deadline.passed() {
        ctx.stop_if_aborted()?;
        for _ in 0..1000 {
            crate::arch::pause();
        }
    }
    Ok(Stats::default())
}

/// Keeps `qd` requests of `bs` bytes in flight on each disk for `seconds`, refilling
/// every finished slot and notifying once per batch of refills.
fn bench(ctx: &Ctx<'_>, bufs: &mut Buffers) -> Result<Stats, Fail> {
    let cfg = ctx.cfg();
    let (mode, bs) = (cfg.mode, cfg.bs);
    let op = if mode.writes() { Op::Write } else { Op::Read };
    let ms = cfg.duration().unwrap_or(0).saturating_mul(1000);
    let mut stats = Stats::default();
    for disk in ctx.setup.disks() {
        let (first, end) = share(ctx.setup.region(disk) / bs, ctx.setup.vcpus, ctx.vcpu);
        let units = end - first;
        let mut rng = XorShift::new(cfg.seed ^ ((ctx.vcpu as u64 + 1) << 48));
        let mut seq = 0u64;
        let mut next = move || {
            let u = if mode.random() {
                rng.below(units)
            } else {
                let u = seq;
                seq = (seq + 1) % units;
                u
            };
            (first + u) * bs / 512
        };
        let (requests, ticks) = with_queue(ctx, disk, |q| {
            let qd = bufs.count.min(q.slots());
            if qd < cfg.qd as usize {
                say!(
                    ctx.vcpu,
                    "bench: qd={} asked, the queue holds {qd} requests",
                    cfg.qd
                );
            }
            if op == Op::Write {
                for slot in 0..qd {
                    for b in 0..bs / BLOCK {
                        Stamp {
                            seed: cfg.seed,
                            off: b * BLOCK,
                            generation: slot as u64,
                        }
                        .fill(bufs.block(slot, b));
                    }
                }
            }
            let len = bs as u32;
            let start = clock::now();
            let stop = start.saturating_add(clock::ms_ticks(ms));
            for slot in 0..qd {
                q.submit(slot, op, next(), bufs.addr(slot, bs), len);
            }
            q.kick();
            let mut done = 0u64;
            while q.in_flight() > 0 {
                let mut d = Some(q.wait());
                let mut refilled = false;
                while let Some(r) = d {
                    let slot = r?.slot;
                    done += 1;
                    if clock::now() < stop {
                        q.submit(slot, op, next(), bufs.addr(slot, bs), len);
                        refilled = true;
                    }
                    d = q.poll();
                }
                if refilled {
                    q.kick();
                }
            }
            Ok((done, clock::now() - start))
        })?;
        say!(
            ctx.vcpu,
            "bench: disk {}: {requests} requests in {}: {} IOPS, {} MB/s",
            disk.index,
            Secs(ticks),
            Rate {
                amount: requests,
                unit: 1,
                ticks
            },
            Rate {
                amount: requests * bs,
                unit: 1_000_000,
                ticks
            }
        );
        stats.requests += requests;
        stats.ticks += ticks;
        if op == Op::Write {
            stats.written += requests * bs;
        } else {
            stats.read += requests * bs;
        }
    }
    Ok(stats)
}

/// The final line's text after `workload: PASS `.
pub struct Summary<'a> {
    pub setup: &'a Setup,
    pub total: Stats,
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cfg = &self.setup.cfg;
        let t = &self.total;
        let disks = self.setup.disks().count();
        let vcpus = self.setup.vcpus;
        let ticks = t.ticks;
        let mb_s = |amount| Rate {
            amount,
            unit: 1_000_000,
            ticks,
        };
        write!(f, "{}", cfg.program.name())?;
        match cfg.program {
            Program::Write => write!(
                f,
                " seed={} gen={}: {} KiB on {disks} disk(s) by {vcpus} vCPU(s) in {} ({} MB/s)",
                cfg.seed,
                cfg.generation,
                t.written >> 10,
                Secs(ticks),
                mb_s(t.written)
            ),
            Program::Verify => write!(
                f,
                " seed={} gen={}: {} KiB verified on {disks} disk(s) by {vcpus} vCPU(s) in {} \
                 ({} MB/s)",
                cfg.seed,
                cfg.generation,
                t.read >> 10,
                Secs(ticks),
                mb_s(t.read)
            ),
            Program::WriteVerifyLoop => write!(
                f,
                " seed={}: {} writes acknowledged, {} blocks verified during the loop, {} at the \
                 end; {disks} disk(s), {vcpus} vCPU(s), {}",
                cfg.seed,
                t.writes,
                t.verified,
                t.verified_end,
                Secs(ticks)
            ),
            Program::Dirty => {
                write!(
                    f,
                    ": {} pages in {}, {} MiB/s",
                    t.pages,
                    Secs(ticks),
                    Rate {
                        amount: t.pages * PAGE,
                        unit: 1 << 20,
                        ticks
                    }
                )?;
                match cfg.rate {
                    Some(r) => write!(
                        f,
                        " (asked {} MiB/s, {vcpus} vCPU(s))",
                        Rate {
                            amount: r,
                            unit: 1 << 20,
                            ticks: clock::hz()
                        }
                    ),
                    None => write!(f, " (as fast as it goes, {vcpus} vCPU(s))"),
                }
            }
            Program::Idle => write!(f, ": {}", Secs(ticks)),
            Program::Bench => write!(
                f,
                " mode={} bs={} qd={}: {} IOPS, {} MB/s, {} requests in {} ({disks} disk(s), \
                 {vcpus} vCPU(s))",
                cfg.mode.name(),
                cfg.bs,
                cfg.qd,
                Rate {
                    amount: t.requests,
                    unit: 1,
                    ticks
                },
                mb_s(t.read + t.written),
                t.requests,
                Secs(ticks)
            ),
        }
    }
}
