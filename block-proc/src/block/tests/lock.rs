//! Image locks interoperate with QEMU's: each side sees the other's and fails with QEMU's
//! message.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc::block::ImageFormat;

use super::*;
use crate::block::Error;

/// `qemu-io` holding `img` open (read/write unless `read_only`) until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn hold(img: &str, fmt: &str, read_only: bool) -> Self {
        let mut args = vec!["-f", fmt];
        if read_only {
            args.push("-r");
        }
        args.extend(["-c", "sleep 20000", img]);
        // Holders of byte 203 of the image in /proc/locks. QEMU takes its locks one byte at
        // a time, its permissions (100 + bit) first, then what it does not share (200 +
        // bit); the last, in both modes, is 203 (resize not shared). Waiting for 100 alone
        // raced with the rest under load. The test itself may hold 203 already, so wait
        // for one holder more than now.
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(img).expect("stat"));
        let holders = || {
            std::fs::read_to_string("/proc/locks")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&format!(":{ino} 203 ")))
                .count()
        };
        let before = holders();
        let child = Command::new("qemu-io")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let deadline = Instant::now() + Duration::from_secs(10);
        while holders() <= before {
            assert!(Instant::now() < deadline, "qemu-io did not lock {img}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a QEMU tool once (for checks that it fails on a lock).
fn stderr_of(prog: &str, args: &[&str]) -> (bool, String) {
    let out = run(prog, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a QEMU tool that must get its locks (see [`run_settled`]).
fn stderr_settled(prog: &str, args: &[&str]) -> (bool, String) {
    let out = run_settled(prog, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_see_the_lock_of_a_writable_node() {
    let dir = TempDir::new("lock-ours");
    for (name, fmt) in [("a.qcow2", ImageFormat::Qcow2), ("a.raw", ImageFormat::Raw)] {
        let img = dir.file(name);
        ok("qemu-img", &["create", "-f", fmt_str(fmt), &img, "1M"]);
        let node = open(&img, fmt, false, &dir).await;
        // A reader that wants the image not to change under it: `qemu-img info` on qcow2
        // (metadata), `qemu-img convert` on anything. (On a raw file, QEMU's `qemu-img
        // info` and `qemu-io -r` share write, and get in next to a writer, ours or QEMU's.)
        let (success, err) = if fmt == ImageFormat::Qcow2 {
            stderr_of("qemu-img", &["info", "-f", "qcow2", &img])
        } else {
            let out = dir.file("copy.raw");
            stderr_of(
                "qemu-img",
                &["convert", "-f", "raw", "-O", "raw", &img, &out],
            )
        };
        assert!(!success, "a reader got in on a locked image");
        assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
        assert!(
            err.contains(&format!("Is another process using the image [{img}]?")),
            "{err}"
        );
        let (success, err) = stderr_of("qemu-io", &["-f", fmt_str(fmt), "-c", "read 0 512", &img]);
        assert!(
            !success && err.contains("Failed to get \"write\" lock"),
            "{err}"
        );
        let (success, err) = stderr_settled("qemu-img", &["info", "-U", "-f", fmt_str(fmt), &img]);
        assert!(success, "qemu-img info -U must work: {err}");
        drop(node);
        let (success, err) = stderr_settled("qemu-img", &["info", "-f", fmt_str(fmt), &img]);
        assert!(success, "closing the node releases the lock: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_node_and_its_backing_files_keep_writers_out_but_let_readers_in() {
    let dir = TempDir::new("lock-ro");
    let base = dir.file("base.raw");
    let top = dir.file("top.qcow2");
    ok("qemu-img", &["create", "-f", "raw", &base, "1M"]);
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top],
    );
    let node = open(&top, ImageFormat::Qcow2, false, &dir).await;
    // The backing file is held read-only: QEMU may read it, not write it.
    let (success, err) = stderr_settled("qemu-img", &["info", "-f", "raw", &base]);
    assert!(success, "reading a backing file in use must work: {err}");
    let (success, err) = stderr_of("qemu-io", &["-f", "raw", "-c", "write 0 512", &base]);
    assert!(
        !success && err.contains("Failed to get \"write\" lock"),
        "{err}"
    );
    drop(node);
    let ro = open(&top, ImageFormat::Qcow2, true, &dir).await;
    let (success, err) = stderr_settled("qemu-img", &["info", &top]);
    assert!(success, "{err}");
    let (success, err) = stderr_of("qemu-io", &["-c", "write 0 512", &top]);
    assert!(
        !success && err.contains("Failed to get \"write\" lock"),
        "{err}"
    );
    // Two read-only users of one image get along.
    let ro2 = open(&top, ImageFormat::Qcow2, true, &dir).await;
    drop((ro, ro2));
}

fn open_error(r: Result<std::sync::Arc<Node>, Error>) -> String {
    match r {
        Ok(_) => panic!("open succeeded on an image QEMU holds"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sees_the_lock_of_qemu_io_and_qemu_nbd() {
    let dir = TempDir::new("lock-theirs");
    let img = dir.file("q.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    let opts =
        |ro: bool| OpenOptions::new(img.clone(), ImageFormat::Qcow2, &dir.dirs()).read_only(ro);

    let holder = QemuIo::hold(&img, "qcow2", false);
    assert_eq!(
        open_error(Node::open(opts(false)).await),
        "Failed to get \"write\" lock"
    );
    assert_eq!(
        open_error(Node::open(opts(true)).await),
        "Failed to get shared \"write\" lock"
    );
    drop(holder);

    // A read-only QEMU user does not share write: QEMU checks our permissions against
    // its unshared ones first, so the message is the first kind (as qemu-io's own is).
    let holder = QemuIo::hold(&img, "qcow2", true);
    assert_eq!(
        open_error(Node::open(opts(false)).await),
        "Failed to get \"write\" lock"
    );
    Node::open(opts(true))
        .await
        .expect("read-only next to read-only");
    drop(holder);

    let sock = dir.file("nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", &sock, &img])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&sock).exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = open_error(Node::open(opts(false)).await);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert_eq!(err, "Failed to get \"write\" lock");
    Node::open(opts(false)).await.expect("free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writable_nodes_on_one_image_conflict() {
    let dir = TempDir::new("lock-self");
    let img = dir.file("s.raw");
    ok("qemu-img", &["create", "-f", "raw", &img, "1M"]);
    let _first = open(&img, ImageFormat::Raw, false, &dir).await;
    let e = Node::open(OpenOptions::new(img.clone(), ImageFormat::Raw, &dir.dirs()))
        .await
        .expect_err("second writer");
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_change_from_read_only_to_read_write_and_back() {
    use crate::block::lock::{self, LockMode};
    let dir = TempDir::new("lock-change");
    let img = dir.file("c.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    let f = std::fs::File::open(&img).expect("open");
    lock::acquire(&f, LockMode::READ_ONLY).expect("read-only");
    let (success, err) = stderr_settled("qemu-img", &["info", &img]);
    assert!(success, "{err}");
    lock::change(&f, LockMode::READ_ONLY, LockMode::READ_WRITE).expect("to read/write");
    let (success, err) = stderr_of("qemu-img", &["info", &img]);
    assert!(
        !success && err.contains("Failed to get shared \"write\" lock"),
        "{err}"
    );
    lock::change(&f, LockMode::READ_WRITE, LockMode::READ_ONLY).expect("back");
    let (success, err) = stderr_settled("qemu-img", &["info", &img]);
    assert!(success, "{err}");
    // A change that conflicts leaves the old locks.
    let holder = QemuIo::hold(&img, "qcow2", true);
    let e = lock::change(&f, LockMode::READ_ONLY, LockMode::READ_WRITE).expect_err("conflict");
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    drop(holder);
    let (success, err) = stderr_of("qemu-io", &["-c", "write 0 512", &img]);
    assert!(
        !success && err.contains("Failed to get \"write\" lock"),
        "still read-only locked: {err}"
    );
}

/// `Node::reopen` (an external snapshot's old active image going read-only, and back):
/// the node refuses writes and qemu-img reads alongside it; reopened read/write it writes
/// again and locks writers out. A node opened read-only cannot be reopened read/write;
/// while it shares writes, a read/write node on the same file opens (a commit's base).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reopen_read_only_and_share_writes_for_a_job() {
    let dir = TempDir::new("lock-reopen");
    let img = dir.file("r.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &img, "1M"]);
    let node = open(&img, ImageFormat::Qcow2, false, &dir).await;
    node.write(&[7; 512], 0, false).await.expect("write");
    node.reopen(true).await.expect("read-only");
    let e = node
        .write(&[8; 512], 0, false)
        .await
        .expect_err("read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let (success, err) = stderr_settled("qemu-img", &["info", &img]);
    assert!(success, "{err}");
    let mut buf = [0u8; 512];
    node.read(&mut buf, 0).await.expect("read");
    assert_eq!(buf, [7; 512]);
    node.reopen(false).await.expect("read/write");
    node.write(&[9; 512], 512, false)
        .await
        .expect("write again");
    let (success, err) = stderr_of("qemu-img", &["info", &img]);
    assert!(
        !success && err.contains("Failed to get shared \"write\" lock"),
        "{err}"
    );
    drop(node);
    let ro = open(&img, ImageFormat::Qcow2, true, &dir).await;
    let e = ro.reopen(false).await.expect_err("read-only descriptor");
    assert!(
        e.to_string().contains("cannot be reopened read/write"),
        "{e}"
    );
    let e = Node::open(OpenOptions::new(
        img.clone(),
        ImageFormat::Qcow2,
        &dir.dirs(),
    ))
    .await
    .expect_err("a writer under a read-only node");
    assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    ro.share_writes(true).expect("share");
    let rw = Node::open(OpenOptions::new(
        img.clone(),
        ImageFormat::Qcow2,
        &dir.dirs(),
    ))
    .await
    .expect("a writer while shared");
    rw.write(&[3; 512], 1024, false).await.expect("write");
    // Taking the usual locks back conflicts while the writer holds its own.
    ro.share_writes(false).expect_err("writer still there");
    rw.release_locks();
    ro.share_writes(false).expect("usual locks");
    drop(rw);
    let c = qemu_contents(&img, "qcow2");
    assert_eq!((c[0], c[512], c[1024]), (7, 9, 3));
}
