//! The I/O thread: one epoll loop serving every disk's queues and the link to block-proc.
//!
//! - A queue's ioeventfd fires → pop every available chain, answer the invalid ones at
//!   once, and send the rest to block-proc as batched `Submit`s whose segments point into
//!   guest memory. While a queue has requests in flight its notifications stay off
//!   (`VIRTQ_USED_F_NO_NOTIFY`, or a stale `avail_event` with event idx): each of their
//!   completions makes the thread look at the queue anyway, so a driver that keeps it
//!   busy submits without a notify exit. The last completion turns them back on.
//! - block-proc's `Completed` → write each status byte, put the chain on the used ring,
//!   interrupt the guest through the disk's irqfd if it asked for interrupts. If that
//!   leaves nothing in flight, watch those queues for a few µs, notifications off: a
//!   driver that has just seen its last requests complete usually makes new ones at once,
//!   and they are taken without the guest's notify exit and the I/O thread's wake-up. The
//!   window adapts as QEMU's `poll-grow`/`poll-shrink` do ([`PollWindow`]).
//! - Commands from the controller: pause (stop taking requests, answer once every request
//!   in flight has completed), resume, reset the devices, exit.
//!
//! Every request stays in the in-flight table until block-proc answers it, whatever the
//! run state; a completion for a device reset since is dropped (the guest forgot it).
//!
//! If block-proc dies, each disk reports a `stop` error (the VM stops in `io-error`), and pausing no longer waits for those requests. When the monitor
//! has started a new block-proc, `Reconnect` hands over the new link and every request
//! still in flight is sent to it again (DESIGN.md §3: nothing acknowledged is lost, and
//! nothing unacknowledged is forgotten).
//!
//! A failed request follows its disk's `werror`/`rerror`: `report` answers IOERR, `ignore`
//! answers OK, `stop` (and `enospc` on ENOSPC) keeps the request aside and asks the
//! controller to stop the VM; it is sent again when the VM resumes. Each failure is
//! reported to the controller (QMP `BLOCK_IO_ERROR`).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc::vmm_block::{
    BlockToVmm, IoCompletion, IoOp, IoRequest, IoStatus, MAX_BATCH, VmmBlockRequest, VmmToBlock,
};
use ipc::{Channel, IpcError, MAX_FRAME};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use ipc::block::OnError;
use ipc::vmm::{BlockIoError, ErrorAction};

use crate::control::Input;
use crate::memory::RamMap;
use crate::migration::DevicePages;
use crate::virtio::blk::{Acct, Parsed, Request, S_IOERR, S_OK, S_UNSUPP};
use crate::virtio::mmio::BlkDevice;

const TOKEN_WAKE: u64 = 0;
const TOKEN_BLOCK: u64 = 1;
const TOKEN_QUEUES: u64 = 2;
/// A bound on the encoded size of one request without its segments, and per segment
/// (bincode varints: at most 10 bytes for a u64, 5 for a u32).
const REQUEST_OVERHEAD: usize = 128;
const SEGMENT_SIZE: usize = 16;
/// The longest the I/O thread watches a queue it has just drained before it goes back to
/// sleep. A notify costs the guest an exit (about 33 µs from CPL3 on PVM hosts,
/// PVM_FACTS.md) and the I/O thread a wake-up; a driver that polls its used ring answers a
/// completion within a few µs, so a short watch catches its next requests.
pub const POLL_MAX: Duration = Duration::from_micros(32);
/// Where a shrunk window starts growing again.
const POLL_MIN: Duration = Duration::from_micros(4);

/// The adaptive polling window: halved each time a watch ends empty-handed (the driver is
/// slow, or its vCPU is not running: the spin only takes CPU from others), doubled again
/// (from `POLL_MIN`, up to `POLL_MAX`) when a notify comes within `POLL_MAX` of the
/// moment the thread went to sleep, i.e. when a longer watch would have caught it.
#[derive(Debug)]
pub struct PollWindow {
    now: Duration,
    /// When a watch last ended empty-handed (or was skipped), until the next notify.
    slept_at: Option<Instant>,
}

impl Default for PollWindow {
    fn default() -> Self {
        Self {
            now: POLL_MAX,
            slept_at: None,
        }
    }
}

impl PollWindow {
    /// How long to watch now.
    pub fn get(&self) -> Duration {
        self.now
    }

    /// A watch ended with nothing (or a zero window skipped it) at `at`.
    pub fn missed(&mut self, at: Instant) {
        self.now /= 2;
        if self.now < POLL_MIN {
            self.now = Duration::ZERO;
        }
        self.slept_at = Some(at);
    }

    /// A notify came at `at`.
    pub fn notified(&mut self, at: Instant) {
        if let Some(t) = self.slept_at.take()
            && at.saturating_duration_since(t) <= POLL_MAX
        {
            self.now = (self.now * 2).clamp(POLL_MIN, POLL_MAX);
        }
    }
}

/// What the controller asks of the I/O thread.
#[derive(Debug)]
pub enum IoCommand {
    /// Take no new requests; answer once nothing is in flight.
    Pause(Sender<()>),
    Resume,
    /// Reset every device (the VM is paused and drained); answer when done.
    Reset(Sender<()>),
    /// A restarted block-proc's data path (already handshaken and given the guest's
    /// memory): send it every request in flight.
    Reconnect(Channel),
    /// Have block-proc take (`true`) or give up the drives' image locks (a migration's
    /// switch-over); answer with its reply.
    ImageLocks(bool, Sender<Result<(), String>>),
    Exit,
}

/// A disk queue's notifier.
#[derive(Debug)]
pub struct QueueEvent {
    pub disk: usize,
    pub queue: usize,
    pub event: EventFd,
}

/// A request block-proc has not answered yet.
#[derive(Debug)]
struct InFlight {
    disk: usize,
    queue: usize,
    generation: u64,
    head: u16,
    status_gpa: u64,
    used_len: u32,
    acct: Acct,
    bytes: u64,
    end: u64,
    started: Instant,
    /// The request as sent, to send it again after a `stop` error.
    request: IoRequest,
}

/// The I/O thread's state.
#[derive(Debug)]
pub struct IoThread {
    epoll: Epoll,
    block: Channel,
    block_alive: bool,
    disks: Vec<Arc<Mutex<BlkDevice>>>,
    queues: Vec<QueueEvent>,
    wake: EventFd,
    commands: Receiver<IoCommand>,
    in_flight: HashMap<u64, InFlight>,
    next_tag: u64,
    paused: bool,
    drain_waiters: Vec<Sender<()>>,
    /// Requests that failed under a `stop` policy, sent again at resume.
    held: Vec<(u64, InFlight)>,
    /// How long to watch a drained queue.
    poll: PollWindow,
    /// The controller, told about failed requests.
    controller: Sender<Input>,
    /// Where completed requests mark the guest pages they wrote, for a migration.
    device_pages: Arc<DevicePages>,
    ram: RamMap,
    /// Calls to block-proc waiting for their reply, by id.
    calls: HashMap<u64, Sender<Result<(), String>>>,
    next_call: u64,
}

fn lock(d: &Mutex<BlkDevice>) -> MutexGuard<'_, BlkDevice> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl IoThread {
    /// Sets up the loop (paused: the VM starts paused). `wake` is written whenever a
    /// command is sent.
    pub fn new(
        block: Channel,
        disks: Vec<Arc<Mutex<BlkDevice>>>,
        queues: Vec<QueueEvent>,
        wake: EventFd,
        commands: Receiver<IoCommand>,
        controller: Sender<Input>,
        (device_pages, ram): (Arc<DevicePages>, RamMap),
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(wake.as_raw_fd(), TOKEN_WAKE)?;
        add(block.as_fd().as_raw_fd(), TOKEN_BLOCK)?;
        for (i, q) in queues.iter().enumerate() {
            add(q.event.as_raw_fd(), TOKEN_QUEUES + i as u64)?;
        }
        Ok(Self {
            epoll,
            block,
            block_alive: true,
            disks,
            queues,
            wake,
            commands,
            in_flight: HashMap::new(),
            next_tag: 1,
            paused: true,
            drain_waiters: Vec::new(),
            held: Vec::new(),
            poll: PollWindow::default(),
            controller,
            device_pages,
            ram,
            calls: HashMap::new(),
            // Set-up used ids 1 and 2 on this link.
            next_call: 100,
        })
    }

    /// Runs until `Exit` or until the controller goes away.
    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("I/O thread: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        if !self.commands() {
                            return;
                        }
                    }
                    TOKEN_BLOCK => self.on_block_message(),
                    t => {
                        let i = (t - TOKEN_QUEUES) as usize;
                        if let Some(q) = self.queues.get(i) {
                            let _ = q.event.read();
                            self.poll.notified(Instant::now());
                            if !self.paused {
                                let (disk, queue) = (q.disk, q.queue);
                                self.process_queue(disk, queue);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handles queued commands; `false` means exit.
    fn commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(IoCommand::Pause(done)) => {
                    self.paused = true;
                    self.drain_waiters.push(done);
                    self.answer_drained();
                }
                Ok(IoCommand::Resume) => {
                    self.paused = false;
                    self.retry_held();
                    // Notifications that came while paused were swallowed: look at every
                    // queue once.
                    let all: Vec<(usize, usize)> =
                        self.queues.iter().map(|q| (q.disk, q.queue)).collect();
                    for (d, q) in all {
                        self.process_queue(d, q);
                    }
                }
                Ok(IoCommand::Reset(done)) => {
                    // The devices forget their requests, those held back included.
                    self.held.clear();
                    for d in &self.disks {
                        lock(d).reset();
                    }
                    let _ = done.send(());
                }
                Ok(IoCommand::Reconnect(block)) => self.reconnect(block),
                Ok(IoCommand::ImageLocks(active, reply)) => {
                    let id = self.next_call;
                    self.next_call += 1;
                    let call = VmmToBlock::Call {
                        id,
                        request: VmmBlockRequest::SetImageLocks { active },
                    };
                    match self.block.send(&call, &[]) {
                        Ok(()) => {
                            self.calls.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(format!("block-proc: {e}")));
                        }
                    }
                }
                Ok(IoCommand::Exit) => return false,
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Pausing waits for the requests in flight, unless block-proc is gone: they then wait
    /// for its successor.
    fn answer_drained(&mut self) {
        if self.in_flight.is_empty() || !self.block_alive {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn process_queue(&mut self, disk: usize, queue: usize) {
        let Some(dev) = self.disks.get(disk).cloned() else {
            return;
        };
        let mut batch = Vec::new();
        let busy = self
            .in_flight
            .values()
            .any(|f| f.disk == disk && f.queue == queue);
        {
            let mut d = lock(&dev);
            let generation = d.generation();
            let parsed = d.pop_requests(queue, busy);
            let mut answered = false;
            for p in parsed {
                match p {
                    Parsed::Submit(req) => {
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        batch.push(self.track(tag, disk, queue, generation, req));
                    }
                    Parsed::Answer {
                        head,
                        status_gpa,
                        status,
                        acct,
                    } => {
                        if let Some(s) = d.stats.of(acct) {
                            s.invalid += 1;
                        }
                        d.complete(queue, head, Some((status_gpa, status)), 1);
                        answered = true;
                    }
                    Parsed::Drop { head } => {
                        d.complete(queue, head, None, 0);
                        answered = true;
                    }
                }
            }
            if answered {
                d.signal_used(queue);
            }
        }
        self.submit(batch);
    }

    /// Records a request as in flight and builds its message.
    fn track(
        &mut self,
        tag: u64,
        disk: usize,
        queue: usize,
        generation: u64,
        r: Request,
    ) -> IoRequest {
        let request = IoRequest {
            tag,
            device: disk as u16,
            op: r.op,
            sector: r.sector,
            segments: r.segments,
        };
        self.in_flight.insert(
            tag,
            InFlight {
                disk,
                queue,
                generation,
                head: r.head,
                status_gpa: r.status_gpa,
                used_len: r.used_len,
                acct: r.acct,
                bytes: r.bytes,
                end: r.end,
                started: Instant::now(),
                request: request.clone(),
            },
        );
        request
    }

    /// Sends the requests held back by a `stop` error again.
    fn retry_held(&mut self) {
        let mut again = Vec::new();
        for (tag, mut f) in self.held.drain(..) {
            f.started = Instant::now();
            again.push(f.request.clone());
            self.in_flight.insert(tag, f);
        }
        self.submit(again);
    }

    /// Sends requests in batches that fit a frame. If block-proc is gone they stay in
    /// flight (a restarted block-proc could be handed them again).
    fn submit(&mut self, requests: Vec<IoRequest>) {
        let mut batch = Vec::new();
        let mut size = 0;
        for r in requests {
            let cost = REQUEST_OVERHEAD + SEGMENT_SIZE * r.segments.len();
            if !batch.is_empty() && (size + cost > MAX_FRAME - 1024 || batch.len() == MAX_BATCH) {
                self.send(std::mem::take(&mut batch));
                size = 0;
            }
            size += cost;
            batch.push(r);
        }
        if !batch.is_empty() {
            self.send(batch);
        }
    }

    fn send(&mut self, batch: Vec<IoRequest>) {
        if !self.block_alive {
            tracing::warn!("block-proc is gone: {} requests wait", batch.len());
            return;
        }
        if let Err(e) = self.block.send(&VmmToBlock::Submit(batch), &[]) {
            tracing::error!("cannot send guest I/O to block-proc: {e}");
            self.block_lost();
        }
    }

    fn block_lost(&mut self) {
        if !self.block_alive {
            return;
        }
        self.block_alive = false;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.block.as_fd().as_raw_fd(),
            EpollEvent::default(),
        );
        // Every disk lost its backend: one `stop` error each, a write if a write was in
        // flight on it (else a read), so the VM stops in `io-error` until `cont`.
        for (disk, dev) in self.disks.iter().enumerate() {
            let write = self
                .in_flight
                .values()
                .any(|f| f.disk == disk && !matches!(f.acct, Acct::Read | Acct::None));
            let d = lock(dev);
            let _ = self.controller.send(Input::BlockIoError(BlockIoError {
                device: d.drive.id.clone(),
                node_name: None,
                index: disk as u16,
                write,
                action: ErrorAction::Stop,
                nospace: false,
                io_status: OnError::keeps_io_status(d.werror, d.rerror),
            }));
        }
        self.answer_drained();
    }

    /// Takes a restarted block-proc's link and sends it every request in flight.
    fn reconnect(&mut self, block: Channel) {
        if self.block_alive {
            self.block_lost();
        }
        self.block = block;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            self.block.as_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_BLOCK),
        ) {
            tracing::error!("I/O thread: watching the new block-proc link: {e}");
            return;
        }
        self.block_alive = true;
        let mut again: Vec<IoRequest> = Vec::new();
        for f in self.in_flight.values_mut() {
            f.started = Instant::now();
            again.push(f.request.clone());
        }
        again.sort_unstable_by_key(|r| r.tag);
        tracing::info!("block-proc restarted: {} requests sent again", again.len());
        self.submit(again);
    }

    fn on_block_message(&mut self) {
        match self.block.recv::<BlockToVmm>() {
            Ok(r) => match r.msg {
                BlockToVmm::Completed(done) => self.complete(done),
                BlockToVmm::Reply { id, result } => match self.calls.remove(&id) {
                    Some(reply) => {
                        let _ = reply.send(result.map(drop));
                    }
                    None => tracing::warn!("block-proc answered unknown call {id}"),
                },
            },
            Err(IpcError::Closed) if self.in_flight.is_empty() && self.held.is_empty() => {
                tracing::debug!("block-proc closed the data path");
                self.block_lost();
            }
            Err(IpcError::Closed) => {
                tracing::error!(
                    "block-proc closed the data path; {} guest requests in flight",
                    self.in_flight.len() + self.held.len()
                );
                self.block_lost();
            }
            Err(e) => {
                tracing::error!("data path from block-proc broken: {e}");
                self.block_lost();
            }
        }
    }

    fn complete(&mut self, done: Vec<IoCompletion>) {
        let mut touched: Vec<(usize, usize)> = Vec::new();
        // The queues these requests came from: their notifications stay off while they
        // have requests in flight, so they are looked at again now.
        let mut seen: Vec<(usize, usize)> = Vec::new();
        for c in done {
            let Some(f) = self.in_flight.remove(&c.tag) else {
                tracing::warn!("block-proc completed unknown request {}", c.tag);
                continue;
            };
            if !seen.contains(&(f.disk, f.queue)) {
                seen.push((f.disk, f.queue));
            }
            let Some(dev) = self.disks.get(f.disk) else {
                continue;
            };
            let mut d = lock(dev);
            if d.generation() != f.generation {
                continue; // the device was reset meanwhile
            }
            let failed = matches!(c.status, IoStatus::IoErr | IoStatus::NoSpace);
            let action = failed.then(|| {
                let write = !matches!(f.acct, Acct::Read | Acct::None);
                let nospace = c.status == IoStatus::NoSpace;
                let policy = if write { d.werror } else { d.rerror };
                let action = ErrorAction::of(policy, nospace);
                let _ = self.controller.send(Input::BlockIoError(BlockIoError {
                    device: d.drive.id.clone(),
                    node_name: c.node_name.clone(),
                    index: f.disk as u16,
                    write,
                    action,
                    nospace,
                    io_status: OnError::keeps_io_status(d.werror, d.rerror),
                }));
                action
            });
            if action == Some(ErrorAction::Stop) {
                drop(d);
                self.held.push((c.tag, f));
                continue;
            }
            let (status, used) = match (c.status, action) {
                (IoStatus::Ok, _) | (_, Some(ErrorAction::Ignore)) => (S_OK, f.used_len),
                (IoStatus::Unsupported, _) => (S_UNSUPP, 1),
                (IoStatus::IoErr | IoStatus::NoSpace, _) => (S_IOERR, 1),
            };
            // An ignored error counts as done, as in QEMU.
            let succeeded = status == S_OK;
            let ns = u64::try_from(f.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let stats = &mut d.stats;
            stats.last_io = Some(Instant::now());
            if let Some(s) = stats.of(f.acct) {
                // Failed requests' latency counts too (QEMU's account_failed).
                s.total_time_ns += ns;
                if succeeded {
                    s.operations += 1;
                    s.bytes += f.bytes;
                } else {
                    s.failed += 1;
                }
            }
            if succeeded {
                stats.wr_highest_offset = stats.wr_highest_offset.max(f.end);
            }
            d.complete(f.queue, f.head, Some((f.status_gpa, status)), used);
            // block-proc wrote a read's data into guest memory and we wrote the status
            // byte: KVM's dirty log sees neither.
            if f.request.op == IoOp::Read {
                for seg in &f.request.segments {
                    self.device_pages.mark(seg.gpa, u64::from(seg.len));
                }
            }
            if let Some(off) = self.ram.file_offset(f.status_gpa, 1) {
                self.device_pages.mark(off, 1);
            }
            if !touched.contains(&(f.disk, f.queue)) {
                touched.push((f.disk, f.queue));
            }
        }
        for &(disk, queue) in &touched {
            if let Some(dev) = self.disks.get(disk) {
                lock(dev).signal_used(queue);
            }
        }
        self.answer_drained();
        if !self.paused {
            // New requests the driver made without notifying; a queue left with nothing
            // in flight gets its notifications back.
            for (disk, queue) in seen {
                self.process_queue(disk, queue);
            }
        }
        self.poll_queues(touched);
    }

    /// With nothing in flight, watches `queues` for new requests for up to the current
    /// [`PollWindow`] with notifications off, and submits what comes. Every queue ends with
    /// notifications on again (`process_queue` re-arms them and takes whatever arrived
    /// meanwhile), so none is missed. With requests still in flight it does nothing: their
    /// completions are what the thread should wait for, and spinning would only delay them
    /// (and take the CPU block-proc needs to make them).
    fn poll_queues(&mut self, queues: Vec<(usize, usize)>) {
        if self.paused || !self.block_alive || !self.in_flight.is_empty() || queues.is_empty() {
            return;
        }
        let window = self.poll.get();
        if window.is_zero() {
            self.poll.missed(Instant::now());
            return;
        }
        for &(disk, queue) in &queues {
            if let Some(dev) = self.disks.get(disk) {
                lock(dev).suppress_notifications(queue);
            }
        }
        let deadline = Instant::now() + window;
        let found = loop {
            let ready = queues.iter().any(|&(disk, queue)| {
                self.disks
                    .get(disk)
                    .is_some_and(|d| lock(d).has_available(queue))
            });
            if ready {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::hint::spin_loop();
        };
        if !found {
            self.poll.missed(Instant::now());
        }
        // Takes what came and turns notifications back on.
        for (disk, queue) in queues {
            self.process_queue(disk, queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_window_shrinks_when_it_misses_and_grows_when_it_would_have_caught() {
        let mut w = PollWindow::default();
        let t = Instant::now();
        assert_eq!(w.get(), POLL_MAX);
        w.missed(t);
        assert_eq!(w.get(), POLL_MAX / 2);
        // The notify came late: a longer watch would not have caught it.
        w.notified(t + POLL_MAX * 3);
        assert_eq!(w.get(), POLL_MAX / 2);
        for _ in 0..4 {
            w.missed(t);
        }
        assert_eq!(w.get(), Duration::ZERO);
        // A notify soon after going to sleep: grow again, from POLL_MIN.
        w.notified(t + Duration::from_micros(1));
        assert_eq!(w.get(), POLL_MIN);
        w.missed(t);
        w.notified(t);
        assert_eq!(w.get(), POLL_MIN);
        // Only the first notify after a miss counts.
        w.notified(t);
        assert_eq!(w.get(), POLL_MIN);
        for _ in 0..10 {
            w.missed(t);
            w.notified(t);
            w.missed(t);
            w.notified(t);
            w.notified(t);
        }
        assert!(w.get() <= POLL_MAX);
    }
}
