//! The stream job (`block-stream`, and `block_stream`, its 2012 name; QMP reference §4):
//! copies into an image of a drive's chain (its active image, or one below it that the
//! graph names) every cluster it does not hold that some image between it and `base`
//! holds (QEMU's copy-on-read of those clusters), in 512 KiB chunks, then makes `base` its
//! backing (in the image header too: `backing-file` or the base's file name, or no backing
//! file at all when the whole chain was streamed) and drops the streamed images from the
//! chain and the graph. An image below the active one is reopened read/write for the job
//! (possible for one that was a drive's active image before a snapshot) and read-only
//! after it; the images above it then read through its new state.
//!
//! A chunk that has something to copy is copied with the drive's requests quiesced (no
//! guest request in flight, none starting), after its allocation is read again: a guest
//! write to a cluster is never overwritten by older data from the backing chain. That is
//! what QEMU's copy-on-read filter and request serialisation ensure.

use std::sync::Arc;

use ipc::QmpError;
use serde::Deserialize;
use serde_json::{Value, json};

use super::chain::{DriveChain, find_backing_image};
use super::{ErrorAction, Job, JobDriver, JobError, JobType, NewJob, OnError, RunFuture};
use crate::block::Node;
use crate::commands::State;
use crate::device::BlockDevice;
use crate::drives::Backend;
use crate::graph::BlockNode;

/// `STREAM_CHUNK`.
const CHUNK: u64 = 512 << 10;

/// `block-stream`'s arguments (QEMU 10). `backing-mask-protocol` is not read: bases are
/// format nodes here, so masking changes nothing.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    job_id: Option<String>,
    device: String,
    base: Option<String>,
    base_node: Option<String>,
    backing_file: Option<String>,
    bottom: Option<String>,
    speed: Option<i64>,
    on_error: Option<OnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// The stream job's driver. See the module documentation.
pub struct Stream {
    /// The drive's requests, quiesced while a chunk is copied; none for a node made by
    /// `blockdev-add`.
    backend: Option<Arc<Backend>>,
    /// A `blockdev-add` qcow2 node streamed into, and the node of its chain that `base`
    /// is: the node's backing child becomes that at the end.
    graph_nodes: Option<(Arc<BlockNode>, Option<Arc<BlockNode>>)>,
    /// The image streamed into: the drive's active image, or one below it.
    top: Arc<Node>,
    /// The images above `top` up to the active one, bottom-up (none when `top` is the
    /// active image): they read through `top` and get its new imago instance at the end.
    overlays: Vec<Arc<Node>>,
    /// `top` was reopened read/write for the job and goes back to read-only after it.
    restore_read_only: bool,
    base: Option<Arc<Node>>,
    /// The backing file name the header gets (`backing-file`, or the base's name).
    backing_file: Option<String>,
    on_error: OnError,
    /// The graph's side of the end: the streamed images leave it.
    finish: Box<dyn Fn(Vec<Arc<Node>>) + Send + Sync>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("top", &self.top.filename())
            .finish_non_exhaustive()
    }
}

fn is_base(node: &Option<Arc<Node>>, base: &Option<Arc<Node>>) -> bool {
    match (node, base) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// Ranges of `[offset, offset + len)` that an image from `from` down to (not including)
/// `base` holds (`bdrv_is_allocated_above`), as `(offset, len, zero)`: `zero` when the
/// holding image has them as zeroes.
pub(crate) async fn allocated_above(
    from: Option<Arc<Node>>,
    base: &Option<Arc<Node>>,
    offset: u64,
    len: u64,
) -> std::io::Result<Vec<(u64, u64, bool)>> {
    let mut out = Vec::new();
    // (layer, offset, len) still to look at.
    let mut todo = vec![(from, offset, len)];
    while let Some((layer, off, len)) = todo.pop() {
        let Some(node) = layer.filter(|l| !is_base(&Some(l.clone()), base)) else {
            continue;
        };
        let end = (off + len).min(node.size());
        let mut pos = off;
        while pos < end {
            let extents = node.block_status(pos, end - pos).await?;
            if extents.is_empty() {
                break;
            }
            for e in extents {
                let l = e.length.min(end - pos);
                if e.allocated_here {
                    out.push((pos, l, e.zero && !e.data));
                } else {
                    todo.push((node.backing(), pos, l));
                }
                pos += l;
            }
        }
    }
    out.sort_unstable_by_key(|r| r.0);
    Ok(out)
}

impl Stream {
    /// What to copy in the chunk at `offset`: the ranges the top image lacks and the
    /// chain above base holds.
    async fn plan(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let extents = self.top.block_status(pos, end - pos).await?;
            if extents.is_empty() {
                break;
            }
            for e in extents {
                let l = e.length.min(end - pos);
                if !e.allocated_here {
                    out.extend(allocated_above(self.top.backing(), &self.base, pos, l).await?);
                }
                pos += l;
            }
        }
        Ok(out)
    }

    /// Copies the chunk at `offset` (quiesced if there is anything to copy). Returns the
    /// bytes copied.
    async fn copy_chunk(&self, offset: u64, len: u64) -> std::io::Result<u64> {
        if self.plan(offset, len).await?.is_empty() {
            return Ok(0);
        }
        // Only the active image takes guest writes.
        let _quiesced = match (&self.backend, self.overlays.is_empty()) {
            (Some(b), true) => Some(b.quiesce().await),
            _ => None,
        };
        let mut copied = 0;
        for (off, n, zero) in self.plan(offset, len).await? {
            if zero {
                self.top.write_zeroes(off, n, false).await?;
                continue;
            }
            let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.top.read(&mut buf, off).await?;
            if buf.iter().all(|b| *b == 0) {
                self.top.write_zeroes(off, n, false).await?;
            } else {
                self.top.write(&buf, off, false).await?;
            }
            copied += n;
        }
        Ok(copied)
    }

    async fn main(self: Arc<Self>, job: Arc<Job>) -> Result<(), JobError> {
        if is_base(&self.top.backing(), &self.base) {
            return Ok(());
        }
        let len = self.top.size();
        job.set_remaining(len);
        let mut first_error = None;
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
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    match job.error_action(self.on_error, true, errno) {
                        // Paused: the same chunk again once resumed.
                        ErrorAction::Stop => continue,
                        ErrorAction::Report => return Err(JobError::Io(e)),
                        ErrorAction::Ignore => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            job.progress(n);
            offset += n;
        }
        // "Do not remove the backing file if an error was there but ignored."
        if let Some(e) = first_error {
            return Err(JobError::Io(e));
        }
        Ok(())
    }

    /// `stream_prepare`: base becomes the top image's backing, in memory and in its
    /// header; the streamed images leave the chain.
    async fn switch_backing(&self) -> std::io::Result<()> {
        let _quiesced = match &self.backend {
            Some(b) => Some(b.quiesce().await),
            None => None,
        };
        let mut dropped = Vec::new();
        let mut cur = self.top.backing();
        while let Some(n) = cur.filter(|n| !is_base(&Some(n.clone()), &self.base)) {
            cur = n.backing();
            dropped.push(n);
        }
        self.top.set_backing(self.base.clone()).await?;
        let header = match (&self.base, &self.backing_file) {
            (Some(b), Some(name)) => Some((name.as_str(), b.format())),
            (Some(b), None) => Some((b.filename(), b.format())),
            (None, _) => None,
        };
        self.top.set_backing_file(header).await?;
        if self.restore_read_only {
            self.top.reopen(true).await?;
        }
        let mut below = self.top.clone();
        for o in self.overlays.iter().rev() {
            o.set_backing(Some(below)).await?;
            below = o.clone();
        }
        if let Some((node, base)) = &self.graph_nodes {
            node.replace_backing(base.as_ref())
                .map_err(|e| std::io::Error::other(e.desc))?;
        }
        (self.finish)(dropped);
        Ok(())
    }
}

impl JobDriver for Stream {
    fn run(self: Arc<Self>, job: Arc<Job>) -> RunFuture {
        Box::pin(self.main(job))
    }

    /// `stream_prepare`: the new backing chain, at finalization (so a job waiting in
    /// `pending` has changed nothing yet).
    fn prepare(&self, _job: &Job) -> Result<(), String> {
        super::block_on(self.switch_backing()).map_err(|e| ipc::common::os_error_text(&e))
    }

    /// `stream_clean`: an image reopened read/write for the job goes back to read-only.
    fn abort(&self, _job: &Job) {
        if self.restore_read_only {
            let top = self.top.clone();
            tokio::spawn(async move {
                if let Err(e) = top.reopen(true).await {
                    tracing::warn!("stream: reopening {} read-only: {e}", top.filename());
                }
            });
        }
    }
}

impl State {
    /// `block-stream` (`qmp_block_stream` + `stream_start`), its checks in QEMU's order.
    pub(crate) async fn block_stream(&self, a: BlockStream) -> Result<Value, QmpError> {
        let both = |x: &str, y: &str| {
            QmpError::generic(format!(
                "'{x}' and '{y}' cannot be specified at the same time"
            ))
        };
        if a.base.is_some() && a.base_node.is_some() {
            return Err(both("base", "base-node"));
        }
        if a.base.is_some() && a.bottom.is_some() {
            return Err(both("base", "bottom"));
        }
        if a.bottom.is_some() && a.base_node.is_some() {
            return Err(both("bottom", "base-node"));
        }
        let node = self.graph().lookup(Some(&a.device), Some(&a.device))?;
        // The image streamed into: the drive's active image, or one below it, or a qcow2
        // node made by `blockdev-add` (no drive: `chain` is none).
        let (chain, top) = match self.drive_chain(&node, "block-stream") {
            Ok(c) => {
                let top = c.top.clone();
                (Some(c), top)
            }
            Err(e) => {
                let below = node
                    .image()
                    .and_then(|i| Some((self.drive_chain_below(&i)?, i)));
                match below {
                    Some((c, i)) => (Some(c), i),
                    // Only a node no other node reads through: the images above one would
                    // keep reading its old state.
                    None => match (node.driver(), node.image()) {
                        (crate::graph::Driver::Qcow2, Some(i))
                            if self.graph().parents(&node).is_empty() =>
                        {
                            (None, i)
                        }
                        (crate::graph::Driver::Qcow2, Some(_)) => {
                            return Err(QmpError::generic(format!(
                                "block-stream: streaming into node '{}', which another node \
                                 uses, is not supported",
                                node.name()
                            )));
                        }
                        _ => return Err(e),
                    },
                }
            }
        };
        let active = chain.as_ref().is_some_and(|c| Arc::ptr_eq(&top, &c.top));
        let in_chain = |i: &Arc<Node>| {
            let mut cur = top.backing();
            while let Some(n) = cur {
                if Arc::ptr_eq(&n, i) {
                    return true;
                }
                cur = n.backing();
            }
            false
        };
        // `None` inside: stream the whole chain.
        let mut base: Option<Arc<Node>> = None;
        if let Some(name) = &a.base {
            base = Some(find_backing_image(&top, name).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{name}' in the backing chain"))
            })?);
        }
        if let Some(name) = &a.base_node {
            let b = self.graph().lookup(None, Some(name))?;
            let image = b.image().filter(|i| in_chain(i)).ok_or_else(|| {
                QmpError::generic(format!(
                    "Node '{name}' is not a backing image of '{}'",
                    a.device
                ))
            })?;
            base = Some(image);
        }
        if let Some(name) = &a.bottom {
            let b = self.graph().lookup(None, Some(name))?;
            let image = b
                .image()
                .filter(|i| Arc::ptr_eq(i, &top) || in_chain(i))
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Node '{name}' is not in a chain starting from '{}'",
                        a.device
                    ))
                })?;
            base = image.backing();
        }
        let blocked = if let Some(chain) = chain.as_ref().filter(|_| active) {
            self.check_chain_blockers(chain, &base)?;
            chain.device.clone()
        } else {
            let mut names = vec![node.name().to_string()];
            let mut cur = top.backing();
            while let Some(n) = cur.filter(|n| !is_base(&Some(n.clone()), &base)) {
                names.extend(self.image_name(&n));
                cur = n.backing();
            }
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            self.jobs.check_blocker(&refs)?;
            node.name().to_string()
        };
        if base.is_none() && a.backing_file.is_some() {
            return Err(QmpError::generic(
                "backing file specified, but streaming the entire chain",
            ));
        }
        // `stream_start` reopens a read-only image read/write for the job.
        let restore_read_only = top.is_read_only();
        if restore_read_only && top.reopen(false).await.is_err() {
            return Err(QmpError::generic("Block node is read-only"));
        }
        if let Some(n) = &a.filter_node_name
            && self.graph().name_taken(n)
        {
            if restore_read_only {
                let _ = top.reopen(true).await;
            }
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
        // QEMU names the job after the node's device: an image below the active layer
        // has none, so it needs an explicit `job-id` ("Invalid job ID ''").
        let default_id = match &chain {
            Some(c) if active => c.device.clone(),
            _ => String::new(),
        };
        let new = NewJob {
            id: a.job_id.clone().unwrap_or(default_id),
            kind: JobType::Stream,
            blocked_node: blocked,
            speed: a.speed.unwrap_or(0),
            auto_finalize: a.auto_finalize.unwrap_or(true),
            auto_dismiss: a.auto_dismiss.unwrap_or(true),
        };
        let mut overlays = Vec::new();
        if let Some(chain) = chain.as_ref().filter(|_| !active) {
            let mut cur = Some(chain.top.clone());
            while let Some(n) = cur.filter(|n| !Arc::ptr_eq(n, &top)) {
                cur = n.backing();
                overlays.push(n);
            }
        }
        // A `blockdev-add` node: the node of its chain that `base` is.
        let graph_nodes = chain.is_none().then(|| {
            let mut cur = node.backing();
            while let Some(b) = cur.take() {
                if base
                    .as_ref()
                    .is_some_and(|i| b.image().is_some_and(|x| Arc::ptr_eq(&x, i)))
                {
                    return (node.clone(), Some(b));
                }
                cur = b.backing();
            }
            (node.clone(), None)
        });
        let graph = self.graph_handle();
        let finish = move |dropped: Vec<Arc<Node>>| {
            if let Some(g) = graph.upgrade() {
                let gone = crate::commands::lock_graph(&g).remove_images(&dropped);
                drop(gone);
            }
        };
        let job = self.jobs.create(new, || {
            Ok(Arc::new(Stream {
                backend: chain.as_ref().map(|c| c.backend.clone()),
                graph_nodes: graph_nodes.clone(),
                top: top.clone(),
                overlays,
                restore_read_only,
                base,
                backing_file: a.backing_file.clone(),
                on_error: a.on_error.unwrap_or_default(),
                finish: Box::new(finish),
            }))
        });
        let job = match job {
            Ok(j) => j,
            Err(e) => {
                if restore_read_only {
                    let _ = top.reopen(true).await;
                }
                return Err(e);
            }
        };
        self.jobs.start(&job);
        Ok(json!({}))
    }

    /// The op blockers of the chain from the drive down to `base` (its device and the
    /// graph names of its images).
    pub(crate) fn check_chain_blockers(
        &self,
        chain: &DriveChain,
        base: &Option<Arc<Node>>,
    ) -> Result<(), QmpError> {
        let mut names = vec![chain.device.clone(), chain.node.name().to_string()];
        for n in chain.backing_chain() {
            if is_base(&Some(n.clone()), base) {
                break;
            }
            names.extend(self.image_name(&n));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.jobs.check_blocker(&refs)
    }
}
