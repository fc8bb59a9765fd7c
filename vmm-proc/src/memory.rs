//! Guest RAM: a memfd made here (`memfd_create` opens no path), sized once, sealed so
//! nobody can grow or shrink it (block-proc maps it too, and a shrink under a mapping would
//! fault), and mapped `MAP_SHARED` through `vm-memory`.
//!
//! RAM lies where [`crate::linux::e820::ram_regions`] says: below the device window at
//! 3 GiB, and what does not fit there from 4 GiB up. The memfd holds both regions back to
//! back, so the guest-physical address of a byte and its offset in the memfd are the same
//! below 3 GiB and differ by 1 GiB above 4 GiB; [`RamMap`] translates. block-proc only
//! knows the memfd, so vmm-proc hands it memfd offsets.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MAX_RAM, MMIO_WINDOW};
use crate::linux::e820;

/// Where `size` bytes of guest RAM lie in guest-physical space and in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamMap {
    size: u64,
}

/// One guest RAM region: guest-physical start, length, offset in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl RamMap {
    pub fn new(size: u64) -> Self {
        Self { size }
    }

    /// All of guest RAM, in bytes (the memfd's size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The regions, lowest first: `e820::ram_regions`, each continuing the memfd where the
    /// one before it ended.
    pub fn regions(&self) -> Vec<RamRegion> {
        let mut file_offset = 0;
        e820::ram_regions(self.size)
            .into_iter()
            .map(|(gpa, len)| {
                let r = RamRegion {
                    gpa,
                    len,
                    file_offset,
                };
                file_offset += len;
                r
            })
            .collect()
    }

    /// The memfd offset of the guest-physical range `[gpa, gpa + len)`, if the whole range
    /// is RAM inside one region (a range cannot span the device window).
    pub fn file_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.regions()
            .into_iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
            .map(|r| gpa - r.gpa + r.file_offset)
    }

    /// Whether the guest-physical range `[gpa, gpa + len)` is RAM inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.file_offset(gpa, len).is_some()
    }
}

/// The guest's RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    pub mem: Arc<GuestMemoryMmap>,
    /// The memfd, sent once to block-proc.
    pub file: Arc<File>,
    pub size: u64,
    pub map: RamMap,
}

/// Why guest RAM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest RAM of {0} bytes: must be a non-zero multiple of 4 KiB and at most {max} GiB",
        max = MAX_RAM >> 30
    )]
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
    /// Makes `size` bytes of sealed, shared guest RAM, mapped as [`RamMap`] says.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(4096) || size > MAX_RAM {
            return Err(MemoryError::BadSize(size));
        }
        let map = RamMap::new(size);
        let mut ranges = Vec::new();
        for r in map.regions() {
            let len = usize::try_from(r.len).map_err(|_| MemoryError::BadSize(size))?;
            ranges.push((r.gpa, len, r.file_offset));
        }
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
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges.into_iter().map(
            |(gpa, len, offset)| {
                (
                    GuestAddress(gpa),
                    len,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                )
            },
        ))?;
        Ok(Self {
            mem: Arc::new(mem),
            file,
            size,
            map,
        })
    }

    /// Each region's guest-physical start, length and host address (for
    /// `KVM_SET_USER_MEMORY_REGION`), lowest first.
    pub fn host_regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
            .collect()
    }

    /// Whether the workload guest's ABI can describe this RAM: one region from 0.
    pub fn is_one_region(&self) -> bool {
        self.size <= MMIO_WINDOW
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
    fn ram_past_3_gib_continues_at_4_gib_and_in_the_memfd() {
        let size = MMIO_WINDOW + (64 << 20);
        let map = RamMap::new(size);
        assert_eq!(
            map.regions(),
            vec![
                RamRegion {
                    gpa: 0,
                    len: MMIO_WINDOW,
                    file_offset: 0
                },
                RamRegion {
                    gpa: 1 << 32,
                    len: 64 << 20,
                    file_offset: MMIO_WINDOW
                },
            ]
        );
        assert_eq!(map.file_offset(0x1000, 0x1000), Some(0x1000));
        assert_eq!(
            map.file_offset((1 << 32) + 0x2000, 512),
            Some(MMIO_WINDOW + 0x2000)
        );
        // Nothing in the device window, nothing across it, nothing past the end.
        assert_eq!(map.file_offset(MMIO_WINDOW, 1), None);
        assert_eq!(map.file_offset(MMIO_WINDOW - 512, 1024), None);
        assert_eq!(map.file_offset((1 << 32) + (64 << 20) - 1, 2), None);
        assert_eq!(map.file_offset(u64::MAX, 2), None);

        // The memfd is sparse: nothing is touched but the two bytes written.
        let ram = GuestRam::new(size).expect("ram");
        assert!(!ram.is_one_region());
        let regions = ram.host_regions();
        assert_eq!(
            regions.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![(0, MMIO_WINDOW), (1 << 32, 64 << 20)]
        );
        ram.mem
            .write_obj(0xa5u8, GuestAddress((1 << 32) + 0x10))
            .expect("write above 4 GiB");
        let mut back = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut back, MMIO_WINDOW + 0x10)
            .expect("pread");
        assert_eq!(back[0], 0xa5);
        assert!(ram.mem.write_obj(0u8, GuestAddress(MMIO_WINDOW)).is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [0, 4095, MAX_RAM + 4096] {
            assert!(matches!(GuestRam::new(size), Err(MemoryError::BadSize(_))));
        }
    }
}
