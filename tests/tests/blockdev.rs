//! `blockdev-add` and `blockdev-del` on real splitvmm processes (jailed as in production),
//! with the data checked through NBD by QEMU's own tools: which backing a qcow2 node reads
//! through, the `nbd` driver against `qemu-nbd`, what deleting releases, the options that
//! change I/O, and the allowed directories.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tests::{
    RawQmp, Splitvmm, TempDir, output, qemu_img_create, qemu_img_overlay, qemu_io, qemu_nbd, run,
};

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// `qemu-io -r -f raw URI -c CMD...`: read-only, so it also works on read-only exports;
/// fails the test on any error or pattern mismatch.
fn read_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    assert!(
        !out.contains("error") && !out.contains("Pattern verification failed"),
        "qemu-io {uri} {cmds:?}: {out}"
    );
}

/// splitvmm allowed to open images in its own directory, with an NBD server on a unix
/// socket there.
fn start(dir: TempDir, extra: &[&str]) -> (Splitvmm, RawQmp, std::path::PathBuf) {
    let image_dir = dir.path().display().to_string();
    let sock = dir.join("nbd.sock");
    let mut args = vec!["--image-dir", image_dir.as_str()];
    args.extend_from_slice(extra);
    let vm = Splitvmm::start_in(dir, &args);
    let mut qmp = vm.raw_qmp();
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    (vm, qmp, sock)
}

fn file(path: &Path) -> Value {
    json!({"driver": "file", "filename": path})
}

/// base.raw ← mid.qcow2 ← top.qcow2, each layer with its own pattern:
/// base 0x11 over the first MiB, mid 0x22 at [64k, 128k), top 0x33 at [128k, 192k).
fn chain(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (base, mid, top) = (
        dir.join("base.raw"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    qemu_img_create("raw", &base, "1M");
    qemu_img_overlay(&mid, "base.raw", "raw", None);
    qemu_img_overlay(&top, "mid.qcow2", "qcow2", None);
    qemu_io("raw", &base.display().to_string(), &["write -P 0x11 0 1M"]);
    qemu_io(
        "qcow2",
        &mid.display().to_string(),
        &["write -P 0x22 64k 64k"],
    );
    qemu_io(
        "qcow2",
        &top.display().to_string(),
        &["write -P 0x33 128k 64k"],
    );
    (base, mid, top)
}

/// A copy of qcow2 `image` whose header names `backing` (or nothing), made by qemu-img:
/// the oracle for what a node with that backing reads.
fn rebased_copy(dir: &TempDir, image: &Path, name: &str, backing: Option<(&str, &str)>) -> String {
    let copy = dir.join(name);
    std::fs::copy(image, &copy).expect("copy image");
    let mut c = Command::new("qemu-img");
    c.args(["rebase", "-u", "-f", "qcow2"]);
    match backing {
        Some((b, fmt)) => c.args(["-b", b, "-F", fmt]),
        None => c.args(["-b", ""]),
    };
    run(c.arg(&copy));
    copy.display().to_string()
}

#[test]
fn qcow2_backing_from_header_by_name_nested_or_none_reads_the_right_layers() {
    let dir = TempDir::new("bd-chain");
    let (base, mid, top) = chain(&dir);
    // Oracles, made before splitvmm holds the images.
    let ref_base = rebased_copy(&dir, &top, "ref-base.qcow2", Some(("base.raw", "raw")));
    let ref_none = rebased_copy(&dir, &top, "ref-none.qcow2", None);
    let mid_alone = rebased_copy(&dir, &mid, "mid-alone.qcow2", None);
    let ref_nested = rebased_copy(
        &dir,
        &top,
        "ref-nested.qcow2",
        Some(("mid-alone.qcow2", "qcow2")),
    );
    let (_vm, mut qmp, sock) = start(dir, &[]);

    // Backing absent: the chain the header names (top → mid → base).
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t-default", "read-only": true,
               "file": file(&top)}),
    );
    // Backing as a node name: top reads through base directly, skipping mid.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "base", "read-only": true, "file": file(&base)}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t-base", "read-only": true,
               "file": file(&top), "backing": "base"}),
    );
    // Backing as a nested definition: mid, itself without backing.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t-nested", "read-only": true, "file": file(&top),
               "backing": {"driver": "qcow2", "node-name": "m-alone", "file": file(&mid),
                           "backing": null}}),
    );
    // Backing null: top alone.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t-none", "read-only": true,
               "file": file(&top), "backing": null}),
    );
    for node in ["t-default", "t-base", "t-nested", "t-none"] {
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node}),
        );
    }
    // [0, 64k) / [64k, 128k) / [128k, 192k) / [192k, 1M)
    let expect = [
        (
            "t-default",
            ["0x11", "0x22", "0x33", "0x11"],
            top.display().to_string(),
        ),
        ("t-base", ["0x11", "0x11", "0x33", "0x11"], ref_base),
        ("t-nested", ["0x00", "0x22", "0x33", "0x00"], ref_nested),
        ("t-none", ["0x00", "0x00", "0x33", "0x00"], ref_none),
    ];
    for (export, patterns, oracle) in expect {
        let u = uri(&sock, export);
        read_io(
            &u,
            &[
                &format!("read -P {} 0 64k", patterns[0]),
                &format!("read -P {} 64k 64k", patterns[1]),
                &format!("read -P {} 128k 64k", patterns[2]),
                &format!("read -P {} 192k 832k", patterns[3]),
            ],
        );
        // And byte for byte what qemu-img reads from an image with that backing.
        run(Command::new("qemu-img").args(["compare", "-U", "-f", "qcow2", &oracle, &u]));
    }
    let _ = mid_alone;

    // What query-named-block-nodes says of them.
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let by_name = |n: &str| -> Value {
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|x| x["node-name"] == n).cloned())
            .unwrap_or_else(|| panic!("no node {n} in {nodes}"))
    };
    assert_eq!(by_name("t-default")["backing_file_depth"], 2);
    assert_eq!(by_name("t-default")["file"], top.display().to_string());
    assert_eq!(
        by_name("t-default")["backing_file"],
        mid.display().to_string()
    );
    assert_eq!(by_name("t-base")["backing_file_depth"], 1);
    assert_eq!(
        by_name("t-base")["backing_file"],
        base.display().to_string()
    );
    assert_eq!(by_name("t-nested")["backing_file_depth"], 1);
    assert_eq!(by_name("t-none")["backing_file_depth"], 0);
    // A node with another backing than its header's is named by its options, as in QEMU.
    assert_eq!(
        by_name("t-none")["file"],
        format!(
            r#"json:{{"backing": null, "driver": "qcow2", "file": {{"driver": "file", "filename": "{}"}}}}"#,
            top.display()
        )
    );
    assert_eq!(by_name("base")["drv"], "raw");
    assert_eq!(by_name("m-alone")["drv"], "qcow2");
    assert_eq!(by_name("m-alone")["ro"], true);
    // The header's chain got generated names: file and format node per layer.
    let generated: Vec<(String, String)> = nodes
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| {
                    n["node-name"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("#block"))
                })
                .map(|n| {
                    (
                        n["drv"].as_str().unwrap_or_default().to_string(),
                        n["file"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    for (drv, f) in [
        ("file", &top),
        ("qcow2", &mid),
        ("file", &mid),
        ("raw", &base),
        ("file", &base),
    ] {
        assert!(
            generated.contains(&(drv.to_string(), f.display().to_string())),
            "no generated {drv} node for {}: {generated:?}",
            f.display()
        );
    }
}

#[test]
fn writes_through_a_blockdev_added_qcow2_land_in_the_image_and_deleting_releases_it() {
    let dir = TempDir::new("bd-write");
    let (_, _, top) = chain(&dir);
    let top_s = top.display().to_string();
    let (_vm, mut qmp, sock) = start(dir, &[]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file",
               "node-name": "top-file", "filename": top}}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "top", "writable": true}),
    );
    // While splitvmm holds the image, QEMU may not write it.
    let held = output(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 512", &top_s]));
    let text =
        String::from_utf8_lossy(&held.stderr).to_string() + &String::from_utf8_lossy(&held.stdout);
    assert!(
        text.contains("Failed to get \"write\" lock"),
        "qemu-io wrote an image splitvmm holds: {text}"
    );
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x44 512k 64k",
        &uri(&sock, "top"),
    ]));
    // In use: by the export, and (the file node) by the qcow2 node.
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "top"})).1,
        "Node top is in use"
    );
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "top-file"})).1,
        "Node top-file is not owned by the monitor"
    );
    remove_export_once_clients_left(&mut qmp, "block-export-del", json!({"id": "w"}));
    qmp.event("BLOCK_EXPORT_DELETED");
    qmp.ok("blockdev-del", json!({"node-name": "top"}));
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "top"})).1,
        "Failed to find node with node-name='top'"
    );
    // Released: QEMU opens it read/write, finds the data, and the image is consistent.
    qemu_io(
        "qcow2",
        &top_s,
        &[
            "read -P 0x44 512k 64k",
            "read -P 0x33 128k 64k",
            "read -P 0x22 64k 64k",
        ],
    );
    run(Command::new("qemu-img").args(["check", "-f", "qcow2", &top_s]));
    // And splitvmm can add the same file again.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": file(&top)}),
    );
    let names: Vec<String> = qmp
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["node-name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(names.contains(&"top".to_string()), "{names:?}");
    assert!(!names.contains(&"top-file".to_string()), "{names:?}");
}

#[test]
fn nbd_driver_uses_a_qemu_nbd_export_and_splitvmm_exports_it_again() {
    let dir = TempDir::new("bd-nbd");
    let src = dir.join("src.qcow2");
    qemu_img_create("qcow2", &src, "4M");
    let src_s = src.display().to_string();
    qemu_io(
        "qcow2",
        &src_s,
        &["write -P 0x5a 0 1M", "write -P 0x6b 3M 64k"],
    );
    let remote = dir.join("remote.sock");
    let server = qemu_nbd(&src, "qcow2", "src", &remote, false);
    let (_vm, mut qmp, sock) = start(dir, &[]);

    // Over unix, as a node of its own; and over TCP under a raw node (a listener
    // splitvmm's monitor connects to by IP address).
    qmp.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "src",
               "server": {"type": "unix", "path": remote}}),
    );
    qmp.ok(
        "nbd-server-add",
        json!({"device": "remote", "name": "again", "writable": true}),
    );
    let again = uri(&sock, "again");
    run(Command::new("qemu-img").args(["compare", "-U", "-f", "qcow2", &src_s, &again]));
    // Writes go through to qemu-nbd's export.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x7c 2M 64k", &again]));
    read_io(
        &uri(&remote, "src"),
        &["read -P 0x7c 2M 64k", "read -P 0x5a 0 1M"],
    );

    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let remote_node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "remote"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(remote_node["drv"], "nbd");
    assert_eq!(
        remote_node["file"],
        format!("nbd+unix:///src?socket={}", remote.display())
    );
    assert_eq!(remote_node["image"]["virtual-size"], 4 << 20);

    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "remote"})).1,
        "Node remote is in use"
    );
    remove_export_once_clients_left(&mut qmp, "nbd-server-remove", json!({"name": "again"}));
    qmp.event("BLOCK_EXPORT_DELETED");
    qmp.ok("blockdev-del", json!({"node-name": "remote"}));

    // An export that does not exist, and a server that is not there.
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "x", "export": "nope",
                   "server": {"type": "unix", "path": remote}})
        )
        .1,
        "Requested export not available"
    );
    let nosock = remote.with_file_name("none.sock");
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "x",
                   "server": {"type": "unix", "path": nosock}})
        )
        .1,
        format!(
            "Failed to connect to '{}': No such file or directory",
            nosock.display()
        )
    );
    drop(server);

    // open-timeout: the monitor keeps trying until the server is there.
    let late = remote.with_file_name("late.sock");
    let server = json!({"type": "unix", "path": late});
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "late", "read-only": true, "export": "src",
                   "server": server})
        )
        .1,
        format!(
            "Failed to connect to '{}': No such file or directory",
            late.display()
        )
    );
    let starter = {
        let (src, late) = (src.clone(), late.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(700));
            qemu_nbd(&src, "qcow2", "src", &late, true)
        })
    };
    qmp.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "late", "read-only": true, "export": "src",
               "server": server, "open-timeout": 30}),
    );
    let _late_server = starter.join().expect("qemu-nbd starter");
    qmp.ok("blockdev-del", json!({"node-name": "late"}));

    // TCP: qemu-nbd on a free port, read-only, so the node must be read-only too.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut tcp = std::process::Command::new("qemu-nbd");
    tcp.args([
        "--persistent",
        "--shared=8",
        "--read-only",
        "-f",
        "qcow2",
        "-x",
        "src",
    ])
    .args(["-b", "127.0.0.1", "-p", &port.to_string()])
    .arg(&src)
    .stderr(std::process::Stdio::null());
    let _tcp = tests::Reaped(tcp.spawn().expect("qemu-nbd"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "qemu-nbd on TCP");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let server = json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string()});
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "over-tcp",
                   "file": {"driver": "nbd", "export": "src", "server": server}})
        )
        .1,
        "Could not open image: Permission denied"
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "over-tcp", "read-only": true,
               "file": {"driver": "nbd", "export": "src", "server": server}}),
    );
    qmp.ok("nbd-server-add", json!({"device": "over-tcp"}));
    run(Command::new("qemu-img").args([
        "compare",
        "-U",
        "-f",
        "qcow2",
        &src_s,
        &uri(&sock, "over-tcp"),
    ]));
    // Host names other than localhost are refused clearly (the monitor sends no DNS).
    let (_, desc) = qmp.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "named",
               "server": {"type": "inet", "host": "nbd.example", "port": "10809"}}),
    );
    assert!(
        desc.starts_with("address resolution failed for nbd.example:10809: "),
        "{desc}"
    );
}

#[test]
fn blockdev_del_refuses_what_qemu_refuses_and_drives_are_devices() {
    let dir = TempDir::new("bd-del");
    let (base, _, top) = chain(&dir);
    let drive = dir.join("drive.raw");
    qemu_img_create("raw", &drive, "1M");
    let drive_arg = format!("id=d0,file={},format=raw", drive.display());
    let (_vm, mut qmp, _sock) = start(dir, &["--drive", &drive_arg]);

    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "nosuch"})),
        (
            "GenericError".to_string(),
            "Failed to find node with node-name='nosuch'".to_string()
        )
    );
    // The drive's node is in use by its device; its id is not a free node name.
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "#block001"})).1,
        "Node #block001 is in use"
    );
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "file", "node-name": "d0", "filename": drive})
        )
        .1,
        "node-name=d0 is conflicting with a device id"
    );
    // A drive is a valid reference, by device id or node name.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "over-drive", "file": "d0"}),
    );
    qmp.ok("blockdev-del", json!({"node-name": "over-drive"}));

    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "bf", "filename": base, "read-only": true}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "b", "file": "bf", "read-only": true}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t", "file": file(&top), "backing": "b"}),
    );
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "b"})).1,
        "Node 'b' is busy: node is used as backing hd of 't'"
    );
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": "bf"})).1,
        "Block device bf is in use"
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let generated = nodes
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n["drv"] == "file" && n["file"] == top.display().to_string())
        })
        .and_then(|n| n["node-name"].as_str().map(str::to_string))
        .expect("t's generated file node");
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": generated})).1,
        format!("Node {generated} is not owned by the monitor")
    );
    // Deleting t takes its generated file node along, and frees b, then bf.
    qmp.ok("blockdev-del", json!({"node-name": "t"}));
    assert_eq!(
        qmp.err("blockdev-del", json!({"node-name": generated})).1,
        format!("Failed to find node with node-name='{generated}'")
    );
    qmp.ok("blockdev-del", json!({"node-name": "b"}));
    qmp.ok("blockdev-del", json!({"node-name": "bf"}));
    let left: Vec<Value> = qmp
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .map(|a| a.iter().map(|n| n["node-name"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(left, vec![json!("#block001")]);
}

#[test]
fn discard_and_detect_zeroes_change_what_reaches_the_file() {
    let dir = TempDir::new("bd-opts");
    let (ignore, unmap, zeroes) = (
        dir.join("ignore.raw"),
        dir.join("unmap.raw"),
        dir.join("zeroes.raw"),
    );
    for f in [&ignore, &unmap, &zeroes] {
        qemu_img_create("raw", f, "1M");
        qemu_io("raw", &f.display().to_string(), &["write -P 0x66 0 1M"]);
    }
    let (_vm, mut qmp, sock) = start(dir, &[]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "ignore", "file": file(&ignore)}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "unmap", "discard": "unmap", "file": file(&unmap)}),
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "zeroes", "discard": "unmap",
               "detect-zeroes": "unmap", "file": file(&zeroes)}),
    );
    for n in ["ignore", "unmap", "zeroes"] {
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": n, "node-name": n, "writable": true}),
        );
    }
    for n in ["ignore", "unmap"] {
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 0 64k", &uri(&sock, n)]));
    }
    // A plain write of zeroes (not a write-zeroes request).
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0 64k 64k",
        &uri(&sock, "zeroes"),
    ]));
    // discard=ignore (QEMU's default) keeps the data; unmap punches the file.
    read_io(&uri(&sock, "ignore"), &["read -P 0x66 0 64k"]);
    read_io(
        &uri(&sock, "unmap"),
        &["read -P 0 0 64k", "read -P 0x66 64k 64k"],
    );
    read_io(&uri(&sock, "zeroes"), &["read -P 0 64k 64k"]);
    let data_at = |f: &Path, offset: u64| -> bool {
        let map: Value = serde_json::from_str(&run(Command::new("qemu-img").args([
            "map",
            "-U",
            "--output=json",
            "-f",
            "raw",
            &f.display().to_string(),
        ])))
        .expect("map json");
        map.as_array()
            .and_then(|a| {
                a.iter().find(|e| {
                    let s = e["start"].as_u64().unwrap_or(0);
                    s <= offset && offset < s + e["length"].as_u64().unwrap_or(0)
                })
            })
            .and_then(|e| e["data"].as_bool())
            .unwrap_or(true)
    };
    assert!(data_at(&ignore, 0), "discard=ignore punched the file");
    assert!(!data_at(&unmap, 0), "discard=unmap left the data");
    assert!(data_at(&unmap, 64 << 10));
    assert!(
        !data_at(&zeroes, 64 << 10),
        "detect-zeroes=unmap wrote zeroes as data"
    );
    assert!(data_at(&zeroes, 0));
}

#[test]
fn images_outside_the_allowed_directories_are_refused() {
    let dir = TempDir::new("bd-dirs");
    let outside = TempDir::new("bd-outside");
    let secret = outside.join("secret.raw");
    qemu_img_create("raw", &secret, "1M");
    // A link inside pointing outside, and a qcow2 inside whose backing is outside.
    let link = dir.join("link.raw");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    let top = dir.join("top.qcow2");
    qemu_img_overlay(&top, &secret, "raw", None);
    let (_vm, mut qmp, _sock) = start(dir, &[]);
    let outside_err = |name: &Path| {
        format!(
            "Could not open '{}': it resolves to '{}', outside the allowed directories",
            name.display(),
            secret.display()
        )
    };
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "file", "node-name": "s", "filename": secret})
        )
        .1,
        outside_err(&secret)
    );
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "file", "node-name": "s", "filename": link})
        )
        .1,
        outside_err(&link)
    );
    assert_eq!(
        qmp.err(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "t", "file": file(&top)})
        )
        .1,
        format!("Could not open backing file: {}", outside_err(&secret))
    );
    // Nothing of the failed commands stayed behind.
    assert_eq!(qmp.ok("query-named-block-nodes", json!({})), json!([]));
    // Without its backing, the image inside is fine.
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t", "file": file(&top), "backing": null}),
    );
}

#[test]
fn deep_definitions_chains_and_stacks_are_bounded_and_long_answers_arrive_whole() {
    let dir = TempDir::new("bd-deep");
    // A chain of 101 qcow2 images: c0 ← c1 ← ... ← c100.
    qemu_img_create("qcow2", &dir.join("c0.qcow2"), "1M");
    for i in 1..=100 {
        qemu_img_overlay(
            dir.join(&format!("c{i}.qcow2")),
            format!("c{}.qcow2", i - 1),
            "qcow2",
            None,
        );
    }
    qemu_io(
        "qcow2",
        &dir.join("c0.qcow2").display().to_string(),
        &["write -P 0x21 0 64k"],
    );
    let raw = dir.join("r.raw");
    qemu_img_create("raw", &raw, "1M");
    let (c99, c100) = (dir.join("c99.qcow2"), dir.join("c100.qcow2"));
    let (_vm, mut qmp, sock) = start(dir, &[]);

    // 101 images are one too many; 100 open, and the whole chain reads.
    let (_, desc) = qmp.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "read-only": true, "file": file(&c100)}),
    );
    assert!(
        desc.ends_with("is longer than 100 images, the most splitvmm opens"),
        "{desc}"
    );
    assert_eq!(qmp.ok("query-named-block-nodes", json!({})), json!([]));
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "read-only": true, "file": file(&c99)}),
    );
    qmp.ok("nbd-server-add", json!({"device": "top"}));
    read_io(
        &uri(&sock, "top"),
        &["read -P 0x21 0 64k", "read -P 0 64k 64k"],
    );
    // 200 nodes: an answer larger than one IPC frame (64 KiB), in one piece.
    let nodes = qmp.ok("query-named-block-nodes", json!({"flat": true}));
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 200);
    assert!(
        nodes
            .iter()
            .all(|n| n["image"].get("backing-image").is_none())
    );
    assert!(serde_json::to_string(&nodes).map_or(0, |s| s.len()) > 64 * 1024);
    let top = nodes
        .iter()
        .find(|n| n["node-name"] == "top")
        .cloned()
        .unwrap_or_default();
    // With `flat`, QEMU counts no chain (qemu-storage-daemon 10 answers 0); without, 99.
    assert_eq!(top["backing_file_depth"], 0);
    let deep = qmp.ok("query-named-block-nodes", json!({}));
    let top = deep
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "top"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(top["backing_file_depth"], 99);

    // Definitions nested 65 deep are refused before anything recursive looks at them.
    let mut def = file(&raw);
    for _ in 0..64 {
        def = json!({"driver": "raw", "file": def});
    }
    def["node-name"] = json!("deep");
    assert_eq!(
        qmp.err("blockdev-add", def.clone()).1,
        "Block node definitions are nested 65 levels deep; splitvmm accepts at most 64"
    );
    // 64 are fine.
    def["file"]["node-name"] = json!("deep-1");
    let inner = def["file"].clone();
    qmp.ok("blockdev-add", inner);
    // Stacked by name, nodes go up to 128 above the image, and I/O goes through them all.
    let mut below = "deep-1".to_string();
    let mut depth = 64;
    loop {
        let name = format!("s{depth}");
        let r = qmp.exec(
            "blockdev-add",
            json!({"driver": "raw", "node-name": name, "file": below}),
        );
        if let Some(e) = r.get("error") {
            assert_eq!(depth, 128, "refused too early: {e}");
            assert_eq!(
                e["desc"],
                format!(
                    "Node '{name}' would stack 129 nodes above an image; splitvmm allows at most 128"
                )
            );
            break;
        }
        below = name;
        depth += 1;
    }
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "stack", "node-name": below, "writable": true}),
    );
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 4k 4k",
        &uri(&sock, &below),
    ]));
    read_io(&uri(&sock, &below), &["read -P 0x77 4k 4k"]);
}

#[test]
fn a_file_node_follows_its_file_when_a_qcow2_node_on_it_grows_it() {
    let dir = TempDir::new("bd-grow");
    let image = dir.join("g.qcow2");
    qemu_img_create("qcow2", &image, "8M");
    let (_vm, mut qmp, sock) = start(dir, &[]);
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "gf", "filename": image}),
    );
    let before = qmp.ok("query-named-block-nodes", json!({}))[0]["image"]["virtual-size"].clone();
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "g", "file": "gf"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "g", "node-name": "g", "writable": true}),
    );
    // Allocating clusters makes the file longer.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x58 1M 2M", &uri(&sock, "g")]));
    remove_export_once_clients_left(&mut qmp, "block-export-del", json!({"id": "g"}));
    qmp.event("BLOCK_EXPORT_DELETED");
    qmp.ok("blockdev-del", json!({"node-name": "g"}));
    // The file node now shows (and reads) the file as it is.
    let len = std::fs::metadata(&image).expect("stat").len();
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["node-name"], "gf");
    assert_eq!(
        nodes[0]["image"]["virtual-size"],
        json!(len.div_ceil(512) * 512)
    );
    assert!(
        len > before.as_u64().unwrap_or(u64::MAX),
        "the file did not grow: {len}"
    );
    qmp.ok("nbd-server-add", json!({"device": "gf"}));
    run(Command::new("qemu-img").args([
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "raw",
        &image.display().to_string(),
        &uri(&sock, "gf"),
    ]));
}

/// Removes an export in the default (safe) mode once the NBD clients that used it are gone.
/// A client's disconnect reaches the server asynchronously (qemu-io or qemu-img has exited,
/// the server may not have read the end of its connection yet), so "still in use" is
/// retried for a while; any other error fails the test.
fn remove_export_once_clients_left(qmp: &mut RawQmp, command: &str, arguments: Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = qmp.exec(command, arguments.clone());
        if r.get("return").is_some() {
            return;
        }
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(
            desc.ends_with("still in use") && std::time::Instant::now() < deadline,
            "{command} {arguments}: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
