//! The mirror job (`drive-mirror`; QMP reference §3): copies a node to a target, keeps
//! copying what is written to the source meanwhile (a [`DirtyBitmap`] on the source node,
//! fed by every write that reaches it), reports READY once both are in sync, and then
//!
//! - `block-job-complete`: quiesces the drive's requests, copies what is still dirty,
//!   flushes the target and switches the drive to the target (the pivot); the guest goes
//!   on with the target and no write is lost, since none is in flight at that moment;
//! - soft cancel after READY: the same final copy, no pivot: the target is a
//!   point-in-time copy, and the job ends with BLOCK_JOB_COMPLETED;
//! - force cancel (or any cancel before READY): the job ends with BLOCK_JOB_CANCELLED.
//!
//! Copying follows the source's allocation: a range the source reads as zeroes and holds
//! no data for is written to the target as zeroes (unmapped with `unmap`), so holes stay
//! holes in a sparse target, or not written at all where the target is known to read as
//! zeroes (`sync=full`, no data written there yet). Up to 16 copies run at once, as in
//! QEMU (with a `speed`, no more together than one rate-limit slice allows).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use ipc::QmpError;
use ipc::block::ImageFormat;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::dirty::DirtyBitmap;
use super::{JobDriver, JobError, JobType, NewJob, OnError, RunFuture, SLICE};
use crate::block::create::{create_qcow2, create_raw};
use crate::block::gate::DirGate;
use crate::block::{Backing, Node, OpenOptions};
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::{Backend, Quiesced};
use crate::graph::BlockNode;
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
    copy_mode: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
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
    inner: Mutex<Inner>,
    /// The graph's side of the end: `true` after a pivot, `false` when the target goes.
    finish: Box<dyn Fn(bool) + Send + Sync>,
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
    pivoted: bool,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Mirror {
    /// Marks what the sync mode copies at the start (`mirror_dirty_init`).
    async fn dirty_init(&self, len: u64) -> std::io::Result<()> {
        if self.sync == SyncMode::None {
            return Ok(());
        }
        if self.zero_target {
            self.target.write_zeroes(0, len, self.unmap).await?;
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
            } else if self.copy_in_kernel(offset, n) {
                self.written.mark(offset, n);
                Ok(())
            } else {
                self.written.mark(offset, n);
                let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
                match self.source.read(&mut buf, offset).await {
                    Err(e) => Err((true, e)),
                    Ok(()) => self
                        .target
                        .write(&buf, offset, false)
                        .await
                        .map_err(|e| (false, e)),
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

    /// Copies `[offset, offset + n)` from a raw image file to a raw image file in the
    /// kernel (`copy_file_range`, as `cp` does: no copy through user memory), if both
    /// are such files. `false`: not done, for any reason (other images, another file
    /// system, an I/O error), so the caller copies through a buffer, which also tells a
    /// read error from a write error.
    fn copy_in_kernel(&self, offset: u64, n: u64) -> bool {
        let (Some(src), Some(dst)) = (self.source.file_image(), self.target.file_image()) else {
            return false;
        };
        if self.target.is_read_only() || offset.saturating_add(n) > dst.size() {
            return false;
        }
        let copied = crate::block::commit::blocking(|| {
            let mut done = 0;
            while done < n {
                let (Ok(mut from), Ok(mut to)) = (
                    libc::off64_t::try_from(offset + done),
                    libc::off64_t::try_from(offset + done),
                ) else {
                    return false;
                };
                let want = usize::try_from(n - done).unwrap_or(usize::MAX);
                // SAFETY: both descriptors are open image files borrowed for the call, and
                // the two offsets are valid locals the kernel only reads and updates.
                let k = unsafe {
                    libc::copy_file_range(
                        src.os_file().as_raw_fd(),
                        &mut from,
                        dst.os_file().as_raw_fd(),
                        &mut to,
                        want,
                        0,
                    )
                };
                match u64::try_from(k) {
                    Ok(k) if k > 0 => done += k,
                    _ => return false,
                }
            }
            true
        });
        if copied {
            // What a write through the node would have told the target's watchers.
            self.target.dirty.mark(offset, n);
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
            if !job.is_ready() {
                if let Err(e) = self.target.flush().await {
                    self.failed(&job, 0, 0, false, e)?;
                    continue;
                }
                job.transition_to_ready();
            }
            let complete = lock(&self.inner).should_complete;
            if complete || job.cancel_requested() {
                // The final copy: no request to the drive in flight, none starting.
                let quiesced = match &self.backend {
                    Some(b) => Some(b.quiesce().await),
                    None => None,
                };
                if self.bitmap.dirty_bytes() > 0 {
                    continue;
                }
                if let Err(e) = self.target.flush().await {
                    drop(quiesced);
                    self.failed(&job, 0, 0, false, e)?;
                    continue;
                }
                lock(&self.inner).quiesced = quiesced;
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
            inner.pivoted = true;
        }
        Ok(())
    }

    fn clean(&self, _job: &Job) {
        self.source.dirty.detach(&self.bitmap);
        let pivoted = {
            let mut inner = lock(&self.inner);
            inner.quiesced = None;
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

    fn query_extra(&self, out: &mut Map<String, Value>) {
        // Background copy mode only: never actively synced.
        out.insert("actively-synced".into(), false.into());
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

impl State {
    /// `drive-mirror` (`qmp_drive_mirror` + `blockdev_mirror_common` + `mirror_start_job`),
    /// its checks in QEMU's order.
    pub(crate) async fn drive_mirror(&self, a: DriveMirror) -> Result<Value, QmpError> {
        let source = self.graph().lookup(Some(&a.device), Some(&a.device))?;
        let device = self.graph().device_of(source.name());
        let blocked = device.clone().unwrap_or_else(|| source.name().to_string());
        self.jobs.check_blocker(&[&blocked])?;
        let existing = a.mode.as_deref() == Some("existing");
        let source_image = source.image();
        let source_format = source_image.as_ref().map(|i| i.format());
        let format = match (&a.format, source_format) {
            (Some(f), _) => format_of(f)?,
            (None, Some(f)) => f,
            (None, None) => {
                return Err(QmpError::generic(
                    "drive-mirror: give the target's 'format'",
                ));
            }
        };
        let source_backing = source_image.as_ref().and_then(|i| i.backing());
        let mut sync = a.sync;
        if matches!(sync, SyncMode::Incremental | SyncMode::Bitmap) {
            let name = if sync == SyncMode::Bitmap {
                "bitmap"
            } else {
                "incremental"
            };
            return Err(QmpError::generic(format!(
                "Sync mode '{name}' not supported"
            )));
        }
        if source_backing.is_none() && sync == SyncMode::Top {
            sync = SyncMode::Full;
        }
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
        if a.copy_mode.as_deref() == Some("write-blocking") {
            return Err(QmpError::generic(
                "drive-mirror: copy-mode 'write-blocking' is not supported",
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
        let gate = DirGate::new(&self.image_dirs);
        if !existing {
            let path = std::path::Path::new(&a.target);
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            gate.admit(&dir.display().to_string())
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let backing = target_backing
                .as_ref()
                .map(|b| (b.filename().to_string(), b.format()));
            let created = match (format, &backing) {
                (ImageFormat::Raw, Some(_)) => {
                    return Err(QmpError::generic(
                        "Backing file not supported for file format 'raw'",
                    ));
                }
                (ImageFormat::Raw, None) => create_raw(&a.target, size).await,
                (ImageFormat::Qcow2, b) => {
                    let b = b.as_ref().map(|(n, f)| (n.as_str(), *f));
                    create_qcow2(&a.target, size, 65536, b).await
                }
            };
            created.map_err(|e| QmpError::generic(e.to_string()))?;
        }
        let backing = match (&target_backing, existing) {
            (Some(b), false) => Backing::Node(b.clone()),
            (None, false) => Backing::None,
            (_, true) => Backing::Default,
        };
        let opts = OpenOptions::new(a.target.clone(), format, &self.image_dirs).backing(backing);
        let image = Node::open(opts)
            .await
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let zero_target = sync == SyncMode::Full && existing;
        // blockdev_mirror_common's checks.
        let granularity = a.granularity.unwrap_or(0);
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
        let buf_size = match a.buf_size {
            Some(n) if n < 0 => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
            Some(0) | None => DEFAULT_BUF_SIZE,
            Some(n) => n as u64,
        };
        let target_name = {
            let mut graph = self.graph();
            let name = a.node_name.clone().unwrap_or_else(|| graph.auto_name());
            graph.reserve(name.clone());
            name
        };
        let read_only = image.read_only();
        let target = BlockNode::drive(target_name.clone(), image, read_only);
        self.graph().insert(target.clone(), false);
        let granularity = if granularity == 0 {
            default_granularity(&target)
        } else {
            granularity
        };
        let buf_size = buf_size.next_multiple_of(granularity);
        let backend = device.as_ref().and_then(|d| {
            self.drives
                .drives
                .iter()
                .find(|x| &x.config.id == d)
                .map(|x| x.backend.clone())
        });
        let bitmap = Arc::new(DirtyBitmap::new(size, granularity));
        let new = NewJob {
            id: a
                .job_id
                .clone()
                .unwrap_or_else(|| device.clone().unwrap_or_default()),
            kind: JobType::Mirror,
            blocked_node: blocked,
            speed: a.speed.unwrap_or(0),
            auto_finalize: a.auto_finalize.unwrap_or(true),
            auto_dismiss: a.auto_dismiss.unwrap_or(true),
        };
        let graph = self.graph_handle();
        let finish = {
            let (device, target, target_name) = (device.clone(), target.clone(), target_name);
            move |pivoted: bool| {
                let gone = match (&graph.upgrade(), pivoted, &device) {
                    (Some(g), true, Some(d)) => {
                        crate::commands::lock_graph(g).replace_device(d, &target)
                    }
                    (Some(g), _, _) => crate::commands::lock_graph(g)
                        .remove_all(std::slice::from_ref(&target_name))
                        .pop(),
                    _ => None,
                };
                if let Some(node) = gone {
                    tokio::spawn(async move { node.close().await });
                }
            }
        };
        let make = || -> Result<Arc<dyn JobDriver>, QmpError> {
            Ok(Arc::new(Mirror {
                source: source.clone(),
                target: target.clone(),
                backend,
                bitmap: bitmap.clone(),
                written: DirtyBitmap::new(size, granularity),
                sync,
                buf_size,
                on_source_error: a.on_source_error.unwrap_or_default(),
                on_target_error: a.on_target_error.unwrap_or_default(),
                unmap: a.unmap.unwrap_or(true),
                zero_target,
                inner: Mutex::new(Inner::default()),
                finish: Box::new(finish),
            }))
        };
        let job = match self.jobs.create(new, make) {
            Ok(j) => j,
            Err(e) => {
                let gone = self
                    .graph()
                    .remove_all(std::slice::from_ref(&target.name().to_string()));
                for n in gone {
                    n.close().await;
                }
                return Err(e);
            }
        };
        source.dirty.attach(bitmap);
        self.jobs.start(&job);
        Ok(json!({}))
    }
}
