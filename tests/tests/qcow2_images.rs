//! qcow2 images made by qemu-img read identically through splitvmm (exported over NBD and
//! compared by qemu-img itself), and images splitvmm writes pass `qemu-img check`.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{Splitvmm, TempDir, qemu_img_overlay, qemu_io, run};

fn img(dir: &TempDir, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Exports `image` (format `fmt`) through splitvmm and has qemu-img compare it with the
/// file, then writes through the export and checks the image afterwards. Returns the
/// stopped splitvmm, which keeps the directory alive.
fn roundtrip(dir: TempDir, image: &str, fmt: &str) -> Splitvmm {
    let sock = img(&dir, "nbd.sock");
    let mut vm = Splitvmm::start_in(
        dir,
        &["--drive", &format!("id=d,file={image},format={fmt}")],
    );
    let mut q = vm.raw_qmp();
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    q.ok("nbd-server-add", json!({"device": "d", "writable": true}));
    let uri = format!("nbd+unix:///d?socket={sock}");
    run(Command::new("qemu-img").args(["compare", "-U", "-f", fmt, image, &uri]));
    qemu_io(
        "raw",
        &uri,
        &["write -P 0x5a 1536k 200k", "write -z 2M 64k"],
    );
    q.ok("quit", json!({}));
    assert!(vm.wait_exit(Duration::from_secs(15)).success());
    if fmt == "qcow2" {
        run(Command::new("qemu-img").args(["check", "-f", "qcow2", image]));
    }
    qemu_io(fmt, image, &["read -P 0x5a 1536k 200k", "read -P 0 2M 64k"]);
    vm
}

fn make_qcow2(path: &str, opts: &str, size: &str) {
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts, path, size]));
    qemu_io(
        "qcow2",
        path,
        &[
            "write -P 0x01 0 300k",
            "write -P 0x02 3M 1k",
            "write -z 4M 1M",
            "write -P 0x03 5M 2M",
        ],
    );
}

#[test]
fn qcow2_v2_and_v3_with_4k_64k_and_2m_clusters_read_identically() {
    for (compat, cluster) in [
        ("0.10", "4k"),
        ("1.1", "4k"),
        ("1.1", "64k"),
        ("0.10", "64k"),
        ("1.1", "2M"),
    ] {
        let dir = TempDir::new("qcow2");
        let path = img(&dir, "i.qcow2");
        make_qcow2(
            &path,
            &format!("compat={compat},cluster_size={cluster}"),
            "8M",
        );
        roundtrip(dir, &path, "qcow2");
    }
}

#[test]
fn a_three_deep_backing_chain_reads_identically() {
    let dir = TempDir::new("chain");
    let (base, mid, top) = (
        img(&dir, "base.raw"),
        img(&dir, "mid.qcow2"),
        img(&dir, "top.qcow2"),
    );
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw", &base, "8M"]));
    qemu_io("raw", &base, &["write -P 0xb0 0 8M"]);
    qemu_img_overlay(&mid, &base, "raw", None);
    qemu_io("qcow2", &mid, &["write -P 0xb1 1M 1M", "write -z 3M 64k"]);
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        &mid,
        "-F",
        "qcow2",
        &top,
    ]));
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0xb2 1536k 8k", "write -P 0xb3 6M 4k"],
    );
    let _vm = roundtrip(dir, &top, "qcow2");
    // The copy-on-write writes went to the top only.
    qemu_io("raw", &base, &["read -P 0xb0 1536k 200k"]);
}

#[test]
fn compressed_images_read_identically() {
    let dir = TempDir::new("compressed");
    let (src, comp) = (img(&dir, "src.raw"), img(&dir, "comp.qcow2"));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw", &src, "8M"]));
    qemu_io("raw", &src, &["write -P 0xc1 0 1M", "write -P 0xc2 2M 3M"]);
    run(Command::new("qemu-img").args(["convert", "-c", "-f", "raw", "-O", "qcow2", &src, &comp]));
    roundtrip(dir, &comp, "qcow2");
}
