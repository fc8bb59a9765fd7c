//! Guest RAM: a memfd made here (`memfd_create` opens no path), sized once, sealed so
//! nobody can grow or shrink it (block-proc maps it too, and a shrink under a mapping would
//! fault), and mapped `MAP_SHARED` through `vm-memory`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::MAX_RAM;

/// The guest's RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    pub mem: Arc<GuestMemoryMmap>,
    /// The memfd, sent once to block-proc.
    pub file: Arc<File>,
    pub size: u64,
}

/// Why guest RAM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM of {0} bytes: must be a non-zero multiple of 4 KiB and at most 3 GiB")]
    BadSize(u64),
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

fn sys(step: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |e| MemoryError::Sys(step, e)
}

impl GuestRam {
    /// Makes `size` bytes of sealed, shared guest RAM at guest-physical address 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(4096) || size > MAX_RAM {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"splitvmm-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(sys("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(sys("sizing the guest RAM memfd"))?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd with valid seal bits.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(sys("sealing the guest RAM memfd")(
                std::io::Error::last_os_error(),
            ));
        }
        let file = Arc::new(file);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])?;
        Ok(Self {
            mem: Arc::new(mem),
            file,
            size,
        })
    }

    /// The host address of guest-physical 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_base(&self) -> Result<u64, MemoryError> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .map_err(|e| {
                MemoryError::Sys("finding guest RAM", std::io::Error::other(e.to_string()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_sealed_shared_and_sized() {
        let ram = GuestRam::new(1 << 20).expect("ram");
        // SAFETY: F_GET_SEALS only reads the seals of our memfd.
        let seals = unsafe { libc::fcntl(ram.file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
        );
        assert!(ram.file.set_len(2 << 20).is_err(), "grew a sealed memfd");
        ram.mem
            .write_obj(0x1234_5678u32, GuestAddress(0x1000))
            .expect("write");
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut back, 0x1000).expect("pread");
        assert_eq!(
            u32::from_le_bytes(back),
            0x1234_5678,
            "the mapping is shared"
        );
        assert!(ram.mem.write_obj(0u8, GuestAddress(1 << 20)).is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [0, 4095, MAX_RAM + 4096] {
            assert!(matches!(GuestRam::new(size), Err(MemoryError::BadSize(_))));
        }
    }
}
