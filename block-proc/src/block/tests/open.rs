//! What opening refuses: files outside the allowed directories, backing files without a
//! format, writable opens of corrupt or dirty images, backing loops.

use std::os::unix::fs::FileExt;

use ipc::block::ImageFormat;

use super::*;

async fn open_err(name: &str, fmt: ImageFormat, ro: bool, dirs: &[PathBuf]) -> String {
    match Node::open(OpenOptions::new(name, fmt, dirs).read_only(ro)).await {
        Ok(_) => panic!("{name} opened, but must not"),
        Err(e) => e.to_string(),
    }
}

/// Sets incompatible-feature bits in a v3 header.
fn set_incompat(img: &str, bits: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("open");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).expect("read");
    let v = u64::from_be_bytes(b) | bits;
    f.write_all_at(&v.to_be_bytes(), 72).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_files_outside_the_allowed_directories_are_refused() {
    let allowed = TempDir::new("allowed");
    let outside = TempDir::new("outside");
    let secret = outside.file("secret.raw");
    ok("qemu-img", &["create", "-f", "raw", &secret, "1M"]);

    // An absolute backing name outside.
    let a = allowed.file("a.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", &secret, "-F", "raw", &a],
    );
    let e = open_err(&a, ImageFormat::Qcow2, true, &allowed.dirs()).await;
    assert!(
        e.starts_with("Could not open backing file: Could not open '")
            && e.contains("secret.raw")
            && e.contains("outside the allowed directories"),
        "{e}"
    );
    // A relative name escaping with `..`.
    let rel = format!(
        "../{}/secret.raw",
        outside
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
    );
    let b = allowed.file("b.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", &rel, "-F", "raw", &b],
    );
    let e = open_err(&b, ImageFormat::Qcow2, true, &allowed.dirs()).await;
    assert!(e.contains("outside the allowed directories"), "{e}");
    // A symlink inside the directory pointing outside.
    std::os::unix::fs::symlink(&secret, allowed.file("link.raw")).expect("symlink");
    let c = allowed.file("c.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "link.raw", "-F", "raw", &c],
    );
    let e = open_err(&c, ImageFormat::Qcow2, true, &allowed.dirs()).await;
    assert!(
        e.contains("link.raw") && e.contains(&secret),
        "names the file and where it leads: {e}"
    );
    // The top image itself too.
    let e = open_err(&secret, ImageFormat::Raw, true, &allowed.dirs()).await;
    assert!(e.contains("outside the allowed directories"), "{e}");
    // With both directories allowed, all of them open.
    let both = [allowed.path().to_path_buf(), outside.path().to_path_buf()];
    for img in [&a, &b, &c] {
        Node::open(OpenOptions::new(img.as_str(), ImageFormat::Qcow2, &both).read_only(true))
            .await
            .unwrap_or_else(|e| panic!("{img}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_file_without_a_format_is_not_probed() {
    let dir = TempDir::new("noformat");
    let base = dir.file("base.qcow2");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &base, "1M"]);
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
            &top,
        ],
    );
    // Drop the format the way an old qemu-img would have left it: QEMU 10 no longer writes
    // such images, so turn the backing-format extension into an unknown one.
    let f = open_rw(&top);
    let mut h = vec![0u8; 65536];
    f.read_exact_at(&mut h, 0).expect("read header");
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = h
        .windows(4)
        .position(|w| w == magic)
        .expect("backing format extension");
    f.write_all_at(&0x0bad_f00du32.to_be_bytes(), at as u64)
        .expect("patch");
    drop(f);
    let info = ok("qemu-img", &["info", "-U", "--output=json", &top]);
    assert!(!info.contains("backing-filename-format"), "{info}");
    let e = open_err(&top, ImageFormat::Qcow2, true, &dir.dirs()).await;
    assert!(
        e.contains("has no backing format") && e.contains("base.qcow2"),
        "{e}"
    );
    // Opening it without its backing file works, and so does recording the format.
    open_with(&top, ImageFormat::Qcow2, true, Backing::None, &dir).await;
    crate::block::set_backing_file(&top, Some(("base.qcow2", ImageFormat::Qcow2)))
        .await
        .expect("set format");
    open(&top, ImageFormat::Qcow2, true, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_images_open_read_only_only() {
    let dir = TempDir::new("corrupt");
    let img = dir.file("c.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    qemu_io(&img, "qcow2", &["write -P 9 0 4k"]);
    set_incompat(&img, 1 << 1);
    let e = open_err(&img, ImageFormat::Qcow2, false, &dir.dirs()).await;
    assert_eq!(e, "qcow2: Image is corrupt; cannot be opened read/write");
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    let mut b = [0u8; 4];
    node.read(&mut b, 0).await.expect("read");
    assert_eq!(b, [9; 4]);
    let info = serde_json::to_value(node.info()).expect("json");
    assert_eq!(info["format-specific"]["data"]["corrupt"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_images_open_read_only_and_report_the_dirty_flag() {
    let dir = TempDir::new("dirty");
    let img = dir.file("d.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &img,
            "1M",
        ],
    );
    qemu_io(&img, "qcow2", &["write -P 8 0 4k"]);
    set_incompat(&img, 1 << 0);
    let e = open_err(&img, ImageFormat::Qcow2, false, &dir.dirs()).await;
    assert!(
        e.contains("is dirty") && e.contains("qemu-img check -r all"),
        "{e}"
    );
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    let mut b = [0u8; 4];
    node.read(&mut b, 0).await.expect("read");
    assert_eq!(b, [8; 4]);
    let ours = serde_json::to_value(node.info()).expect("json");
    let theirs: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", &img]))
            .expect("info");
    assert_eq!(ours["dirty-flag"], true);
    assert_eq!(theirs["dirty-flag"], true);
    assert_eq!(ours["format-specific"]["data"]["lazy-refcounts"], true);
    // The read-only open must not have changed the header.
    let f = std::fs::File::open(&img).expect("open");
    let mut h = [0u8; 8];
    f.read_exact_at(&mut h, 72).expect("read");
    assert_eq!(u64::from_be_bytes(h) & 1, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_loop_is_an_error() {
    let dir = TempDir::new("loop");
    let a = dir.file("a.qcow2");
    let b = dir.file("b.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &a, "1M"]);
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b],
    );
    crate::block::set_backing_file(&a, Some(("b.qcow2", ImageFormat::Qcow2)))
        .await
        .expect("make a loop");
    let e = open_err(&b, ImageFormat::Qcow2, true, &dir.dirs()).await;
    assert!(e.contains("loops back"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_worded_like_qemu() {
    let dir = TempDir::new("missing");
    let img = dir.file("nope.qcow2");
    let e = open_err(&img, ImageFormat::Qcow2, true, &dir.dirs()).await;
    assert_eq!(
        e,
        format!("Could not open '{img}': No such file or directory")
    );
    let not_qcow2 = dir.file("raw.img");
    ok("qemu-img", &["create", "-f", "raw", &not_qcow2, "1M"]);
    let e = open_err(&not_qcow2, ImageFormat::Qcow2, true, &dir.dirs()).await;
    assert!(e.ends_with("Image is not in qcow2 format"), "{e}");
}

#[test]
fn path_combine_is_qemus() {
    use crate::block::node::path_combine;
    assert_eq!(path_combine("top.qcow2", "base.raw"), "base.raw");
    assert_eq!(path_combine("/a/b/top.qcow2", "base.raw"), "/a/b/base.raw");
    assert_eq!(
        path_combine("/a/b/top.qcow2", "../c/base.raw"),
        "/a/b/../c/base.raw"
    );
    assert_eq!(path_combine("d/top.qcow2", "/abs/base"), "/abs/base");
    assert_eq!(path_combine("./top", "x"), "./x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_sub_byte_refcounts_open_read_only_only() {
    let dir = TempDir::new("refbits");
    let img = dir.file("r1.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "refcount_bits=1", &img, "1M"],
    );
    qemu_io(&img, "qcow2", &["write -P 6 0 4k"]);
    let e = open_err(&img, ImageFormat::Qcow2, false, &dir.dirs()).await;
    assert!(
        e.contains("refcount_bits=1 cannot be opened read/write"),
        "{e}"
    );
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    assert_eq!(read_all(&node).await[4095], 6);
    let e = open_err(&img, ImageFormat::Qcow2, true, &[]).await;
    assert!(
        e.contains("outside the allowed directories"),
        "no directories allow nothing: {e}"
    );
}

/// Found by the `qcow2_open` fuzz target: an image whose L1 table (1 entry) covered 32 KiB
/// of a 256 TiB virtual size opened, and a `block_status` over the whole image then ran for
/// ever. Such images are refused as QEMU refuses them, with its words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_whose_l1_table_does_not_fit_their_size_are_refused_like_qemu() {
    let dir = TempDir::new("l1");
    // 512-byte clusters: one L1 entry maps 64 clusters, 32 KiB; a 64 KiB image has 2.
    let cases: [(&str, u64, u32, u64, &str); 5] = [
        ("fuzz", 0xffff_ffff_8000, 1, 0, "Image is too big"),
        ("small", 1 << 20, 2, 0, "L1 table is too small"),
        (
            "large",
            64 << 10,
            (4 << 20) + 1,
            0,
            "Active L1 table too large",
        ),
        (
            "unaligned",
            64 << 10,
            2,
            0x1234,
            "Active L1 table offset invalid",
        ),
        (
            "beyond",
            64 << 10,
            2,
            u64::MAX - 511,
            "Active L1 table offset invalid",
        ),
    ];
    for (name, size, l1_size, l1_offset, want) in cases {
        let img = dir.file(&format!("{name}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                &img,
                "64K",
            ],
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open");
        f.write_all_at(&size.to_be_bytes(), 24).expect("size");
        f.write_all_at(&l1_size.to_be_bytes(), 36).expect("l1_size");
        if l1_offset != 0 {
            f.write_all_at(&l1_offset.to_be_bytes(), 40)
                .expect("l1 offset");
        }
        drop(f);
        let qemu = run("qemu-img", &["info", "-f", "qcow2", &img]);
        let qemu = String::from_utf8_lossy(&qemu.stderr);
        assert!(qemu.contains(want), "{name}: qemu-img says {qemu}");
        for ro in [true, false] {
            let e = open_err(&img, ImageFormat::Qcow2, ro, &dir.dirs()).await;
            assert_eq!(e, format!("Could not open '{img}': {want}"), "{name}");
        }
    }
    // The limits themselves are fine: 2 entries for 64 KiB, the image opens and reads.
    let img = dir.file("exact.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            &img,
            "64K",
        ],
    );
    let node = open(&img, ImageFormat::Qcow2, true, &dir).await;
    assert_eq!(read_all(&node).await.len(), 64 << 10);
}

/// Found by the `qcow2_open` fuzz target: a feature name table of one byte made imago 0.2.6
/// index past the end of its last entry, and the panic aborted block-proc. Such tables are
/// refused before imago sees them. QEMU reads them (it needs no whole entries): a
/// deviation, for images no QEMU tool writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_name_table_of_partial_entries_is_refused_not_a_panic() {
    let dir = TempDir::new("featuretable");
    let img = dir.file("ft.qcow2");
    create_qcow2(&img, 512, "64K");
    let f = open_rw(&img);
    let mut hl = [0u8; 4];
    f.read_exact_at(&mut hl, 100).expect("header_length");
    let at = u64::from(u32::from_be_bytes(hl));
    // The feature name table, 1 byte long (an "incompatible" entry cut short), then the end.
    let mut exts = Vec::new();
    exts.extend_from_slice(&0x6803_f857u32.to_be_bytes());
    exts.extend_from_slice(&1u32.to_be_bytes());
    exts.extend_from_slice(&[0u8; 8]);
    exts.extend_from_slice(&[0u8; 8]);
    f.write_all_at(&exts, at).expect("write extensions");
    drop(f);
    let qemu = run("qemu-img", &["info", "-f", "qcow2", &img]);
    assert!(qemu.status.success(), "QEMU opens it: {qemu:?}");
    for ro in [true, false] {
        let e = open_err(&img, ImageFormat::Qcow2, ro, &dir.dirs()).await;
        assert_eq!(
            e,
            format!(
                "Could not open '{img}': Feature name table of 1 bytes is not a whole number \
                 of 48-byte entries"
            )
        );
    }
}
