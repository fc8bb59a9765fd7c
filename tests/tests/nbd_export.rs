//! The NBD server of splitvmm against the real tools: qemu-img, qemu-io, nbdinfo, nbdcopy,
//! over unix and TCP, for raw and qcow2 images; and the QMP side of NBD with QEMU's texts.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{RawQmp, Splitvmm, TempDir, output, qemu_img_create, qemu_io, run};

struct Setup {
    vm: Splitvmm,
    qmp: RawQmp,
    raw: String,
    qcow: String,
    sock: String,
}

/// splitvmm with a raw and a qcow2 drive holding known patterns, and an NBD server on a
/// unix socket exporting both (qcow2 writable).
fn setup() -> Setup {
    let dir = TempDir::new("nbd");
    let raw = dir.join("disk.raw").display().to_string();
    let qcow = dir.join("disk.qcow2").display().to_string();
    let sock = dir.join("nbd.sock").display().to_string();
    qemu_img_create("raw", std::path::Path::new(&raw), "4M");
    qemu_img_create("qcow2", std::path::Path::new(&qcow), "8M");
    qemu_io(
        "raw",
        &raw,
        &["write -P 0x11 0 64k", "write -P 0x22 1M 128k"],
    );
    qemu_io(
        "qcow2",
        &qcow,
        &[
            "write -P 0x33 64k 64k",
            "write -z 2M 1M",
            "write -P 0x44 7M 4k",
        ],
    );
    let vm = Splitvmm::start_in(
        dir,
        &[
            "--drive",
            &format!("id=raw0,file={raw},format=raw"),
            "--drive",
            &format!("id=qcow0,file={qcow},format=qcow2"),
        ],
    );
    let mut qmp = vm.raw_qmp();
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    qmp.ok("nbd-server-add", json!({"device": "raw0"}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "qcow0", "name": "q", "description": "the qcow2 one", "writable": true}),
    );
    Setup {
        vm,
        qmp,
        raw,
        qcow,
        sock,
    }
}

fn uri(sock: &str, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={sock}")
}

#[test]
fn qemu_img_reads_and_maps_exports_like_the_images() {
    let s = setup();
    for (export, image, fmt) in [("raw0", &s.raw, "raw"), ("q", &s.qcow, "qcow2")] {
        let info: Value = serde_json::from_str(&run(Command::new("qemu-img").args([
            "info",
            "--output=json",
            &uri(&s.sock, export),
        ])))
        .expect("info json");
        let want: Value = serde_json::from_str(&run(Command::new("qemu-img").args([
            "info",
            "-U",
            "--output=json",
            "-f",
            fmt,
            image,
        ])))
        .expect("info json");
        assert_eq!(info["virtual-size"], want["virtual-size"], "{export}");
        // Same content, byte for byte.
        run(Command::new("qemu-img").args([
            "compare",
            "-U",
            "-f",
            fmt,
            image,
            &uri(&s.sock, export),
        ]));
        // The same allocation map (data/zero per range) as qemu-img sees in the image.
        let map_of = |args: &[&str]| -> Vec<(u64, u64, bool, bool)> {
            let v: Value =
                serde_json::from_str(&run(Command::new("qemu-img").args(args))).expect("map json");
            let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
            for e in v.as_array().expect("array") {
                let (start, len) = (
                    e["start"].as_u64().unwrap_or(0),
                    e["length"].as_u64().unwrap_or(0),
                );
                let (data, zero) = (
                    e["data"].as_bool().unwrap_or(false),
                    e["zero"].as_bool().unwrap_or(false),
                );
                match runs.last_mut() {
                    Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                        last.1 += len
                    }
                    _ => runs.push((start, len, data, zero)),
                }
            }
            runs
        };
        let over_nbd = map_of(&["map", "--output=json", &uri(&s.sock, export)]);
        let local = map_of(&["map", "-U", "--output=json", "-f", fmt, image]);
        let reads_zero = |m: &[(u64, u64, bool, bool)], at: u64| {
            m.iter().find(|r| r.0 <= at && at < r.0 + r.1).map(|r| r.3)
        };
        for probe in [0u64, 64 << 10, 1 << 20, 2 << 20, (7 << 20) + 100] {
            assert_eq!(
                reads_zero(&over_nbd, probe),
                reads_zero(&local, probe),
                "{export} zero flag at {probe}: {over_nbd:?} vs {local:?}"
            );
        }
    }
    // Over TCP too.
    let mut qmp = s.qmp;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    qmp.ok("nbd-server-stop", json!({}));
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}}),
    );
    qmp.ok("nbd-server-add", json!({"device": "qcow0"}));
    let tcp = format!("nbd://127.0.0.1:{port}/qcow0");
    run(Command::new("qemu-img").args(["compare", "-U", "-f", "qcow2", &s.qcow, &tcp]));
    let dir = TempDir::new("convert");
    let out = dir.join("copy.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", &tcp])
        .arg(&out));
    run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", &s.qcow])
        .arg(&out));
}

#[test]
fn nbdinfo_lists_and_maps_and_nbdcopy_copies_both_ways() {
    let s = setup();
    let list = run(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix:///?socket={}", s.sock),
    ]));
    let v: Value = serde_json::from_str(&list).expect("nbdinfo json");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(names.contains(&"raw0") && names.contains(&"q"), "{list}");
    let q = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .find(|e| e["export-name"] == "q")
        .expect("q");
    assert_eq!(q["description"], "the qcow2 one");
    assert_eq!(q["is_read_only"], false);
    let map = run(Command::new("nbdinfo").args(["--map", &uri(&s.sock, "q")]));
    assert!(map.contains("zero") && map.contains("data"), "{map}");
    // nbdcopy out of splitvmm, then back into the writable export.
    let dir = TempDir::new("nbdcopy");
    let copy = dir.join("copy.raw").display().to_string();
    run(Command::new("nbdcopy").args([&uri(&s.sock, "q"), &copy]));
    run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", &s.qcow, "-F", "raw", &copy]));
    qemu_io("raw", &copy, &["write -P 0x77 3M 512k"]);
    run(Command::new("nbdcopy").args([&copy, &uri(&s.sock, "q")]));
    run(Command::new("qemu-img").args(["compare", "-F", "raw", &copy, &uri(&s.sock, "q")]));
}

#[test]
fn writes_through_a_writable_export_survive_and_the_image_checks_clean() {
    let mut s = setup();
    let u = uri(&s.sock, "q");
    qemu_io(
        "raw",
        &u,
        &[
            "write -P 0xab 5M 256k",
            "write -P 0xcd 100k 3k",
            "aio_flush",
        ],
    );
    // The read-only export refuses writes.
    let ro = output(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write 0 4k",
        &uri(&s.sock, "raw0"),
    ]));
    let text =
        String::from_utf8_lossy(&ro.stdout).to_string() + &String::from_utf8_lossy(&ro.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"),
        "{text}"
    );
    s.qmp.ok("quit", json!({}));
    assert!(s.vm.wait_exit(Duration::from_secs(15)).success());
    run(Command::new("qemu-img").args(["check", "-f", "qcow2", &s.qcow]));
    qemu_io(
        "qcow2",
        &s.qcow,
        &[
            "read -P 0xab 5M 256k",
            "read -P 0xcd 100k 3k",
            "read -P 0x33 64k 36k",
            "read -P 0x44 7M 4k",
        ],
    );
}

#[test]
fn nbd_qmp_commands_have_qemus_errors_and_events() {
    let dir = TempDir::new("nbdqmp");
    let raw = dir.join("d.raw");
    qemu_img_create("raw", &raw, "1M");
    let sock = dir.join("nbd.sock").display().to_string();
    let vm = Splitvmm::start_in(
        dir,
        &[
            "--drive",
            &format!("id=d0,file={},format=raw", raw.display()),
        ],
    );
    let mut q = vm.raw_qmp();
    let generic = |d: &str| ("GenericError".to_string(), d.to_string());
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "d0"})),
        generic("NBD server not running")
    );
    assert_eq!(
        q.err("nbd-server-stop", json!({})),
        generic("NBD server not running")
    );
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    assert_eq!(
        q.err(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}})
        ),
        generic("NBD server already running")
    );
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "nope"})),
        generic("Cannot find device='nope' nor node-name='nope'")
    );
    assert_eq!(
        q.err(
            "nbd-server-add",
            json!({"device": "d0", "name": "bad name!"})
        ),
        generic("Invalid block export id")
    );
    q.ok("nbd-server-add", json!({"device": "d0"}));
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "d0"})),
        generic("Block export id 'd0' is already in use")
    );
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(
        exports,
        json!([{"id": "d0", "type": "nbd", "node-name": exports[0]["node-name"], "shutting-down": false}])
    );
    assert_eq!(
        q.err("nbd-server-remove", json!({"name": "zz"})),
        generic("Export 'zz' is not found")
    );
    // A client in transmission: safe removal refuses, hard removal drops it.
    let mut client = nbd_connect(&sock, "d0");
    assert_eq!(
        q.err("nbd-server-remove", json!({"name": "d0"})),
        generic("export 'd0' still in use")
    );
    q.ok("nbd-server-remove", json!({"name": "d0", "mode": "hard"}));
    let ev = q.event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "d0"}));
    // The client was dropped: its socket reads end-of-file.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        std::io::Read::read(&mut client, &mut [0u8; 16]).expect("read after hard removal"),
        0
    );
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    q.ok("nbd-server-stop", json!({}));
    assert!(
        !std::path::Path::new(&sock).exists(),
        "the NBD socket file was left behind"
    );
}

/// A minimal NBD client: fixed newstyle handshake with NBD_OPT_EXPORT_NAME, left in the
/// transmission phase.
fn nbd_connect(sock: &str, export: &str) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the NBD socket");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("server greeting");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).expect("option");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).expect("export size and flags");
    s
}
