//! The server against the real clients of this machine: qemu-img (info, map, compare,
//! convert), qemu-io, nbdinfo and nbdcopy, over the unix socket and over TCP.

use serde_json::Value;

use super::*;

/// "img": 64 MiB read-only with data at [0, 1M) and [32M, 33M); "w": 64 MiB writable,
/// empty.
async fn img_and_w() -> (TestServer, Arc<MemDevice>, Arc<MemDevice>) {
    let img = MemDevice::new(64 * MIB).read_only();
    img.fill(0, &pattern(MIB as usize, 1));
    img.fill(32 * MIB, &pattern(MIB as usize, 2));
    let (mut e1, img) = export("img", img, false);
    e1.description = Some("test image".into());
    let (e2, w) = export("w", MemDevice::new(64 * MIB), true);
    (
        TestServer::start(NbdServerConfig::default(), vec![e1, e2]).await,
        img,
        w,
    )
}

/// (start, length, data, zero) of each `qemu-img map --output=json` entry.
fn map_entries(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_and_map_over_unix_and_tcp() {
    let (t, _img, _w) = img_and_w().await;
    let expected = [
        (0, MIB, true, false),
        (MIB, 31 * MIB, false, true),
        (32 * MIB, MIB, true, false),
        (33 * MIB, 31 * MIB, false, true),
    ];
    for uri in [t.unix_uri("img"), t.tcp_uri("img")] {
        let out = run_ok("qemu-img", &["info", "--output=json", &uri]).await;
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(64 * MIB), "{out}");
        assert_eq!(v["format"].as_str(), Some("raw"), "{out}");

        let out = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).await;
        assert_eq!(map_entries(&out), expected, "{out}");
    }
    // An unknown export is an error, with the server's message.
    let (ok, _, err) = run("qemu-img", &["info", &t.unix_uri("nope")]).await;
    assert!(!ok);
    assert!(err.contains("export 'nope' not present"), "{err}");
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare_both_directions() {
    let (t, img, w) = img_and_w().await;
    let dir = TempDir::new("convert");

    // To the export: a raw file with data, zeroes and a hole.
    let src = dir.join("src.raw");
    let mut data = pattern(64 * MIB as usize, 7);
    data[8 * MIB as usize..16 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    let w_uri = t.unix_uri("w");
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &w_uri],
    )
    .await;
    assert!(w.contents() == data, "the export differs from the source");
    let out = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &w_uri],
    )
    .await;
    assert!(out.contains("Images are identical"), "{out}");
    // ... and compare notices a difference.
    w.fill(40 * MIB, b"different");
    let (ok, out, _) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &w_uri],
    )
    .await;
    assert!(
        !ok && out.contains("Content mismatch at offset 41943040"),
        "{out}"
    );

    // From the export, over TCP, to qcow2; holes stay holes.
    let dst = dir.join("dst.qcow2");
    let dst_s = dst.to_str().unwrap();
    let img_tcp = t.tcp_uri("img");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &img_tcp, dst_s],
    )
    .await;
    let out = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &img_tcp, dst_s],
    )
    .await;
    assert!(out.contains("Images are identical"), "{out}");
    let out = run_ok("qemu-img", &["map", "--output=json", dst_s]).await;
    let allocated: u64 = map_entries(&out).iter().filter(|e| e.2).map(|e| e.1).sum();
    assert_eq!(allocated, 2 * MIB, "{out}");
    let raw = dir.join("dst.raw");
    run_ok(
        "qemu-img",
        &["convert", "-O", "raw", dst_s, raw.to_str().unwrap()],
    )
    .await;
    assert!(std::fs::read(&raw).unwrap() == img.contents());
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_a_pattern() {
    let (t, img, w) = img_and_w().await;
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "flush",
            &t.unix_uri("w"),
        ],
    )
    .await;
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    let c = w.contents();
    assert!(c[..65536].iter().all(|&b| b == 0xab));
    assert!(c[65536..].iter().all(|&b| b == 0));
    assert!(w.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // Read-only export: reads verify, writes are refused.
    let out = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0 2M 64k",
            &t.tcp_uri("img"),
        ],
    )
    .await;
    assert!(
        out.contains("read 65536/65536 bytes at offset 2097152"),
        "{out}"
    );
    let (_, out, err) = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &t.unix_uri("img")],
    )
    .await;
    assert!(!out.contains("wrote"), "{out}{err}");
    assert_eq!(img.contents()[..4], pattern(4, 1)[..]);
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_describes_and_maps() {
    let (t, _img, _w) = img_and_w().await;
    let all = format!("nbd+unix:///?socket={}", t.sock.display());
    let out = run_ok("nbdinfo", &["--list", &all]).await;
    assert!(out.contains("export=\"img\""), "{out}");
    assert!(out.contains("export=\"w\""), "{out}");
    assert!(out.contains("test image"), "{out}");

    let out = run_ok("nbdinfo", &["--json", &t.unix_uri("img")]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "img", "{out}");
    assert_eq!(e["description"], "test image", "{out}");
    assert_eq!(e["export-size"].as_u64(), Some(64 * MIB), "{out}");
    assert_eq!(e["is_read_only"], true, "{out}");
    assert_eq!(e["can_multi_conn"], true, "{out}");
    assert_eq!(e["can_flush"], true, "{out}");
    assert_eq!(e["can_fua"], true, "{out}");
    assert_eq!(e["can_cache"], true, "{out}");
    assert_eq!(e["can_df"], true, "{out}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{out}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{out}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20), "{out}");
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "{out}"
    );
    let out = run_ok("nbdinfo", &["--json", &t.tcp_uri("w")]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], false, "{out}");
    assert_eq!(e["can_trim"], true, "{out}");
    assert_eq!(e["can_zero"], true, "{out}");
    assert_eq!(e["can_fast_zero"], true, "{out}");

    let out = run_ok("nbdinfo", &["--map", &t.unix_uri("img")]).await;
    let map: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        [
            (0, MIB, 0),
            (MIB, 31 * MIB, 3),
            (32 * MIB, MIB, 0),
            (33 * MIB, 31 * MIB, 3)
        ],
        "{out}"
    );
    t.wait_no_connections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_both_directions() {
    let (t, img, w) = img_and_w().await;
    let dir = TempDir::new("nbdcopy");

    let out = dir.join("out.raw");
    std::fs::File::create(&out).unwrap();
    run_ok("nbdcopy", &[&t.unix_uri("img"), out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == img.contents());

    let src = dir.join("src.raw");
    let mut data = pattern(64 * MIB as usize, 9);
    data[MIB as usize..3 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    w.fill(2 * MIB, &[0xff; 4096]); // must be overwritten with zeroes
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &t.tcp_uri("w")],
    )
    .await;
    assert!(w.contents() == data);
    // Export to export, several connections at once (multi-conn).
    w.fill(0, &[0u8; 4096]);
    run_ok(
        "nbdcopy",
        &["--connections=4", &t.unix_uri("img"), &t.unix_uri("w")],
    )
    .await;
    assert!(w.contents() == img.contents());
    t.wait_no_connections().await;
}
