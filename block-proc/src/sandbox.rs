//! block-proc's jail: host mount and network namespaces (it must reach the image
//! directories), its own pid, ipc and uts namespaces (made by the launcher), Landlock
//! limiting file access to the image directories, and this seccomp allowlist.
//!
//! It creates no sockets: it uses only the ones it was handed.

use std::path::PathBuf;

use jail::seccomp::{allow, allow_if, arg_eq, arg_masked_eq};
use jail::{LandlockRules, Policy, SeccompPolicy, base_runtime_policy};

/// block-proc's syscalls beyond the base runtime's, each with why.
pub fn seccomp_policy() -> SeccompPolicy {
    base_runtime_policy().union(&SeccompPolicy::new([
        allow_if(
            libc::SYS_socketpair,
            &[arg_eq(0, libc::AF_UNIX)],
            "tokio's I/O driver makes an unnamed AF_UNIX pair for its signal driver; it reaches nothing",
        ),
        allow_if(
            libc::SYS_fcntl,
            &[arg_eq(1, libc::F_GET_SEALS)],
            "check that the guest memory memfd is sealed against shrinking",
        ),
        allow(libc::SYS_accept4, "NBD clients, on the listening socket the monitor handed over"),
        allow(libc::SYS_getsockname, "tell a handed-over NBD listener's family (unix or TCP)"),
        allow_if(libc::SYS_fcntl, &[arg_eq(1, libc::F_OFD_SETLK)], "QEMU's image lock bytes (OFD locks)"),
        allow_if(libc::SYS_fcntl, &[arg_eq(1, libc::F_OFD_GETLK)], "test the lock bytes other users hold"),
        allow(libc::SYS_pread64, "read image data and headers"),
        allow(libc::SYS_pwrite64, "write image data and metadata"),
        allow(libc::SYS_preadv, "imago reads guest and NBD buffers in one vectored call"),
        allow_if(
            libc::SYS_preadv2,
            &[arg_eq(5, libc::RWF_NOWAIT)],
            "reads on a tokio worker: served from the page cache or EAGAIN, never a wait for the disk (only RWF_NOWAIT)",
        ),
        allow(
            libc::SYS_mincore,
            "whether the page cache holds a range before it is copied from a mapping of the image (block::mapped)",
        ),
        allow(libc::SYS_pwritev, "imago writes guest and NBD buffers in one vectored call"),
        allow(libc::SYS_fallocate, "discard and write-zeroes: punch holes, zero ranges"),
        allow(libc::SYS_copy_file_range, "mirror: copy raw files and qcow2 data clusters into the target in the kernel"),
        allow(libc::SYS_ftruncate, "grow or shrink an image (block_resize, qcow2 allocation)"),
        allow(libc::SYS_fstatfs, "the file system an image lives on (hole and alignment support)"),
        allow_if(
            libc::SYS_openat,
            &[arg_masked_eq(2, libc::O_CREAT, 0)],
            "blockdev-add opens existing image files at run time; Landlock confines them to the \
             image directories",
        ),
        allow_if(
            libc::SYS_openat,
            &[arg_masked_eq(2, libc::O_CREAT, libc::O_CREAT)],
            "drive-mirror creates its target image (QEMU's mode=absolute-paths); Landlock \
             confines creation to the image directories",
        ),
        allow(
            libc::SYS_readlink,
            "realpath resolves an image's name to check it against the image directories",
        ),
        allow(
            libc::SYS_getcwd,
            "realpath of a relative image name (relative to block-proc's directory, as QEMU's)",
        ),
        allow(libc::SYS_fsync, "make writes durable on flush"),
        allow(libc::SYS_fdatasync, "make data durable on flush"),
    ]))
}

/// Enters the jail: file access is limited to `image_dirs`.
pub fn enter(image_dirs: &[PathBuf], runas: Option<(u32, u32)>) -> Result<(), jail::JailError> {
    let policy = Policy {
        name: "block-proc",
        empty_root: false,
        landlock: Some(LandlockRules {
            read_write: image_dirs.to_vec(),
            ..LandlockRules::default()
        }),
        drop_caps: true,
        runas,
        seccomp: seccomp_policy(),
    };
    jail::enter(&policy).map(drop)
}
