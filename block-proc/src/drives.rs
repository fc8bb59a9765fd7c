//! The images opened for `--drive`, and what `query-block` reports of them.
//!
//! Images are never probed: the format comes from the command line. An image must live
//! under one of the allowed directories.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ipc::QmpError;
use ipc::block::{
    BlockConfig, BlockDeviceInfo, BlockInfo, BlockdevCacheInfo, DriveConfig, ImageFormat,
    ImageInfo, IoStatus,
};
use ipc::vmm_block::GuestDrive;

/// One open drive.
#[derive(Debug)]
pub struct Drive {
    config: DriveConfig,
    file: File,
    virtual_size: u64,
    cluster_size: Option<u64>,
}

/// Every open drive, in command-line order.
#[derive(Debug)]
pub struct Drives {
    drives: Vec<Drive>,
    /// A guest device is attached (vmm-proc runs), so the drives have an io-status.
    attached: bool,
}

fn under(path: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .any(|d| std::fs::canonicalize(d).is_ok_and(|d| path.starts_with(d)))
}

/// The qcow2 header fields `query-block` needs (virtual size, cluster size). The full
/// format lives in the block layer; this only reads what identifies an image.
fn qcow2_geometry(file: &mut File, name: &Path) -> Result<(u64, u64), QmpError> {
    let mut h = [0u8; 32];
    file.read_exact(&mut h).map_err(|e| {
        QmpError::generic(format!("Could not read image '{}': {e}", name.display()))
    })?;
    let be32 = |o: usize| {
        h.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let be64 = |o: usize| {
        h.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    };
    if h.get(..4) != Some(b"QFI\xfb") {
        return Err(QmpError::generic("Image is not in qcow2 format"));
    }
    let (Some(version), Some(bits), Some(size)) = (be32(4), be32(20), be64(24)) else {
        return Err(QmpError::generic("Image is not in qcow2 format"));
    };
    if !(2..=3).contains(&version) {
        return Err(QmpError::generic(format!(
            "Unsupported qcow2 version {version}"
        )));
    }
    if !(9..=21).contains(&bits) {
        return Err(QmpError::generic(format!(
            "Unsupported cluster size: 2^{bits}"
        )));
    }
    Ok((size, 1 << bits))
}

impl Drive {
    fn open(config: &DriveConfig, dirs: &[PathBuf]) -> Result<Self, QmpError> {
        let shown = config.file.display();
        let path = std::fs::canonicalize(&config.file).map_err(|e| {
            QmpError::generic(format!("Could not open '{shown}': {}", os_error(&e)))
        })?;
        if !under(&path, dirs) {
            return Err(QmpError::generic(format!(
                "Could not open '{shown}': the image is outside the allowed directories"
            )));
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&path)
            .map_err(|e| {
                QmpError::generic(format!("Could not open '{shown}': {}", os_error(&e)))
            })?;
        let len = file
            .metadata()
            .map_err(|e| QmpError::generic(format!("Could not stat '{shown}': {}", os_error(&e))))?
            .len();
        let (virtual_size, cluster_size) = match config.format {
            ImageFormat::Raw => (len, None),
            ImageFormat::Qcow2 => {
                let (size, cluster) = qcow2_geometry(&mut file, &path)?;
                (size, Some(cluster))
            }
        };
        Ok(Self {
            config: config.clone(),
            file,
            virtual_size,
            cluster_size,
        })
    }

    fn info(&self, attached: bool) -> BlockInfo {
        let c = &self.config;
        let file = c.file.display().to_string();
        let actual_size = self.file.metadata().ok().map(|m| m.blocks() * 512);
        BlockInfo {
            device: c.id.clone(),
            qdev: None,
            kind: "unknown".into(),
            removable: false,
            locked: false,
            io_status: attached.then_some(IoStatus::Ok),
            inserted: Some(BlockDeviceInfo {
                file: file.clone(),
                node_name: None,
                ro: c.read_only,
                drv: c.format.as_str().into(),
                backing_file: None,
                backing_file_depth: 0,
                encrypted: false,
                detect_zeroes: "off".into(),
                bps: 0,
                bps_rd: 0,
                bps_wr: 0,
                iops: 0,
                iops_rd: 0,
                iops_wr: 0,
                image: ImageInfo {
                    filename: file,
                    format: c.format.as_str().into(),
                    virtual_size: self.virtual_size,
                    actual_size,
                    dirty_flag: None,
                    cluster_size: self.cluster_size,
                    backing_filename: None,
                    backing_image: None,
                },
                cache: BlockdevCacheInfo {
                    writeback: true,
                    direct: false,
                    no_flush: false,
                },
                write_threshold: 0,
            }),
        }
    }
}

/// An OS error the way QEMU words it ("No such file or directory"), without Rust's suffix.
fn os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl Drives {
    /// Opens every drive of the configuration. The first failure is returned, worded as
    /// QEMU words it.
    pub fn open(config: &BlockConfig, attached: bool) -> Result<Self, QmpError> {
        let drives = config
            .drives
            .iter()
            .map(|d| Drive::open(d, &config.image_dirs))
            .collect::<Result<_, _>>()?;
        Ok(Self { drives, attached })
    }

    /// The open images' descriptors (kept across the jail's clean-up).
    pub fn raw_fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.drives
            .iter()
            .map(|d| std::os::fd::AsRawFd::as_raw_fd(&d.file))
    }

    /// `query-block`.
    pub fn query_block(&self) -> Vec<BlockInfo> {
        self.drives.iter().map(|d| d.info(self.attached)).collect()
    }

    /// The drives as the guest-facing side sees them.
    pub fn guest_drives(&self) -> Vec<GuestDrive> {
        self.drives
            .iter()
            .map(|d| GuestDrive {
                id: d.config.id.clone(),
                size_bytes: d.virtual_size,
                read_only: d.config.read_only,
            })
            .collect()
    }
}
