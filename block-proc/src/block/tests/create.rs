//! Images we create, and backing files we rewrite, pass `qemu-img check` and show in
//! `qemu-img info` as intended.

use ipc::block::ImageFormat;

use super::*;
use crate::block::{create_qcow2, create_raw, header, set_backing_file};

fn qemu_info(img: &str) -> serde_json::Value {
    serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", img])).expect("info JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_images_pass_qemu_img_check_and_take_writes() {
    let dir = TempDir::new("create");
    let raw = dir.file("new.raw");
    create_raw(&raw, 3 << 20).await.expect("create raw");
    assert_eq!(std::fs::metadata(&raw).expect("stat").len(), 3 << 20);
    assert_eq!(qemu_info(&raw)["format"], "raw");

    for cluster in [512usize, 4096, 65536, 2 << 20] {
        let img = dir.file(&format!("new-{cluster}.qcow2"));
        create_qcow2(&img, 16 << 20, cluster, None)
            .await
            .expect("create qcow2");
        qemu_check_clean(&img, "qcow2");
        let info = qemu_info(&img);
        assert_eq!(info["virtual-size"], 16 << 20);
        assert_eq!(info["cluster-size"], cluster);
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
        let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
        node.write(&[0x42; 10000], 5 << 20, false)
            .await
            .expect("write");
        drop(node);
        qemu_check_clean(&img, "qcow2");
        assert_eq!(qemu_contents(&img, "qcow2")[(5 << 20) + 9999], 0x42);
    }

    // With a backing file: QEMU opens the chain we described.
    let top = dir.file("top.qcow2");
    create_qcow2(&top, 3 << 20, 65536, Some(("new.raw", ImageFormat::Raw)))
        .await
        .expect("create with backing");
    qemu_check_clean(&top, "qcow2");
    let info = qemu_info(&top);
    assert_eq!(info["backing-filename"], "new.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    qemu_io(&raw, "raw", &["write -P 0x31 0 3M"]);
    assert!(qemu_contents(&top, "qcow2").iter().all(|b| *b == 0x31));
    let node = open(&top, ImageFormat::Qcow2, true, &dir).await;
    assert!(read_all(&node).await.iter().all(|b| *b == 0x31));

    // Bad arguments.
    assert!(
        create_qcow2(&dir.file("x"), 1 << 20, 3000, None)
            .await
            .is_err()
    );
    assert!(
        create_qcow2(&dir.file("x"), 1000, 65536, None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_over_an_image_in_use_is_refused() {
    let dir = TempDir::new("create-busy");
    let img = dir.file("busy.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 4k"]);
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    let e = create_qcow2(&img, 1 << 20, 65536, None)
        .await
        .expect_err("in use");
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    let e = create_raw(&img, 1 << 20).await.expect_err("in use");
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    let mut b = [0u8; 1];
    node.read(&mut b, 0).await.expect("read");
    assert_eq!(b[0], 1, "the image in use is untouched");
}

/// Checks the header on disk names `backing` and that QEMU agrees.
fn assert_backing(img: &str, backing: Option<(&str, &str)>) {
    qemu_check_clean(img, "qcow2");
    let info = qemu_info(img);
    match backing {
        Some((name, fmt)) => {
            assert_eq!(info["backing-filename"], name, "{info}");
            assert_eq!(info["backing-filename-format"], fmt, "{info}");
        }
        None => {
            assert!(info.get("backing-filename").is_none(), "{info}");
            assert!(info.get("backing-filename-format").is_none(), "{info}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_files_are_rewritten_in_place_on_closed_images() {
    let dir = TempDir::new("rebase");
    let raw = dir.file("b.raw");
    let q = dir.file("b.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &raw, "1M"]);
    ok("qemu-img", &["create", "-f", "qcow2", &q, "1M"]);
    for compat in ["1.1", "0.10"] {
        for cluster in ["512", "65536"] {
            let img = dir.file(&format!("t-{compat}-{cluster}.qcow2"));
            ok(
                "qemu-img",
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={compat},cluster_size={cluster}"),
                    "-b",
                    "b.raw",
                    "-F",
                    "raw",
                    &img,
                ],
            );
            qemu_io(&img, "qcow2", &["write -P 5 0 4k"]);
            let seq: [Option<(&str, ImageFormat)>; 5] = [
                Some(("b.qcow2", ImageFormat::Qcow2)),
                Some((
                    "a-much-longer-name-for-the-same-backing-file.qcow2",
                    ImageFormat::Qcow2,
                )),
                None,
                Some(("b.raw", ImageFormat::Raw)),
                Some(("b.raw", ImageFormat::Raw)),
            ];
            for step in seq {
                if let Some(("a-much-longer-name-for-the-same-backing-file.qcow2", _)) = step {
                    std::fs::copy(
                        &q,
                        dir.file("a-much-longer-name-for-the-same-backing-file.qcow2"),
                    )
                    .expect("copy");
                }
                set_backing_file(&img, step)
                    .await
                    .unwrap_or_else(|e| panic!("{img} {step:?}: {e}"));
                assert_backing(&img, step.map(|(n, f)| (n, f.as_str())));
                let h = header::Header::read(&std::fs::File::open(&img).expect("open"))
                    .expect("header");
                assert_eq!(h.backing_file.as_deref(), step.map(|(n, _)| n));
                // The image still reads right through QEMU.
                assert_eq!(qemu_contents(&img, "qcow2")[100], 5);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_files_are_rewritten_on_open_nodes_which_keep_working() {
    let dir = TempDir::new("rebase-open");
    let base = dir.file("base.qcow2");
    let copy = dir.file("copy.qcow2");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &base, "2M"]);
    qemu_io(&base, "qcow2", &["write -P 0x10 0 2M"]);
    std::fs::copy(&base, &copy).expect("copy");
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
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    node.write(&[1; 100], 0, false).await.expect("write");
    node.set_backing_file(Some(("copy.qcow2", ImageFormat::Qcow2)))
        .await
        .expect("set backing file");
    // Keeps reading through the backing node it has, and keeps taking writes.
    node.write(&[2; 100], 1 << 20, false)
        .await
        .expect("write after");
    node.resize(4 << 20).await.expect("resize after");
    let got = read_all(&node).await;
    assert_eq!(
        (got[0], got[100], got[1 << 20], got[(1 << 20) + 100]),
        (1, 0x10, 2, 0x10)
    );
    let info = serde_json::to_value(node.info()).expect("json");
    assert_eq!(info["backing-filename"], "copy.qcow2");
    assert_eq!(info["full-backing-filename"], copy);
    // Switch the backing node too, then drop it altogether.
    let other = open(&copy, ImageFormat::Qcow2, true, &dir).await;
    node.set_backing(Some(other)).await.expect("set backing");
    // (Clusters 0 and 16 were copied up by the writes; 512 KiB was never written.)
    assert_eq!(read_all(&node).await[512 << 10], 0x10);
    node.set_backing(None).await.expect("no backing");
    node.set_backing_file(None).await.expect("no backing file");
    assert_eq!(read_all(&node).await[512 << 10], 0);
    drop(node);
    assert_backing(&top, None);
    let c = qemu_contents(&top, "qcow2");
    assert_eq!((c[0], c[200], c[512 << 10], c.len()), (1, 0x10, 0, 4 << 20));
}

/// A backing file name and format, or none.
type Pair<'a> = Option<(&'a str, &'a str)>;

/// Stops a rewrite after each of its writes (what a crash would leave) and checks every
/// state is a valid image whose backing name and format never mismatch: old pair, new
/// pair, or a name without a format (or, on removal, a stale format without a name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_a_crash_can_leave_during_a_backing_rewrite_is_consistent() {
    let dir = TempDir::new("rebase-crash");
    for (name, fmt) in [
        ("b.raw", "raw"),
        ("b.qcow2", "qcow2"),
        ("a-rather-longer-name-for-b.raw", "raw"),
        ("a-rather-longer-name-for-b.qcow2", "qcow2"),
    ] {
        ok("qemu-img", &["create", "-f", fmt, &dir.file(name), "1M"]);
    }
    let transitions: [(Pair, Pair); 5] = [
        (Some(("b.raw", "raw")), Some(("b.qcow2", "qcow2"))),
        (
            Some(("b.raw", "raw")),
            Some(("a-rather-longer-name-for-b.raw", "raw")),
        ),
        (
            Some(("a-rather-longer-name-for-b.qcow2", "qcow2")),
            Some(("b.raw", "raw")),
        ),
        (Some(("b.raw", "raw")), None),
        (None, Some(("b.qcow2", "qcow2"))),
    ];
    let mut n = 0;
    for compat in ["1.1", "0.10"] {
        for (from, to) in transitions {
            for budget in 0..6 {
                n += 1;
                let img = dir.file(&format!("img{n}.qcow2"));
                let mut args = vec!["create", "-f", "qcow2", "-o"];
                let opt = format!("compat={compat}");
                args.push(&opt);
                if let Some((name, fmt)) = from {
                    args.extend(["-u", "-b", name, "-F", fmt]);
                }
                args.extend([img.as_str(), "1M"]);
                ok("qemu-img", &args);
                let f = open_rw(&img);
                let h = header::rewrite_backing_steps(&f, to, Some(budget)).expect("rewrite");
                drop(f);
                let state = (h.backing_file.clone(), h.backing_format());
                let pair = |p: Option<(&str, &str)>| {
                    (p.map(|(n, _)| n.to_string()), p.map(|(_, f)| f.to_string()))
                };
                let (old, new) = (pair(from), pair(to));
                let allowed = [
                    old.clone(),
                    new.clone(),
                    (old.0.clone(), None),
                    (new.0.clone(), None),
                    (None, old.1.clone()),
                ];
                assert!(
                    allowed.contains(&state)
                        && (state.0.is_some() || state.1.is_none() || to.is_none()),
                    "compat={compat} {from:?} -> {to:?}, stopped after {budget} writes: {state:?}"
                );
                // QEMU reads the same state, and finds the image sound.
                qemu_check_clean(&img, "qcow2");
                let info = qemu_info(&img);
                assert_eq!(
                    info["backing-filename"].as_str(),
                    state.0.as_deref(),
                    "{info}"
                );
                if state.0.is_some() {
                    assert_eq!(
                        info["backing-filename-format"].as_str(),
                        state.1.as_deref(),
                        "{info}"
                    );
                }
                if budget == 5 {
                    assert_eq!(state, new, "a full rewrite ends in the new state");
                }
            }
        }
    }
}
