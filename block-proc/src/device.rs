//! The interface between block-proc's block layer and its users (the NBD server, the guest
//! data path, later the block jobs): a block device with QEMU-like semantics.
//!
//! **Acknowledgement rule (DESIGN.md §3).** When `write`, `write_zeroes` or `discard`
//! returns `Ok`, the data and every piece of image metadata it depends on (qcow2 L2 and
//! refcount updates) have been written to the kernel: killing block-proc right after loses
//! nothing that was acknowledged. Only `flush` (and `fua`) make them durable against a host
//! crash (fsync). Implementations may share one metadata write-back among concurrent
//! requests (group commit), but must not acknowledge before it.

use std::future::Future;
use std::io;

/// One run of the allocation map, as `qemu-img map` and NBD `base:allocation` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range has data in this image or a backing image. A qcow2 zero cluster is not data
    /// (as `qemu-img map` and NBD report it); `false` with `zero` is a hole or zero marker.
    pub data: bool,
    /// The range is allocated in the top image itself (not only in a backing image).
    pub allocated_here: bool,
}

/// A block device. Offsets and lengths are bytes; callers check them against `size()`
/// first (out-of-range requests are the caller's error to report, per its protocol).
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// The name of the node requests go to, where there is one (QMP `BLOCK_IO_ERROR`'s
    /// `node-name`).
    fn node_name(&self) -> Option<String> {
        None
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes `buf` at `offset`; with `fua`, durable when it returns.
    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes `[offset, offset+length)` read as zeroes; `may_unmap` allows freeing the space.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_unmap: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Drops the data of `[offset, offset+length)` if the format can (content unspecified).
    fn discard(&self, offset: u64, length: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every acknowledged write durable (fsync).
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// The allocation map of `[offset, offset+length)`: contiguous extents covering at least
    /// the first byte, at most `length` bytes in all.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;

    /// Takes (`active`) or gives up the image's locks, for a migration's switch-over
    /// (see `Node::set_image_locks`). Devices without an image file of their own have
    /// nothing to hand over.
    fn set_image_locks(&self, active: bool) -> Result<(), String> {
        let _ = active;
        Ok(())
    }
}

/// Devices for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::io;
    use std::sync::Mutex;

    use super::{BlockDevice, Extent};

    /// An in-memory device: every byte is data.
    #[derive(Debug)]
    pub struct MemDevice {
        pub bytes: Mutex<Vec<u8>>,
        pub read_only: bool,
        /// When set, `flush` blocks its thread until a message comes (or 10 s pass), as an
        /// fsync blocks for the disk.
        pub flush_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        /// Taken shared by every read, as `Node` takes its image's lock: it spends tokio's
        /// co-operative budget as a real read does.
        access: tokio::sync::RwLock<()>,
        /// The name of the thread each read ran on, in order.
        pub read_threads: Mutex<Vec<String>>,
    }

    impl MemDevice {
        pub fn new(size: usize, read_only: bool) -> Self {
            Self {
                bytes: Mutex::new(vec![0; size]),
                read_only,
                flush_gate: Mutex::new(None),
                access: tokio::sync::RwLock::new(()),
                read_threads: Mutex::new(Vec::new()),
            }
        }

        fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start + usize::try_from(len).map_err(io::Error::other)?;
            if end > self.size() as usize {
                return Err(io::Error::other("out of range"));
            }
            Ok(start..end)
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.bytes.lock().expect("lock").len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let _shared = self.access.read().await;
            let thread = std::thread::current().name().unwrap_or("").to_string();
            self.read_threads.lock().expect("lock").push(thread);
            let r = self.range(offset, buf.len() as u64)?;
            buf.copy_from_slice(&self.bytes.lock().expect("lock")[r]);
            Ok(())
        }
        async fn write(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
            let r = self.range(offset, buf.len() as u64)?;
            self.bytes.lock().expect("lock")[r].copy_from_slice(buf);
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, length: u64, _may_unmap: bool) -> io::Result<()> {
            let r = self.range(offset, length)?;
            self.bytes.lock().expect("lock")[r].fill(0);
            Ok(())
        }
        async fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
            self.write_zeroes(offset, length, true).await
        }
        async fn flush(&self) -> io::Result<()> {
            if let Some(gate) = self.flush_gate.lock().expect("lock").as_ref() {
                gate.recv_timeout(std::time::Duration::from_secs(10))
                    .map_err(io::Error::other)?;
            }
            Ok(())
        }
        async fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![Extent {
                length,
                zero: false,
                data: true,
                allocated_here: true,
            }])
        }
    }
}
