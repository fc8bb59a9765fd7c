//! The block devices the command line made (`--drive`): each a named device on top of an
//! opened image [`Node`], and what `query-block` says of them.
//!
//! Images are never probed: the format comes from the command line. An image and its
//! backing files must live under the allowed directories.

use std::sync::Arc;

use ipc::QmpError;
use ipc::block::{
    BlockConfig, BlockDeviceInfo, BlockInfo, BlockdevCacheInfo, DriveConfig, IoStatus,
};

use crate::block::{Backing, Node, OpenOptions};
use crate::device::BlockDevice;
use crate::guest::GuestDevice;

/// One `--drive`: its configuration and its image.
#[derive(Debug)]
pub struct Drive {
    pub config: DriveConfig,
    pub node: Arc<Node>,
    /// The image node's name, generated as QEMU generates `#block<N>` names for the nodes
    /// it makes itself.
    pub node_name: String,
}

/// Every drive, in command-line order.
#[derive(Debug)]
pub struct Drives {
    pub drives: Vec<Drive>,
    /// Directories images may be opened under (`blockdev-add` uses them too).
    pub image_dirs: Vec<std::path::PathBuf>,
    /// A guest device is attached (vmm-proc runs), so the drives have an io-status.
    attached: bool,
}

impl Drives {
    /// Opens every drive of the configuration. The first failure is returned, worded as
    /// QEMU words it.
    pub async fn open(config: &BlockConfig, attached: bool) -> Result<Self, QmpError> {
        let mut drives = Vec::new();
        for d in &config.drives {
            let opts = OpenOptions::new(d.file.display().to_string(), d.format, &config.image_dirs)
                .read_only(d.read_only)
                .backing(Backing::Default);
            let node = Node::open(opts)
                .await
                .map_err(|e| QmpError::generic(e.to_string()))?;
            let node_name = format!("#block{:03}", drives.len() + 1);
            drives.push(Drive {
                config: d.clone(),
                node,
                node_name,
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
    pub fn guest_devices(&self) -> Vec<GuestDevice<Node>> {
        self.drives
            .iter()
            .map(|d| GuestDevice {
                id: d.config.id.clone(),
                device: d.node.clone(),
            })
            .collect()
    }
}

impl Drive {
    /// QAPI `BlockDeviceInfo` of the drive's image.
    pub fn device_info(&self) -> BlockDeviceInfo {
        let image = self.node.info();
        BlockDeviceInfo {
            file: image.filename.clone(),
            node_name: Some(self.node_name.clone()),
            ro: self.node.read_only(),
            drv: self.config.format.as_str().into(),
            backing_file: image.backing_filename.clone(),
            backing_file_depth: self.node.backing_depth(),
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
            io_status: attached.then_some(IoStatus::Ok),
            inserted: Some(self.device_info()),
        }
    }
}
