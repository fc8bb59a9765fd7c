//! `qcow2_write`: an image file as a hostile user (or a hostile image upload) could supply
//! it, opened *read-write* as qcow2 through block-proc's node layer ([`Node::open`], backing
//! chain by default, in the same private directory as [`super::qcow2_open`], with its
//! `base.raw`), then changed as a guest and the block jobs would change it: writes (aligned
//! and not, so copy-on-write and allocation run over whatever the tables say), zeroing and
//! discarding, a resize that grows the L1 table, writes past the old end, and a flush.
//! Then it is closed and opened again read-only, and read as in `qcow2_open`.
//!
//! Checks: every step returns `Ok` or an error, never panics, hangs or allocates past
//! libFuzzer's memory limit; an image that opened read-write opens again afterwards, or
//! fails with an error. What the writes leave is not checked against what was written: on
//! an image whose tables point two guest clusters at one host cluster, or at its own
//! metadata, qcow2 itself gives the wrong data back (QEMU too; `qemu-img check` reports it).

use block_proc::block::{Backing, Node, OpenOptions};
use block_proc::device::BlockDevice;
use ipc::block::ImageFormat;

use crate::qcow2_open::{dir, exercise};

/// How much a resize grows the image by: enough for a new L2 table or two at any cluster
/// size, and a bigger L1 table when the old one was full.
const GROW: u64 = 4 << 20;

async fn change(node: &Node) {
    let size = node.size();
    let pattern = |len: u64, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    // Writes that fit in the image; zero and discard ranges likewise.
    let clamp = |offset: u64, len: u64| -> Option<(u64, u64)> {
        let len = len.min(size.checked_sub(offset)?);
        (len > 0).then_some((offset, len))
    };
    let mid = size / 2;
    for (offset, len, seed) in [
        (0, 4096, 1),
        (mid.saturating_sub(1500) | 7, 3000, 2),
        (size.saturating_sub(5000), 5000, 3),
    ] {
        if let Some((offset, len)) = clamp(offset, len) {
            let _ = node.write(&pattern(len, seed), offset, false).await;
        }
    }
    if let Some((offset, len)) = clamp(mid & !0xffff, 1 << 16) {
        let _ = node.write_zeroes(offset, len, true).await;
    }
    if let Some((offset, len)) = clamp(0, 1 << 20) {
        let _ = node.discard(offset, len).await;
    }
    if let Some((offset, len)) = clamp(512, 2048) {
        let _ = node.write(&pattern(len, 4), offset, true).await;
    }
    if let Some(new_size) = size.checked_add(GROW)
        && node.resize(new_size).await.is_ok()
    {
        let _ = node.write(&pattern(8192, 5), size, false).await;
        let _ = node.write(&pattern(4096, 6), new_size - 4096, false).await;
    }
    let _ = node.flush().await;
}

/// The target.
pub fn run(data: &[u8]) {
    let _ = write(data);
}

/// Runs the target; returns why the image did not open read-write, or (having changed it)
/// why it did not open again.
pub fn write(data: &[u8]) -> Result<(), String> {
    let dir = dir();
    let image = dir.join("img-rw.qcow2");
    std::fs::write(&image, data).expect("write the image");
    let opts = |read_only: bool| {
        OpenOptions::new(
            image.display().to_string(),
            ImageFormat::Qcow2,
            &[dir.to_path_buf()],
        )
        .read_only(read_only)
        .backing(Backing::Default)
    };
    crate::block_on(async {
        let node = Node::open(opts(false)).await.map_err(|e| e.to_string())?;
        change(&node).await;
        drop(node);
        let node = Node::open(opts(true))
            .await
            .map_err(|e| format!("reopening: {e}"))?;
        exercise(&node).await;
        Ok(())
    })
}
