//! Creating images, and rewriting the backing file of an image that is not open.
//!
//! - [`create_raw`]: a sparse raw file of the given size;
//! - [`create_qcow2`]: a qcow2 v3 image with 16-bit refcounts (what `qemu-img create -f
//!   qcow2` makes), optionally naming a backing file and its format; imago formats it;
//! - [`set_backing_file`]: `qemu-img rebase -u` on a closed image (an open one goes
//!   through [`super::Node::set_backing_file`]); the crash-safe order is in [`super::header`].
//!
//! As QEMU's file-posix `raw_co_create` does, creation opens the file without truncating
//! it, takes the creation locks (write and resize, sharing all but resize) and only then
//! truncates it, so an image in use elsewhere is refused (`Failed to get "write" lock`)
//! rather than destroyed. The names are used as given; callers check them against the
//! allowed directories (and Landlock does, in block-proc).

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use imago::FormatCreateBuilder;
use imago::qcow2::Qcow2;
use ipc::block::ImageFormat;

use super::commit::blocking;
use super::error::Error;
use super::file::ImageFile;
use super::header;
use super::lock::{self, LockMode};
use super::node::Access;

/// Opens (creating if needed) `path` for formatting: locks first, then truncates.
fn open_for_create(path: &str) -> Result<fs::File, Error> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::open(path, &e))?;
    lock::acquire(&file, LockMode::CREATE)?;
    file.set_len(0).map_err(|e| Error::open(path, &e))?;
    Ok(file)
}

/// Creates a raw image of `size` bytes (sparse).
pub async fn create_raw(path: &str, size: u64) -> Result<(), Error> {
    blocking(|| {
        let file = open_for_create(path)?;
        file.set_len(size).map_err(|e| Error::open(path, &e))?;
        file.sync_all().map_err(|e| Error::open(path, &e))
    })
}

/// Creates a qcow2 v3 image (16-bit refcounts) of `size` bytes with `cluster_size`
/// (a power of two from 512 to 2 MiB), optionally naming a backing file and its format.
/// The backing file is only named, not opened.
pub async fn create_qcow2(
    path: &str,
    size: u64,
    cluster_size: usize,
    backing: Option<(&str, ImageFormat)>,
) -> Result<(), Error> {
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::other(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if !size.is_multiple_of(512) {
        return Err(Error::other("Image size must be a multiple of 512 bytes"));
    }
    if let Some((name, _)) = backing
        && name.is_empty()
    {
        return Err(Error::other("Backing file name must not be empty"));
    }
    blocking(|| {
        let file = open_for_create(path)?;
        let sync = file.try_clone().map_err(|e| Error::open(path, &e))?;
        let storage = ImageFile::new(file, path, true).map_err(|e| Error::open(path, &e))?;
        let mut builder = Qcow2::<ImageFile, Arc<Access>>::create_builder(storage)
            .size(size)
            .cluster_size(cluster_size)
            .refcount_width(16);
        if let Some((name, fmt)) = backing {
            builder = builder.backing(name.to_string(), fmt.as_str().to_string());
        }
        builder
            .create()
            .map_err(|e| Error::other(format!("Could not create '{path}': {e}")))?;
        sync.sync_all().map_err(|e| Error::open(path, &e))
    })
}

/// Rewrites the backing file name and format in the header of the qcow2 image at `path`,
/// which must not be in use (it is locked as a read/write open would lock it).
pub async fn set_backing_file(
    path: &str,
    backing: Option<(&str, ImageFormat)>,
) -> Result<(), Error> {
    blocking(|| {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::open(path, &e))?;
        lock::acquire(&file, LockMode::READ_WRITE)?;
        let h = header::Header::read(&file).map_err(|e| Error::open(path, &e))?;
        if h.corrupt() {
            return Err(Error::Corrupt);
        }
        header::rewrite_backing(&file, backing.map(|(n, f)| (n, f.as_str()))).map_err(|e| {
            Error::other(format!(
                "Could not change the backing file of '{path}': {e}"
            ))
        })?;
        Ok(())
    })
}
