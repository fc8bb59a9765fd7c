//! The block devices the command line made (`--drive`): each a named device on top of an
//! opened image [`Node`], and what `query-block` says of them.
//!
//! A drive's guest device is a [`Backend`]: the node it currently uses, which a mirror's
//! `block-job-complete` replaces (the pivot), and a gate that lets a job quiesce the
//! guest's requests for that moment (QEMU's drained section).
//!
//! Images are never probed: the format comes from the command line. An image and its
//! backing files must live under the allowed directories.

use std::sync::Arc;

use ipc::QmpError;
use ipc::block::{
    BlockConfig, BlockDeviceInfo, BlockInfo, BlockdevCacheInfo, DriveConfig, IoStatus, OnError,
};

use crate::block::lock::LockMode;
use crate::block::{Backing, Node, OpenOptions};
use crate::device::{BlockDevice, Extent};
use crate::graph::BlockNode;
use crate::guest::GuestDevice;

/// What a drive's users (the guest) send requests to: the drive's current node.
#[derive(Debug)]
pub struct Backend {
    /// Held shared by every request; a job takes it exclusively to have no request in
    /// flight and none starting (see [`Backend::quiesce`]).
    gate: Arc<tokio::sync::RwLock<()>>,
    current: std::sync::RwLock<Arc<BlockNode>>,
}

/// Requests to the backend wait while this is held.
pub type Quiesced = tokio::sync::OwnedRwLockWriteGuard<()>;

impl Backend {
    pub fn new(node: Arc<BlockNode>) -> Self {
        Self {
            gate: Arc::default(),
            current: std::sync::RwLock::new(node),
        }
    }

    /// The node requests go to now.
    pub fn current(&self) -> Arc<BlockNode> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until no request is in flight; none starts until the guard is dropped.
    pub async fn quiesce(&self) -> Quiesced {
        self.gate.clone().write_owned().await
    }

    /// Requests go to `node` from now on (the caller holds `_quiesced`).
    pub fn replace(&self, node: Arc<BlockNode>, _quiesced: &Quiesced) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = node;
    }
}

impl BlockDevice for Backend {
    fn size(&self) -> u64 {
        self.current().size()
    }

    fn set_image_locks(&self, active: bool) -> Result<(), String> {
        match self.current().drive_image() {
            Some(image) => image.set_image_locks(active).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn read_only(&self) -> bool {
        self.current().is_read_only()
    }

    fn node_name(&self) -> Option<String> {
        Some(self.current().name().to_string())
    }

    async fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let _g = self.gate.read().await;
        self.current().read(buf, offset).await
    }

    async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let _g = self.gate.read().await;
        self.current().write(buf, offset, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> std::io::Result<()> {
        let _g = self.gate.read().await;
        self.current().write_zeroes(offset, length, may_unmap).await
    }

    async fn discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        let _g = self.gate.read().await;
        self.current().discard(offset, length).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        let _g = self.gate.read().await;
        self.current().flush().await
    }

    async fn block_status(&self, offset: u64, length: u64) -> std::io::Result<Vec<Extent>> {
        let _g = self.gate.read().await;
        self.current().block_status(offset, length).await
    }
}

/// One `--drive`: its configuration and its image.
#[derive(Debug)]
pub struct Drive {
    pub config: DriveConfig,
    pub node: Arc<Node>,
    /// The image node's name, generated as QEMU generates `#block<N>` names for the nodes
    /// it makes itself.
    pub node_name: String,
    /// What the guest uses: the image's node, until a mirror replaces it.
    pub backend: Arc<Backend>,
}

/// Every drive, in command-line order.
#[derive(Debug)]
pub struct Drives {
    pub drives: Vec<Drive>,
    /// Directories images may be opened under (`blockdev-add` uses them too).
    pub image_dirs: Vec<std::path::PathBuf>,
    /// A guest device is attached (vmm-proc runs), so drives whose error policy can stop
    /// the VM have an io-status.
    attached: bool,
}

impl Drives {
    /// Opens every drive of the configuration. The first failure is returned, worded as
    /// QEMU words it.
    pub async fn open(config: &BlockConfig, attached: bool) -> Result<Self, QmpError> {
        let mut drives = Vec::new();
        for d in &config.drives {
            let mut opts =
                OpenOptions::new(d.file.display().to_string(), d.format, &config.image_dirs)
                    .read_only(d.read_only)
                    .backing(Backing::Default);
            if config.incoming {
                opts = opts.lock(LockMode::NONE);
            }
            let node = Node::open(opts)
                .await
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let node_name = format!("#block{:03}", drives.len() + 1);
            let read_only = node.read_only();
            let backend = Arc::new(Backend::new(BlockNode::drive(
                node_name.clone(),
                node.clone(),
                read_only,
            )));
            drives.push(Drive {
                config: d.clone(),
                node,
                node_name,
                backend,
            });
        }
        Ok(Self {
            drives,
            image_dirs: config.image_dirs.clone(),
            attached,
        })
    }

    /// `query-block`.
    pub fn query_block(&self) -> Vec<BlockInfo> {
        self.drives.iter().map(|d| d.info(self.attached)).collect()
    }

    /// The drives for the guest data path.
    pub fn guest_devices(&self) -> Vec<GuestDevice<Backend>> {
        self.drives
            .iter()
            .map(|d| GuestDevice {
                id: d.config.id.clone(),
                device: d.backend.clone(),
            })
            .collect()
    }
}

impl Drive {
    /// QAPI `BlockDeviceInfo` of the drive's image.
    pub fn device_info(&self) -> BlockDeviceInfo {
        let current = self.backend.current();
        // A node over no image of its own (a mirror pivoted to an NBD export): as
        // query-named-block-nodes describes it.
        if current.image().is_none()
            && let Ok(info) = serde_json::from_value(current.device_info(false))
        {
            return info;
        }
        let node = current.image().unwrap_or_else(|| self.node.clone());
        let image = node.info();
        BlockDeviceInfo {
            file: image.filename.clone(),
            node_name: Some(current.name().to_string()),
            ro: current.is_read_only(),
            drv: node.format().as_str().into(),
            backing_file: image.backing_filename.clone(),
            backing_file_depth: node.backing_depth(),
            encrypted: false,
            detect_zeroes: "off".into(),
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            image,
            cache: BlockdevCacheInfo {
                writeback: true,
                direct: false,
                no_flush: false,
            },
            write_threshold: 0,
        }
    }

    fn info(&self, attached: bool) -> BlockInfo {
        BlockInfo {
            device: self.config.id.clone(),
            qdev: None,
            kind: "unknown".into(),
            removable: false,
            locked: false,
            // The monitor fills in the status a guest error left; block-proc only says
            // whether the drive keeps one.
            io_status: (attached
                && OnError::keeps_io_status(self.config.werror, self.config.rerror))
            .then_some(IoStatus::Ok),
            inserted: Some(self.device_info()),
        }
    }
}
