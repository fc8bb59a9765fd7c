//! [`ImageFile`]: the storage object under every image, an imago [`Storage`] that wraps
//! imago's own `File` and adds what the block layer needs from the file itself.
//!
//! - It keeps a second descriptor on the same open file description (a `dup`), so the
//!   block layer can take OFD locks ([`super::lock`]), ask for holes (`SEEK_DATA` /
//!   `SEEK_HOLE`, for `block_status`), punch or zero ranges (`fallocate`) and `fstat` it.
//!   Locks and the file offset belong to the open file description, which both descriptors
//!   share; imago only uses positional I/O, so the shared offset never matters.
//! - It can hide qcow2 incompatible-feature bits from imago's header parser
//!   ([`ImageFile::hide_incompatible`]): imago 0.2.6 refuses every image with the dirty or
//!   the corrupt bit, while QEMU opens such images read-only. The block layer sets the mask
//!   only for read-only opens, after checking the bits itself.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use imago::Storage;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::PreallocateMode;
use imago::storage::drivers::CommonStorageHelper;
use nix::unistd::Whence;

use super::order::MetadataOrder;

/// Offset of the qcow2 `incompatible_features` field (big-endian u64).
const INCOMPAT_OFFSET: u64 = 72;

/// One image file, as imago sees it (a [`Storage`]) and as the block layer sees it.
#[derive(Debug)]
pub struct ImageFile {
    /// imago's file driver; every imago I/O goes through it.
    inner: imago::file::File,
    /// A duplicate of `inner`'s descriptor (same open file description).
    aux: fs::File,
    /// The name the file was opened under (as the user or the image header gave it).
    name: String,
    /// qcow2 incompatible-feature bits to hide from reads of the header.
    hide_incompat: u64,
    /// For the metadata file of a writable qcow2 image: refcounts before pointers.
    order: Option<MetadataOrder>,
}

impl ImageFile {
    /// Wraps an open file. `name` is the name it was opened under: relative backing file
    /// names resolve against it, and error messages show it.
    pub fn new(file: fs::File, name: &str, writable: bool) -> io::Result<Self> {
        let aux = file.try_clone()?;
        let opts = imago::StorageOpenOptions::new()
            .filename(name)
            .write(writable);
        let inner = imago::file::File::from_open_file(file, opts)?;
        Ok(Self {
            inner,
            aux,
            name: name.to_string(),
            hide_incompat: 0,
            order: None,
        })
    }

    /// Makes writes of qcow2 table pointers wait for the refcounts they depend on
    /// ([`MetadataOrder`]). For the image file of a writable qcow2 image.
    pub fn order_metadata_writes(&mut self) -> io::Result<()> {
        self.order = Some(MetadataOrder::new(&self.aux)?);
        Ok(())
    }

    /// Hides the given qcow2 incompatible-feature bits from reads of the image header.
    /// Only for read-only images: imago must never write a header it read this way.
    pub fn hide_incompatible(&mut self, bits: u64) {
        self.hide_incompat = bits;
    }

    /// The name the file was opened under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file, for locks, `fstat` and `fallocate`.
    pub fn file(&self) -> &fs::File {
        &self.aux
    }

    /// Space the file takes on disk (`st_blocks * 512`), QEMU's `actual-size`.
    pub fn actual_size(&self) -> io::Result<u64> {
        Ok(self.aux.metadata()?.blocks() * 512)
    }

    /// Whether `[offset, offset + ..)` starts in a hole of the file, and how long that hole
    /// or data extent is (at most `max`). Beyond the end of the file is a hole. A file system
    /// without `SEEK_DATA` reports everything as data, as QEMU's file-posix driver does.
    pub fn hole_or_data(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        hole_or_data(&self.aux, offset, max)
    }
}

/// See [`ImageFile::hole_or_data`].
pub fn hole_or_data(file: &fs::File, offset: u64, max: u64) -> io::Result<(bool, u64)> {
    let size = file.metadata()?.len();
    if offset >= size {
        return Ok((true, max));
    }
    let off = i64::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
    let fd = file.as_fd();
    match nix::unistd::lseek(fd, off, Whence::SeekData) {
        Ok(data) => {
            let data = data as u64;
            if data > offset {
                return Ok((true, (data - offset).min(max)));
            }
            let hole = match nix::unistd::lseek(fd, off, Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(_) => size,
            };
            // A data extent reaching a partial sector at EOF counts up to the sector end.
            let end = hole.max(offset + 1);
            Ok((false, (end - offset).min(max)))
        }
        // Trailing hole.
        Err(nix::errno::Errno::ENXIO) => Ok((true, max)),
        // No information: pretend there are no holes.
        Err(_) => Ok((false, (size - offset).min(max))),
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Clears `mask`'s bits from the big-endian u64 at file offset [`INCOMPAT_OFFSET`] where it
/// overlaps `buf`, which holds the file's bytes from `offset` on.
fn mask_incompat(buf: &mut [u8], offset: u64, mask: u64) {
    let mask_bytes = mask.to_be_bytes();
    for (i, m) in mask_bytes.iter().enumerate() {
        let pos = INCOMPAT_OFFSET + i as u64;
        if let Some(idx) = pos.checked_sub(offset)
            && let Ok(idx) = usize::try_from(idx)
            && let Some(b) = buf.get_mut(idx)
        {
            *b &= !m;
        }
    }
}

impl Storage for ImageFile {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(bufv.len());
        if self.hide_incompat == 0 || end <= INCOMPAT_OFFSET || offset >= INCOMPAT_OFFSET + 8 {
            // SAFETY: our caller upholds `pure_readv`'s contract (alignment to our
            // `mem_align`/`req_align`, which are `inner`'s) and we pass its request unchanged.
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        // A read of the header of a read-only image with hidden bits: bounce it. Files are
        // opened without O_DIRECT, so `inner` has no alignment needs the bounce could break.
        let len = usize::try_from(bufv.len()).map_err(|_| io::Error::other("read too large"))?;
        let mut tmp = vec![0u8; len];
        // SAFETY: as above; the bounce buffer is a plain byte buffer, and buffered files
        // (never O_DIRECT here) have a memory and request alignment of 1.
        unsafe { self.inner.pure_readv(IoVectorMut::from(&mut tmp), offset) }?;
        mask_incompat(&mut tmp, offset, self.hide_incompat);
        bufv.copy_from_slice(&tmp);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        if let Some(order) = &self.order
            && order.touches(offset, bufv.len())
        {
            let len =
                usize::try_from(bufv.len()).map_err(|_| io::Error::other("write too large"))?;
            let mut data = vec![0u8; len];
            bufv.copy_into_slice(&mut data);
            order.pointer_write(&self.aux, offset, &data, || {
                // SAFETY: our caller upholds `pure_writev`'s contract and we pass its request
                // on unchanged.
                unsafe { self.inner.pure_writev(bufv, offset) }
            })?;
            #[cfg(test)]
            super::order::test_hook::fire(&self.name);
            return Ok(());
        }
        // SAFETY: our caller upholds `pure_writev`'s contract and we pass it on unchanged.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: our caller upholds the contract (alignment to `zero_align`, which is
        // `inner`'s) and we pass it on unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as for `pure_write_zeroes`.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: our caller upholds the contract (alignment to `discard_align`, which is
        // `inner`'s) and we pass it on unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: our caller guarantees the on-disk state is consistent, which is all
        // `inner` needs too.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::mask_incompat;

    #[test]
    fn masking_clears_only_the_requested_bits_inside_the_field() {
        let mut buf = vec![0xffu8; 16];
        // buf covers file bytes 70..86; the field is 72..80, bit 0/1 live in byte 79.
        mask_incompat(&mut buf, 70, 0b11);
        assert_eq!(buf[9], 0xfc);
        assert!(buf.iter().enumerate().all(|(i, b)| i == 9 || *b == 0xff));
        let mut tail = vec![0xffu8; 4];
        mask_incompat(&mut tail, 78, 0b10);
        assert_eq!(tail, [0xff, 0xfd, 0xff, 0xff]);
    }
}
