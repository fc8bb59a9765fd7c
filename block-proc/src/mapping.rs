//! A shared mapping of part of a file, unmapped when dropped: the guest's RAM
//! ([`crate::guest`]) and the read windows over image files ([`crate::block::mapped`]).
//! It owns the address range and hands out its start as a raw pointer; what is read or
//! written through it, and why that is sound, is its users' business.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `[offset, offset + len)` of a file, mapped `MAP_SHARED`.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the struct holds only the address and length of a mapping it owns; moving or
// sharing it between threads moves no data, and every access through `base` is a raw-pointer
// access its user justifies.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` gives out the address and length, nothing else.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`, for reading, and for writing too if
    /// `writable`.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file the caller holds, at no fixed address, so
        // it replaces nothing; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned address 0"))?;
        Ok(Self { base, len })
    }

    /// The first byte.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// How many bytes are mapped (never 0).
    pub fn size(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` mapped; the owner holds no reference into it
        // past its own life.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
