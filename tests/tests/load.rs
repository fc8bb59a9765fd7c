//! Load: 64 QMP clients at once issuing queries while a mirror runs, and 16 NBD clients
//! (nbdcopy) reading one export at once. Every request gets its own reply, none is lost
//! or mixed up, and every copy is exact. Latency and memory are benchmark figures
//! (`bench load`), not assertions here.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{Splitvmm, TempDir, qemu_img_create, qemu_io, run};

const CLIENTS: usize = 64;
const QUERIES: usize = 40;
const NBD_CLIENTS: usize = 16;

#[test]
fn sixty_four_qmp_clients_and_sixteen_nbd_clients_lose_nothing_while_a_mirror_runs() {
    let dir = TempDir::new("load");
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "8M");
    qemu_io("qcow2", &img.display().to_string(), &["write -P 0x3c 0 8M"]);
    let target = dir.join("target.qcow2").display().to_string();
    let sock = dir.join("nbd.sock").display().to_string();
    let d = dir.path().display().to_string();
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    let mut vm = Splitvmm::start_in(dir, &["--drive", &drive, "--image-dir", &d]);
    let mut qmp = vm.raw_qmp();
    // Slow: still running when every client is done.
    qmp.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "format": "qcow2",
               "speed": 1024}),
    );
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    qmp.ok("nbd-server-add", json!({"device": "disk0"}));

    let queries = [
        "query-block-jobs",
        "query-block",
        "query-status",
        "query-version",
        "query-named-block-nodes",
        "query-jobs",
    ];
    let qmp_path = vm.qmp.clone();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let path = qmp_path.clone();
            std::thread::spawn(move || {
                let mut q = tests::RawQmp::connect(&path);
                q.negotiate();
                let mut answered = 0;
                for i in 0..QUERIES {
                    let id = format!("c{c}-q{i}");
                    let cmd = queries[i % queries.len()];
                    let r = q.cmd(&json!({"execute": cmd, "id": id}).to_string());
                    assert_eq!(r["id"], id.as_str(), "client {c}: {r}");
                    assert!(r.get("return").is_some(), "client {c} {cmd}: {r}");
                    if cmd == "query-block-jobs" {
                        assert_eq!(r["return"][0]["device"], "disk0", "{r}");
                    }
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let out = TempDir::new("load-nbd");
    let copies: Vec<_> = (0..NBD_CLIENTS)
        .map(|n| {
            let copy = out.join(&format!("copy{n}.raw")).display().to_string();
            let uri = format!("nbd+unix:///disk0?socket={sock}");
            std::thread::spawn(move || {
                let status = Command::new("nbdcopy")
                    .args([&uri, &copy])
                    .status()
                    .expect("nbdcopy");
                (status.success(), copy)
            })
        })
        .collect();
    let answered: usize = clients
        .into_iter()
        .map(|t| t.join().expect("QMP client"))
        .sum();
    assert_eq!(answered, CLIENTS * QUERIES);
    let source = img.display().to_string();
    for t in copies {
        let (ok, copy) = t.join().expect("nbdcopy thread");
        assert!(ok, "nbdcopy to {copy} failed");
        run(Command::new("qemu-img").args([
            "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", &source, &copy,
        ]));
    }
    // The mirror ran throughout and still runs.
    let jobs = qmp.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    assert_eq!(qmp.ok("quit", json!({})), json!({}));
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", vm.stderr_text());
}
