//! The bzImage setup header (Documentation/arch/x86/boot.rst), read and checked before any
//! byte of the image is loaded. A kernel image is external input: every field is read with
//! bounds checks, and anything the 64-bit boot protocol cannot use is refused with an error
//! that says which check failed.

/// Offset of the setup header in the image (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// End of the setup header fields this loader reads (up to `kernel_info_offset`, 2.15).
pub const SETUP_HEADER_END: usize = 0x26c;
/// The 64-bit entry point is this far into the protected-mode code.
pub const ENTRY_64_OFFSET: u64 = 0x200;

pub(crate) const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// 2.12: `xloadflags`, and with it `XLF_KERNEL_64`, the 64-bit entry point.
const MIN_VERSION: u16 = 0x020c;
pub(crate) const LOADED_HIGH: u8 = 1 << 0;
pub(crate) const XLF_KERNEL_64: u16 = 1 << 0;

/// Why an image is not a bzImage this loader can boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BzImageError {
    #[error(
        "{0} bytes is too small for a bzImage (the setup header ends at {SETUP_HEADER_END:#x})"
    )]
    TooSmall(u64),
    #[error("no boot sector signature 0xaa55 at 0x1fe (found {0:#06x}): not a bzImage")]
    NoBootFlag(u16),
    #[error("no \"HdrS\" setup header magic at 0x202 (found {0:#010x}): not a bzImage")]
    NoHeaderMagic(u32),
    #[error("boot protocol {}.{:02} is too old: the 64-bit entry point needs 2.12", .0 >> 8, .0 & 0xff)]
    OldProtocol(u16),
    #[error("not a bzImage: the kernel loads low (zImage); loadflags {0:#04x}")]
    NotLoadedHigh(u8),
    #[error("the kernel has no 64-bit entry point (xloadflags {0:#06x} lacks XLF_KERNEL_64)")]
    No64BitEntry(u16),
    #[error("the setup code ({setup} bytes) leaves no kernel in a {file} byte image")]
    NoKernel { setup: u64, file: u64 },
}

/// The setup header fields the loader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    /// Size of the real-mode setup code that precedes the protected-mode kernel.
    pub setup_size: u64,
    /// Size of the protected-mode kernel (the rest of the file).
    pub kernel_size: u64,
    /// Highest address the initramfs may end at (inclusive), as the kernel says.
    pub initrd_addr_max: u32,
    /// Maximum command line length, without the terminating NUL.
    pub cmdline_size: u32,
    /// Where the kernel prefers to run, and how much memory from there it needs while it
    /// decompresses and relocates itself.
    pub pref_address: u64,
    pub init_size: u32,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

impl SetupHeader {
    /// Parses and checks the header from the image's first bytes (`head`, at least
    /// [`SETUP_HEADER_END`] of them) and the image's total size.
    pub fn parse(head: &[u8], file_size: u64) -> Result<Self, BzImageError> {
        if head.len() < SETUP_HEADER_END || file_size < SETUP_HEADER_END as u64 {
            return Err(BzImageError::TooSmall(file_size.min(head.len() as u64)));
        }
        let boot_flag = u16_at(head, 0x1fe);
        if boot_flag != BOOT_FLAG {
            return Err(BzImageError::NoBootFlag(boot_flag));
        }
        let magic = u32_at(head, 0x202);
        if magic != HDRS_MAGIC {
            return Err(BzImageError::NoHeaderMagic(magic));
        }
        let version = u16_at(head, 0x206);
        if version < MIN_VERSION {
            return Err(BzImageError::OldProtocol(version));
        }
        let loadflags = head[0x211];
        if loadflags & LOADED_HIGH == 0 {
            return Err(BzImageError::NotLoadedHigh(loadflags));
        }
        let xloadflags = u16_at(head, 0x236);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BzImageError::No64BitEntry(xloadflags));
        }
        // setup_sects == 0 means 4, for compatibility with ancient images.
        let setup_sects = match head[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let setup_size = (setup_sects + 1) * 512;
        if setup_size >= file_size {
            return Err(BzImageError::NoKernel {
                setup: setup_size,
                file: file_size,
            });
        }
        Ok(Self {
            version,
            setup_size,
            kernel_size: file_size - setup_size,
            initrd_addr_max: u32_at(head, 0x22c),
            cmdline_size: u32_at(head, 0x238),
            pref_address: u64_at(head, 0x258),
            init_size: u32_at(head, 0x260),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal image with a valid 2.15 header: 1 setup sector (+ the boot sector),
    /// then `kernel` bytes of "kernel".
    pub(crate) fn fake_bzimage(kernel: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..kernel).map(|i| (i % 251) as u8).collect();
        crate::linux::testing::bzimage(&payload)
    }

    fn parse(img: &[u8]) -> Result<SetupHeader, BzImageError> {
        SetupHeader::parse(img, img.len() as u64)
    }

    #[test]
    fn a_valid_header_parses() {
        let h = parse(&fake_bzimage(4096)).expect("valid header");
        assert_eq!(h.version, 0x020f);
        assert_eq!(h.setup_size, 1024);
        assert_eq!(h.kernel_size, 4096);
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(h.pref_address, 0x100_0000);
        assert_eq!(h.init_size, 0x40_0000);
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        assert_eq!(parse(&[]), Err(BzImageError::TooSmall(0)));
        assert_eq!(parse(&[0xff; 100]), Err(BzImageError::TooSmall(100)));
        assert_eq!(
            parse(&[0x5a; 0x1000]),
            Err(BzImageError::NoBootFlag(0x5a5a))
        );
        let mut img = fake_bzimage(4096);
        img[0x202] = b'X';
        assert!(matches!(parse(&img), Err(BzImageError::NoHeaderMagic(_))));
        let mut img = fake_bzimage(4096);
        img[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        let e = parse(&img).expect_err("old protocol");
        assert_eq!(e, BzImageError::OldProtocol(0x0204));
        assert!(e.to_string().contains("2.04"), "{e}");
        let mut img = fake_bzimage(4096);
        img[0x211] = 0;
        assert_eq!(parse(&img), Err(BzImageError::NotLoadedHigh(0)));
        let mut img = fake_bzimage(4096);
        img[0x236] = 0;
        assert_eq!(parse(&img), Err(BzImageError::No64BitEntry(0)));
        let mut img = fake_bzimage(4096);
        img[0x1f1] = 200; // 201 sectors of setup in a 5 KiB file
        assert!(matches!(parse(&img), Err(BzImageError::NoKernel { .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: many random headers, some with the magic numbers planted.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut img = vec![0u8; 0x300 + (round % 7) * 512];
            for b in img.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round % 2 == 0 {
                img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
                img[0x202..0x206].copy_from_slice(b"HdrS");
            }
            let len = img.len() as u64;
            let _ = SetupHeader::parse(&img, len);
            let _ = SetupHeader::parse(&img, len / 3);
            let _ = SetupHeader::parse(&img[..img.len() / 2], len);
        }
    }
}
