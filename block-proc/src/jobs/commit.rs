//! `block-commit` (QMP reference §2.3, §4): merges the images from `top` down to (not
//! including) `base` into `base`.
//!
//! - **Intermediate commit** (`top` below the drive's active layer; QEMU's `commit_start`):
//!   a job of its own that copies, chunk by chunk, what `top` and the images between it
//!   and `base` hold into `base`, then makes `base` the backing of `top`'s overlay (in its
//!   header too: `backing-file` or the base's file name) and drops the committed images.
//!   It ends by itself with `BLOCK_JOB_COMPLETED`.
//! - **Active commit** (`top` is the active layer; `commit_active_start`): the mirror job
//!   (`Mirror::active_commit`) with the base as its target, type `commit`:
//!   READY once in sync, and `block-job-complete` switches the drive to the base.
//!
//! The base is opened anew read/write for the job (QEMU reopens it in place; a backing
//! file's descriptor here is read-only), while the old read-only node lets it write. The
//! base grows to the top's size if it is smaller, as QEMU's does.

use std::sync::Arc;

use ipc::QmpError;
use serde::Deserialize;
use serde_json::{Value, json};

use super::chain::{DriveChain, find_backing_image};
use super::dirty::DirtyBitmap;
use super::mirror::{ActiveCommit, Mirror};
use super::stream::allocated_above;
use super::{ErrorAction, Job, JobDriver, JobError, JobType, NewJob, OnError, RunFuture};
use crate::block::{Backing, Node, OpenOptions};
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::Backend;
use crate::graph::BlockNode;

/// `COMMIT_BUFFER_SIZE`: the chunk an intermediate commit copies at a time.
const CHUNK: u64 = 512 << 10;

/// `block-commit`'s arguments (QEMU 10). `backing-mask-protocol` is not read: bases are
/// format nodes here, so masking changes nothing.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCommit {
    job_id: Option<String>,
    device: String,
    base_node: Option<String>,
    base: Option<String>,
    top_node: Option<String>,
    top: Option<String>,
    backing_file: Option<String>,
    speed: Option<i64>,
    on_error: Option<OnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// The intermediate commit job's driver. See the module documentation.
pub struct Commit {
    backend: Arc<Backend>,
    /// The image above `top` (its backing changes to the base at the end).
    overlay: Arc<Node>,
    top: Arc<Node>,
    /// The base as the chain had it (read-only), and opened anew read/write for the job.
    old_base: Arc<Node>,
    base: Arc<Node>,
    backing_file: Option<String>,
    on_error: OnError,
    /// The graph's side of a successful end: the committed images leave it, and the
    /// base's node stands for the new base.
    finish: Box<GraphUpdate>,
}

/// The graph update at the end of an intermediate commit: (committed images, old base,
/// new base).
type GraphUpdate = dyn Fn(&[Arc<Node>], &Arc<Node>, &Arc<Node>) + Send + Sync;

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("top", &self.top.filename())
            .field("base", &self.base.filename())
            .finish_non_exhaustive()
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Commit {
    /// Copies what the chunk at `offset` holds above the base into the base. Returns the
    /// bytes copied, or the error and whether it was a read.
    async fn copy_chunk(&self, offset: u64, len: u64) -> Result<u64, (bool, std::io::Error)> {
        let base = Some(self.old_base.clone());
        let ranges = allocated_above(Some(self.top.clone()), &base, offset, len)
            .await
            .map_err(|e| (true, e))?;
        let mut copied = 0;
        for (off, n, zero) in ranges {
            if zero {
                self.base
                    .write_zeroes(off, n, false)
                    .await
                    .map_err(|e| (false, e))?;
                continue;
            }
            let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.top.read(&mut buf, off).await.map_err(|e| (true, e))?;
            self.base
                .write(&buf, off, false)
                .await
                .map_err(|e| (false, e))?;
            copied += n;
        }
        Ok(copied)
    }

    async fn main(self: Arc<Self>, job: Arc<Job>) -> Result<(), JobError> {
        let len = self.top.size();
        if self.base.size() < len {
            self.base.resize(len).await.map_err(JobError::Io)?;
        }
        job.set_remaining(len);
        let mut offset = 0;
        while offset < len {
            job.ratelimit_sleep().await;
            if job.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let n = CHUNK.min(len - offset);
            match self.copy_chunk(offset, n).await {
                Ok(copied) => {
                    if copied > 0 {
                        job.ratelimit_processed(copied);
                    }
                }
                Err((read, e)) => match job.error_action(self.on_error, read, errno(&e)) {
                    ErrorAction::Stop => continue,
                    ErrorAction::Report => return Err(JobError::Io(e)),
                    ErrorAction::Ignore => {}
                },
            }
            job.progress(n);
            offset += n;
        }
        self.base.flush().await.map_err(JobError::Io)?;
        Ok(())
    }

    /// `commit_prepare`: the base, read-only again, becomes the overlay's backing.
    async fn switch_backing(&self) -> std::io::Result<()> {
        let _quiesced = self.backend.quiesce().await;
        self.base.reopen(true).await?;
        let mut dropped = Vec::new();
        let mut cur = Some(self.top.clone());
        while let Some(n) = cur.filter(|n| !Arc::ptr_eq(n, &self.old_base)) {
            cur = n.backing();
            dropped.push(n);
        }
        self.overlay.set_backing(Some(self.base.clone())).await?;
        let name = self.backing_file.as_deref().unwrap_or(self.base.filename());
        self.overlay
            .set_backing_file(Some((name, self.base.format())))
            .await?;
        (self.finish)(&dropped, &self.old_base, &self.base);
        Ok(())
    }
}

impl JobDriver for Commit {
    fn run(self: Arc<Self>, job: Arc<Job>) -> RunFuture {
        Box::pin(self.main(job))
    }

    /// `commit_prepare`: the new backing chain, at finalization (so a job waiting in
    /// `pending` has changed nothing yet).
    fn prepare(&self, _job: &Job) -> Result<(), String> {
        super::block_on(self.switch_backing()).map_err(|e| ipc::common::os_error_text(&e))
    }

    /// Failed or cancelled: the new base is not used; the old one locks as before.
    fn abort(&self, _job: &Job) {
        undo_base(&self.base, &self.old_base);
    }
}

/// The base opened for a job that did not switch to it: it lets go of the file, and the
/// chain's base takes its usual locks again.
fn undo_base(base: &Node, old_base: &Node) {
    base.release_locks();
    if let Err(e) = old_base.share_writes(false) {
        tracing::warn!("commit: relocking {}: {e}", old_base.filename());
    }
}

impl State {
    /// `block-commit` (`qmp_block_commit`), its checks in QEMU's order.
    pub(crate) async fn block_commit(&self, a: BlockCommit) -> Result<Value, QmpError> {
        // QEMU looks the device up first (libvirt probes for DeviceNotFound).
        let node = self
            .graph()
            .lookup(Some(&a.device), Some(&a.device))
            .map_err(|_| {
                QmpError::new(
                    ipc::common::ErrorClass::DeviceNotFound,
                    format!("Device '{}' not found", a.device),
                )
            })?;
        let chain = self.drive_chain(&node, "block-commit")?;
        self.jobs.check_blocker(&[&chain.device, node.name()])?;
        let images = {
            let mut v = vec![chain.top.clone()];
            v.extend(chain.backing_chain());
            v
        };
        let top = match (&a.top_node, &a.top) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'top-node' and 'top' are mutually exclusive",
                ));
            }
            (Some(name), None) => {
                let n = self.graph().lookup(None, Some(name))?;
                n.image().filter(|i| chain.contains(i)).ok_or_else(|| {
                    QmpError::generic(format!("'{name}' is not in this backing file chain"))
                })?
            }
            (None, Some(name)) if name != chain.top.filename() => {
                find_backing_image(&chain.top, name)
                    .ok_or_else(|| QmpError::generic(format!("Top image file {name} not found")))?
            }
            _ => chain.top.clone(),
        };
        let base = match (&a.base_node, &a.base) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'base-node' and 'base' are mutually exclusive",
                ));
            }
            (Some(name), None) => {
                let n = self.graph().lookup(None, Some(name))?;
                let in_chain = |i: &Arc<Node>| Arc::ptr_eq(i, &top) || find_in(&top, i);
                n.image().filter(in_chain).ok_or_else(|| {
                    QmpError::generic(format!("'{name}' is not in this backing file chain"))
                })?
            }
            (None, Some(name)) => find_backing_image(&top, name).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{name}' in the backing chain"))
            })?,
            (None, None) => images
                .last()
                .filter(|b| !Arc::ptr_eq(b, &top))
                .cloned()
                .ok_or_else(|| QmpError::generic("There is no backimg image"))?,
        };
        if Arc::ptr_eq(&top, &base) {
            return Err(QmpError::generic("cannot commit an image into itself"));
        }
        let active = Arc::ptr_eq(&top, &chain.top);
        if active && a.backing_file.is_some() {
            return Err(QmpError::generic(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        if let Some(n) = &a.filter_node_name
            && self.graph().name_taken(n)
        {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
        let overlay = images
            .iter()
            .zip(images.iter().skip(1))
            .find(|(_, b)| Arc::ptr_eq(b, &top))
            .map(|(o, _)| o.clone());
        if let Some(o) = &overlay
            && o.is_read_only()
        {
            return Err(QmpError::generic(
                "block-commit: only an image right below the active layer can be committed \
                 without committing the active layer",
            ));
        }
        // The base, read/write for the job.
        base.share_writes(true)
            .map_err(|e| QmpError::generic(ipc::common::os_error_text(&e)))?;
        let backing = match base.backing() {
            Some(b) => Backing::Node(b),
            None => Backing::None,
        };
        let opts = OpenOptions::new(base.filename().to_string(), base.format(), &self.image_dirs)
            .backing(backing);
        let new_base = match Node::open(opts).await {
            Ok(n) => n,
            Err(e) => {
                let _ = base.share_writes(false);
                return Err(QmpError::generic(e.to_string()));
            }
        };
        let id = a.job_id.clone().unwrap_or_else(|| chain.device.clone());
        let new = NewJob {
            id,
            kind: JobType::Commit,
            blocked_node: chain.device.clone(),
            speed: a.speed.unwrap_or(0),
            auto_finalize: a.auto_finalize.unwrap_or(true),
            auto_dismiss: a.auto_dismiss.unwrap_or(true),
        };
        let on_error = a.on_error.unwrap_or_default();
        let result = if active {
            self.start_active_commit(new, &chain, &base, &new_base, on_error)
                .await
        } else {
            let graph = self.graph_handle();
            let finish = move |dropped: &[Arc<Node>], old: &Arc<Node>, new: &Arc<Node>| {
                if let Some(g) = graph.upgrade() {
                    let mut g = crate::commands::lock_graph(&g);
                    g.replace_image(old, new);
                    drop(g.remove_images(dropped));
                }
            };
            let driver = Arc::new(Commit {
                backend: chain.backend.clone(),
                overlay: overlay.unwrap_or_else(|| chain.top.clone()),
                top,
                old_base: base.clone(),
                base: new_base.clone(),
                backing_file: a.backing_file.clone(),
                on_error,
                finish: Box::new(finish),
            });
            self.jobs
                .create(new, || Ok(driver as Arc<dyn JobDriver>))
                .map(|job| self.jobs.start(&job))
        };
        if let Err(e) = result {
            undo_base(&new_base, &base);
            return Err(e);
        }
        Ok(json!({}))
    }

    /// `commit_active_start`: the drive's active layer mirrored into `new_base` (the base
    /// opened read/write), which the drive uses after `block-job-complete`.
    async fn start_active_commit(
        &self,
        new: NewJob,
        chain: &DriveChain,
        old_base: &Arc<Node>,
        new_base: &Arc<Node>,
        on_error: OnError,
    ) -> Result<(), QmpError> {
        let len = chain.top.size();
        if new_base.size() < len {
            new_base
                .resize(len)
                .await
                .map_err(|e| QmpError::generic(ipc::common::os_error_text(&e)))?;
        }
        let bitmap = Arc::new(DirtyBitmap::new(len, 65536));
        let ranges = allocated_above(Some(chain.top.clone()), &Some(old_base.clone()), 0, len)
            .await
            .map_err(|e| QmpError::generic(ipc::common::os_error_text(&e)))?;
        for (off, n, _) in ranges {
            bitmap.mark(off, n);
        }
        let name = {
            let g = self.graph();
            g.node_of_image(old_base).map(|n| n.name().to_string())
        };
        let name = match name {
            Some(n) => n,
            None => self.graph().auto_name(),
        };
        let target = BlockNode::drive(name, new_base.clone(), false);
        let mut dropped = vec![chain.top.clone()];
        dropped.extend(
            chain
                .backing_chain()
                .into_iter()
                .take_while(|n| !Arc::ptr_eq(n, old_base)),
        );
        dropped.push(old_base.clone());
        let graph = self.graph_handle();
        let finish = {
            let (device, target, new_base, old_base) = (
                chain.device.clone(),
                target.clone(),
                new_base.clone(),
                old_base.clone(),
            );
            move |pivoted: bool| {
                if !pivoted {
                    undo_base(&new_base, &old_base);
                    return;
                }
                let Some(g) = graph.upgrade() else { return };
                let mut g = crate::commands::lock_graph(&g);
                drop(g.remove_images(&dropped));
                g.insert(target.clone(), false);
                if let Some(old) = g.replace_device(&device, &target) {
                    tokio::spawn(async move { old.close().await });
                }
            }
        };
        let mirror = Mirror::active_commit(ActiveCommit {
            source: chain.node.clone(),
            target,
            backend: chain.backend.clone(),
            bitmap: bitmap.clone(),
            on_error,
            finish: Box::new(finish),
        });
        let job = self.jobs.create(new, || Ok(mirror as Arc<dyn JobDriver>))?;
        chain.node.dirty.attach(bitmap);
        self.jobs.start(&job);
        Ok(())
    }
}

/// Whether `image` is below `top` in its chain.
fn find_in(top: &Arc<Node>, image: &Arc<Node>) -> bool {
    let mut cur = top.backing();
    while let Some(n) = cur {
        if Arc::ptr_eq(&n, image) {
            return true;
        }
        cur = n.backing();
    }
    false
}
