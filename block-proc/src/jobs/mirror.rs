//! The mirror job (`drive-mirror`; QMP reference §3): copies a node to a target, keeps
//! copying what is written to the source meanwhile (a [`DirtyBitmap`] on the source node,
//! fed by every write that reaches it), reports READY once both are in sync, and then
//!
//! - `block-job-complete`: quiesces the drive's requests (and the source's exports'),
//!   copies what is still dirty, flushes the target and switches the drive and the
//!   exports to the target (the pivot); the guest goes on with the target and no write is
//!   lost, since none is in flight at that moment;
//! - soft cancel after READY: the same final copy, no pivot: the target is a
//!   point-in-time copy, and the job ends with BLOCK_JOB_COMPLETED;
//! - force cancel (or any cancel before READY): the job ends with BLOCK_JOB_CANCELLED.
//!
//! Copying follows the source's allocation: a range the source reads as zeroes and holds
//! no data for is written to the target as zeroes (unmapped with `unmap`), so holes stay
//! holes in a sparse target, or not written at all where the target is known to read as
//! zeroes (`sync=full`, no data written there yet). Up to 16 copies run at once, as in
//! QEMU (with a `speed`, no more together than one rate-limit slice allows).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ipc::QmpError;
use ipc::block::ImageFormat;
use ipc::nbd_uri::Target;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::dirty::{DirtyBitmap, ThroughFuture, WriteThrough};
use super::{JobDriver, JobError, JobType, NewJob, OnError, RunFuture, SLICE};
use crate::block::create::{create_qcow2, create_raw};
use crate::block::gate::DirGate;
use crate::block::{Backing, Node, OpenOptions};
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::{Backend, Quiesced};
use crate::graph::{Attached, BlockNode, UserQuiesced};
use crate::jobs::{ErrorAction, Job};

/// `DEFAULT_MIRROR_BUF_SIZE`.
const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// `MAX_IO_BYTES`: the largest single copy.
const MAX_IO_BYTES: u64 = 1 << 20;
/// `MAX_IN_FLIGHT`: the most copies running at once.
const MAX_IN_FLIGHT: usize = 16;

/// QAPI `MirrorSyncMode` (the ones mirror accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

/// QAPI `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    #[default]
    Background,
    WriteBlocking,
}

/// `blockdev-mirror`'s arguments (`BlockdevMirror`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    job_id: Option<String>,
    device: String,
    target: String,
    replaces: Option<String>,
    sync: SyncMode,
    speed: Option<i64>,
    granularity: Option<u64>,
    buf_size: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    filter_node_name: Option<String>,
    copy_mode: Option<CopyMode>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// `drive-mirror`'s arguments (`DriveMirror`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DriveMirror {
    job_id: Option<String>,
    device: String,
    target: String,
    format: Option<String>,
    node_name: Option<String>,
    replaces: Option<String>,
    sync: SyncMode,
    mode: Option<String>,
    speed: Option<i64>,
    granularity: Option<u64>,
    buf_size: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    unmap: Option<bool>,
    copy_mode: Option<CopyMode>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    /// The monitor's failure to connect an NBD target (see [`ipc::nbd_uri`]).
    #[serde(rename = "splitvmm-connect-error")]
    connect_error: Option<String>,
}

/// The mirror job's driver. See the module documentation.
pub struct Mirror {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    /// The drive whose requests go to `source` (pivoted at completion).
    backend: Option<Arc<Backend>>,
    bitmap: Arc<DirtyBitmap>,
    /// Where this job wrote data to the target (see [`Mirror::target_reads_zero`]).
    written: DirtyBitmap,
    sync: SyncMode,
    buf_size: u64,
    on_source_error: OnError,
    on_target_error: OnError,
    unmap: bool,
    zero_target: bool,
    /// An active commit (`commit_active_start`): the job's type is `commit`, and its
    /// `query-block-jobs` entry has no mirror members.
    commit: bool,
    /// `copy-mode: write-blocking` (set once; `block-job-change` can only set it).
    write_blocking: AtomicBool,
    /// Every write since the job was last clean went to the target too (write-blocking,
    /// and no copy to the target failed since).
    actively_synced: Arc<AtomicBool>,
    inner: Mutex<Inner>,
    /// The graph's side of the end: `true` after a pivot, `false` when the target goes.
    finish: Box<dyn Fn(bool) + Send + Sync>,
}

/// What an active commit gives the mirror job (see [`Mirror::active_commit`]).
pub(crate) struct ActiveCommit {
    pub source: Arc<BlockNode>,
    pub target: Arc<BlockNode>,
    pub backend: Arc<Backend>,
    /// What to copy: marked by the caller (what the chain holds above the base).
    pub bitmap: Arc<DirtyBitmap>,
    pub on_error: OnError,
    pub finish: Box<dyn Fn(bool) + Send + Sync>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("source", &self.source.name())
            .field("target", &self.target.name())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    should_complete: bool,
    /// The drive's requests wait from the final copy until the pivot (or its absence).
    quiesced: Option<Quiesced>,
    /// So do those of the source's other users (exports), which the pivot moves too.
    users: Vec<(Arc<Attached>, UserQuiesced)>,
    /// `clean` ran: the target is no longer the job's.
    cleaned: bool,
    pivoted: bool,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A write-blocking mirror's copy of the source's writes (QEMU's `do_sync_target_write`).
/// The written range stays dirty too, for the background copy: a copy of the same range
/// that read the source before this write may land on the target after it (QEMU waits
/// for such copies instead), and copying it again makes that harmless.
struct Through {
    target: Arc<BlockNode>,
    synced: Arc<AtomicBool>,
}

impl Through {
    fn done(&self, r: std::io::Result<()>) {
        if let Err(e) = r {
            tracing::debug!("mirror write-through: {e}; left to the background copy");
            self.synced.store(false, Ordering::Release);
        }
    }
}

impl WriteThrough for Through {
    fn write<'a>(&'a self, buf: &'a [u8], offset: u64) -> ThroughFuture<'a> {
        Box::pin(async move { self.done(self.target.write(buf, offset, false).await) })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> ThroughFuture<'_> {
        Box::pin(async move { self.done(self.target.write_zeroes(offset, len, unmap).await) })
    }
}

impl Mirror {
    /// The mirror job of an active commit (`commit_active_start`): the drive's active
    /// layer mirrored into its base, which the drive uses after `block-job-complete`.
    pub(crate) fn active_commit(c: ActiveCommit) -> Arc<Self> {
        Arc::new(Self {
            source: c.source,
            target: c.target,
            backend: Some(c.backend),
            written: DirtyBitmap::new(c.bitmap.size(), c.bitmap.granularity()),
            bitmap: c.bitmap,
            sync: SyncMode::None,
            buf_size: DEFAULT_BUF_SIZE,
            on_source_error: c.on_error,
            on_target_error: c.on_error,
            unmap: true,
            zero_target: false,
            commit: true,
            write_blocking: AtomicBool::new(false),
            actively_synced: Arc::new(AtomicBool::new(false)),
            inner: Mutex::new(Inner::default()),
            finish: c.finish,
        })
    }

    /// Guest writes go through to the target from now on.
    fn start_write_through(&self) {
        let through = Through {
            target: self.target.clone(),
            synced: self.actively_synced.clone(),
        };
        self.source.dirty.set_write_through(Some(Arc::new(through)));
    }

    /// Marks what the sync mode copies at the start (`mirror_dirty_init`).
    async fn dirty_init(&self, len: u64) -> std::io::Result<()> {
        if self.sync == SyncMode::None {
            return Ok(());
        }
        if self.zero_target {
            self.target.write_zeroes(0, len, self.unmap).await?;
            // QEMU 10.0 marks the whole image dirty here (its target cannot write zeroes
            // with unmap), so `len` counts every byte (041 TestUnbackedSource). The
            // copy loop skips the runs that read as zeroes: the target already does.
            self.bitmap.mark(0, len);
            return Ok(());
        }
        let mut offset = 0;
        while offset < len {
            let extents = self.source.block_status(offset, len - offset).await?;
            if extents.is_empty() {
                break;
            }
            for e in extents {
                let copy = match self.sync {
                    SyncMode::Top => e.allocated_here,
                    _ => e.data || e.allocated_here,
                };
                if copy {
                    self.bitmap.mark(offset, e.length);
                }
                offset += e.length;
            }
        }
        Ok(())
    }

    /// Copies dirty runs from `from` on, up to [`MAX_IN_FLIGHT`] of them at once (each at
    /// most [`MAX_IO_BYTES`], together at most `buf-size`), as QEMU's mirror keeps several
    /// copies in flight; with a `speed`, together at most what one rate-limit slice allows,
    /// so that the rate limiter weighs them before the next ones start. Returns where the
    /// next iteration starts, after every copy started here ended; `Ok(None)`: clean.
    async fn iteration(
        self: &Arc<Self>,
        job: &Arc<Job>,
        from: u64,
    ) -> Result<Option<u64>, JobError> {
        let max = self.buf_size.clamp(self.bitmap.granularity(), MAX_IO_BYTES);
        let mut budget = match job.speed() {
            0 => self.buf_size,
            speed => {
                let slice = u128::from(speed) * SLICE.as_nanos() / 1_000_000_000;
                self.buf_size
                    .min(u64::try_from(slice).unwrap_or(u64::MAX))
                    .max(self.bitmap.granularity())
            }
        };
        let mut cursor = from;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut copies = tokio::task::JoinSet::new();
        while runs.len() < MAX_IN_FLIGHT && budget > 0 {
            let Some((start, bytes)) = self.bitmap.next_run(cursor, max.min(budget)) else {
                break;
            };
            // A range written again while its copy runs is copied after that copy ended,
            // never beside it (the older data could land last).
            if runs
                .iter()
                .any(|&(s, b)| start < s + b && s < start + bytes)
            {
                break;
            }
            self.bitmap.clear(start, bytes);
            runs.push((start, bytes));
            budget = budget.saturating_sub(bytes);
            cursor = start + bytes;
            let (me, job) = (self.clone(), job.clone());
            copies.spawn(async move { me.copy(&job, start, bytes).await });
        }
        if runs.is_empty() {
            return Ok(None);
        }
        let mut result = Ok(());
        while let Some(r) = copies.join_next().await {
            let r =
                r.unwrap_or_else(|e| Err(JobError::Msg(format!("mirror copy: {e}"), libc::EIO)));
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| Some(cursor))
    }

    /// Copies `[start, start + bytes)` (cleared in the bitmap by the caller): data as data,
    /// what the source reads as zeroes and holds no data for as zeroes, unless the target
    /// still reads as zeroes there.
    async fn copy(&self, job: &Arc<Job>, start: u64, bytes: u64) -> Result<(), JobError> {
        let end = start + bytes;
        let mut offset = start;
        while offset < end {
            // What the source holds there decides between copying data and writing zeroes.
            let extent = match self.source.block_status(offset, end - offset).await {
                Ok(e) => e.first().copied(),
                Err(e) => return self.failed(job, offset, end - offset, true, e),
            };
            let n = extent.map_or(end - offset, |e| e.length.clamp(1, end - offset));
            let zero = extent.is_some_and(|e| e.zero && !e.data);
            let result = if zero && self.target_reads_zero(offset, n) {
                Ok(())
            } else if zero {
                self.target
                    .write_zeroes(offset, n, self.unmap)
                    .await
                    .map_err(|e| (false, e))
            } else {
                self.written.mark(offset, n);
                let copied = self.copy_in_kernel(offset, n).await;
                if copied < n {
                    let rest = offset + copied;
                    let mut buf = vec![0u8; usize::try_from(n - copied).unwrap_or(0)];
                    match self.source.read(&mut buf, rest).await {
                        Err(e) => Err((true, e)),
                        Ok(()) => self
                            .target
                            .write(&buf, rest, false)
                            .await
                            .map_err(|e| (false, e)),
                    }
                } else {
                    Ok(())
                }
            };
            if let Err((read, e)) = result {
                return self.failed(job, offset, end - offset, read, e);
            }
            job.progress(n);
            if !zero {
                job.ratelimit_processed(n);
            }
            offset += n;
        }
        Ok(())
    }

    /// Copies what it can of `[offset, offset + n)` from the source's image to the
    /// target's in the kernel ([`Node::copy_from`]: raw files and qcow2 data clusters,
    /// no copy through user memory), if both nodes are such images; returns how many
    /// bytes from `offset` on it copied. On an error it copies nothing more, so that the
    /// caller copies the rest through a buffer, which also tells a read error from a
    /// write error.
    async fn copy_in_kernel(&self, offset: u64, n: u64) -> u64 {
        let (Some(src), Some(dst)) = (self.source.copy_image(false), self.target.copy_image(true))
        else {
            return 0;
        };
        let copied = match dst.copy_from(&src, offset, n).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(
                    "mirror: copy in the kernel at {offset}: {e}; copying through memory"
                );
                0
            }
        };
        if copied > 0 {
            // What a write through the node would have told the target's watchers.
            self.target.dirty.mark(offset, copied);
        }
        copied
    }

    /// Whether the target reads as zeroes over `[offset, offset + n)`: with `sync=full` it
    /// starts as zeroes (a new image without backing, or an existing one zeroed by
    /// [`Mirror::dirty_init`]), and stays so where this job wrote no data (QEMU 10's
    /// zero bitmap), so those zeroes need not be written again.
    fn target_reads_zero(&self, offset: u64, n: u64) -> bool {
        self.sync == SyncMode::Full
            && !self
                .written
                .next_run(offset, n)
                .is_some_and(|(s, _)| s >= offset && s < offset + n)
    }

    /// A failed read or write: the range is dirty again; the policy decides.
    fn failed(
        &self,
        job: &Arc<Job>,
        offset: u64,
        bytes: u64,
        read: bool,
        e: std::io::Error,
    ) -> Result<(), JobError> {
        self.bitmap.mark(offset, bytes);
        self.actively_synced.store(false, Ordering::Release);
        let policy = if read {
            self.on_source_error
        } else {
            self.on_target_error
        };
        match job.error_action(policy, read, errno(&e)) {
            ErrorAction::Report => Err(JobError::Io(e)),
            ErrorAction::Ignore | ErrorAction::Stop => Ok(()),
        }
    }

    async fn main(self: Arc<Self>, job: Arc<Job>) -> Result<(), JobError> {
        let len = self.source.size();
        if self.target.size() != len {
            return Err(JobError::Msg(
                "Source and target image have different sizes".into(),
                libc::EINVAL,
            ));
        }
        job.set_remaining(len);
        if let Err(e) = self.dirty_init(len).await {
            return Err(JobError::Io(e));
        }
        let mut cursor = 0;
        loop {
            job.ratelimit_sleep().await;
            if job.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            job.set_remaining(self.bitmap.dirty_bytes());
            if let Some(next) = self.iteration(&job, cursor).await? {
                cursor = next;
                continue;
            }
            if self.write_blocking.load(Ordering::Acquire) {
                self.actively_synced.store(true, Ordering::Release);
            }
            if !job.is_ready() {
                if let Err(e) = self.target.flush().await {
                    self.failed(&job, 0, 0, false, e)?;
                    continue;
                }
                job.transition_to_ready();
            }
            let complete = lock(&self.inner).should_complete;
            if complete || job.cancel_requested() {
                // The final copy: no request to the drive or to another user of the
                // source (an export) in flight, none starting.
                let quiesced = match &self.backend {
                    Some(b) => Some(b.quiesce().await),
                    None => None,
                };
                let mut users = Vec::new();
                for user in self.source.users() {
                    let held = user.quiesce().await;
                    users.push((user, held));
                }
                if self.bitmap.dirty_bytes() > 0 {
                    continue;
                }
                if let Err(e) = self.target.flush().await {
                    drop((quiesced, users));
                    self.failed(&job, 0, 0, false, e)?;
                    continue;
                }
                let mut inner = lock(&self.inner);
                inner.quiesced = quiesced;
                inner.users = users;
                return Ok(());
            }
            job.sleep(SLICE).await;
        }
    }
}

impl JobDriver for Mirror {
    fn run(self: Arc<Self>, job: Arc<Job>) -> RunFuture {
        Box::pin(self.main(job))
    }

    /// `mirror_exit_common` on success: the pivot, if completion was asked for.
    fn prepare(&self, _job: &Job) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        if inner.should_complete {
            if let (Some(backend), Some(q)) = (&self.backend, &inner.quiesced) {
                backend.replace(self.target.clone(), q);
            }
            // Exports follow, as every parent of QEMU's source does.
            for (user, q) in &inner.users {
                if let Err(e) = user.replace(&self.target, q) {
                    tracing::warn!(
                        "mirror: an export of {} stays there: {}",
                        self.source.name(),
                        e.desc
                    );
                }
            }
            inner.pivoted = true;
        }
        Ok(())
    }

    fn clean(&self, _job: &Job) {
        self.source.dirty.set_write_through(None);
        self.source.dirty.detach(&self.bitmap);
        let pivoted = {
            let mut inner = lock(&self.inner);
            inner.quiesced = None;
            inner.users.clear();
            inner.cleaned = true;
            inner.pivoted
        };
        (self.finish)(pivoted);
    }

    /// `mirror_cancel`: before READY every cancel is a force cancel.
    fn cancel(&self, ready: bool, force: bool) -> bool {
        force || !ready
    }

    fn complete(&self, _job: &Job) -> Option<Result<(), QmpError>> {
        lock(&self.inner).should_complete = true;
        Some(Ok(()))
    }

    fn also_blocks(&self) -> Vec<String> {
        if lock(&self.inner).cleaned {
            Vec::new()
        } else {
            vec![self.target.name().to_string()]
        }
    }

    fn query_extra(&self, out: &mut Map<String, Value>) {
        // An active commit's entry has no mirror members.
        if !self.commit {
            let synced = self.actively_synced.load(Ordering::Acquire);
            out.insert("actively-synced".into(), synced.into());
        }
    }

    /// `mirror_change`: only background → write-blocking. (A `type` other than mirror
    /// has no `copy-mode`, which QEMU then reads as background.)
    fn change(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let wanted = match args.get("copy-mode").and_then(Value::as_str) {
            Some("write-blocking") => CopyMode::WriteBlocking,
            _ => CopyMode::Background,
        };
        let current = if self.write_blocking.load(Ordering::Acquire) {
            CopyMode::WriteBlocking
        } else {
            CopyMode::Background
        };
        if wanted == current {
            return Ok(());
        }
        if wanted == CopyMode::Background {
            return Err(QmpError::generic(
                "Change to copy mode 'background' is not implemented",
            ));
        }
        if self
            .write_blocking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.start_write_through();
        }
        Ok(())
    }
}

/// `bdrv_get_default_bitmap_granularity(target)`.
fn default_granularity(target: &BlockNode) -> u64 {
    match target.image().and_then(|i| i.info().cluster_size) {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

fn format_of(name: &str) -> Result<ImageFormat, QmpError> {
    match name {
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        other => Err(QmpError::generic(format!("Unknown file format '{other}'"))),
    }
}

/// What `drive-mirror` and `blockdev-mirror` share once the target is open
/// (`blockdev_mirror_common` + `mirror_start_job`).
struct Start {
    job_id: Option<String>,
    source: Arc<BlockNode>,
    device: Option<String>,
    blocked: String,
    target: Arc<BlockNode>,
    /// The nodes the command made (drive-mirror: the target and an NBD target's protocol
    /// node), newest last: they leave the graph (closed) unless the job pivots to them.
    own: Vec<String>,
    sync: SyncMode,
    zero_target: bool,
    granularity: Option<u64>,
    buf_size: Option<i64>,
    speed: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    unmap: bool,
    copy_mode: CopyMode,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// `sync: top` on a source without a backing file is `full`.
fn effective_sync(sync: SyncMode, backed: bool) -> SyncMode {
    if sync == SyncMode::Top && !backed {
        SyncMode::Full
    } else {
        sync
    }
}

impl State {
    /// `drive-mirror` (`qmp_drive_mirror` + `blockdev_mirror_common` + `mirror_start_job`),
    /// its checks in QEMU's order. `fds`: the monitor's connection to an NBD target.
    pub(crate) async fn drive_mirror(
        &self,
        a: DriveMirror,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Value, QmpError> {
        let source = self.root_source(&a.device)?;
        let device = self.graph().device_of(source.name());
        let blocked = device.clone().unwrap_or_else(|| source.name().to_string());
        self.jobs.check_blocker(&[&blocked])?;
        let existing = a.mode.as_deref() == Some("existing");
        // A bad name is reported where QEMU opens the target, below.
        let parsed = ipc::nbd_uri::parse_target(&a.target);
        let nbd = matches!(parsed, Ok(Target::Nbd(_)));
        let source_image = source.image();
        let source_format = source_image.as_ref().map(|i| i.format());
        let format = match (&a.format, source_format) {
            // An NBD export is raw to splitvmm, the only format it reads over NBD.
            (Some(f), _) if nbd && matches!(f.as_str(), "raw" | "nbd") => ImageFormat::Raw,
            (None, _) if nbd && existing => ImageFormat::Raw,
            (Some(f), _) => format_of(f)?,
            (None, Some(f)) => f,
            (None, None) => {
                return Err(QmpError::generic(
                    "drive-mirror: give the target's 'format'",
                ));
            }
        };
        let source_backing = source_image.as_ref().and_then(|i| i.backing());
        let sync = effective_sync(a.sync, source_backing.is_some());
        // The target's backing: the source's backing (top), the source itself (none).
        let target_backing: Option<Arc<Node>> = match sync {
            SyncMode::None => source_image.clone(),
            SyncMode::Top => source_backing.clone(),
            _ => None,
        };
        let size = source.size();
        if a.replaces.is_some() && a.node_name.is_none() {
            return Err(QmpError::generic(
                "a node-name must be provided when replacing a named node of the graph",
            ));
        }
        if a.replaces.is_some() {
            return Err(QmpError::generic(
                "drive-mirror: 'replaces' is not supported",
            ));
        }
        if let Some(n) = &a.node_name {
            let graph = self.graph();
            if !ipc::common::id_wellformed(n) {
                return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
            }
            if graph.name_taken(n) || graph.is_device(n) {
                return Err(QmpError::generic(format!(
                    "Duplicate nodes with node-name='{n}'"
                )));
            }
        }
        // The nodes this command makes, besides the target (an NBD target's protocol node).
        let mut own: Vec<String> = Vec::new();
        let (target, zero_target) = match parsed.map_err(QmpError::generic)? {
            Target::File(path) => {
                let image = self
                    .mirror_file_target(&path, existing, format, size, target_backing.as_ref())
                    .await?;
                let name = self.target_name(a.node_name.clone());
                let read_only = image.read_only();
                let node = BlockNode::drive(name, image, read_only);
                (node, sync == SyncMode::Full && existing)
            }
            Target::Nbd(t) => {
                if let Some(e) = &a.connect_error {
                    return Err(nbd_open_error(existing, e));
                }
                if format != ImageFormat::Raw {
                    return Err(QmpError::generic(
                        "splitvmm writes NBD exports in format raw only: give format 'raw'",
                    ));
                }
                if target_backing.is_some() && !existing {
                    return Err(QmpError::generic(
                        "Backing file not supported for file format 'raw'",
                    ));
                }
                let fd = fds.into_iter().next().ok_or_else(|| {
                    QmpError::generic("drive-mirror: the monitor sent no NBD connection")
                })?;
                // `format: nbd` is the protocol node itself; `raw` (or probed) a raw
                // node over it, named as the target, the protocol node named by splitvmm.
                let bare = a.format.as_deref() == Some("nbd");
                let name = self.target_name(a.node_name.clone());
                let child_name = if bare {
                    name.clone()
                } else {
                    self.target_name(None)
                };
                let forget = |names: &[String]| {
                    self.graph().remove_all(names);
                };
                let nbd_node = match crate::graph::open::nbd_node(
                    fd,
                    &t.server,
                    t.export.as_deref(),
                    child_name.clone(),
                    (false, false),
                    crate::graph::NodeOptions::DRIVE,
                )
                .await
                {
                    Ok(n) => n,
                    Err(e) => {
                        forget(&[name.clone(), child_name.clone()]);
                        return Err(nbd_open_error(existing, &e.desc));
                    }
                };
                if existing && a.format.is_none() && probe_qcow2(&nbd_node).await {
                    nbd_node.close().await;
                    forget(&[name.clone(), child_name.clone()]);
                    return Err(QmpError::generic(
                        "splitvmm reads no qcow2 image over NBD: the export holds one",
                    ));
                }
                let node = if bare {
                    nbd_node
                } else {
                    self.graph().insert(nbd_node.clone(), false);
                    own.push(child_name);
                    let raw = crate::graph::open::raw_node(
                        name.clone(),
                        &nbd_node,
                        crate::graph::NodeOptions::DRIVE,
                    );
                    match raw {
                        Ok(r) => r,
                        Err(e) => {
                            forget(std::slice::from_ref(&name));
                            let gone = self.graph().remove_all(&own);
                            for n in gone {
                                n.close().await;
                            }
                            return Err(e);
                        }
                    }
                };
                // An export does not read as zeroes to begin with.
                (node, sync == SyncMode::Full)
            }
        };
        self.graph().insert(target.clone(), false);
        self.start_mirror(Start {
            job_id: a.job_id,
            source,
            device,
            blocked,
            own: {
                own.push(target.name().to_string());
                own
            },
            target,
            sync,
            zero_target,
            granularity: a.granularity,
            buf_size: a.buf_size,
            speed: a.speed,
            on_source_error: a.on_source_error,
            on_target_error: a.on_target_error,
            unmap: a.unmap.unwrap_or(true),
            copy_mode: a.copy_mode.unwrap_or_default(),
            auto_finalize: a.auto_finalize,
            auto_dismiss: a.auto_dismiss,
        })
        .await
    }

    /// `blockdev-mirror`: between two nodes of the graph; the target's own backing stays
    /// as the user built it (`MIRROR_LEAVE_BACKING_CHAIN`), and the target is pre-zeroed
    /// for `sync: full`.
    pub(crate) async fn blockdev_mirror(&self, a: BlockdevMirror) -> Result<Value, QmpError> {
        let source = self.root_source(&a.device)?;
        let device = self.graph().device_of(source.name());
        let blocked = device.clone().unwrap_or_else(|| source.name().to_string());
        let target = self.graph().lookup(Some(&a.target), Some(&a.target))?;
        self.jobs.check_blocker(&[&blocked])?;
        let target_blocked = self
            .graph()
            .device_of(target.name())
            .unwrap_or_else(|| target.name().to_string());
        self.jobs.check_blocker(&[&target_blocked])?;
        if a.replaces.is_some() {
            return Err(QmpError::generic(
                "blockdev-mirror: 'replaces' is not supported",
            ));
        }
        if a.filter_node_name.is_some() {
            return Err(QmpError::generic(
                "blockdev-mirror: 'filter-node-name' is not supported",
            ));
        }
        let backed =
            source.image().and_then(|i| i.backing()).is_some() || source.backing().is_some();
        let sync = effective_sync(a.sync, backed);
        self.start_mirror(Start {
            job_id: a.job_id,
            source,
            device,
            blocked,
            target,
            own: Vec::new(),
            sync,
            zero_target: sync == SyncMode::Full,
            granularity: a.granularity,
            buf_size: a.buf_size,
            speed: a.speed,
            on_source_error: a.on_source_error,
            on_target_error: a.on_target_error,
            unmap: true,
            copy_mode: a.copy_mode.unwrap_or_default(),
            auto_finalize: a.auto_finalize,
            auto_dismiss: a.auto_dismiss,
        })
        .await
    }

    /// A mirror's source (`qmp_get_root_bs`): a device or node name, of a root node (not
    /// one a mirror uses: QEMU has put a node above it).
    fn root_source(&self, name: &str) -> Result<Arc<BlockNode>, QmpError> {
        let graph = self.graph();
        let node = graph.lookup(Some(name), Some(name))?;
        // A device name finds the device's top node, which is the mirror filter when the
        // device is being mirrored: that is a root (and its job's op blocker answers).
        if !graph.is_root(&node) || (!graph.is_device(name) && self.jobs.in_mirror(name)) {
            return Err(QmpError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// A drive-mirror target's node name: the given one, or a generated one.
    fn target_name(&self, given: Option<String>) -> String {
        let mut graph = self.graph();
        let name = given.unwrap_or_else(|| graph.auto_name());
        graph.reserve(name.clone());
        name
    }

    /// Creates (unless `existing`) and opens a drive-mirror target file.
    async fn mirror_file_target(
        &self,
        path: &str,
        existing: bool,
        format: ImageFormat,
        size: u64,
        target_backing: Option<&Arc<Node>>,
    ) -> Result<Arc<Node>, QmpError> {
        let gate = DirGate::new(&self.image_dirs);
        if !existing {
            let p = std::path::Path::new(path);
            let dir = match p.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            gate.admit(&dir.display().to_string())
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let backing = target_backing.map(|b| (b.filename().to_string(), b.format()));
            let created = match (format, &backing) {
                (ImageFormat::Raw, Some(_)) => {
                    return Err(QmpError::generic(
                        "Backing file not supported for file format 'raw'",
                    ));
                }
                (ImageFormat::Raw, None) => create_raw(path, size).await,
                (ImageFormat::Qcow2, b) => {
                    let b = b.as_ref().map(|(n, f)| (n.as_str(), *f));
                    create_qcow2(path, size, 65536, b).await
                }
            };
            created.map_err(|e| QmpError::generic(e.to_string()))?;
        }
        let backing = match (target_backing, existing) {
            (Some(b), false) => Backing::Node(b.clone()),
            (None, false) => Backing::None,
            (_, true) => Backing::Default,
        };
        let opts = OpenOptions::new(path.to_string(), format, &self.image_dirs).backing(backing);
        Node::open(opts)
            .await
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    /// `blockdev_mirror_common`'s checks, then the job.
    async fn start_mirror(&self, s: Start) -> Result<Value, QmpError> {
        let result = self.start_mirror_inner(&s);
        if result.is_err() {
            let gone = self.graph().remove_all(&s.own);
            for n in gone {
                n.close().await;
            }
        }
        result
    }

    fn start_mirror_inner(&self, s: &Start) -> Result<Value, QmpError> {
        let granularity = s.granularity.unwrap_or(0);
        if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if granularity != 0 && !granularity.is_power_of_two() {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a power of 2",
            ));
        }
        if let SyncMode::Incremental | SyncMode::Bitmap = s.sync {
            let name = if s.sync == SyncMode::Bitmap {
                "bitmap"
            } else {
                "incremental"
            };
            return Err(QmpError::generic(format!(
                "Sync mode '{name}' not supported"
            )));
        }
        let buf_size = match s.buf_size {
            Some(n) if n < 0 => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
            Some(0) | None => DEFAULT_BUF_SIZE,
            Some(n) => n as u64,
        };
        if Arc::ptr_eq(&s.source, &s.target) {
            return Err(QmpError::generic("Can't mirror node into itself"));
        }
        if s.target.is_read_only() {
            return Err(QmpError::generic("Block node is read-only"));
        }
        let granularity = if granularity == 0 {
            default_granularity(&s.target)
        } else {
            granularity
        };
        let buf_size = buf_size.next_multiple_of(granularity);
        let backend = s.device.as_ref().and_then(|d| {
            self.drives
                .drives
                .iter()
                .find(|x| &x.config.id == d)
                .map(|x| x.backend.clone())
        });
        let size = s.source.size();
        let bitmap = Arc::new(DirtyBitmap::new(size, granularity));
        let synced = Arc::new(AtomicBool::new(false));
        let new = NewJob {
            id: s
                .job_id
                .clone()
                .unwrap_or_else(|| s.device.clone().unwrap_or_default()),
            kind: JobType::Mirror,
            blocked_node: s.blocked.clone(),
            speed: s.speed.unwrap_or(0),
            auto_finalize: s.auto_finalize.unwrap_or(true),
            auto_dismiss: s.auto_dismiss.unwrap_or(true),
        };
        let graph = self.graph_handle();
        let finish = {
            let (device, target, own) = (s.device.clone(), s.target.clone(), s.own.clone());
            move |pivoted: bool| {
                let gone: Vec<Arc<BlockNode>> = match (&graph.upgrade(), pivoted, &device) {
                    (Some(g), true, Some(d)) => crate::commands::lock_graph(g)
                        .replace_device(d, &target)
                        .into_iter()
                        .collect(),
                    (Some(g), false, _) => crate::commands::lock_graph(g).remove_all(&own),
                    _ => Vec::new(),
                };
                if !gone.is_empty() {
                    tokio::spawn(async move {
                        for node in gone {
                            node.close().await;
                        }
                    });
                }
            }
        };
        let make = || -> Result<Arc<dyn JobDriver>, QmpError> {
            Ok(Arc::new(Mirror {
                source: s.source.clone(),
                target: s.target.clone(),
                backend,
                bitmap: bitmap.clone(),
                written: DirtyBitmap::new(size, granularity),
                sync: s.sync,
                buf_size,
                on_source_error: s.on_source_error.unwrap_or_default(),
                on_target_error: s.on_target_error.unwrap_or_default(),
                unmap: s.unmap,
                zero_target: s.zero_target,
                write_blocking: AtomicBool::new(s.copy_mode == CopyMode::WriteBlocking),
                actively_synced: synced.clone(),
                commit: false,
                inner: Mutex::new(Inner::default()),
                finish: Box::new(finish),
            }))
        };
        let job = self.jobs.create(new, make)?;
        s.source.dirty.attach(bitmap);
        if s.copy_mode == CopyMode::WriteBlocking {
            s.source.dirty.set_write_through(Some(Arc::new(Through {
                target: s.target.clone(),
                synced: synced.clone(),
            })));
        }
        self.jobs.start(&job);
        Ok(json!({}))
    }
}

/// An NBD target that did not open: as the open error reads, after QEMU's preface when it
/// tried to create the image first (`mode: absolute-paths`).
fn nbd_open_error(existing: bool, why: &str) -> QmpError {
    if existing {
        QmpError::generic(why)
    } else {
        QmpError::generic(format!(
            "Protocol driver 'nbd' does not support creating new images, so an existing \
             image must be selected as the target; however, opening the given target as an \
             existing image failed: {why}"
        ))
    }
}

/// Whether an export holds a qcow2 image (what QEMU's probe would open as qcow2).
async fn probe_qcow2(node: &BlockNode) -> bool {
    let mut head = [0u8; 4];
    node.size() >= 4 && node.read(&mut head, 0).await.is_ok() && head == *b"QFI\xfb"
}
