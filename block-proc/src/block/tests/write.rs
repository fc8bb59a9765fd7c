//! Writes through `Node` (with copy-on-write from a backing file, zeroing, discarding,
//! many concurrent writers, resizing) read back right, through `Node` and through QEMU,
//! and leave images `qemu-img check` finds no error in.

use std::sync::Arc;

use ipc::block::ImageFormat;

use super::*;

/// Applies a random mix of operations to `node` and to a model of its contents; checks
/// the node against the model after each step.
async fn random_ops(
    node: &Node,
    model: &mut [u8],
    backing: &[u8],
    rng: &mut Rng,
    steps: usize,
    cluster: u64,
) {
    let size = model.len() as u64;
    for step in 0..steps {
        let op = rng.below(10);
        // Offsets near cluster boundaries, lengths from a few bytes to several clusters.
        let base = rng.below(size / cluster) * cluster;
        let off = (base + rng.below(3) * (cluster / 2) + rng.below(700)).min(size - 1);
        let len = (1 + rng.below(3 * cluster)).min(size - off);
        match op {
            0..=5 => {
                let byte = (step % 250 + 1) as u8;
                let buf = vec![byte; len as usize];
                node.write(&buf, off, step % 7 == 0).await.expect("write");
                model[off as usize..(off + len) as usize].fill(byte);
            }
            6 | 7 => {
                node.write_zeroes(off, len, op == 7)
                    .await
                    .expect("write_zeroes");
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                // Discard leaves the contents unspecified: take what the node now reads,
                // but each byte must be the old one, zero, or (qcow2 v2, where discarded
                // clusters become unallocated, as in QEMU) the backing file's.
                node.discard(off, len).await.expect("discard");
                let mut now = vec![0u8; len as usize];
                node.read(&mut now, off).await.expect("read after discard");
                let range = off as usize..(off + len) as usize;
                let old = &model[range.clone()];
                let below = &backing[range];
                assert!(
                    now.iter()
                        .zip(old)
                        .zip(below)
                        .all(|((n, o), b)| n == o || *n == 0 || n == b),
                    "step {step}: discard at {off}+{len} produced data that was never there"
                );
                model[off as usize..(off + len) as usize].copy_from_slice(&now);
            }
            _ => {
                let mut got = vec![0u8; len as usize];
                node.read(&mut got, off).await.expect("read");
                assert_same(
                    &format!("step {step}: read {off}+{len}"),
                    &got,
                    &model[off as usize..(off + len) as usize],
                );
            }
        }
    }
}

async fn writes_over_backing(compat: &str, cluster: u64) {
    let test = format!("writes_over_backing compat={compat} cluster={cluster}");
    let mut rng = Rng::new(seed(&test));
    let dir = TempDir::new("write");
    let base = dir.file("base.raw");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &base, "6M"]);
    qemu_io(&base, "raw", &["write -P 0xaa 0 6M"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
            &top,
            "8M",
        ],
    );
    let mut model = qemu_contents(&top, "qcow2");
    let backing = model.clone();
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    // Copy-on-write: a small write in the middle of a backed cluster keeps the rest.
    node.write(&[1, 2, 3], cluster + 10, false)
        .await
        .expect("cow write");
    model[(cluster + 10) as usize..(cluster + 13) as usize].copy_from_slice(&[1, 2, 3]);
    random_ops(&node, &mut model, &backing, &mut rng, 300, cluster).await;
    assert_same(&test, &read_all(&node).await, &model);
    node.flush().await.expect("flush");
    // What QEMU sees while we hold the image must already be right (acknowledged writes
    // have their metadata on the file).
    assert_same(
        &format!("{test}, QEMU while open"),
        &qemu_contents(&top, "qcow2"),
        &model,
    );
    drop(node);
    qemu_check(&top, "qcow2");
    assert_same(
        &format!("{test}, QEMU after close"),
        &qemu_contents(&top, "qcow2"),
        &model,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_zeroes_and_discards_over_a_backing_file_v3() {
    writes_over_backing("1.1", 65536).await;
    writes_over_backing("1.1", 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_zeroes_and_discards_over_a_backing_file_v2() {
    writes_over_backing("0.10", 65536).await;
    writes_over_backing("0.10", 512).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_zeroing_on_v3_makes_zero_clusters_and_frees_space() {
    let dir = TempDir::new("zero");
    let img = dir.file("z.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "4M"]);
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    node.write(&vec![9u8; 1 << 20], 0, false)
        .await
        .expect("write");
    node.write_zeroes(0, 512 << 10, true)
        .await
        .expect("zero unmap");
    node.write_zeroes(512 << 10, 256 << 10, false)
        .await
        .expect("zero keep");
    let map = node_map(&node, 4 << 20).await;
    assert_eq!(
        map,
        vec![
            (0, 768 << 10, true, false, true),
            (768 << 10, 256 << 10, false, true, true),
            (1 << 20, 3 << 20, true, false, false),
        ]
    );
    assert_eq!(map, qemu_map(&img, "qcow2"));
    drop(node);
    let out = ok("qemu-img", &["check", "--output=json", &img]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("check JSON");
    // 512 KiB unmapped: only 8 data clusters (256 KiB kept + 256 KiB written) remain.
    assert_eq!(v["allocated-clusters"], 8, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_all_land_and_leave_a_consistent_image() {
    let dir = TempDir::new("concurrent");
    let img = dir.file("c.qcow2");
    create_qcow2_4k(&img, "64M");
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    const TASKS: u64 = 8;
    const PER_TASK: u64 = 40;
    // Task t writes blocks t, t+TASKS, ...: 3 KiB each, 1 MiB + 5 KiB apart, so writes
    // allocate data clusters, L2 tables and refcount blocks concurrently.
    let stride = (1 << 20) + 5120;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_TASK {
                let i = k * TASKS + t;
                let buf = vec![(i % 251 + 1) as u8; 3072];
                node.write(&buf, i * stride % (63 << 20), false)
                    .await
                    .unwrap_or_else(|e| panic!("write {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let mut model = vec![0u8; 64 << 20];
    for i in 0..TASKS * PER_TASK {
        let off = (i * stride % (63 << 20)) as usize;
        model[off..off + 3072].fill((i % 251 + 1) as u8);
    }
    assert_same("node", &read_all(&node).await, &model);
    assert_same("qemu while open", &qemu_contents(&img, "qcow2"), &model);
    drop(node);
    qemu_check_clean(&img, "qcow2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_zeroes_and_discards() {
    let dir = TempDir::new("rawwrite");
    let img = dir.file("r.raw");
    ok("qemu-img", &["create", "-f", "raw", &img, "2M"]);
    let node = open(&img, ImageFormat::Raw, false, &dir).await;
    node.write(&vec![5u8; 1 << 20], 4096, false)
        .await
        .expect("write");
    node.write_zeroes(8192, 8192, true).await.expect("punch");
    node.write_zeroes(65536, 4096, false)
        .await
        .expect("zero range");
    node.discard(131072, 65536).await.expect("discard");
    let got = read_all(&node).await;
    let mut model = vec![0u8; 2 << 20];
    model[4096..4096 + (1 << 20)].fill(5);
    model[8192..16384].fill(0);
    model[65536..69632].fill(0);
    model[131072..196608].fill(0);
    assert_same("raw", &got, &model);
    assert_eq!(node_map(&node, 2 << 20).await, qemu_map(&img, "raw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_with_zeroes_over_a_longer_backing_file_and_shrinks() {
    let dir = TempDir::new("resize");
    let base = dir.file("base.raw");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &base, "4M"]);
    qemu_io(&base, "raw", &["write -P 0xbb 0 4M"]);
    ok(
        "qemu-img",
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top, "1M",
        ],
    );
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    node.resize(3 << 20).await.expect("grow");
    assert_eq!(node.size(), 3 << 20);
    let got = read_all(&node).await;
    assert!(
        got[..1 << 20].iter().all(|b| *b == 0xbb),
        "old range shows the backing file"
    );
    assert!(
        got[1 << 20..].iter().all(|b| *b == 0),
        "new range must read as zeroes"
    );
    node.resize(2 << 20).await.expect("shrink");
    assert_eq!(node.size(), 2 << 20);
    assert!(
        node.resize(1000).await.is_err(),
        "qcow2 sizes are multiples of 512"
    );
    drop(node);
    qemu_check(&top, "qcow2");
    let info = ok("qemu-img", &["info", "--output=json", &top]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("info JSON");
    assert_eq!(v["virtual-size"], 2 << 20);
    let c = qemu_contents(&top, "qcow2");
    assert!(c[1 << 20..].iter().all(|b| *b == 0));

    let raw = dir.file("r.raw");
    ok("qemu-img", &["create", "-f", "raw", &raw, "1M"]);
    let node = open(&raw, ImageFormat::Raw, false, &dir).await;
    node.resize(5 << 20).await.expect("grow raw");
    assert_eq!(std::fs::metadata(&raw).expect("stat").len(), 5 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_nodes_refuse_changes() {
    let dir = TempDir::new("ro");
    let img = dir.file("ro.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    assert!(node.read_only());
    let e = node.write(&[1], 0, false).await.expect_err("write");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert!(node.write_zeroes(0, 512, true).await.is_err());
    assert!(node.discard(0, 512).await.is_err());
    assert!(node.resize(2 << 20).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_backing_node_serves_two_overlays() {
    let dir = TempDir::new("explicit");
    let base = dir.file("base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &base, "1M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 1M"]);
    for name in ["a.qcow2", "b.qcow2"] {
        ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &dir.file(name),
            ],
        );
    }
    let b = open(&base, ImageFormat::Qcow2, true, &dir).await;
    let a = open_with(
        &dir.file("a.qcow2"),
        ImageFormat::Qcow2,
        false,
        Backing::Node(b.clone()),
        &dir,
    )
    .await;
    let c = open_with(
        &dir.file("b.qcow2"),
        ImageFormat::Qcow2,
        false,
        Backing::Node(b.clone()),
        &dir,
    )
    .await;
    a.write(&[1; 100], 0, false).await.expect("write a");
    c.write(&[2; 100], 50, false).await.expect("write b");
    let (ra, rc) = (read_all(&a).await, read_all(&c).await);
    assert_eq!((ra[0], ra[99], ra[100]), (1, 1, 0x5a));
    assert_eq!((rc[49], rc[50], rc[150]), (0x5a, 2, 0x5a));
    assert!(Arc::ptr_eq(&a.backing().expect("backing"), &b));
    drop((a, c));
    qemu_check_clean(&dir.file("a.qcow2"), "qcow2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_data_file_is_opened_through_the_gate() {
    let dir = TempDir::new("datafile");
    let img = dir.file("df.qcow2");
    let data = dir.file("df.raw");
    // (qemu-img create takes a relative data file name relative to its working directory.)
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data}"),
            &img,
            "2M",
        ],
    );
    qemu_io(&img, "qcow2", &["write -P 3 0 64k", "write -P 4 1M 4096"]);
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    node.write(&[5; 1000], 70_000, false).await.expect("write");
    assert_same(
        "data file image",
        &read_all(&node).await,
        &qemu_contents(&img, "qcow2"),
    );
    assert_eq!(node_map(&node, 2 << 20).await, qemu_map(&img, "qcow2"));
    let info = serde_json::to_value(node.info()).expect("json");
    assert_eq!(info["format-specific"]["data"]["data-file"], data.as_str());
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], false);
    // The data file is locked like the image.
    let (success, _) = {
        let out = run("qemu-io", &["-f", "raw", "-c", "write 0 512", &data]);
        (out.status.success(), ())
    };
    assert!(!success, "the data file must be locked");
    drop(node);
    qemu_check_clean(&img, "qcow2");

    // A data file outside the allowed directories is refused.
    let other = TempDir::new("datafile-out");
    let img2 = dir.file("df2.qcow2");
    let outside = other.file("out.raw");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={outside}"),
            &img2,
            "1M",
        ],
    );
    let e = Node::open(OpenOptions::new(
        img2.clone(),
        ImageFormat::Qcow2,
        &dir.dirs(),
    ))
    .await
    .expect_err("outside");
    assert!(
        e.to_string().contains("outside the allowed directories"),
        "{e}"
    );
}

/// A corrupt image whose refcount block says its header cluster is free: imago would hand
/// that cluster out for the first new table and write the table over the header (the
/// `qcow2_write` fuzzer's first finding, which panicked block-proc by reading the table's
/// bytes as a header). Such an image is not opened read/write; read-only it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_metadata_has_refcount_0_is_not_opened_read_write() {
    let dir = TempDir::new("free-header");
    let img = dir.file("h.qcow2");
    create_qcow2(&img, 512, "64K");
    let file = open_rw(&img);
    let refblock = be64_at(&file, be64_at(&file, 48)) & !511;
    assert_ne!(refblock, 0, "the image has a refcount block");
    // Refcount of cluster 0 (16 bits wide): 0.
    std::os::unix::fs::FileExt::write_all_at(&file, &[0, 0], refblock)
        .expect("free the header cluster");
    let before = std::fs::read(&img).expect("read");

    let opts = || OpenOptions::new(img.clone(), ImageFormat::Qcow2, &dir.dirs());
    let err = Node::open(opts()).await.expect_err("opened read/write");
    let want = "qcow2: cluster 0 holds the header but its refcount is 0: the image is corrupt; \
                repair it with 'qemu-img check -r all'";
    assert!(err.to_string().contains(want), "{err}");
    assert_eq!(
        std::fs::read(&img).expect("read"),
        before,
        "the image changed"
    );
    let node = Node::open(opts().read_only(true))
        .await
        .expect("read-only open");
    assert_eq!(node.size(), 64 << 10);
}

/// The header guard, for what the open check cannot see: a compressed L2 entry whose bytes
/// lie in the header cluster (the cluster's refcount counts the header only). Overwriting
/// that guest cluster frees the header cluster, imago hands it out for the next new cluster,
/// and the data meant for it would wipe the header. That write is refused with QEMU's
/// overlap-check words, and the header survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_allocated_over_the_header_is_refused() {
    let dir = TempDir::new("over-header");
    let img = dir.file("h.qcow2");
    create_qcow2(&img, 512, "64K");
    qemu_io(&img, "qcow2", &["write -P 7 0 512"]);
    let file = open_rw(&img);
    let table = be64_at(&file, be64_at(&file, 40)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(table, 0, "the write made an L2 table");
    // Entry 0: compressed, one sector at byte 8 of the file (inside the header).
    let entry = (1u64 << 62) | 8;
    std::os::unix::fs::FileExt::write_all_at(&file, &entry.to_be_bytes(), table)
        .expect("point into the header");
    let header = std::fs::read(&img).expect("read")[..72].to_vec();

    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    // A whole cluster: nothing to decompress, and the compressed cluster is freed.
    node.write(&[0x11; 512], 0, false)
        .await
        .expect("overwrite the compressed cluster");
    let err = node
        .write(&[0x5a; 512], 512, false)
        .await
        .expect_err("a cluster over the header was written");
    assert!(
        err.to_string()
            .contains("Preventing invalid write on metadata (overlaps with qcow2_header)"),
        "{err}"
    );
    drop(node);
    assert_eq!(
        std::fs::read(&img).expect("read")[..72],
        header[..],
        "the header changed"
    );
    let info = ok("qemu-img", &["info", &img]);
    assert!(info.contains("virtual size: 64 KiB"), "{info}");
}
