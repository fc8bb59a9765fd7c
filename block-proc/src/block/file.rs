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
//! - **Reads that must not wait.** Inside [`without_waiting`], this thread's reads of any
//!   image file use `preadv2(RWF_NOWAIT)`: what the page cache holds is copied at once, and a
//!   read that would have to wait for the disk fails with [`io::ErrorKind::WouldBlock`]
//!   instead. The block layer runs imago's reads on a tokio worker that way, and redoes the
//!   few that would block where blocking is allowed ([`super::node`]).
//!   Before either, a read the page cache holds completely is copied from a mapping of the
//!   file ([`super::mapped`]), which is faster on these hosts (1.25 times for 1 MiB reads
//!   of a freshly written file, twice for one whose page cache was rebuilt in pieces).
//! - **The last data extent** `SEEK_DATA`/`SEEK_HOLE` found is remembered (QEMU's
//!   block-status cache), so the allocation map of a raw image, which NBD asks for on every
//!   structured READ, usually costs no system call. Writes only turn holes into data, so
//!   only what can make holes forgets it: discard, zeroing, resizing
//!   ([`ImageFile::extent_cache`] lets the block layer say so for its own `fallocate`).
//! - **Injected faults** ([`Faults`]): the image of a `raw` node over a `blkdebug` node,
//!   which a qcow2 image reads as its backing (read-only), asks the blkdebug rules about
//!   every read of the file first (see [`crate::graph::blkdebug`]).

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use imago::Storage;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::PreallocateMode;
use imago::storage::drivers::CommonStorageHelper;
use nix::unistd::Whence;

use super::mapped::Windows;
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
    /// The last data extent found in the file.
    extents: Arc<ExtentCache>,
    /// Read-only mappings of the file, for reads the page cache can serve.
    windows: Windows,
    /// Set once the file system refused `RWF_NOWAIT` (9p, some network file systems):
    /// then every read of this file may block, and is done where that is allowed.
    no_wait_unsupported: AtomicBool,
    /// The fault-injection rules the file's requests go through, if any.
    faults: Option<Faults>,
}

/// Whether a read of the file fails: `(offset, length)` gives the injected error, if any.
/// Asked once per read (in no-wait mode a read of a file with faults always takes the
/// blocking path, so a redo cannot ask twice).
#[derive(Clone)]
pub struct Faults(pub Arc<dyn Fn(u64, u64) -> io::Result<()> + Send + Sync>);

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Faults")
    }
}

thread_local! {
    /// Whether this thread's image reads must not wait for the disk ([`without_waiting`]).
    static NO_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's image-file reads in no-wait mode: they are served from the
/// page cache or fail with [`io::ErrorKind::WouldBlock`] (`preadv2` with `RWF_NOWAIT`).
/// For calls that only read (imago `read`, mappings), so failing half-way changes nothing
/// and the caller can redo the call where it may block. Writes are not affected.
pub fn without_waiting<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            NO_WAIT.set(self.0);
        }
    }
    let _reset = Reset(NO_WAIT.replace(true));
    f()
}

/// Whether `e` is the failure of a read in no-wait mode that would have had to wait.
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// The last data extent `SEEK_DATA`/`SEEK_HOLE` found in one file. See the module
/// documentation.
#[derive(Debug, Default)]
pub struct ExtentCache(Mutex<ExtentState>);

#[derive(Debug, Default)]
struct ExtentState {
    /// Known data (empty: nothing known).
    data: Range<u64>,
    /// Bumped by every invalidation: a lookup that raced with one must not store its result.
    generation: u64,
}

impl ExtentCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExtentState> {
        // Two plain fields, each written whole: a panic cannot leave them inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the known data extent containing `offset` ends, if there is one.
    fn data_end(&self, offset: u64) -> Option<u64> {
        let s = self.lock();
        s.data.contains(&offset).then_some(s.data.end)
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Remembers `data`, unless an invalidation came after `generation` was read.
    fn store(&self, data: Range<u64>, generation: u64) {
        let mut s = self.lock();
        if s.generation == generation {
            s.data = data;
        }
    }

    /// Forgets what is known. Call it *after* anything that can make holes has happened.
    pub fn invalidate(&self) {
        let mut s = self.lock();
        s.data = 0..0;
        s.generation += 1;
    }
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
            extents: Arc::default(),
            windows: Windows::default(),
            no_wait_unsupported: AtomicBool::new(false),
            faults: None,
        })
    }

    /// Makes writes of qcow2 table pointers wait for the refcounts they depend on
    /// ([`MetadataOrder`]). For the image file of a writable qcow2 image.
    pub fn order_metadata_writes(&mut self) -> io::Result<()> {
        self.order = Some(MetadataOrder::new(&self.aux)?);
        Ok(())
    }

    /// Puts the file's requests through `faults`.
    pub fn inject_faults(&mut self, faults: Option<Faults>) {
        self.faults = faults;
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
        if let Some(end) = self.extents.data_end(offset) {
            return Ok((false, (end - offset).min(max)));
        }
        let generation = self.extents.generation();
        let (hole, len) = hole_or_data(&self.aux, offset, u64::MAX)?;
        if !hole {
            self.extents
                .store(offset..offset.saturating_add(len), generation);
        }
        Ok((hole, len.min(max)))
    }

    /// The file's extent cache, for whoever makes holes in the file without going through
    /// this object (the block layer's own `fallocate`).
    pub fn extent_cache(&self) -> Arc<ExtentCache> {
        self.extents.clone()
    }

    /// `preadv2(RWF_NOWAIT)` until `bufv` is full: what the page cache holds, or
    /// `WouldBlock`. Past the end of the file reads as zeroes, as imago's own reads do.
    fn readv_no_wait(&self, mut bufv: IoVectorMut<'_>, mut offset: u64) -> io::Result<()> {
        if self.windows.read(self.aux.as_fd(), &mut bufv, offset) {
            return Ok(());
        }
        if self.no_wait_unsupported.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        while !bufv.is_empty() {
            let pos = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::other("read offset overflow"))?;
            // SAFETY: `as_iovec` describes `bufv`'s buffers, which we hold mutably and which
            // outlive the call; the iovec slice is not used after `bufv` is next modified.
            let iov = unsafe { bufv.as_iovec() };
            // At most the kernel's limit per call; the loop reads the rest.
            let count = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: `iov` points to at least `count` valid, writable iovecs (see above);
            // the descriptor is open for as long as `self`.
            let n = unsafe {
                libc::preadv2(
                    self.aux.as_raw_fd(),
                    iov.as_ptr(),
                    count,
                    pos,
                    libc::RWF_NOWAIT,
                )
            };
            match n {
                0 => {
                    bufv.fill(0);
                    break;
                }
                n if n > 0 => {
                    let n = n as u64;
                    bufv = bufv.split_tail_at(n);
                    offset += n;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                        // The file system cannot read without waiting: the caller redoes
                        // the read where it may block, now and from now on.
                        Some(libc::EOPNOTSUPP) => {
                            self.no_wait_unsupported.store(true, Ordering::Relaxed);
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// A read of `bufv.len()` bytes at `offset`, without waiting in no-wait mode.
    ///
    /// # Safety
    /// As [`Storage::pure_readv`].
    unsafe fn readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        if NO_WAIT.get() {
            self.readv_no_wait(bufv, offset)
        } else {
            // SAFETY: our caller upholds `pure_readv`'s contract (alignment to our
            // `mem_align`/`req_align`, which are `inner`'s) and we pass its request unchanged.
            unsafe { self.inner.pure_readv(bufv, offset) }
        }
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
        if let Some(f) = &self.faults {
            if NO_WAIT.get() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            (f.0)(offset, bufv.len())?;
        }
        let end = offset.saturating_add(bufv.len());
        if self.hide_incompat == 0 || end <= INCOMPAT_OFFSET || offset >= INCOMPAT_OFFSET + 8 {
            // SAFETY: our caller upholds `pure_readv`'s contract and we pass it on unchanged.
            return unsafe { self.readv(bufv, offset) };
        }
        // A read of the header of a read-only image with hidden bits: bounce it. Files are
        // opened without O_DIRECT, so `inner` has no alignment needs the bounce could break.
        let len = usize::try_from(bufv.len()).map_err(|_| io::Error::other("read too large"))?;
        let mut tmp = vec![0u8; len];
        // SAFETY: as above; the bounce buffer is a plain byte buffer, and buffered files
        // (never O_DIRECT here) have a memory and request alignment of 1.
        unsafe { self.readv(IoVectorMut::from(&mut tmp), offset) }?;
        mask_incompat(&mut tmp, offset, self.hide_incompat);
        bufv.copy_from_slice(&tmp);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        if let Some(order) = &self.order
            && order.touches(offset, len)
        {
            // SAFETY: the iovecs describe `bufv`'s buffers, which `pure_writev`'s contract
            // keeps valid for reading for this call.
            let iovecs = unsafe { bufv.as_iovec() };
            let copy;
            let data: &[u8] = match iovecs {
                // Table write-backs come in one buffer: read it where it is.
                // SAFETY: that buffer, `iov_len` bytes valid for reading for this call. It
                // belongs to our caller, not to `bufv` (which only refers to it), so handing
                // `bufv` to the write below moves nothing; the slice is only read, and only
                // within this call.
                [one] => unsafe {
                    std::slice::from_raw_parts(one.iov_base.cast::<u8>(), one.iov_len)
                },
                _ => {
                    let len =
                        usize::try_from(len).map_err(|_| io::Error::other("write too large"))?;
                    copy = {
                        let mut d = vec![0u8; len];
                        bufv.copy_into_slice(&mut d);
                        d
                    };
                    &copy
                }
            };
            order.pointer_write(&self.aux, offset, data, || {
                // SAFETY: our caller upholds `pure_writev`'s contract and we pass its request
                // on unchanged.
                unsafe { self.inner.pure_writev(bufv, offset) }
            })?;
            #[cfg(test)]
            super::order::test_hook::fire(&self.name, offset, len, true);
            return Ok(());
        }
        // SAFETY: our caller upholds `pure_writev`'s contract and we pass it on unchanged.
        let r = unsafe { self.inner.pure_writev(bufv, offset) };
        #[cfg(test)]
        super::order::test_hook::fire(&self.name, offset, len, false);
        r
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: our caller upholds the contract (alignment to `zero_align`, which is
        // `inner`'s) and we pass it on unchanged.
        let r = unsafe { self.inner.pure_write_zeroes(offset, length) };
        self.extents.invalidate();
        r
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: as for `pure_write_zeroes`.
        let r = unsafe { self.inner.pure_write_allocated_zeroes(offset, length) };
        self.extents.invalidate();
        r
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: our caller upholds the contract (alignment to `discard_align`, which is
        // `inner`'s) and we pass it on unchanged.
        let r = unsafe { self.inner.pure_discard(offset, length) };
        self.extents.invalidate();
        r
    }

    /// Nothing to do: the file has no user-space buffer (imago's own `flush` is
    /// `fs::File::flush`, a no-op, but it takes an exclusive lock that waits for every read
    /// and write in flight on the file and stalls new ones; the qcow2 metadata write-back
    /// that every acknowledged write waits for ends with it).
    fn flush(&self) -> io::Result<()> {
        Ok(())
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
        self.windows.clear();
        let r = self.inner.resize(new_size, prealloc_mode);
        self.extents.invalidate();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// In no-wait mode a read the page cache cannot serve fails with `WouldBlock` (and
    /// succeeds once the data is cached); outside it, the same read waits and succeeds.
    #[test]
    fn reads_in_no_wait_mode_do_not_wait_for_the_disk() {
        let path = std::env::temp_dir().join(format!("splitvmm-nowait-{}", std::process::id()));
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let file = fs::File::options().read(true).open(&path).expect("open");
        file.sync_all().expect("fsync");
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("fadvise");
        // A file system that lives in memory has nothing to wait for.
        let in_memory = nix::sys::statfs::fstatfs(&file)
            .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
            .expect("fstatfs");
        let name = path.display().to_string();
        let storage = ImageFile::new(file, &name, false).expect("wrap");
        let read = |no_wait: bool| {
            let mut buf = vec![0u8; data.len()];
            let mut call = || {
                // SAFETY: a plain buffer on a buffered file (memory and request alignment 1).
                unsafe { storage.pure_readv(IoVectorMut::from(&mut buf), 0) }
            };
            let r = if no_wait {
                without_waiting(call)
            } else {
                call()
            };
            r.map(|()| buf)
        };
        match read(true) {
            Err(e) => assert!(would_block(&e) && !in_memory, "{e}"),
            Ok(_) => assert!(in_memory, "a cold read in no-wait mode did not fail"),
        }
        assert_eq!(read(false).expect("waiting read"), data);
        assert_eq!(read(true).expect("cached read"), data);
        let _ = std::fs::remove_file(&path);
    }
}
