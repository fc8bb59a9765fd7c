//! iotests 041's mirror scenarios that block_jobs.rs does not play, driven over QMP on a
//! real splitvmm (block-proc jailed as in production): `test_large_cluster` (an existing
//! target with a cluster larger than the mirror's granularity, with and without a target
//! backing file), `TestMirrorResized` (a top image grown past its backing file, `sync`
//! top and full), `TestUnbackedSource` (a `blockdev-add`ed source without backing: every
//! `sync` mode, an existing target pre-filled with 0x42, `blockdev-mirror`) and
//! `TestGranularity` (`granularity: 8192` over a fully written 10 MiB image: READY is the
//! first job event after the status changes, and `query-block-jobs` at READY answers
//! what qemu-storage-daemon 10 answers for the same mirror). Every scenario is also played
//! on qemu-storage-daemon first, and the READY and COMPLETED events' data must match its.
//! Images are made by qemu-img and qemu-io and checked with `qemu-img compare` and
//! `qemu-img info` (the targets' backing files, §3.8 of the QMP reference).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tests::{RawQmp, Splitvmm, StorageDaemon, TempDir, qemu_img_create, qemu_io, run};

/// 041's `iotests.create_image`: a fully allocated raw file whose every 512-byte sector
/// starts and ends with its big-endian sector number.
fn create_image(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    for (i, sector) in data.chunks_mut(512).enumerate() {
        let n = u32::try_from(i).expect("sector number").to_be_bytes();
        sector[..4].copy_from_slice(&n);
        sector[508..].copy_from_slice(&n);
    }
    std::fs::write(path, data).expect("write backing image");
}

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F raw] PATH [SIZE]`.
fn qcow2(path: &Path, opts: &str, backing: Option<(&Path, &str)>, size: Option<&str>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    if let Some((b, fmt)) = backing {
        cmd.arg("-b").arg(b).args(["-F", fmt]);
    }
    cmd.arg(path);
    if let Some(size) = size {
        cmd.arg(size);
    }
    run(&mut cmd);
}

fn compare(a: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b])
        .status()
        .expect("qemu-img compare")
        .success()
}

fn start(dir: TempDir, drive: Option<&str>) -> (Splitvmm, RawQmp) {
    let d = dir.path().display().to_string();
    let mut args = vec!["--image-dir", d.as_str()];
    if let Some(drive) = drive {
        args.extend(["--drive", drive]);
    }
    let vm = Splitvmm::start_in(dir, &args);
    let c = vm.raw_qmp();
    (vm, c)
}

/// iotests' `assert_no_active_block_jobs`.
fn no_jobs(c: &mut RawQmp) {
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
}

/// iotests' `complete_and_wait`: READY, `block-job-complete`, then BLOCK_JOB_COMPLETED
/// without an error and with `offset == len`. Returns the two events' data.
fn complete_and_wait(c: &mut RawQmp, job: &str) -> (Value, Value) {
    let ready = c.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["device"], job, "{ready}");
    c.ok("block-job-complete", json!({"device": job}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["device"], job, "{done}");
    assert_eq!(done["data"]["type"], "mirror", "{done}");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"], "{done}");
    no_jobs(c);
    (ready["data"].clone(), done["data"].clone())
}

/// `blockdev-add` of the qcow2 image `img` as node `name`.
fn qcow2_node(name: &str, img: &str) -> Value {
    json!({"node-name": name, "driver": "qcow2", "file": {"driver": "file", "filename": img}})
}

/// The same mirror on qemu-storage-daemon 10 (QEMU's answer): `adds` are
/// `blockdev-add`ed (the source as node `drive0`), then `execute` runs with `args` (job
/// `drive0`) and the job is completed. Returns the READY and COMPLETED events' data,
/// which splitvmm's must equal.
fn qemu_mirror(dir: &TempDir, adds: &[Value], execute: &str, args: Value) -> (Value, Value) {
    let qsd = StorageDaemon::start(&dir.join("qsd.sock"));
    let mut q = qsd.raw_qmp();
    for a in adds {
        q.ok("blockdev-add", a.clone());
    }
    q.ok(execute, args);
    complete_and_wait(&mut q, "drive0")
}

/// A copy of the existing image `img` for qemu-storage-daemon's run.
fn qemu_copy(dir: &TempDir, img: &str) -> String {
    let copy = dir.join("qsd-target.img");
    std::fs::copy(img, &copy).expect("copy target");
    copy.display().to_string()
}

/// The device's `query-block` `inserted` record.
fn inserted(c: &mut RawQmp) -> Value {
    c.ok("query-block", json!({}))[0]["inserted"].clone()
}

/// `qemu-img info`'s backing file name and format of `img` (`None` without one), and its
/// virtual size.
fn backing_of(img: &str) -> (Option<(String, String)>, u64) {
    let info: Value = serde_json::from_str(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "-U",
        img,
    ])))
    .expect("qemu-img info JSON");
    let backing = info["backing-filename"].as_str().map(|b| {
        let fmt = info["backing-filename-format"].as_str().unwrap_or_default();
        (b.to_string(), fmt.to_string())
    });
    (backing, info["virtual-size"].as_u64().unwrap_or_default())
}

fn quit(vm: &mut Splitvmm, c: &mut RawQmp) {
    c.ok("quit", json!({}));
    vm.wait_exit(std::time::Duration::from_secs(30));
}

/// 041 TestSingleDrive's set-up: a 1 MiB `create_image` backing file under an empty
/// qcow2 top (041 writes nothing into the top). Returns (backing, top).
fn single_drive(dir: &TempDir) -> (String, String) {
    let backing = dir.join("backing.img");
    let top = dir.join("test.img");
    create_image(&backing, 1 << 20);
    qcow2(&top, "", Some((&backing, "raw")), None);
    (backing.display().to_string(), top.display().to_string())
}

/// A mirror with `mode: existing` into `target`, completed; the device then uses the
/// target, over the backing file the target's header names (`target_backing`, opened at
/// completion), and the two images read the same.
fn mirror_existing_and_compare(dir: TempDir, top: &str, target: &str, target_backing: &str) {
    let qsd_target = qemu_copy(&dir, target);
    let qemu = qemu_mirror(
        &dir,
        &[qcow2_node("drive0", top)],
        "drive-mirror",
        json!({"job-id": "drive0", "device": "drive0", "sync": "full", "mode": "existing",
               "target": qsd_target}),
    );
    let drive = format!("id=drive0,file={top},format=qcow2");
    let (mut vm, mut c) = start(dir, Some(&drive));
    no_jobs(&mut c);
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "sync": "full", "mode": "existing", "target": target}),
    );
    assert_eq!(complete_and_wait(&mut c, "drive0"), qemu);
    let i = inserted(&mut c);
    assert_eq!(i["file"], target, "{i}");
    assert_eq!(i["backing_file"], target_backing, "{i}");
    assert_eq!(i["backing_file_depth"], 1, "{i}");
    quit(&mut vm, &mut c);
    assert!(compare(top, target), "target differs from the source");
}

/// 041 TestSingleDrive.test_large_cluster: the existing target has 1 MiB clusters (the
/// whole image) and the same backing file, so every copy is a partial cluster write.
#[test]
fn test_large_cluster() {
    let dir = TempDir::new("041-large-cluster");
    let (backing, top) = single_drive(&dir);
    let target = dir.join("target.img");
    qcow2(
        &target,
        "cluster_size=1048576",
        Some((Path::new(&backing), "raw")),
        None,
    );
    let target = target.display().to_string();
    mirror_existing_and_compare(dir, &top, &target, &backing);
}

/// 041 TestMirrorNoBacking.test_large_cluster: 2 MiB images; the target's backing file
/// is an empty image of its own (not the source's), its cluster 2 MiB.
#[test]
fn test_large_cluster_target_backing() {
    let dir = TempDir::new("041-large-cluster-nb");
    let backing = dir.join("backing.img");
    let top = dir.join("test.img");
    create_image(&backing, 2 << 20);
    qcow2(&top, "", Some((&backing, "raw")), None);
    let target_backing = dir.join("target-backing.img");
    let target = dir.join("target.img");
    qcow2(&target_backing, "size=2097152", None, None);
    qcow2(
        &target,
        "cluster_size=2097152",
        Some((&target_backing, "qcow2")),
        None,
    );
    let (top, target) = (top.display().to_string(), target.display().to_string());
    let target_backing = target_backing.display().to_string();
    mirror_existing_and_compare(dir, &top, &target, &target_backing);
}

/// 041 TestMirrorResized: a qcow2 top over a 1 MiB backing file, grown to 2 MiB by
/// `qemu-img resize`; mirrored with `sync` top or full, completed, compared. The new
/// target is 2 MiB; with `top` it is made over the source's backing file (raw), which the
/// device then uses; with `full` it has none.
fn mirror_resized(sync: &str) {
    let dir = TempDir::new(&format!("041-resized-{sync}"));
    let backing = dir.join("backing.img");
    let top = dir.join("test.img");
    create_image(&backing, 1 << 20);
    qcow2(&top, "", Some((&backing, "raw")), None);
    run(Command::new("qemu-img").arg("resize").arg(&top).arg("2M"));
    let target = dir.join("target.img").display().to_string();
    let (top, backing) = (top.display().to_string(), backing.display().to_string());
    let qemu = qemu_mirror(
        &dir,
        &[qcow2_node("drive0", &top)],
        "drive-mirror",
        json!({"job-id": "drive0", "device": "drive0", "sync": sync,
               "target": dir.join("qsd-target.img")}),
    );
    let (mut vm, mut c) = start(dir, Some(&format!("id=drive0,file={top},format=qcow2")));
    no_jobs(&mut c);
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "sync": sync, "target": target}),
    );
    let mut ours = complete_and_wait(&mut c, "drive0");
    if sync == "full" {
        // Known difference: QEMU's progress also counts the 1 MiB past the backing file's
        // end (zeroes it treats as allocated there); splitvmm's block status cannot tell
        // that range from an unallocated one, so its `len` is the backing file's 1 MiB.
        for (o, q) in [(&mut ours.0, &qemu.0), (&mut ours.1, &qemu.1)] {
            assert_eq!(o["len"], 1 << 20, "{o}");
            for k in ["len", "offset"] {
                o[k] = q[k].clone();
            }
        }
    }
    assert_eq!(ours, qemu);
    let i = inserted(&mut c);
    assert_eq!(i["file"], target, "{i}");
    let expected = (sync == "top").then(|| (backing.clone(), "raw".to_string()));
    match &expected {
        Some((b, _)) => assert_eq!(i["backing_file"], b.as_str(), "{i}"),
        None => assert!(i.get("backing_file").is_none(), "{i}"),
    }
    assert_eq!(i["backing_file_depth"], u8::from(expected.is_some()), "{i}");
    quit(&mut vm, &mut c);
    assert_eq!(backing_of(&target), (expected, 2 << 20));
    assert!(compare(&top, &target), "target differs from the source");
}

#[test]
fn test_mirror_resized_complete_top() {
    mirror_resized("top");
}

#[test]
fn test_mirror_resized_complete_full() {
    mirror_resized("full");
}

/// 041 TestUnbackedSource's set-up: an empty 2 MiB qcow2 image without backing file.
/// Returns the directory, the image and the target's path.
fn unbacked_images(tag: &str) -> (TempDir, String, String) {
    let dir = TempDir::new(tag);
    let test = dir.join("test.img");
    qemu_img_create("qcow2", &test, "2M");
    let test = test.display().to_string();
    let target = dir.join("target.img").display().to_string();
    (dir, test, target)
}

/// A splitvmm without drives, `test` opened by `blockdev-add` as node `drive0`.
fn unbacked_source(dir: TempDir, test: &str) -> (Splitvmm, RawQmp) {
    let (vm, mut c) = start(dir, None);
    c.ok("blockdev-add", qcow2_node("drive0", test));
    (vm, c)
}

/// `test_absolute_paths_{full,top,none}`: a mirror with a new target in each `sync` mode
/// completes (and, the source being empty, the target reads the same). The new target
/// has no backing file, except with `none`, where the source itself is its backing file.
fn unbacked_absolute_paths(sync: &str) {
    let (dir, test, target) = unbacked_images(&format!("041-unbacked-{sync}"));
    let args = |target: &str| {
        json!({"job-id": "drive0", "device": "drive0", "sync": sync,
               "target": target, "mode": "absolute-paths"})
    };
    let qsd_target = dir.join("qsd-target.img").display().to_string();
    let qemu = qemu_mirror(
        &dir,
        &[qcow2_node("drive0", &test)],
        "drive-mirror",
        args(&qsd_target),
    );
    let (mut vm, mut c) = unbacked_source(dir, &test);
    no_jobs(&mut c);
    c.ok("drive-mirror", args(&target));
    assert_eq!(complete_and_wait(&mut c, "drive0"), qemu);
    quit(&mut vm, &mut c);
    let expected = (sync == "none").then(|| (test.clone(), "qcow2".to_string()));
    assert_eq!(backing_of(&target), (expected, 2 << 20));
    assert!(compare(&test, &target), "target differs from the source");
}

#[test]
fn test_unbacked_absolute_paths_full() {
    unbacked_absolute_paths("full");
}

#[test]
fn test_unbacked_absolute_paths_top() {
    unbacked_absolute_paths("top");
}

#[test]
fn test_unbacked_absolute_paths_none() {
    unbacked_absolute_paths("none");
}

/// An existing 2 MiB qcow2 target holding 0x42 in its first 64 KiB (a full mirror of the
/// empty source must leave zeros there), and a copy of it for qemu-storage-daemon.
fn prefilled_target(dir: &TempDir, target: &str) -> String {
    qemu_img_create("qcow2", Path::new(target), "2M");
    qemu_io("qcow2", target, &["write -P 0x42 0 64k"]);
    qemu_copy(dir, target)
}

/// `test_existing_full`: `drive-mirror` `mode: existing` onto the pre-filled target.
#[test]
fn test_unbacked_existing_full() {
    let (dir, test, target) = unbacked_images("041-unbacked-existing");
    let qsd_target = prefilled_target(&dir, &target);
    let args = |target: &str| {
        json!({"job-id": "drive0", "device": "drive0", "sync": "full",
               "target": target, "mode": "existing"})
    };
    let qemu = qemu_mirror(
        &dir,
        &[qcow2_node("drive0", &test)],
        "drive-mirror",
        args(&qsd_target),
    );
    let (mut vm, mut c) = unbacked_source(dir, &test);
    no_jobs(&mut c);
    c.ok("drive-mirror", args(&target));
    assert_eq!(complete_and_wait(&mut c, "drive0"), qemu);
    c.ok("blockdev-del", json!({"node-name": "drive0"}));
    quit(&mut vm, &mut c);
    assert!(compare(&test, &target), "target differs from the source");
    qemu_io("qcow2", &target, &["read -P 0 0 64k"]);
}

/// `test_blockdev_full`: `blockdev-mirror` onto the pre-filled target opened by
/// `blockdev-add`; both nodes deleted afterwards.
#[test]
fn test_unbacked_blockdev_full() {
    let (dir, test, target) = unbacked_images("041-unbacked-blockdev");
    let qsd_target = prefilled_target(&dir, &target);
    let args = json!({"job-id": "drive0", "device": "drive0", "sync": "full", "target": "target"});
    let qemu = qemu_mirror(
        &dir,
        &[
            qcow2_node("drive0", &test),
            qcow2_node("target", &qsd_target),
        ],
        "blockdev-mirror",
        args.clone(),
    );
    let (mut vm, mut c) = unbacked_source(dir, &test);
    c.ok("blockdev-add", qcow2_node("target", &target));
    no_jobs(&mut c);
    c.ok("blockdev-mirror", args);
    assert_eq!(complete_and_wait(&mut c, "drive0"), qemu);
    c.ok("blockdev-del", json!({"node-name": "drive0"}));
    c.ok("blockdev-del", json!({"node-name": "target"}));
    quit(&mut vm, &mut c);
    assert!(compare(&test, &target), "target differs from the source");
    qemu_io("qcow2", &target, &["read -P 0 0 64k"]);
}

/// Sends a command and reads up to and including the first event that is not a
/// JOB_STATUS_CHANGE; returns the reply and that event. Every JOB_STATUS_CHANGE read on
/// the way must be about `job`.
fn exec_until_job_event(c: &mut RawQmp, execute: &str, args: Value, job: &str) -> (Value, Value) {
    c.send(
        json!({"execute": execute, "arguments": args})
            .to_string()
            .as_bytes(),
    );
    let mut reply = None;
    loop {
        let v = c.read();
        match v["event"].as_str() {
            None if v.get("error").is_some() => return (v, Value::Null),
            None => reply = Some(v),
            Some("JOB_STATUS_CHANGE") => assert_eq!(v["data"]["id"], job, "{v}"),
            Some(_) => {
                let reply = reply.unwrap_or_else(|| c.reply());
                return (reply, v);
            }
        }
    }
}

/// The first block job as `query-block-jobs` shows it.
fn job_info(c: &mut RawQmp) -> Value {
    c.ok("query-block-jobs", json!({}))[0].clone()
}

/// 041 TestGranularity: a 10 MiB qcow2 image written in full, mirrored with
/// `granularity: 8192`. Failures would show as COMPLETED or ERROR; the first job event
/// after the status changes must be READY. At READY, `query-block-jobs` answers as
/// qemu-storage-daemon answers for the same mirror.
#[test]
fn test_granularity() {
    let dir = TempDir::new("041-granularity");
    let test = dir.join("test.img");
    qemu_img_create("qcow2", &test, "10M");
    let test = test.display().to_string();
    qemu_io("qcow2", &test, &["write 0 10M"]);
    let target = dir.join("target.img").display().to_string();

    // QEMU's answer, from qemu-storage-daemon with the same image and mirror (a node
    // without a device name needs the job id there).
    let qsd_target = dir.join("qsd-target.img").display().to_string();
    let qsd = StorageDaemon::start(&dir.join("qsd.sock"));
    let mut q = qsd.raw_qmp();
    q.ok("blockdev-add", qcow2_node("drive0", &test));
    let (reply, first) = exec_until_job_event(
        &mut q,
        "drive-mirror",
        json!({"job-id": "drive0", "device": "drive0", "sync": "full", "target": qsd_target,
               "mode": "absolute-paths", "granularity": 8192}),
        "drive0",
    );
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(first["event"], "BLOCK_JOB_READY", "qemu: {first}");
    let qemu_job = job_info(&mut q);
    drop(q);
    drop(qsd);

    let (mut vm, mut c) = start(dir, Some(&format!("id=drive0,file={test},format=qcow2")));
    no_jobs(&mut c);
    let (reply, first) = exec_until_job_event(
        &mut c,
        "drive-mirror",
        json!({"device": "drive0", "sync": "full", "target": target,
               "mode": "absolute-paths", "granularity": 8192}),
        "drive0",
    );
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(first["event"], "BLOCK_JOB_READY", "{first}");
    assert_eq!(
        first["data"],
        json!({"device": "drive0", "type": "mirror",
        "len": 10 << 20, "offset": 10 << 20, "speed": 0})
    );
    assert_eq!(job_info(&mut c), qemu_job);
    c.ok("block-job-complete", json!({"device": "drive0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    no_jobs(&mut c);
    quit(&mut vm, &mut c);
    assert!(compare(&test, &target), "target differs from the source");
}
