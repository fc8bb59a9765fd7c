//! Images made by QEMU read through `Node` exactly as `qemu-img convert -O raw` reads them.

use ipc::block::ImageFormat;

use super::*;

/// Writes a recognisable mix into a qcow2 image with qemu-io: data in full and partial
/// clusters, zero clusters, and a discarded range.
fn fill_with_qemu_io(img: &str, cluster: u64, size: u64) {
    let c = cluster;
    let cmds = [
        format!("write -P 0x11 0 {}", c),
        format!("write -P 0x22 {} {}", c + 512, 3 * c),
        format!("write -P 0x33 {} 4096", size / 2 + 1536),
        format!("write -P 0x44 {} {}", size - 2 * c, 2 * c),
        format!("write -z {} {}", 6 * c, 2 * c),
        format!("write -P 0x55 {} 1000", 9 * c + 100),
        format!("discard {} {}", c + 512 + c, c),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(img, "qcow2", &cmds);
}

async fn check_reads_like_qemu(compat: &str, cluster: u64) {
    let dir = TempDir::new("read");
    let img = dir.file("img.qcow2");
    let size = (64 * cluster).max(8 << 20);
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}"),
            &img,
            &size.to_string(),
        ],
    );
    fill_with_qemu_io(&img, cluster, size);
    let want = qemu_contents(&img, "qcow2");
    for read_only in [true, false] {
        let node = open(&img, ImageFormat::Qcow2, read_only, &dir).await;
        assert_eq!(node.size(), size);
        let got = read_all(&node).await;
        assert_same(
            &format!("compat={compat} cluster={cluster} read_only={read_only}"),
            &got,
            &want,
        );
        drop(node);
    }
    qemu_check_clean(&img, "qcow2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_v3_images_read_like_qemu_img_convert() {
    for cluster in [4096, 65536, 2 << 20] {
        check_reads_like_qemu("1.1", cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_v2_images_read_like_qemu_img_convert() {
    for cluster in [4096, 65536, 2 << 20] {
        check_reads_like_qemu("0.10", cluster).await;
    }
}

/// A raw base, a v2 qcow2 middle and a v3 top, each with data QEMU wrote at its level.
pub fn make_three_deep_chain(dir: &TempDir) -> String {
    let base = dir.file("base.raw");
    let mid = dir.file("mid.qcow2");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &base, "4M"]);
    qemu_io(
        &base,
        "raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 3M 65536",
            "write -P 0x13 4100000 4000",
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &mid,
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x22 512k 1M",
            "write -P 0x23 2097252 300",
            "write -z 3M 4096",
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x33 768k 65536",
            "write -z 0 4096",
            "write -P 0x34 1049000 5000",
        ],
    );
    top
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_deep_chain_of_raw_and_qcow2_reads_like_qemu() {
    let dir = TempDir::new("chain");
    let top = make_three_deep_chain(&dir);
    let want = qemu_contents(&top, "qcow2");
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    assert_eq!(node.backing_depth(), 2);
    let got = read_all(&node).await;
    assert_same("three-deep chain", &got, &want);
    // Spot checks that each layer shows where QEMU put it.
    assert_eq!(got[1000], 0, "top zero cluster");
    assert_eq!(got[5000], 0x11, "base data");
    assert_eq!(got[600 << 10], 0x22, "mid data");
    assert_eq!(got[800 << 10], 0x33, "top data");
    assert_eq!(got[(3 << 20) + 100], 0, "mid zero write over base data");
    assert_eq!(got[(3 << 20) + 5000], 0x12, "base data next to it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_clusters_read_like_qemu() {
    let dir = TempDir::new("compressed");
    let src = dir.file("src.raw");
    let img = dir.file("comp.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &src, "4M"]);
    // Compressible patterns, and one cluster of varied bytes.
    qemu_io(
        &src,
        "raw",
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 2M 300000",
            "write -P 0x63 3670016 65536",
        ],
    );
    let mut varied = std::fs::read(&src).expect("read src");
    for (i, b) in varied[(1 << 20)..(1 << 20) + 65536].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&src, &varied).expect("write src");
    ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &src, &img],
    );
    let map = ok("qemu-img", &["map", "--output=json", &img]);
    assert!(
        map.contains("\"compressed\": true"),
        "qemu-img did not compress: {map}"
    );
    let want = qemu_contents(&img, "qcow2");
    assert_same("source", &want, &varied);
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    let got = read_all(&node).await;
    assert_same("compressed image", &got, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_images_read_as_the_file() {
    let dir = TempDir::new("rawread");
    let img = dir.file("a.raw");
    ok("qemu-img", &["create", "-f", "raw", &img, "3M"]);
    qemu_io(&img, "raw", &["write -P 0x77 1000 70000"]);
    let node = open(&img, ImageFormat::Raw, true, &dir).await;
    let got = read_all(&node).await;
    assert_same("raw", &got, &std::fs::read(&img).expect("read"));
}

/// Drops `path`'s pages from the page cache (written back first), so reading it again has
/// to wait for the disk.
fn evict_from_page_cache(path: &str) {
    let f = std::fs::File::open(path).expect("open");
    f.sync_all().expect("fsync");
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("fadvise");
}

/// Reads run on the tokio worker in no-wait mode; data (and qcow2 tables) that the page
/// cache does not hold are read again where waiting is allowed, and come out the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_images_out_of_the_page_cache_read_like_qemu() {
    let dir = TempDir::new("coldread");
    let top = make_three_deep_chain(&dir);
    let want = qemu_contents(&top, "qcow2");
    let node = open(&top, ImageFormat::Qcow2, true, &dir).await;
    for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
        evict_from_page_cache(&dir.file(f));
    }
    assert_same("cold chain", &read_all(&node).await, &want);

    let raw = dir.file("cold.raw");
    ok("qemu-img", &["create", "-f", "raw", &raw, "3M"]);
    qemu_io(&raw, "raw", &["write -P 0x5a 4096 2M"]);
    let node = open(&raw, ImageFormat::Raw, true, &dir).await;
    evict_from_page_cache(&raw);
    assert_same(
        "cold raw",
        &read_all(&node).await,
        &std::fs::read(&raw).expect("read"),
    );
}
