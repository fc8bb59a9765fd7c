//! `block_status` agrees with `qemu-img map --output=json` (its `zero` and `data`, and
//! `depth == 0 && present` for `allocated_here`).

use ipc::block::ImageFormat;

use super::read::make_three_deep_chain;
use super::*;

async fn assert_map_like_qemu(img: &str, fmt: ImageFormat, dir: &TempDir) {
    let want = qemu_map(img, fmt_str(fmt));
    let node = open(img, fmt, true, dir).await;
    // One call for everything, and many small calls, must both give QEMU's map.
    for step in [node.size(), 300_000, 4096] {
        let got = node_map(&node, step).await;
        assert_eq!(
            got, want,
            "{img}: block_status in steps of {step} differs from qemu-img map"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_chain_matches_qemu_img_map() {
    let dir = TempDir::new("status-chain");
    let top = make_three_deep_chain(&dir);
    assert_map_like_qemu(&top, ImageFormat::Qcow2, &dir).await;
    assert_map_like_qemu(&dir.file("mid.qcow2"), ImageFormat::Qcow2, &dir).await;
    assert_map_like_qemu(&dir.file("base.raw"), ImageFormat::Raw, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_zero_clusters_holes_and_compressed_data_matches_qemu_img_map() {
    let dir = TempDir::new("status-misc");
    let img = dir.file("z.qcow2");
    create_qcow2_4k(&img, "2M");
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 64k 64k",
            "write -z -u 128k 16k",
            "write -P 0 512k 8k",
            "discard 32k 8k",
        ],
    );
    assert_map_like_qemu(&img, ImageFormat::Qcow2, &dir).await;

    // A qcow2 data cluster whose space in the file is a hole is still plain data to QEMU
    // (it looks into the file only for metadata-preallocated images).
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    node.write(&[7u8; 4096], 1 << 20, false)
        .await
        .expect("write");
    drop(node);
    let map = ok("qemu-img", &["map", "--output=json", &img]);
    let v: serde_json::Value = serde_json::from_str(&map).expect("map JSON");
    let host = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e["start"] == 1 << 20))
        .and_then(|e| e["offset"].as_u64())
        .expect("host offset of the new cluster");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        host as i64,
        4096,
    )
    .expect("punch");
    drop(f);
    assert_map_like_qemu(&img, ImageFormat::Qcow2, &dir).await;

    let raw = dir.file("sparse.raw");
    ok("qemu-img", &["create", "-f", "raw", &raw, "1M"]);
    qemu_io(&raw, "raw", &["write -P 3 64k 8k", "write -P 4 900k 100k"]);
    assert_map_like_qemu(&raw, ImageFormat::Raw, &dir).await;

    let comp = dir.file("c.qcow2");
    ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &raw, &comp],
    );
    assert_map_like_qemu(&comp, ImageFormat::Qcow2, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_after_our_own_writes_matches_qemu_img_map() {
    let dir = TempDir::new("status-ours");
    let base = dir.file("b.qcow2");
    let top = dir.file("t.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &base, "4M"]);
    qemu_io(&base, "qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    ok(
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", &top,
        ],
    );
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    node.write(&[2u8; 5000], 100_000, false)
        .await
        .expect("write");
    node.write_zeroes(1 << 20, 256 << 10, true)
        .await
        .expect("zeroes");
    node.discard(3 << 20, 1 << 20).await.expect("discard");
    let ours = node_map(&node, 4 << 20).await;
    assert_eq!(ours, qemu_map(&top, "qcow2"));
    assert!(
        ours.iter().any(|r| !r.4),
        "some ranges are only in the backing file"
    );
}

/// The allocation map of a raw image is answered from the last data extent found; whatever
/// makes holes afterwards must make it forget, or NBD would serve holes as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_status_sees_the_holes_made_after_data_was_found() {
    let dir = TempDir::new("status-cache");
    let img = dir.file("c.raw");
    ok("qemu-img", &["create", "-f", "raw", &img, "4M"]);
    qemu_io(&img, "raw", &["write -P 1 0 4M"]);
    let node = open(&img, ImageFormat::Raw, false, &dir).await;
    let full = node.size();
    assert_eq!(node_map(&node, 4096).await, qemu_map(&img, "raw"));
    node.discard(1 << 20, 64 << 10).await.expect("discard");
    assert_eq!(
        node_map(&node, 4096).await,
        qemu_map(&img, "raw"),
        "after discard"
    );
    node.write_zeroes(2 << 20, 64 << 10, true)
        .await
        .expect("punch");
    assert_eq!(
        node_map(&node, 4096).await,
        qemu_map(&img, "raw"),
        "after zeroing"
    );
    node.resize(3 << 20).await.expect("shrink");
    node.resize(full).await.expect("grow");
    let map = node_map(&node, 4096).await;
    assert_eq!(map, qemu_map(&img, "raw"), "after shrinking and growing");
    assert!(
        map.iter().filter(|r| r.2 && !r.3).count() >= 3,
        "three holes expected: {map:?}"
    );
}
