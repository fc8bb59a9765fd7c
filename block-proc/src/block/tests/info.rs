//! `Node::info` says what `qemu-img info --output=json --backing-chain` says.

use ipc::block::{ImageFormat, ImageInfo};
use serde_json::Value;

use super::read::make_three_deep_chain;
use super::*;

/// Our `ImageInfo` as QAPI JSON (absent members dropped, as the monitor does), flattened
/// into the list `--backing-chain` prints, without `backing-image`.
fn flatten(info: &ImageInfo) -> Vec<Value> {
    fn strip(v: &mut Value) {
        if let Value::Object(m) = v {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip);
        }
    }
    let mut out = Vec::new();
    let mut cur = Some(info);
    while let Some(i) = cur {
        let mut v = serde_json::to_value(i).expect("to JSON");
        strip(&mut v);
        if let Value::Object(m) = &mut v {
            m.remove("backing-image");
        }
        out.push(v);
        cur = i.backing_image.as_deref();
    }
    out
}

/// QEMU's list, without what `query-block` does not have (`children`, the protocol node).
fn qemu_chain(img: &str) -> Vec<Value> {
    let out = ok(
        "qemu-img",
        &["info", "-U", "--output=json", "--backing-chain", img],
    );
    let v: Value = serde_json::from_str(&out).expect("info JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if let Value::Object(m) = &mut e {
                m.remove("children");
            }
            e
        })
        .collect()
}

fn assert_info_like_qemu(ours: &ImageInfo, img: &str) {
    let ours = flatten(ours);
    let theirs = qemu_chain(img);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "chain length\nours: {ours:#?}\nqemu: {theirs:#?}"
    );
    for (mut o, mut t) in ours.into_iter().zip(theirs) {
        // actual-size depends on when the file system accounts blocks; both must have it.
        for v in [&mut o, &mut t] {
            let m = v.as_object_mut().expect("object");
            assert!(
                m.remove("actual-size").is_some_and(|s| s.is_u64()),
                "actual-size in {m:?}"
            );
        }
        assert_eq!(o, t, "ours differs from qemu-img info");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_of_a_chain_matches_qemu_img_info() {
    let dir = TempDir::new("info");
    let top = make_three_deep_chain(&dir);
    let node = open(&top, ImageFormat::Qcow2, true, &dir).await;
    assert_info_like_qemu(&node.info(), &top);
    let info = node.info();
    assert_eq!(
        info.backing_image.as_ref().map(|b| b.format.as_str()),
        Some("qcow2")
    );

    // Relative names stay relative, as QEMU shows them when opened by a relative name.
    let cwd = std::env::current_dir().expect("cwd");
    let rel_dirs = dir.dirs();
    let rel = pathdiff(dir.path(), &cwd).join("top.qcow2");
    let rel = rel.display().to_string();
    let node =
        Node::open(OpenOptions::new(rel.clone(), ImageFormat::Qcow2, &rel_dirs).read_only(true))
            .await
            .expect("open by relative name");
    assert_info_like_qemu(&node.info(), &rel);
}

/// `path` relative to `base` (both absolute), with `..` steps.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<_> = path.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_of_v2_v3_raw_and_odd_images_matches_qemu_img_info() {
    let dir = TempDir::new("info-misc");
    let cases: [(&str, &str, &[&str]); 5] = [
        ("v3.qcow2", "qcow2", &["-o", "cluster_size=4096"]),
        ("v2.qcow2", "qcow2", &["-o", "compat=0.10"]),
        (
            "lazy.qcow2",
            "qcow2",
            &["-o", "lazy_refcounts=on,refcount_bits=64"],
        ),
        ("big.qcow2", "qcow2", &["-o", "cluster_size=2M"]),
        ("plain.raw", "raw", &[]),
    ];
    for (name, fmt, opts) in cases {
        let img = dir.file(name);
        let mut args = vec!["create", "-f", fmt];
        args.extend_from_slice(opts);
        args.extend([img.as_str(), "5M"]);
        ok("qemu-img", &args);
        qemu_io(&img, fmt, &["write -P 1 0 100k"]);
        let format = if fmt == "raw" {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        };
        let node = open(&img, format, false, &dir).await;
        assert_info_like_qemu(&node.info(), &img);
    }
    // Our own images too.
    let ours = dir.file("ours.qcow2");
    crate::block::create_qcow2(&ours, 5 << 20, 65536, Some(("plain.raw", ImageFormat::Raw)))
        .await
        .expect("create");
    let node = open(&ours, ImageFormat::Qcow2, true, &dir).await;
    assert_info_like_qemu(&node.info(), &ours);
}

#[test]
fn image_info_survives_the_ipc_codec() {
    use ipc::block::{ImageInfoSpecific, ImageInfoSpecificQcow2};
    let info = ImageInfo {
        filename: "a".into(),
        format: "qcow2".into(),
        virtual_size: 1,
        actual_size: Some(2),
        dirty_flag: Some(false),
        cluster_size: Some(65536),
        backing_filename: Some("b".into()),
        full_backing_filename: Some("/b".into()),
        backing_filename_format: Some("raw".into()),
        format_specific: Some(ImageInfoSpecific {
            kind: "qcow2".into(),
            data: ImageInfoSpecificQcow2 {
                compat: "1.1".into(),
                data_file: None,
                data_file_raw: None,
                extended_l2: Some(false),
                lazy_refcounts: Some(true),
                corrupt: Some(false),
                refcount_bits: 16,
                compression_type: "zlib".into(),
            },
        }),
        backing_image: None,
    };
    let frame = ipc::codec::encode(&info).expect("encode");
    let back: ImageInfo = ipc::codec::decode(&frame).expect("decode");
    assert_eq!(
        serde_json::to_value(&back).ok(),
        serde_json::to_value(&info).ok()
    );
    let json = serde_json::to_value(&info).expect("json");
    assert_eq!(json["format-specific"]["type"], "qcow2");
    assert_eq!(json["format-specific"]["data"]["lazy-refcounts"], true);
}
