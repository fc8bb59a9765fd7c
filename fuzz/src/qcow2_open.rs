//! `qcow2_open`: an image file as a hostile user (or a hostile image upload) could supply
//! it, opened as qcow2 through block-proc's node layer ([`Node::open`], read-only, backing
//! chain by default, the allowed directory being a private temporary one), then read.
//!
//! The directory also holds `base.raw` (64 KiB of data), so images that name it as their
//! backing file (`-b base.raw -F raw`) open with a backing chain. Checks:
//! - opening returns a node or an error, never panics or hangs, and allocates within
//!   libFuzzer's memory limit;
//! - an opened node renders its `ImageInfo`, reads at its start, middle and end, and answers
//!   `block_status` as `BlockDevice` promises: contiguous extents that cover at least the
//!   first byte and no more than was asked;
//! - what `block_status` calls zero reads as zeroes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use block_proc::block::{Backing, Node, OpenOptions};
use block_proc::device::{BlockDevice, Extent};
use ipc::block::ImageFormat;

/// Bytes read at each place.
const READ: u64 = 4096;

/// The private directory of this process (under /dev/shm, else the temporary directory);
/// removed at exit.
pub(crate) fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove_dir() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    DIR.get_or_init(|| {
        // In memory if possible: the image is rewritten for every input.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("splitvmm-fuzz-qcow2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).expect("create the fuzz directory");
        let base: Vec<u8> = (0..64u32 << 10).map(|i| (i % 253) as u8 | 1).collect();
        std::fs::write(d.join("base.raw"), base).expect("write base.raw");
        // SAFETY: registers a function with no arguments that only removes our directory;
        // libFuzzer leaves through exit(), which runs it.
        unsafe { libc::atexit(remove_dir) };
        d
    })
}

/// Checks the `BlockDevice::block_status` contract for a request of `length` bytes.
fn check_extents(extents: &[Extent], length: u64) {
    if length == 0 {
        return;
    }
    assert!(
        extents.first().is_some_and(|e| e.length > 0),
        "block_status of {length} bytes covers nothing: {extents:?}"
    );
    let total = extents
        .iter()
        .try_fold(0u64, |t, e| t.checked_add(e.length))
        .expect("extent lengths overflow");
    assert!(
        total <= length,
        "block_status of {length} bytes answered {total}: {extents:?}"
    );
}

pub(crate) async fn exercise(node: &Node) {
    let info = node.info();
    let _ = ipc::common::qapi_json(&info);
    let size = node.size();
    let mid = (size / 2) & !511;
    for offset in [0, mid, size.saturating_sub(READ)] {
        let len = READ.min(size - offset);
        let mut buf = vec![0u8; len as usize];
        let read = node.read(&mut buf, offset).await;
        let Ok(extents) = node.block_status(offset, len).await else {
            continue;
        };
        check_extents(&extents, len);
        if read.is_err() {
            continue;
        }
        let mut pos = 0usize;
        for e in &extents {
            let n = e.length as usize;
            if e.zero {
                assert!(
                    buf[pos..pos + n].iter().all(|&b| b == 0),
                    "block_status says [{}, +{n}) is zero, it reads as data",
                    offset + pos as u64
                );
            }
            pos += n;
        }
    }
    if let Ok(extents) = node.block_status(0, size).await {
        check_extents(&extents, size);
    }
}

/// The target.
pub fn run(data: &[u8]) {
    let _ = open(data);
}

/// Runs the target; returns the opened image's first 4 KiB (or less), or why it did not
/// open.
pub fn open(data: &[u8]) -> Result<Vec<u8>, String> {
    let dir = dir();
    let image = dir.join("img.qcow2");
    std::fs::write(&image, data).expect("write the image");
    let opts = OpenOptions::new(
        image.display().to_string(),
        ImageFormat::Qcow2,
        &[dir.to_path_buf()],
    )
    .read_only(true)
    .backing(Backing::Default);
    crate::block_on(async {
        let node = Node::open(opts).await.map_err(|e| e.to_string())?;
        exercise(&node).await;
        let mut head = vec![0u8; READ.min(node.size()) as usize];
        node.read(&mut head, 0).await.map_err(|e| e.to_string())?;
        Ok(head)
    })
}
