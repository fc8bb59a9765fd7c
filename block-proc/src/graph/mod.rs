//! The block graph: every block node block-proc holds, by node name, as QEMU's graph of
//! `BlockDriverState`s. It owns what `blockdev-add` and `blockdev-del` change, the lookup
//! of a device id or node name that other commands use (`nbd-server-add`,
//! `block-export-add`, `block_resize`, later the block jobs), and what
//! `query-named-block-nodes` says.
//!
//! - A [`BlockNode`] is a node of one driver: `file` (the bytes of an image file), `raw` (its
//!   `file` child's bytes, or a window of them), `qcow2` (an image on its `file` child,
//!   reading unallocated clusters from its `backing` child) or `nbd` (a remote export, over
//!   a socket the monitor connected). A `--drive`'s image is a node too, of its format, with
//!   its own locks and backing chain (see [`crate::drives`]).
//! - Parents hold [`Claim`]s on their children, users (exports) on the nodes they use:
//!   QEMU's permission model ([`perm`]), which also decides the image locks.
//! - A `blkdebug` node ([`blkdebug`]) is a filter over its `image` child that fails the
//!   requests its rules pick, for testing error policies.
//! - [`open`] turns a `blockdev-add` definition into nodes, in QEMU's order and with its
//!   errors; [`Graph::delete`] is `blockdev-del`'s graph half.
//! - A node is a [`BlockDevice`]: `raw` nodes pass requests to their child, and each node
//!   applies its own options (`discard`, `detect-zeroes`, `cache.no-flush`).

pub mod blkdebug;
pub mod open;
pub mod perm;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use ipc::QmpError;
use ipc::block::ImageFormat;
use serde_json::{Map, Value, json};

use crate::block::Node;
use crate::device::{BlockDevice, Extent};
use crate::nbd::NbdClient;
use blkdebug::{Event, IoType};

pub use perm::{Claim, Role, User};

/// Longest node name QEMU accepts (its `node_name` buffer holds 32 bytes).
pub const MAX_NODE_NAME: usize = 31;

/// Most images in a backing chain splitvmm opens (QEMU has no limit). Each level nests
/// the node's `query-named-block-nodes` answer one level deeper, and the monitor reads at
/// most 128 levels of JSON from block-proc.
pub const MAX_BACKING_CHAIN: u32 = 100;

/// Most nodes on a path from a node down to an image (a leaf) in the graph: requests and
/// opens recurse along it.
pub const MAX_GRAPH_DEPTH: usize = 128;

/// A node's driver, as QMP names it (`drv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    File,
    Raw,
    Qcow2,
    Nbd,
    Blkdebug,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Nbd => "nbd",
            Self::Blkdebug => "blkdebug",
        }
    }
}

impl From<ImageFormat> for Driver {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Raw => Self::Raw,
            ImageFormat::Qcow2 => Self::Qcow2,
        }
    }
}

/// QAPI `BlockdevDetectZeroesOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    Off,
    On,
    Unmap,
}

impl DetectZeroes {
    fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Unmap => "unmap",
        }
    }
}

/// The options that change how a node handles requests (QEMU's per-node open flags).
#[derive(Debug, Clone, Copy)]
pub struct NodeOptions {
    /// `discard=unmap`: discards reach the image and write-zeroes may free space; with
    /// `ignore` (QEMU's default) discards do nothing and zeroes are always written.
    pub discard: bool,
    /// `detect-zeroes`: writes of zeroes become write-zeroes (`unmap`: that may free
    /// space).
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flushes do nothing.
    pub no_flush: bool,
}

impl NodeOptions {
    /// A `--drive`'s: requests pass unchanged.
    pub const DRIVE: Self = Self {
        discard: true,
        detect_zeroes: DetectZeroes::Off,
        no_flush: false,
    };
}

/// What a node is made of.
#[derive(Debug)]
pub(crate) enum Kind {
    /// `file`: imago's raw driver over the file. `locking`: claims take the OFD locks
    /// (`locking=off` takes none).
    File { image: Arc<Node>, locking: bool },
    /// `raw`: `file`'s bytes from `offset` on, `size` of them (or up to its end).
    Raw {
        file: Claim,
        offset: u64,
        size: Option<u64>,
    },
    /// `qcow2` on `file`, over `backing` if any. `overridden`: the backing is not the one
    /// the image header names, so QEMU names the node `json:{...}`.
    Qcow2 {
        image: Arc<Node>,
        file: Claim,
        /// Changed by a `block-stream` of the node ([`BlockNode::replace_backing`]).
        backing: std::sync::Mutex<Option<Claim>>,
    },
    /// `nbd`: a connected client.
    Nbd { client: Arc<NbdClient> },
    /// `blkdebug`: `image`'s bytes, with the errors its rules inject.
    Blkdebug {
        image: Claim,
        rules: blkdebug::Blkdebug,
    },
    /// A `--drive`'s image, with its own locks and backing chain.
    Drive { image: Arc<Node> },
}

/// One node of the graph. See the module documentation.
#[derive(Debug)]
pub struct BlockNode {
    name: String,
    driver: Driver,
    pub(crate) kind: Kind,
    read_only: bool,
    options: NodeOptions,
    /// QEMU's `filename` and `full_open_options` of the node; they change when a stream
    /// gives a qcow2 node a new backing.
    names: std::sync::RwLock<Names>,
    /// Nodes on the longest path from this one down to a leaf, itself included.
    depth: usize,
    claims: perm::Claims,
    /// The dirty bitmaps of the jobs that watch this node (see [`crate::jobs::dirty`]).
    pub(crate) dirty: crate::jobs::dirty::Tracker,
    /// The devices attached to it (see [`Attached`]).
    users: std::sync::Mutex<Vec<std::sync::Weak<Attached>>>,
}

/// A node's names (see [`BlockNode::filename`], [`BlockNode::desc`]).
#[derive(Debug)]
struct Names {
    /// QEMU's `filename` of the node: the image file's name, an NBD URI, or `json:{...}`
    /// when no plain name says what the node is.
    filename: String,
    /// QEMU's `full_open_options` of the node (without node names), for the `json:`
    /// filenames of its parents.
    desc: Value,
}

/// A qcow2 node's backing child (a poisoned lock still holds a valid claim).
fn lock_backing(m: &std::sync::Mutex<Option<Claim>>) -> std::sync::MutexGuard<'_, Option<Claim>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// A request a blkdebug rule fails, or lets through.
fn injected(errno: Option<i32>) -> io::Result<()> {
    errno.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

impl BlockNode {
    pub(crate) fn new(
        name: String,
        driver: Driver,
        kind: Kind,
        read_only: bool,
        options: NodeOptions,
        filename: String,
        desc: Value,
    ) -> Arc<Self> {
        let below = match &kind {
            Kind::Raw { file, .. } | Kind::Blkdebug { image: file, .. } => file.node().depth,
            Kind::Qcow2 { file, backing, .. } => file
                .node()
                .depth
                .max(lock_backing(backing).as_ref().map_or(0, |b| b.node().depth)),
            _ => 0,
        };
        Arc::new(Self {
            name,
            driver,
            kind,
            read_only,
            options,
            names: std::sync::RwLock::new(Names { filename, desc }),
            depth: below + 1,
            claims: perm::Claims::default(),
            dirty: Default::default(),
            users: Default::default(),
        })
    }

    /// Nodes on the longest path from this one down to an image, itself included.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// A node for a `--drive`'s image.
    /// The image of a drive's own node (`--drive`), which holds that drive's locks.
    pub fn drive_image(&self) -> Option<&Arc<Node>> {
        match &self.kind {
            Kind::Drive { image } => Some(image),
            _ => None,
        }
    }

    pub fn drive(name: String, image: Arc<Node>, read_only: bool) -> Arc<Self> {
        let filename = image.filename().to_string();
        let driver = Driver::from(image.format());
        let desc =
            json!({"driver": driver.as_str(), "file": {"driver": "file", "filename": filename}});
        Self::new(
            name,
            driver,
            Kind::Drive { image },
            read_only,
            NodeOptions::DRIVE,
            filename,
            desc,
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    fn names(&self) -> std::sync::RwLockReadGuard<'_, Names> {
        self.names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// QEMU's `filename` of the node (see `Names`).
    pub fn filename(&self) -> String {
        self.names().filename.clone()
    }

    /// QEMU's `full_open_options` of the node (see `Names`).
    pub fn desc(&self) -> Value {
        self.names().desc.clone()
    }

    /// Whether the node was opened read-only (its own `read-only`, as `ro` shows it).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether some user holds the permission to write.
    pub fn has_writer(&self) -> bool {
        self.claims.writing()
    }

    /// The image whose bytes are this node's bytes, for a qcow2 node's `backing`: `file`,
    /// `qcow2` and drive nodes, and `raw` nodes without a window over one of those.
    pub fn image(&self) -> Option<Arc<Node>> {
        match &self.kind {
            Kind::File { image, .. } | Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                Some(image.clone())
            }
            Kind::Raw {
                file,
                offset: 0,
                size: None,
            } => file.node().image(),
            _ => None,
        }
    }

    /// For a `raw` node over a `blkdebug` node over an image file (QEMU's backing file
    /// `blkdebug:RULES:IMAGE` with `backing_fmt=raw`), as a qcow2 node's backing: the file
    /// as a read-only raw image whose reads go through the blkdebug rules, the raw node's
    /// `read_aio` event first, as in [`BlockDevice::read`]. `None` for other nodes.
    pub(crate) async fn blkdebug_image(
        &self,
        dirs: &[std::path::PathBuf],
    ) -> Option<Result<Arc<Node>, crate::block::Error>> {
        let Kind::Raw {
            file,
            offset: 0,
            size: None,
        } = &self.kind
        else {
            return None;
        };
        let dbg = file.node().clone();
        let Kind::Blkdebug { image, .. } = &dbg.kind else {
            return None;
        };
        let img = image.node().file_image()?;
        let dup = match img.os_file().try_clone() {
            Ok(f) => f,
            Err(e) => return Some(Err(crate::block::Error::other(e.to_string()))),
        };
        let faults = crate::block::file::Faults(Arc::new(move |offset, len| {
            dbg.debug_event(Event::ReadAio);
            match &dbg.kind {
                Kind::Blkdebug { rules, .. } => injected(rules.check(IoType::Read, offset, len)),
                _ => Ok(()),
            }
        }));
        let opts = crate::block::OpenOptions::new(img.filename(), ImageFormat::Raw, dirs)
            .read_only(true)
            .opened(crate::block::node::OpenedFile {
                file: dup,
                resolved: img.path().to_path_buf(),
            })
            .faults(faults);
        Some(Node::open(opts).await)
    }

    /// The image file whose bytes are this node's bytes, for a qcow2 node's `file`: `file`
    /// nodes, raw drives, and `raw` nodes without a window over one of those.
    pub fn file_image(&self) -> Option<Arc<Node>> {
        match &self.kind {
            Kind::File { image, .. } => Some(image.clone()),
            Kind::Drive { image } if image.format() == ImageFormat::Raw => Some(image.clone()),
            Kind::Raw {
                file,
                offset: 0,
                size: None,
            } => file.node().file_image(),
            _ => None,
        }
    }

    /// The image whose bytes are this node's bytes, for copying from it or (`writing`) into
    /// it in the kernel, around `read` and `write` (the mirror's copies, see
    /// [`Node::copy_from`]): drive and `qcow2` nodes, and image files as
    /// [`BlockNode::file_image`] finds them; never a node that changes what is written to
    /// it (zero detection) or a read-only one when `writing`.
    pub fn copy_image(&self, writing: bool) -> Option<Arc<Node>> {
        if writing && (self.read_only || self.options.detect_zeroes != DetectZeroes::Off) {
            return None;
        }
        match &self.kind {
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => Some(image.clone()),
            _ => self.file_image(),
        }
    }

    /// The image file under the node, through any `raw` nodes (for `actual-size`).
    fn storage(&self) -> Option<Arc<Node>> {
        match &self.kind {
            Kind::File { image, .. } => Some(image.clone()),
            Kind::Drive { image } if image.format() == ImageFormat::Raw => Some(image.clone()),
            Kind::Raw { file, .. } => file.node().storage(),
            _ => None,
        }
    }

    /// Whether QEMU's `bdrv_get_info` answers for the node (so its image info has a
    /// `dirty-flag`): image files and formats do, filters and raw nodes pass the question
    /// down, NBD nodes do not.
    fn has_info(&self) -> bool {
        match &self.kind {
            Kind::Raw { file: c, .. } | Kind::Blkdebug { image: c, .. } => c.node().has_info(),
            Kind::Nbd { .. } => false,
            _ => true,
        }
    }

    /// The node's children in the graph, with their roles.
    pub fn children(&self) -> Vec<(Role, Arc<BlockNode>)> {
        match &self.kind {
            Kind::Raw { file, .. } => vec![(Role::File, file.node().clone())],
            Kind::Blkdebug { image, .. } => vec![(Role::Image, image.node().clone())],
            Kind::Qcow2 { file, backing, .. } => std::iter::once((Role::File, file.node().clone()))
                .chain(
                    lock_backing(backing)
                        .iter()
                        .map(|b| (Role::Backing, b.node().clone())),
                )
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The backing node of a qcow2 node.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        match &self.kind {
            Kind::Qcow2 { backing, .. } => lock_backing(backing).as_ref().map(|b| b.node().clone()),
            _ => None,
        }
    }

    /// `stream_prepare` on a qcow2 node made by `blockdev-add`: its backing child becomes
    /// `base` (a node of its old backing chain, claimed read-only as QEMU's backing child
    /// is), or none; the old child's claim goes.
    pub(crate) fn replace_backing(&self, base: Option<&Arc<BlockNode>>) -> Result<(), QmpError> {
        let Kind::Qcow2 { backing, .. } = &self.kind else {
            return Ok(());
        };
        let claim = base
            .map(|b| {
                Claim::new(
                    b,
                    User::Node(self.name.clone()),
                    Role::Backing,
                    crate::block::lock::LockMode::READ_ONLY,
                )
            })
            .transpose()?;
        let old = std::mem::replace(&mut *lock_backing(backing), claim);
        drop(old);
        self.refresh_names();
        Ok(())
    }

    /// QEMU's `bdrv_refresh_filename` for a qcow2 node whose backing changed: the plain
    /// image name when the backing child is the one the header names (none for none),
    /// else `json:{...}` with the backing's options, as [`open`] names a new node.
    fn refresh_names(&self) {
        let Kind::Qcow2 { image, file, .. } = &self.kind else {
            return;
        };
        let header = image.info().backing_filename;
        let backing = self.backing();
        let overridden = match &backing {
            None => header.is_some(),
            Some(b) => header.as_deref() != Some(b.filename().as_str()),
        };
        let mut desc = Map::new();
        if overridden {
            desc.insert("backing".into(), backing.map_or(Value::Null, |b| b.desc()));
        }
        desc.insert("driver".into(), json!("qcow2"));
        desc.insert("file".into(), file.node().desc());
        let desc = Value::Object(desc);
        let filename = if overridden {
            format!("json:{}", open::qemu_json(&desc))
        } else {
            image.filename().to_string()
        };
        *self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Names { filename, desc };
    }

    /// `backing_file_depth`.
    pub fn backing_depth(&self) -> u32 {
        match &self.kind {
            Kind::Qcow2 { image, .. } => self
                .backing()
                .map_or_else(|| image.backing_depth(), |b| 1 + b.backing_depth()),
            Kind::Drive { image } => image.backing_depth(),
            // QEMU counts through filters.
            Kind::Blkdebug { image, .. } => 1 + image.node().backing_depth(),
            _ => 0,
        }
    }

    /// QAPI `ImageInfo` of the node, as `query-named-block-nodes` shows it; `flat` leaves
    /// out the backing chain (`backing-image`).
    pub fn image_info(&self, flat: bool) -> Value {
        let size = self.size();
        match &self.kind {
            Kind::File { image, .. } => json!({
                "virtual-size": size,
                "filename": self.filename(),
                "format": "file",
                "actual-size": image.info().actual_size,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false,
            }),
            Kind::Raw { .. } => {
                let mut v = json!({
                    "virtual-size": size,
                    "filename": self.filename(),
                    "format": "raw",
                });
                if let Value::Object(m) = &mut v {
                    if let Some(img) = self.storage() {
                        m.insert("actual-size".into(), json!(img.info().actual_size));
                    }
                    if self.has_info() {
                        m.insert("dirty-flag".into(), json!(false));
                    }
                }
                v
            }
            Kind::Qcow2 { image, .. } => {
                let mut v = ipc::common::qapi_json(&image.info());
                if let Value::Object(m) = &mut v {
                    m.insert("filename".into(), json!(self.filename()));
                    // Without a backing child, the image may still read through a drive's
                    // old image (`blockdev-snapshot`): its own info says so.
                    if self.backing().is_some() || flat {
                        m.remove("backing-image");
                    }
                    if let Some(b) = self.backing().filter(|_| !flat) {
                        m.insert("backing-image".into(), b.image_info(false));
                    }
                }
                v
            }
            Kind::Nbd { .. } => json!({
                "virtual-size": size,
                "filename": self.filename(),
                "format": "nbd",
            }),
            // A filter: QEMU shows its image as its backing image.
            Kind::Blkdebug { image, .. } => {
                let mut v = json!({
                    "virtual-size": size,
                    "filename": self.filename(),
                    "format": "blkdebug",
                    "dirty-flag": false,
                });
                if let (false, Value::Object(m)) = (flat, &mut v) {
                    m.insert("backing-image".into(), image.node().image_info(false));
                }
                v
            }
            Kind::Drive { image } => {
                let mut v = ipc::common::qapi_json(&image.info());
                if let (true, Value::Object(m)) = (flat, &mut v) {
                    m.remove("backing-image");
                }
                v
            }
        }
    }

    /// QAPI `BlockDeviceInfo` of the node (`query-named-block-nodes`, `flat` as there).
    pub fn device_info(&self, flat: bool) -> Value {
        let mut m = Map::new();
        m.insert("file".into(), json!(self.filename()));
        m.insert("node-name".into(), json!(self.name));
        m.insert("ro".into(), json!(self.read_only));
        m.insert("drv".into(), json!(self.driver.as_str()));
        let backing_file = match &self.kind {
            Kind::Drive { image } => image.info().backing_filename,
            Kind::Qcow2 { image, .. } if self.backing().is_none() => {
                image.backing().map(|b| b.filename().to_string())
            }
            _ => self.backing().map(|b| b.filename().to_string()),
        };
        if let Some(b) = backing_file {
            m.insert("backing_file".into(), json!(b));
        }
        // QEMU counts the chain only while it fills in `backing-image`: never when flat.
        let depth = if flat { 0 } else { self.backing_depth() };
        m.insert("backing_file_depth".into(), json!(depth));
        m.insert("encrypted".into(), json!(false));
        m.insert(
            "detect_zeroes".into(),
            json!(self.options.detect_zeroes.as_str()),
        );
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            m.insert(k.into(), json!(0));
        }
        m.insert("image".into(), self.image_info(flat));
        m.insert(
            "cache".into(),
            json!({"writeback": true, "direct": false, "no-flush": self.options.no_flush}),
        );
        m.insert("write_threshold".into(), json!(0));
        Value::Object(m)
    }

    /// Resizes the node (`block_resize`).
    pub async fn resize(&self, size: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File { image, .. } | Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.resize(size).await
            }
            Kind::Raw {
                file,
                offset: 0,
                size: None,
            } => Box::pin(file.node().resize(size)).await,
            Kind::Blkdebug { image, .. } => Box::pin(image.node().resize(size)).await,
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Image format driver does not support resize",
            )),
        }
    }

    /// Ends the node's use of its resources before it is dropped: makes what it wrote
    /// durable, and says goodbye to an NBD server.
    pub async fn close(&self) {
        match &self.kind {
            Kind::Nbd { client } => {
                if let Err(e) = client.disconnect().await {
                    tracing::debug!("NBD node {}: disconnect: {e}", self.name);
                }
            }
            Kind::File { image, .. } | Kind::Qcow2 { image, .. } if !image.read_only() => {
                if let Err(e) = image.flush().await {
                    tracing::warn!("flushing node {}: {e}", self.name);
                }
            }
            _ => {}
        }
    }

    /// `bdrv_debug_event`: tells a blkdebug node that `event` happened (other drivers
    /// ignore events).
    fn debug_event(&self, event: Event) {
        if let Kind::Blkdebug { rules, .. } = &self.kind {
            rules.event(event);
        }
    }

    /// `[offset, offset + len)` of a raw node's window, on its child; or an error beyond it.
    fn window(&self, offset: u64, len: u64) -> io::Result<u64> {
        let Kind::Raw { offset: base, .. } = &self.kind else {
            return Ok(offset);
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(base + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the end of the node",
            )),
        }
    }

    fn child_read<'a>(child: &'a BlockNode, buf: &'a mut [u8], offset: u64) -> Fut<'a, ()> {
        Box::pin(child.read(buf, offset))
    }

    fn child_write<'a>(child: &'a BlockNode, buf: &'a [u8], offset: u64, fua: bool) -> Fut<'a, ()> {
        Box::pin(child.write(buf, offset, fua))
    }

    fn child_zeroes(child: &BlockNode, offset: u64, length: u64, unmap: bool) -> Fut<'_, ()> {
        Box::pin(child.write_zeroes(offset, length, unmap))
    }

    fn child_discard(child: &BlockNode, offset: u64, length: u64) -> Fut<'_, ()> {
        Box::pin(child.discard(offset, length))
    }

    fn child_flush(child: &BlockNode) -> Fut<'_, ()> {
        Box::pin(child.flush())
    }

    fn child_status(child: &BlockNode, offset: u64, length: u64) -> Fut<'_, Vec<Extent>> {
        Box::pin(child.block_status(offset, length))
    }
}

/// A `file` node's size: the file's, rounded up to whole 512-byte sectors, as QEMU's
/// `bdrv_getlength` counts it (the part past the end of the file reads as zeroes).
fn sectors(bytes: u64) -> u64 {
    bytes.div_ceil(512).saturating_mul(512)
}

impl BlockNode {
    /// The current length of a `file` node's file, as QEMU's file driver reads it (another
    /// node on the same file may have grown it).
    fn file_len(image: &Node) -> u64 {
        image
            .os_file()
            .metadata()
            .map_or_else(|_| image.size(), |m| m.len())
    }

    /// Brings the image's idea of the file's length up to date before a request.
    async fn file_current(image: &Node) -> io::Result<()> {
        if Self::file_len(image) != image.size() {
            image.refresh_size().await?;
        }
        Ok(())
    }

    /// A `file` node's read: the file, then zeroes up to the end of its last sector.
    async fn file_read(image: &Node, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Self::file_current(image).await?;
        let real = image.size();
        let inside = usize::try_from(real.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            image.read(head, offset).await?;
        }
        tail.fill(0);
        Ok(())
    }

    /// The length of `[offset, offset + length)` that lies inside a `file` node's file.
    fn file_part(image: &Node, offset: u64, length: u64) -> u64 {
        image.size().saturating_sub(offset).min(length)
    }
}

impl BlockDevice for BlockNode {
    fn size(&self) -> u64 {
        match &self.kind {
            Kind::File { image, .. } => sectors(Self::file_len(image)),
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => image.size(),
            Kind::Raw { file, offset, size } => {
                size.unwrap_or_else(|| file.node().size().saturating_sub(*offset))
            }
            Kind::Nbd { client } => client.size(),
            Kind::Blkdebug { image, .. } => image.node().size(),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File { image, .. } => Self::file_read(image, buf, offset).await,
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => image.read(buf, offset).await,
            Kind::Raw { file, .. } => {
                let at = self.window(offset, buf.len() as u64)?;
                file.node().debug_event(Event::ReadAio);
                Self::child_read(file.node(), buf, at).await
            }
            Kind::Nbd { client } => client.read(buf, offset).await,
            Kind::Blkdebug { image, rules } => {
                injected(rules.check(IoType::Read, offset, buf.len() as u64))?;
                Self::child_read(image.node(), buf, offset).await
            }
        }
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let r = self.write_inner(buf, offset, fua).await;
        self.dirty.mark(offset, buf.len() as u64);
        if r.is_ok() {
            self.dirty.write_through(buf, offset).await;
        }
        r
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        let r = self.zeroes_inner(offset, length, may_unmap).await;
        self.dirty.mark(offset, length);
        if r.is_ok() {
            self.dirty.zeroes_through(offset, length, may_unmap).await;
        }
        r
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let r = self.discard_inner(offset, length).await;
        self.dirty.mark(offset, length);
        r
    }

    async fn flush(&self) -> io::Result<()> {
        self.flush_inner().await
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.status_inner(offset, length).await
    }
}

/// The requests themselves; [`BlockDevice`] adds the dirty tracking.
impl BlockNode {
    async fn write_inner(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(eperm());
        }
        if self.options.detect_zeroes != DetectZeroes::Off && buf.iter().all(|b| *b == 0) {
            let unmap = self.options.detect_zeroes == DetectZeroes::Unmap;
            self.write_zeroes(offset, buf.len() as u64, unmap).await?;
            return if fua { self.flush().await } else { Ok(()) };
        }
        match &self.kind {
            Kind::File { image, .. } => {
                Self::file_current(image).await?;
                image.write(buf, offset, fua).await
            }
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.write(buf, offset, fua).await
            }
            Kind::Raw { file, .. } => {
                let at = self.window(offset, buf.len() as u64)?;
                file.node().debug_event(Event::WriteAio);
                Self::child_write(file.node(), buf, at, fua).await
            }
            Kind::Nbd { client } => client.write(buf, offset, fua).await,
            Kind::Blkdebug { image, rules } => {
                rules.event(Event::Pwritev);
                injected(rules.check(IoType::Write, offset, buf.len() as u64))?;
                let r = Self::child_write(image.node(), buf, offset, fua).await;
                rules.event(Event::PwritevDone);
                r
            }
        }
    }

    async fn zeroes_inner(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(eperm());
        }
        let unmap = may_unmap && self.options.discard;
        match &self.kind {
            // Past the end of the file already reads as zeroes.
            Kind::File { image, .. } => {
                Self::file_current(image).await?;
                let inside = Self::file_part(image, offset, length);
                image.write_zeroes(offset, inside, unmap).await
            }
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.write_zeroes(offset, length, unmap).await
            }
            Kind::Raw { file, .. } => {
                let at = self.window(offset, length)?;
                Self::child_zeroes(file.node(), at, length, unmap).await
            }
            Kind::Nbd { client } => client.write_zeroes(offset, length, unmap).await,
            Kind::Blkdebug { image, rules } => {
                rules.event(Event::PwritevZero);
                injected(rules.check(IoType::WriteZeroes, offset, length))?;
                let r = Self::child_zeroes(image.node(), offset, length, unmap).await;
                rules.event(Event::PwritevDone);
                r
            }
        }
    }

    async fn discard_inner(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.read_only {
            return Err(eperm());
        }
        if !self.options.discard {
            return Ok(());
        }
        match &self.kind {
            Kind::File { image, .. } => {
                Self::file_current(image).await?;
                let inside = Self::file_part(image, offset, length);
                image.discard(offset, inside).await
            }
            Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.discard(offset, length).await
            }
            Kind::Raw { file, .. } => {
                let at = self.window(offset, length)?;
                Self::child_discard(file.node(), at, length).await
            }
            Kind::Nbd { client } => client.discard(offset, length).await,
            Kind::Blkdebug { image, rules } => {
                injected(rules.check(IoType::Discard, offset, length))?;
                Self::child_discard(image.node(), offset, length).await
            }
        }
    }

    async fn flush_inner(&self) -> io::Result<()> {
        if self.options.no_flush {
            return Ok(());
        }
        match &self.kind {
            Kind::File { image, .. } | Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.flush().await
            }
            Kind::Raw { file, .. } => {
                file.node().debug_event(Event::FlushToOs);
                file.node().debug_event(Event::FlushToDisk);
                Self::child_flush(file.node()).await
            }
            Kind::Nbd { client } => client.flush().await,
            Kind::Blkdebug { image, rules } => {
                injected(rules.check(IoType::Flush, 0, 0))?;
                Self::child_flush(image.node()).await
            }
        }
    }

    async fn status_inner(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        if let Kind::File { image, .. } = &self.kind {
            Self::file_current(image).await?;
        }
        match &self.kind {
            Kind::File { image, .. } if offset >= image.size() => {
                let size = self.size();
                if offset >= size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "block status request beyond the end of the node",
                    ));
                }
                Ok(vec![Extent {
                    length: length.min(size - offset),
                    zero: true,
                    data: false,
                    allocated_here: false,
                }])
            }
            Kind::File { image, .. } | Kind::Qcow2 { image, .. } | Kind::Drive { image } => {
                image.block_status(offset, length).await
            }
            Kind::Raw { file, .. } => {
                if offset >= self.size() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "block status request beyond the end of the node",
                    ));
                }
                let length = length.min(self.size() - offset);
                let at = self.window(offset, length)?;
                Self::child_status(file.node(), at, length).await
            }
            Kind::Nbd { client } => client.block_status(offset, length).await,
            Kind::Blkdebug { image, rules } => {
                injected(rules.check(IoType::BlockStatus, offset, length))?;
                Self::child_status(image.node(), offset, length).await
            }
        }
    }
}

/// A user's hold on a node that is also the device it uses: an NBD export's device.
/// Dropping it (the export is gone) releases the claim.
///
/// A mirror that completes moves it to its target, as QEMU's `bdrv_replace_node` moves
/// every parent of the source: it waits for the user's requests in flight and holds new
/// ones ([`Attached::quiesce`]), then [`Attached::replace`]s the node. Each node lists
/// the users attached to it for that ([`BlockNode::users`]).
#[derive(Debug)]
pub struct Attached {
    claim: std::sync::RwLock<Claim>,
    mode: crate::block::lock::LockMode,
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// An [`Attached`] user's requests wait while this is held.
pub type UserQuiesced = tokio::sync::OwnedRwLockWriteGuard<()>;

impl Attached {
    /// Claims `node` for a block device that reads it, and writes it if `writable`, in the
    /// two steps QEMU's exports take (attach sharing everything, then stop sharing resize,
    /// as an export's size is fixed), so conflicts are reported as QEMU reports them.
    pub fn export(node: &Arc<BlockNode>, writable: bool) -> Result<Arc<Self>, QmpError> {
        use crate::block::lock::{LockMode, Perms};
        let perm = if writable {
            Perms::CONSISTENT_READ.with(Perms::WRITE)
        } else {
            Perms::CONSISTENT_READ
        };
        let claim = Claim::new(
            node,
            User::Device,
            Role::Root,
            LockMode {
                perm,
                shared: Perms::ALL,
            },
        )?;
        let mode = LockMode {
            perm,
            shared: Perms::ALL.without(Perms::RESIZE),
        };
        claim.update(mode)?;
        let me = Arc::new(Self {
            claim: std::sync::RwLock::new(claim),
            mode,
            gate: Arc::default(),
        });
        node.attach_user(&me);
        Ok(me)
    }

    /// The node the device uses now.
    pub fn node(&self) -> Arc<BlockNode> {
        self.claim
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .node()
            .clone()
    }

    /// Waits until no request is in flight; none starts until the guard is dropped.
    pub async fn quiesce(&self) -> UserQuiesced {
        self.gate.clone().write_owned().await
    }

    /// Moves the device to `node` with the same permissions (the caller holds
    /// `_quiesced`). On a conflict the device stays where it was.
    pub fn replace(
        self: &Arc<Self>,
        node: &Arc<BlockNode>,
        _quiesced: &UserQuiesced,
    ) -> Result<(), QmpError> {
        let claim = Claim::new(node, User::Device, Role::Root, self.mode)?;
        let old = std::mem::replace(
            &mut *self
                .claim
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            claim,
        );
        old.node().detach_user(self);
        node.attach_user(self);
        Ok(())
    }
}

impl BlockDevice for Attached {
    fn size(&self) -> u64 {
        self.node().size()
    }

    fn read_only(&self) -> bool {
        self.node().is_read_only()
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _g = self.gate.read().await;
        self.node().read(buf, offset).await
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let _g = self.gate.read().await;
        self.node().write(buf, offset, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> io::Result<()> {
        let _g = self.gate.read().await;
        self.node().write_zeroes(offset, length, may_unmap).await
    }

    async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let _g = self.gate.read().await;
        self.node().discard(offset, length).await
    }

    async fn flush(&self) -> io::Result<()> {
        let _g = self.gate.read().await;
        self.node().flush().await
    }

    async fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let _g = self.gate.read().await;
        self.node().block_status(offset, length).await
    }
}

impl BlockNode {
    /// The devices attached to the node (exports), as far as they are alive.
    pub fn users(&self) -> Vec<Arc<Attached>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    fn attach_user(&self, user: &Arc<Attached>) {
        let mut users = self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        users.retain(|u| u.strong_count() > 0);
        users.push(Arc::downgrade(user));
    }

    fn detach_user(&self, user: &Arc<Attached>) {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|u| u.strong_count() > 0 && !std::ptr::eq(u.as_ptr(), Arc::as_ptr(user)));
    }
}

/// A node in the graph, with how it got there.
#[derive(Debug)]
struct Entry {
    name: String,
    /// `None` while the node is being opened: QEMU gives a node its name (and its place in
    /// the list) before it opens the node's backing.
    node: Option<Arc<BlockNode>>,
    /// Added at the top of a `blockdev-add` (QEMU's `monitor_bdrv_states`): only such
    /// nodes can be deleted with `blockdev-del`.
    owned: bool,
    /// The device id of a `--drive`'s node.
    device: Option<String>,
}

/// Every node, in the order their names were given.
#[derive(Debug, Default)]
pub struct Graph {
    entries: Vec<Entry>,
    /// Last number used in a generated node name.
    last_auto: u64,
}

impl Graph {
    /// A graph holding the drives' nodes, named `#block001`... in command-line order;
    /// generated names go on from there.
    pub fn new(drives: impl IntoIterator<Item = (String, Arc<BlockNode>)>) -> Self {
        let mut g = Self::default();
        for (device, node) in drives {
            g.last_auto += 1;
            g.entries.push(Entry {
                name: node.name().to_string(),
                node: Some(node),
                owned: false,
                device: Some(device),
            });
        }
        g
    }

    /// The next generated node name, in the `#block%03d` style QEMU uses for the nodes it
    /// names itself (a `#` keeps it out of the user's name space).
    pub fn auto_name(&mut self) -> String {
        self.last_auto += 1;
        format!("#block{:03}", self.last_auto)
    }

    /// Takes `name` for a node about to be opened.
    pub fn reserve(&mut self, name: String) {
        self.entries.push(Entry {
            name,
            node: None,
            owned: false,
            device: None,
        });
    }

    /// Puts an opened node in its reserved place (`owned`: by `blockdev-add`'s caller).
    pub fn insert(&mut self, node: Arc<BlockNode>, owned: bool) {
        match self
            .entries
            .iter_mut()
            .find(|e| e.node.is_none() && e.name == node.name())
        {
            Some(e) => {
                e.node = Some(node);
                e.owned = owned;
            }
            None => self.entries.push(Entry {
                name: node.name().to_string(),
                node: Some(node),
                owned,
                device: None,
            }),
        }
    }

    /// The nodes that are open.
    fn open_entries(&self) -> impl DoubleEndedIterator<Item = (&Entry, &Arc<BlockNode>)> {
        self.entries
            .iter()
            .filter_map(|e| e.node.as_ref().map(|n| (e, n)))
    }

    /// Removes a name (and its node, if open) from the graph, returning the node.
    fn take(&mut self, name: &str) -> Option<Arc<BlockNode>> {
        let i = self.entries.iter().position(|e| e.name == name)?;
        self.entries.remove(i).node
    }

    /// Undoes a failed `blockdev-add`: removes `names`, newest first.
    pub fn remove_all(&mut self, names: &[String]) -> Vec<Arc<BlockNode>> {
        names.iter().rev().filter_map(|n| self.take(n)).collect()
    }

    /// Whether a node has (or is about to have) this name.
    pub fn name_taken(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    pub fn find_node(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.open_entries()
            .find(|(e, _)| e.name == name)
            .map(|(_, n)| n.clone())
    }

    /// Whether `id` names a device (a `--drive`).
    pub fn is_device(&self, id: &str) -> bool {
        self.entries.iter().any(|e| e.device.as_deref() == Some(id))
    }

    /// Whether `name` is a drive's node.
    pub fn is_drive_node(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.device.is_some() && e.name == name)
    }

    /// The device id of the drive whose node is `name`, if it is one.
    pub fn device_of(&self, name: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.device.clone())
    }

    /// A mirror's pivot (`bdrv_replace_node` for a drive): the device `device` now uses
    /// `node`, which is already in the graph; its old node leaves the graph and is
    /// returned for closing.
    pub fn replace_device(
        &mut self,
        device: &str,
        node: &Arc<BlockNode>,
    ) -> Option<Arc<BlockNode>> {
        let old = self
            .entries
            .iter()
            .position(|e| e.device.as_deref() == Some(device))?;
        let new = self
            .entries
            .iter_mut()
            .find(|e| e.node.as_ref().is_some_and(|n| Arc::ptr_eq(n, node)))?;
        new.device = Some(device.to_string());
        new.owned = false;
        self.entries.remove(old).node
    }

    /// An external snapshot (`bdrv_append`): the device `device` now uses `overlay`, a new
    /// node (or, for `blockdev-snapshot`, one already in the graph); the device's old node stays in the graph under its name, as `old` (the same
    /// image, now read-only and the overlay's backing).
    pub fn snapshot_device(
        &mut self,
        device: &str,
        overlay: Arc<BlockNode>,
        old: Arc<BlockNode>,
    ) -> Result<(), QmpError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.device.as_deref() == Some(device))
            .ok_or_else(|| QmpError::generic(format!("Device '{device}' not found")))?;
        let e = &mut self.entries[i];
        e.device = None;
        e.node = Some(old);
        // `blockdev-snapshot`: the overlay is in the graph already.
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.node.as_ref().is_some_and(|n| Arc::ptr_eq(n, &overlay)))
        {
            e.device = Some(device.to_string());
            e.owned = false;
            return Ok(());
        }
        let entry = Entry {
            name: overlay.name().to_string(),
            node: Some(overlay),
            owned: false,
            device: Some(device.to_string()),
        };
        match self
            .entries
            .iter()
            .position(|e| e.node.is_none() && e.name == entry.name)
        {
            Some(j) => self.entries[j] = entry,
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// The node of the graph whose image is `image` (a drive's, or one of a drive's
    /// backing chain that a snapshot left named).
    pub fn node_of_image(&self, image: &Arc<Node>) -> Option<Arc<BlockNode>> {
        self.open_entries()
            .find(|(_, n)| n.image().is_some_and(|i| Arc::ptr_eq(&i, image)))
            .map(|(_, n)| n.clone())
    }

    /// A block job dropped `images` from a drive's backing chain: their nodes leave the
    /// graph (returned, for closing).
    pub fn remove_images(&mut self, images: &[Arc<Node>]) -> Vec<Arc<BlockNode>> {
        let mut gone = Vec::new();
        self.entries.retain(|e| {
            let drop = e.device.is_none()
                && e.node.as_ref().is_some_and(|n| {
                    matches!(n.kind, Kind::Drive { .. })
                        && n.image()
                            .is_some_and(|i| images.iter().any(|x| Arc::ptr_eq(x, &i)))
                });
            if drop && let Some(n) = &e.node {
                gone.push(n.clone());
            }
            !drop
        });
        gone
    }

    /// A block job replaced an image of a drive's backing chain by `new` (the same file,
    /// opened anew): the node named for the old one now stands for the new one.
    pub fn replace_image(&mut self, old: &Arc<Node>, new: &Arc<Node>) {
        for e in &mut self.entries {
            if let Some(n) = &e.node
                && matches!(n.kind, Kind::Drive { .. })
                && n.image().is_some_and(|i| Arc::ptr_eq(&i, old))
            {
                e.node = Some(BlockNode::drive(
                    e.name.clone(),
                    new.clone(),
                    new.read_only(),
                ));
            }
        }
    }

    /// The node a device id or a node name designates (QEMU's `bdrv_lookup_bs`).
    pub fn lookup(
        &self,
        device: Option<&str>,
        node: Option<&str>,
    ) -> Result<Arc<BlockNode>, QmpError> {
        self.open_entries()
            .find(|(e, n)| {
                (device.is_some() && e.device.as_deref() == device) || node == Some(n.name())
            })
            .map(|(_, n)| n.clone())
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Cannot find device='{}' nor node-name='{}'",
                    device.unwrap_or_default(),
                    node.unwrap_or_default()
                ))
            })
    }

    /// Whether no node has `node` as a child (QEMU's `bdrv_is_root_node`: devices and
    /// exports do not count).
    pub fn is_root(&self, node: &Arc<BlockNode>) -> bool {
        self.parents(node).is_empty()
    }

    /// Nodes that have `node` as a child, with the role.
    pub fn parents(&self, node: &Arc<BlockNode>) -> Vec<(Arc<BlockNode>, Role)> {
        self.open_entries()
            .flat_map(|(_, p)| {
                p.children()
                    .into_iter()
                    .filter(|(_, c)| Arc::ptr_eq(c, node))
                    .map(|(role, _)| (p.clone(), role))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `blockdev-del`'s checks after the caller's ("not found", "in use" by a device), in
    /// QEMU's order; then takes the node out of the graph, with the children nothing else
    /// holds (no other node, no device: `used_by_device` says which nodes an export or
    /// such uses), and returns them all for closing.
    pub fn delete(
        &mut self,
        name: &str,
        used_by_device: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Arc<BlockNode>>, QmpError> {
        let (entry, node) = self
            .open_entries()
            .find(|(e, _)| e.name == name)
            .ok_or_else(|| {
                QmpError::generic(format!("Failed to find node with node-name='{name}'"))
            })?;
        let node = node.clone();
        let owned = entry.owned;
        let parents = self.parents(&node);
        if let Some((p, _)) = parents.iter().find(|(_, r)| *r == Role::Backing) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                p.name()
            )));
        }
        if !owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !parents.is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        let mut gone = Vec::new();
        self.drop_subtree(node, used_by_device, &mut gone);
        Ok(gone)
    }

    /// Takes `node` out, then each child that nothing else holds: no other node, not the
    /// monitor, no drive, no export.
    fn drop_subtree(
        &mut self,
        node: Arc<BlockNode>,
        used_by_device: &dyn Fn(&str) -> bool,
        gone: &mut Vec<Arc<BlockNode>>,
    ) {
        let Some(node) = self.take(node.name()) else {
            return;
        };
        let children = node.children();
        gone.push(node);
        for (_, child) in children {
            let held = self
                .open_entries()
                .any(|(e, n)| Arc::ptr_eq(n, &child) && (e.owned || e.device.is_some()))
                || used_by_device(child.name());
            if !held && self.parents(&child).is_empty() {
                self.drop_subtree(child, used_by_device, gone);
            }
        }
    }

    /// `query-named-block-nodes`: newest first, as QEMU lists them.
    pub fn query(&self, flat: bool) -> Value {
        self.open_entries()
            .rev()
            .map(|(_, n)| n.device_info(flat))
            .collect()
    }

    /// Every node, oldest first.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.open_entries().map(|(_, n)| n.clone()).collect()
    }
}
