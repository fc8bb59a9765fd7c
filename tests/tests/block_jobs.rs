//! Block jobs over QMP on a real splitvmm (block-proc jailed as in production): drive-mirror
//! as QEMU's iotests 041 drive it (complete, cancel before and after READY, pause, small
//! buffers, speed, the not-found errors), the state machine as 219 checks it (every verb
//! in every state, with QEMU's texts, and the JOB_STATUS_CHANGE sequences), a guest that
//! keeps writing through a mirror and its pivot; block-stream as 030 drives it (and under
//! the guest's load), external snapshots, and block-commit as 040 drives it. Images are
//! made by qemu-img and checked with qemu-img compare/check/info/map.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{
    EventLog, RawQmp, Splitvmm, StorageDaemon, TempDir, kvm_or_skip, qemu_img_create,
    qemu_img_overlay, qemu_io, run,
};

/// A QMP client that keeps every event, in order, with the job helpers of these tests.
struct Client(EventLog);

impl std::ops::Deref for Client {
    type Target = EventLog;
    fn deref(&self) -> &EventLog {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut EventLog {
        &mut self.0
    }
}

impl Client {
    fn new(vm: &Splitvmm) -> Self {
        Self(EventLog::new(vm.raw_qmp()))
    }

    /// The job's JOB_STATUS_CHANGE statuses and other job events seen so far, as
    /// "status" or "EVENT" strings.
    fn sequence(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| match e["event"].as_str()? {
                "JOB_STATUS_CHANGE" => e["data"]["status"].as_str().map(str::to_string),
                n if n.starts_with("BLOCK_JOB") => Some(n.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Waits until the job has gone (its last JOB_STATUS_CHANGE is `null`); returns
    /// [`Self::sequence`].
    fn until_null(&mut self) -> Vec<String> {
        while self.sequence().last().map(String::as_str) != Some("null") {
            self.event("JOB_STATUS_CHANGE");
        }
        self.sequence()
    }

    fn job(&mut self) -> Value {
        let jobs = self.ok("query-block-jobs", json!({}));
        jobs[0].clone()
    }

    /// iotests' `pause_job`: until paused and not busy.
    fn wait_paused(&mut self) -> Value {
        for _ in 0..500 {
            let j = self.job();
            if j["paused"] == true && j["busy"] == false {
                return j;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the job did not pause: {}", self.job());
    }
}

/// A job that gets ready and is completed (a mirror's pivot, an active commit), from
/// start to dismissal, as [`Client::sequence`] shows it: iotests 041's order.
const PIVOT: [&str; 9] = [
    "created",
    "running",
    "ready",
    "BLOCK_JOB_READY",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

/// A 1 MiB raw backing file with data at 0, and a qcow2 overlay with data at 512 KiB
/// (041's TestSingleDrive set-up).
fn source_images(dir: &TempDir) -> (String, String) {
    let backing = dir.join("backing.raw");
    let top = dir.join("test.qcow2");
    qemu_img_create("raw", &backing, "1M");
    qemu_io(
        "raw",
        &backing.display().to_string(),
        &["write -P 0x11 0 64k"],
    );
    qemu_img_overlay(&top, &backing, "raw", Some("1M"));
    qemu_io(
        "qcow2",
        &top.display().to_string(),
        &["write -P 0x22 512k 64k"],
    );
    (backing.display().to_string(), top.display().to_string())
}

fn start(dir: TempDir, drive: &str) -> (Splitvmm, Client) {
    let d = dir.path().display().to_string();
    let vm = Splitvmm::start_in(dir, &["--drive", drive, "--image-dir", &d]);
    let c = Client::new(&vm);
    (vm, c)
}

fn compare(a: &str, fa: &str, b: &str, fb: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", fa, "-F", fb, a, b])
        .status()
        .expect("qemu-img compare")
        .success()
}

/// Quits; the directory (and its images) stays until `vm` is dropped.
fn quit(vm: &mut Splitvmm, mut c: Client) {
    c.ok("quit", json!({}));
    vm.wait_exit(Duration::from_secs(30));
}

fn inserted_file(c: &mut Client) -> String {
    let b = c.ok("query-block", json!({}));
    b[0]["inserted"]["file"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn mirror_complete_pivots_with_the_exact_event_sequence() {
    let dir = TempDir::new("mirror-complete");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "format": "qcow2"}),
    );
    // created and running come before the reply (094.out). A small image can also reach
    // ready before the reply goes out: QEMU does not order those, so only the prefix counts.
    assert_eq!(c.sequence()[..2], ["created", "running"]);
    let ready = c.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["type"], "mirror");
    assert_eq!(ready["data"]["device"], "drive0");
    assert_eq!(ready["data"]["len"], ready["data"]["offset"]);
    let j = c.job();
    assert_eq!(j["status"], "ready");
    assert_eq!(j["ready"], true);
    assert_eq!(j["io-status"], "ok");
    assert_eq!(j["actively-synced"], false);
    assert_eq!(j["auto-finalize"], true);
    let jobs = c.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["id"], "drive0");
    assert_eq!(jobs[0]["type"], "mirror");
    assert_eq!(jobs[0]["status"], "ready");
    assert_eq!(jobs[0]["current-progress"], jobs[0]["total-progress"]);
    c.ok("block-job-complete", json!({"device": "drive0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    c.event("JOB_STATUS_CHANGE");
    assert_eq!(c.until_null(), PIVOT);
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    assert_eq!(inserted_file(&mut c), target);
    quit(&mut vm, c);
    assert!(compare(&top, "qcow2", &target, "qcow2"));
    run(Command::new("qemu-img").args(["check", "-q", &target]));
    // sync=full: the target stands alone.
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &target]));
    assert!(!info.contains("backing-filename"), "{info}");
}

#[test]
fn mirror_force_cancel_keeps_the_source() {
    let dir = TempDir::new("mirror-cancel");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "speed": 1}),
    );
    c.ok(
        "block-job-cancel",
        json!({"device": "drive0", "force": true}),
    );
    let ev = c.event("BLOCK_JOB_CANCELLED");
    assert_eq!(ev["data"]["type"], "mirror");
    assert_eq!(ev["data"]["speed"], 1);
    c.event("JOB_STATUS_CHANGE");
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    assert_eq!(inserted_file(&mut c), top);
    let seq = c.sequence();
    assert_eq!(
        &seq[seq.len() - 4..],
        ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    );
    quit(&mut vm, c);
}

#[test]
fn mirror_soft_cancel_after_ready_completes_without_pivot() {
    let dir = TempDir::new("mirror-cancel-ready");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full"}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-cancel", json!({"device": "drive0"}));
    let ev = c.event("BLOCK_JOB_COMPLETED");
    assert_eq!(ev["data"]["type"], "mirror");
    assert_eq!(ev["data"]["offset"], ev["data"]["len"]);
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert_eq!(inserted_file(&mut c), top);
    quit(&mut vm, c);
    assert!(compare(&top, "qcow2", &target, "qcow2"));
}

/// The qcow2 copy path (data clusters copied file to file in the kernel, target clusters
/// allocated per run) against what it must not get wrong: a source with 4 KiB clusters
/// (runs that are not contiguous in its file), data read through a qcow2 backing file,
/// compressed clusters there (copied through memory), zero clusters over backing data,
/// unaligned writes, and a granularity below the target's 64 KiB clusters (partial
/// clusters, several copies into one new cluster).
#[test]
fn mirror_qcow2_to_qcow2_small_clusters_backing_and_compressed_data() {
    let dir = TempDir::new("mirror-qcow2-paths");
    let base = dir.join("base.qcow2").display().to_string();
    let top = dir.join("top.qcow2").display().to_string();
    qemu_img_create("qcow2", Path::new(&base), "8M");
    qemu_io(
        "qcow2",
        &base,
        &[
            "write -c -P 0x21 0 128k",
            "write -P 0x22 1M 1M",
            "write -P 0x23 5M 64k",
        ],
    );
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
        ])
        .args([&base, &top]));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x31 1000 10000",
            "write -P 0x32 1052672 4096",
            "write -z 1200k 64k",
            "write -P 0x33 3M 1M",
            "write -P 0x34 4100k 8k",
            "write -P 0x35 7M 1M",
            "write -P 0x36 3200k 4k",
        ],
    );
    let target = dir.join("target.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "format": "qcow2",
               "granularity": 4096}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "drive0"}));
    let ev = c.event("BLOCK_JOB_COMPLETED");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert_eq!(inserted_file(&mut c), target);
    quit(&mut vm, c);
    assert!(compare(&top, "qcow2", &target, "qcow2"));
    run(Command::new("qemu-img").args(["check", "-q", &target]));
}

#[test]
fn mirror_pause_freezes_progress_until_resume() {
    let dir = TempDir::new("mirror-pause");
    let img = dir.join("big.raw");
    qemu_img_create("raw", &img, "8M");
    let img = img.display().to_string();
    qemu_io("raw", &img, &["write -P 0x5a 0 8M"]);
    let target = dir.join("target.raw").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={img},format=raw"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full",
               "speed": 1024 * 1024, "granularity": 65536, "buf-size": 65536}),
    );
    c.ok("block-job-pause", json!({"device": "drive0"}));
    let paused = c.wait_paused();
    assert_eq!(paused["status"], "paused");
    let (class, desc) = c.err("block-job-pause", json!({"device": "drive0"}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "Job is already paused")
    );
    let (_, desc) = c.err("block-job-cancel", json!({"device": "drive0"}));
    assert_eq!(
        desc,
        "The block job for device 'drive0' is currently paused"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.job()["offset"], paused["offset"], "progress while paused");
    c.ok("block-job-resume", json!({"device": "drive0"}));
    let (_, desc) = c.err("block-job-resume", json!({"device": "drive0"}));
    assert_eq!(desc, "Can't resume a job that was not paused");
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 0}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "drive0"}));
    c.event("BLOCK_JOB_COMPLETED");
    let seq = c.sequence();
    assert_eq!(&seq[..4], ["created", "running", "paused", "running"]);
    quit(&mut vm, c);
    assert!(compare(&img, "raw", &target, "raw"));
}

#[test]
fn mirror_small_buffer_and_holes_stay_holes() {
    let dir = TempDir::new("mirror-small-buf");
    let img = dir.join("sparse.raw");
    qemu_img_create("raw", &img, "4M");
    let img = img.display().to_string();
    qemu_io(
        "raw",
        &img,
        &["write -P 0x33 1M 64k", "write -P 0x44 3M 4k"],
    );
    let target = dir.join("target.raw").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={img},format=raw"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "buf-size": 4096}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "drive0"}));
    c.event("BLOCK_JOB_COMPLETED");
    assert_eq!(inserted_file(&mut c), target);
    quit(&mut vm, c);
    assert!(compare(&img, "raw", &target, "raw"));
    // Only what the source holds was written: the target is as sparse.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &target]));
    let extents: Vec<Value> = serde_json::from_str(&map).expect("map JSON");
    let data: u64 = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert!(data <= 256 * 1024, "target has {data} bytes of data: {map}");
}

#[test]
fn mirror_speed_and_errors_as_qemu() {
    let dir = TempDir::new("mirror-speed");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.qcow2").display().to_string();
    let missing = dir.join("missing.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    // The not-found errors (041 test_device_not_found, test_image_not_found).
    let (class, desc) = c.err(
        "drive-mirror",
        json!({"device": "nonexistent", "target": target, "sync": "full"}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        "Cannot find device='nonexistent' nor node-name='nonexistent'"
    );
    let (class, desc) = c.err(
        "drive-mirror",
        json!({"device": "drive0", "target": missing, "sync": "full", "mode": "existing"}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        format!("Could not open '{missing}': No such file or directory")
    );
    for cmd in [
        "block-job-pause",
        "block-job-resume",
        "block-job-complete",
        "block-job-cancel",
    ] {
        let (class, desc) = c.err(cmd, json!({"device": "nosuch"}));
        assert_eq!(class, "DeviceNotActive");
        assert_eq!(desc, "Block job 'nosuch' not found");
    }
    for cmd in [
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
    ] {
        assert_eq!(
            c.err(cmd, json!({"id": "nosuch"})),
            ("GenericError".into(), "Job not found".into())
        );
    }
    let (class, _) = c.err(
        "block-job-set-speed",
        json!({"device": "nosuch", "speed": 0}),
    );
    assert_eq!(class, "DeviceNotActive");
    let (_, desc) = c.err(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "speed": -1}),
    );
    assert_eq!(desc, "Parameter 'speed' expects a non-negative value");
    // As qemu-storage-daemon 10.0.2: the job appeared and went before the error.
    assert_eq!(c.sequence(), ["created", "null"]);
    let (_, desc) = c.err(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "granularity": 1000}),
    );
    assert_eq!(desc, "Parameter 'granularity' expects a power of 2");
    // TestSetSpeed.
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "speed": 1}),
    );
    assert_eq!(c.job()["speed"], 1);
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 8 << 20}),
    );
    assert_eq!(c.job()["speed"], 8 << 20);
    let (class, desc) = c.err(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": -1}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Parameter 'speed' expects a non-negative value");
    // The op blocker, and the job id already in use.
    let (_, desc) = c.err(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full"}),
    );
    assert_eq!(
        desc,
        "Node 'drive0' is busy: block device is in use by block job: mirror"
    );
    let (_, desc) = c.err("block_resize", json!({"device": "drive0", "size": 2 << 20}));
    assert_eq!(
        desc,
        "Node 'drive0' is busy: block device is in use by block job: mirror"
    );
    c.ok(
        "block-job-cancel",
        json!({"device": "drive0", "force": true}),
    );
    c.event("BLOCK_JOB_CANCELLED");
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "speed": 4 << 20, "job-id": "j1"}),
    );
    let j = c.job();
    assert_eq!(
        (j["device"].as_str(), j["speed"].as_u64()),
        (Some("j1"), Some(4 << 20))
    );
    let (_, desc) = c.err(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "job-id": "1bad"}),
    );
    assert_eq!(
        desc,
        "Node 'drive0' is busy: block device is in use by block job: mirror"
    );
    quit(&mut vm, c);
}

/// 219: every verb in every state a mirror passes through, with QEMU's texts.
#[test]
fn job_verbs_in_every_state() {
    let dir = TempDir::new("job-verbs");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "job-id": "job0", "target": target, "sync": "full",
               "speed": 1, "auto-finalize": false, "auto-dismiss": false}),
    );
    let refused = |c: &mut Client, state: &str, verbs: &[&str]| {
        for verb in verbs {
            let (cmd, args) = match *verb {
                "complete" => ("job-complete", json!({"id": "job0"})),
                "finalize" => ("job-finalize", json!({"id": "job0"})),
                "dismiss" => ("job-dismiss", json!({"id": "job0"})),
                "pause" => ("job-pause", json!({"id": "job0"})),
                "cancel" => ("job-cancel", json!({"id": "job0"})),
                "set-speed" => ("block-job-set-speed", json!({"device": "job0", "speed": 0})),
                _ => ("block-job-complete", json!({"device": "job0"})),
            };
            let (class, desc) = c.err(cmd, args);
            assert_eq!(class, "GenericError");
            assert_eq!(
                desc,
                format!("Job 'job0' in state '{state}' cannot accept command verb '{verb}'")
            );
        }
    };
    refused(&mut c, "running", &["complete", "finalize", "dismiss"]);
    // Throttled to 1 B/s, the job sleeps after its first copy. A sleeping job pauses at
    // once, and resumes at once: QEMU enters it, so both JOB_STATUS_CHANGEs come before
    // the commands' replies.
    for _ in 0..500 {
        if c.job()["busy"] == false {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.job()["busy"], false);
    c.ok("job-pause", json!({"id": "job0"}));
    assert_eq!(c.sequence().last().map(String::as_str), Some("paused"));
    c.wait_paused();
    refused(&mut c, "paused", &["complete", "finalize", "dismiss"]);
    c.ok("job-resume", json!({"id": "job0"}));
    assert_eq!(c.sequence().last().map(String::as_str), Some("running"));
    c.ok("block-job-set-speed", json!({"device": "job0", "speed": 0}));
    c.event("BLOCK_JOB_READY");
    refused(&mut c, "ready", &["finalize", "dismiss"]);
    c.ok("job-pause", json!({"id": "job0"}));
    let j = c.wait_paused();
    assert_eq!(j["status"], "standby");
    assert_eq!(j["ready"], true);
    refused(&mut c, "standby", &["finalize", "dismiss"]);
    c.ok("job-resume", json!({"id": "job0"}));
    c.ok("job-complete", json!({"id": "job0"}));
    let pending = c.event("BLOCK_JOB_PENDING");
    assert_eq!(pending["data"], json!({"type": "mirror", "id": "job0"}));
    assert_eq!(c.job()["status"], "pending");
    refused(
        &mut c,
        "pending",
        &["pause", "complete", "dismiss", "set-speed"],
    );
    c.ok("job-finalize", json!({"id": "job0"}));
    c.event("BLOCK_JOB_COMPLETED");
    assert_eq!(c.job()["status"], "concluded");
    refused(
        &mut c,
        "concluded",
        &["pause", "complete", "finalize", "cancel", "set-speed"],
    );
    c.ok("job-dismiss", json!({"id": "job0"}));
    c.event("JOB_STATUS_CHANGE");
    assert_eq!(
        c.until_null(),
        [
            "created",
            "running",
            "paused",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "standby",
            "ready",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(c.ok("query-jobs", json!({})), json!([]));
    assert_eq!(inserted_file(&mut c), target);
    quit(&mut vm, c);
}

/// The workload guest (write-verify-loop for 6 s) on a 16 MiB qcow2 disk, once it has
/// begun writing; the path of its disk and of a mirror target beside it.
fn workload_vm(dir: TempDir) -> (Splitvmm, Client, String, String) {
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "16M");
    let target = dir.join("target.qcow2").display().to_string();
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    let vm = Splitvmm::start_workload(dir, "run=write-verify-loop seconds=6", &drive);
    let c = Client::new(&vm);
    let log = vm.dir.join("serial.log");
    // Its first progress line (about 1 s in, later on a loaded machine).
    let serial = tests::wait_for_text(&log, Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: ")
    });
    assert!(
        !serial.contains("workload: PASS") && !serial.contains("workload: FAIL"),
        "the run ended early: {serial}"
    );
    (vm, c, img.display().to_string(), target)
}

/// The guest's run ends: it shut itself down, splitvmm exits 0, the guest says PASS.
/// (The directory stays until `vm` is dropped.)
fn workload_passes(vm: &mut Splitvmm, mut c: Client) {
    let ev = c.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let code = vm.wait_exit(Duration::from_secs(120)).code();
    let serial = std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{serial}");
    assert!(serial.contains("workload: PASS"), "{serial}");
}

/// The workload guest writes and verifies all along a mirror, READY and the pivot: it
/// passes, on the target, and the target is a sound qcow2 image.
#[test]
fn guest_keeps_writing_through_mirror_and_pivot() {
    if !kvm_or_skip("guest_keeps_writing_through_mirror_and_pivot") {
        return;
    }
    let (mut vm, mut c, _, target) = workload_vm(TempDir::new("mirror-guest"));
    c.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "format": "qcow2"}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "disk0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(inserted_file(&mut c), target);
    workload_passes(&mut vm, c);
    run(Command::new("qemu-img").args(["check", "-q", &target]));
}

/// A soft cancel after READY while the workload guest writes: BLOCK_JOB_COMPLETED with
/// offset == len, the drive stays on the source, and the target is a point-in-time copy:
/// with the guest stopped (its I/O drained) at the cancel, the target equals what the
/// drive reads (through an NBD export of it). The guest then goes on and passes.
#[test]
fn guest_keeps_writing_through_mirror_soft_cancel() {
    if !kvm_or_skip("guest_keeps_writing_through_mirror_soft_cancel") {
        return;
    }
    let (mut vm, mut c, img, target) = workload_vm(TempDir::new("mirror-guest-cancel"));
    let sock = vm.dir.join("nbd.sock").display().to_string();
    c.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "format": "qcow2"}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("stop", json!({}));
    c.ok("block-job-cancel", json!({"device": "disk0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    assert_eq!(inserted_file(&mut c), img);
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    c.ok("nbd-server-add", json!({"device": "disk0"}));
    let uri = format!("nbd+unix:///disk0?socket={sock}");
    let same = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2", &uri, &target])
        .status()
        .expect("qemu-img compare");
    assert!(
        same.success(),
        "the target is not the source as of the cancel"
    );
    c.ok("nbd-server-stop", json!({}));
    c.ok("cont", json!({}));
    workload_passes(&mut vm, c);
    run(Command::new("qemu-img").args(["check", "-q", &target]));
    run(Command::new("qemu-img").args(["check", "-q", &img]));
}

/// iotests 094: `drive-mirror` to an NBD export (`format: nbd`, `mode: existing`,
/// `sync: full`), READY, complete; the drive now uses the export, the events come in
/// 094.out's order. `target` is the NBD name the mirror is given, `uri` the name QEMU
/// shows for the node, `format` `nbd` (094's) or `raw`.
fn mirror_to_nbd(c: &mut Client, target: &str, format: &str, uri: &str) {
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "format": format, "sync": "full",
               "mode": "existing"}),
    );
    assert_eq!(c.sequence()[..2], ["created", "running"]);
    let ready = c.event("BLOCK_JOB_READY");
    // The export must be zeroed (sync=full, mode=existing), so QEMU 10.0 counts the
    // whole 1 MiB image, as qemu-storage-daemon 10.0.2 reports for this mirror.
    let size = 1 << 20;
    assert_eq!(
        ready["data"],
        json!({"device": "drive0", "len": size, "offset": size, "speed": 0, "type": "mirror"})
    );
    c.ok("block-job-complete", json!({"device": "drive0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert_eq!(
        done["data"],
        json!({"device": "drive0", "len": size, "offset": size, "speed": 0, "type": "mirror"})
    );
    assert_eq!(c.until_null(), PIVOT);
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["file"], uri, "{b}");
    // `format: raw` is a raw node over the NBD node, as QEMU opens it.
    assert_eq!(b[0]["inserted"]["drv"], format, "{b}");
}

#[test]
fn mirror_to_an_nbd_export_of_qemu_nbd_as_iotests_094() {
    let dir = TempDir::new("mirror-094");
    let (_, top) = source_images(&dir);
    let image = dir.join("export.raw");
    qemu_img_create("raw", &image, "1M");
    let sock = dir.join("nbd.sock");
    let server = tests::qemu_nbd(&image, "raw", "exp", &sock, false);
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    mirror_to_nbd(&mut c, &uri, "nbd", &uri);
    quit(&mut vm, c);
    drop(server);
    assert!(compare(&top, "qcow2", &image.display().to_string(), "raw"));
}

/// The same, to a writable export of another splitvmm (its `nbd-server-add`), named in
/// the legacy `nbd:unix:PATH:exportname=X` form, with `format: raw`.
#[test]
fn mirror_to_an_nbd_export_of_another_splitvmm() {
    let dir = TempDir::new("mirror-094-splitvmm");
    let (_, top) = source_images(&dir);
    let image = dir.join("export.raw").display().to_string();
    qemu_img_create("raw", Path::new(&image), "1M");
    let sock = dir.join("nbd.sock").display().to_string();
    let d = dir.path().display().to_string();
    let mut server = Splitvmm::start(&[
        "--drive",
        &format!("id=t0,file={image},format=raw"),
        "--image-dir",
        &d,
    ]);
    let mut s = Client::new(&server);
    s.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    s.ok(
        "nbd-server-add",
        json!({"device": "t0", "name": "t", "writable": true}),
    );
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    let target = format!("nbd:unix:{sock}:exportname=t");
    let uri = format!("nbd+unix:///t?socket={sock}");
    mirror_to_nbd(&mut c, &target, "raw", &uri);
    quit(&mut vm, c);
    quit(&mut server, s);
    assert!(compare(&top, "qcow2", &image, "raw"));
}

/// `copy-mode`: in the background mode a write to the source reaches the target only
/// through the (here throttled) copy; after `block-job-change` to write-blocking, a write
/// is on the target by the time it completes, and the job reports `actively-synced`
/// once in sync. Writes come from an NBD client of the source drive's export. The way
/// back is refused as QEMU refuses it.
#[test]
fn mirror_write_blocking_after_block_job_change() {
    let dir = TempDir::new("mirror-write-blocking");
    let (_, top) = source_images(&dir);
    let target = dir.join("target.raw").display().to_string();
    let sock = dir.join("nbd.sock").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    c.ok(
        "nbd-server-add",
        json!({"device": "drive0", "writable": true}),
    );
    let uri = format!("nbd+unix:///drive0?socket={sock}");
    // speed 1: the copy stalls after its first run, at the start of the image.
    c.ok(
        "drive-mirror",
        json!({"device": "drive0", "target": target, "sync": "full", "format": "raw",
               "speed": 1}),
    );
    let at = |off: usize| -> Vec<u8> {
        let bytes = std::fs::read(&target).expect("read the target");
        bytes[off..off + (64 << 10)].to_vec()
    };
    tests::qemu_io("raw", &uri, &["write -P 0x77 768k 64k"]);
    assert_ne!(at(768 << 10), vec![0x77; 64 << 10]);
    assert_eq!(c.job()["actively-synced"], false);
    // To the mode it is in: nothing to do.
    c.ok(
        "block-job-change",
        json!({"id": "drive0", "type": "mirror", "copy-mode": "background"}),
    );
    c.ok(
        "block-job-change",
        json!({"id": "drive0", "type": "mirror", "copy-mode": "write-blocking"}),
    );
    // Already write-blocking: no change, no error.
    c.ok(
        "block-job-change",
        json!({"id": "drive0", "type": "mirror", "copy-mode": "write-blocking"}),
    );
    tests::qemu_io("raw", &uri, &["write -P 0x66 896k 64k"]);
    assert_eq!(at(896 << 10), vec![0x66; 64 << 10]);
    let (class, desc) = c.err(
        "block-job-change",
        json!({"id": "drive0", "type": "mirror", "copy-mode": "background"}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Change to copy mode 'background' is not implemented");
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 0}),
    );
    c.event("BLOCK_JOB_READY");
    let mut synced = c.job()["actively-synced"].clone();
    for _ in 0..200 {
        if synced == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        synced = c.job()["actively-synced"].clone();
    }
    assert_eq!(synced, true);
    c.ok("block-job-cancel", json!({"device": "drive0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(&mut vm, c);
    assert!(compare(&top, "qcow2", &target, "raw"));
}

/// `blockdev-mirror` between two `blockdev-add` nodes, the source exported over NBD: at
/// completion the export moves to the target, as qemu-storage-daemon 10.0.2 moves it
/// (`query-block-exports` then names the target; writes through the export land in it;
/// the source, used by nothing, can be deleted).
#[test]
fn blockdev_mirror_moves_the_source_exports_at_completion() {
    let dir = TempDir::new("blockdev-mirror-export");
    let (src, tgt) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
    qemu_img_create("qcow2", &src, "4M");
    qemu_img_create("qcow2", &tgt, "4M");
    let src = src.display().to_string();
    let tgt = tgt.display().to_string();
    qemu_io("qcow2", &src, &["write -P 0x44 0 1M"]);
    let sock = dir.join("nbd.sock").display().to_string();
    let d = dir.path().display().to_string();
    let mut vm = Splitvmm::start_in(dir, &["--image-dir", &d]);
    let mut c = Client::new(&vm);
    for (name, file) in [("src", &src), ("tgt", &tgt)] {
        c.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name,
                   "file": {"driver": "file", "filename": file}}),
        );
    }
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    c.ok("nbd-server-add", json!({"device": "src", "writable": true}));
    c.ok(
        "blockdev-mirror",
        json!({"device": "src", "target": "tgt", "sync": "full", "job-id": "j"}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-complete", json!({"device": "j"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(
        c.ok("query-block-exports", json!({})),
        json!([{"id": "src", "type": "nbd", "node-name": "tgt", "shutting-down": false}])
    );
    let uri = format!("nbd+unix:///src?socket={sock}");
    qemu_io("raw", &uri, &["write -P 0x55 2M 64k"]);
    c.ok("blockdev-del", json!({"node-name": "src"}));
    c.ok("nbd-server-stop", json!({}));
    quit(&mut vm, c);
    qemu_io("qcow2", &tgt, &["read -P 0x44 0 1M", "read -P 0x55 2M 64k"]);
    qemu_io("qcow2", &src, &["read -P 0 2M 64k"]);
}

// ---- block-stream (iotests 030), external snapshots, block-commit (iotests 040) ----

/// 030's chain: a raw backing file with data at 0, a qcow2 `mid` with data at 512 KiB, and
/// an empty qcow2 `test` image on top (all 1 MiB). Returns (backing, mid, test).
fn chain_images(dir: &TempDir) -> (String, String, String) {
    let backing = dir.join("backing.raw");
    let mid = dir.join("mid.qcow2");
    let test = dir.join("test.qcow2");
    qemu_img_create("raw", &backing, "1M");
    let backing = backing.display().to_string();
    qemu_io("raw", &backing, &["write -P 0x1 0 512"]);
    qemu_img_overlay(&mid, &backing, "raw", Some("1M"));
    qemu_img_overlay(&test, &mid, "qcow2", Some("1M"));
    let mid = mid.display().to_string();
    qemu_io("qcow2", &mid, &["write -P 0x1 524288 512"]);
    (backing, mid, test.display().to_string())
}

/// The chain's guest-visible contents, as a raw file (`qemu-img convert` reads through it).
fn snapshot_contents(img: &str, dir: &Path, name: &str) -> String {
    let out = dir.join(name).display().to_string();
    run(Command::new("qemu-img").args(["convert", "-O", "raw", img, &out]));
    out
}

/// `qemu-io -c map` of an image, without the file name line (030 compares these).
fn io_map(fmt: &str, img: &str) -> String {
    run(Command::new("qemu-io").args(["-r", "-f", fmt, "-c", "map", img]))
}

fn backing_filename(img: &str) -> Option<String> {
    let info = run(Command::new("qemu-img").args(["info", "-U", "--output=json", img]));
    let v: Value = serde_json::from_str(&info).expect("qemu-img info json");
    v["backing-filename"].as_str().map(str::to_string)
}

/// Waits for the job's end; returns the completion event.
fn wait_completed(c: &mut Client) -> Value {
    let done = c.event("BLOCK_JOB_COMPLETED");
    c.until_null();
    done
}

/// 030 `test_stream`: the whole chain streamed into the top image, which then stands
/// alone with the same contents, fully allocated as the raw backing file is.
#[test]
fn stream_whole_chain() {
    let dir = TempDir::new("stream-all");
    let (backing, _mid, test) = chain_images(&dir);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok("block-stream", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "stream");
    assert_eq!(done["data"]["device"], "drive0");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    assert_eq!(done["data"]["len"], 1 << 20);
    let seq = c.sequence();
    assert_eq!(
        seq,
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let b = c.ok("query-block", json!({}));
    assert!(b[0]["inserted"].get("backing_file").is_none(), "{b}");
    assert_eq!(b[0]["inserted"]["backing_file_depth"], 0);
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test), None);
    assert_eq!(
        io_map("raw", &backing).replace(&backing, ""),
        io_map("qcow2", &test).replace(&test, ""),
        "image file map does not match backing file after streaming"
    );
    assert!(compare(&test, "qcow2", &want, "raw"));
    run(Command::new("qemu-img").args(["check", "-q", &test]));
}

/// 030 `test_stream_partial`: `base` given: only `mid` is streamed; the top image's
/// backing file becomes the base (in its header), its map the same as mid's.
#[test]
fn stream_partial_keeps_the_base() {
    let dir = TempDir::new("stream-partial");
    let (backing, mid, test) = chain_images(&dir);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    // The 2012 name of the command is accepted too.
    c.ok("block_stream", json!({"device": "drive0", "base": backing}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["backing_file"], backing.as_str());
    assert_eq!(b[0]["inserted"]["backing_file_depth"], 1);
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test).as_deref(), Some(backing.as_str()));
    assert_eq!(
        io_map("qcow2", &mid).replace(&mid, ""),
        io_map("qcow2", &test).replace(&test, ""),
        "image file map does not match backing file after streaming"
    );
    assert!(compare(&test, "qcow2", &want, "raw"));
}

/// 030 `test_stream_no_op`: the top image is empty and its backing is the base: nothing
/// to do, the job completes at once with `len` 0 and the map is unchanged.
#[test]
fn stream_no_op() {
    let dir = TempDir::new("stream-noop");
    let (_backing, mid, test) = chain_images(&dir);
    let before = io_map("qcow2", &test);
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok("block-stream", json!({"device": "drive0", "base": mid}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], 0);
    assert_eq!(done["data"]["offset"], 0);
    quit(&mut vm, c);
    assert_eq!(io_map("qcow2", &test), before);
    assert_eq!(backing_filename(&test).as_deref(), Some(mid.as_str()));
}

/// 030 `test_stream_pause` (slowed by `speed` instead of blkdebug), and 030 `TestSetSpeed`.
#[test]
fn stream_pause_and_speed() {
    let dir = TempDir::new("stream-pause");
    let base = dir.join("base.raw");
    qemu_img_create("raw", &base, "8M");
    let base = base.display().to_string();
    qemu_io("raw", &base, &["write -P 0x5a 0 8M"]);
    let top = dir.join("top.qcow2").display().to_string();
    qemu_img_overlay(&top, &base, "raw", None);
    let want = snapshot_contents(&top, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    let (class, desc) = c.err("block-stream", json!({"device": "drive0", "speed": -1}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        (
            "GenericError",
            "Parameter 'speed' expects a non-negative value"
        )
    );
    c.ok(
        "block-stream",
        json!({"device": "drive0", "speed": 1024 * 1024}),
    );
    assert_eq!(c.job()["speed"], 1024 * 1024);
    assert_eq!(c.job()["type"], "stream");
    let (_, desc) = c.err(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": -1}),
    );
    assert_eq!(desc, "Parameter 'speed' expects a non-negative value");
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 8 * 1024 * 1024}),
    );
    assert_eq!(c.job()["speed"], 8 * 1024 * 1024);
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 512 * 1024}),
    );
    // A second job on the same drive hits the op blocker.
    let (_, desc) = c.err("block-stream", json!({"device": "drive0", "job-id": "j2"}));
    assert_eq!(
        desc,
        "Node 'drive0' is busy: block device is in use by block job: stream"
    );
    c.ok("block-job-pause", json!({"device": "drive0"}));
    let paused = c.wait_paused();
    assert_eq!(paused["status"], "paused");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.job()["offset"], paused["offset"], "progress while paused");
    assert!(paused["offset"].as_u64() < paused["len"].as_u64());
    c.ok("block-job-resume", json!({"device": "drive0"}));
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 0}),
    );
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    // The job refused for its speed appeared and went (as QEMU's does).
    let seq = c.sequence();
    assert_eq!(
        &seq[..6],
        ["created", "null", "created", "running", "paused", "running"]
    );
    quit(&mut vm, c);
    assert_eq!(backing_filename(&top), None);
    assert!(compare(&top, "qcow2", &want, "raw"));
}

/// 030 `TestSmallerBackingFile`: a 1 MiB backing file under a 2 MiB image; streaming
/// must end (reading past the backing file's end is zeroes, not an endless loop).
#[test]
fn stream_smaller_backing_file_terminates() {
    let dir = TempDir::new("stream-smaller");
    let base = dir.join("base.qcow2");
    qemu_img_create("qcow2", &base, "1M");
    let base = base.display().to_string();
    qemu_io("qcow2", &base, &["write -P 0x33 0 1M"]);
    let top = dir.join("top.qcow2").display().to_string();
    qemu_img_overlay(&top, &base, "qcow2", Some("2M"));
    let want = snapshot_contents(&top, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok("block-stream", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], 2 << 20);
    quit(&mut vm, c);
    assert!(compare(&top, "qcow2", &want, "raw"));
    assert_eq!(backing_filename(&top), None);
}

/// `block-stream` arguments QEMU refuses (030 `test_device_not_found` and the argument
/// checks) on drive `drive0`, each with QEMU 10's text (class `GenericError`). The
/// differential test also sends them to qemu-storage-daemon.
fn stream_argument_errors() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"device": "nonexistent"}),
            "Cannot find device='nonexistent' nor node-name='nonexistent'",
        ),
        (
            json!({"device": "drive0", "base": "nothere"}),
            "Can't find 'nothere' in the backing chain",
        ),
        (
            json!({"device": "drive0", "base": "x", "base-node": "x"}),
            "'base' and 'base-node' cannot be specified at the same time",
        ),
        (
            json!({"device": "drive0", "base": "x", "bottom": "x"}),
            "'base' and 'bottom' cannot be specified at the same time",
        ),
        (
            json!({"device": "drive0", "base-node": "x", "bottom": "x"}),
            "'bottom' and 'base-node' cannot be specified at the same time",
        ),
        (
            json!({"device": "drive0", "base-node": "nothere"}),
            "Cannot find device='' nor node-name='nothere'",
        ),
        (
            json!({"device": "drive0", "bottom": "nothere"}),
            "Cannot find device='' nor node-name='nothere'",
        ),
        (
            json!({"device": "drive0", "backing-file": "foo"}),
            "backing file specified, but streaming the entire chain",
        ),
        (
            json!({"device": "drive0", "job-id": "j", "speed": -1}),
            "Parameter 'speed' expects a non-negative value",
        ),
    ]
}

/// `block-stream`'s errors with QEMU 10's texts and classes.
#[test]
fn stream_errors_as_qemu() {
    let dir = TempDir::new("stream-errors");
    let (_backing, _mid, test) = chain_images(&dir);
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    for (args, want) in stream_argument_errors() {
        let (class, desc) = c.err("block-stream", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert_eq!(desc, want, "{args}");
    }
    let node = c.ok("query-block", json!({}))[0]["inserted"]["node-name"].clone();
    let (_, desc) = c.err(
        "block-stream",
        json!({"device": "drive0", "base-node": node}),
    );
    assert_eq!(
        desc,
        format!(
            "Node '{}' is not a backing image of 'drive0'",
            node.as_str().unwrap_or_default()
        )
    );
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    quit(&mut vm, c);
}

/// `blockdev-snapshot-sync` on a drive: a new qcow2 overlay over the old active image,
/// which becomes its (read-only) backing; then the chain it made is streamed back into
/// the overlay. QEMU's errors for the argument checks.
#[test]
fn snapshot_sync_then_stream() {
    let dir = TempDir::new("snapshot-sync");
    let (_, top) = source_images(&dir);
    let want = snapshot_contents(&top, dir.path(), "want.raw");
    let snap = dir.join("snap.qcow2").display().to_string();
    let missing = dir.join("missing.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    let old = c.ok("query-block", json!({}))[0]["inserted"]["node-name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cases = [
        (
            json!({"node-name": "nope", "snapshot-file": snap}),
            "Cannot find device='' nor node-name='nope'",
        ),
        (
            json!({"device": "nope", "snapshot-file": snap}),
            "Cannot find device='nope' nor node-name=''",
        ),
        (
            json!({"node-name": old, "snapshot-file": snap}),
            "New overlay node-name missing",
        ),
        (
            json!({"device": "drive0", "snapshot-file": snap, "snapshot-node-name": old}),
            "New overlay node-name already in use",
        ),
        (
            json!({"device": "drive0", "snapshot-file": snap, "format": "raw"}),
            "Backing file not supported for file format 'raw'",
        ),
        (
            json!({"device": "drive0", "snapshot-file": snap, "format": "nonexistent"}),
            "Unknown file format 'nonexistent'",
        ),
    ];
    for (args, want) in cases {
        let (class, desc) = c.err("blockdev-snapshot-sync", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert_eq!(desc, want, "{args}");
    }
    let (_, desc) = c.err(
        "blockdev-snapshot-sync",
        json!({"device": "drive0", "snapshot-file": missing, "mode": "existing"}),
    );
    assert_eq!(
        desc,
        format!("Could not open '{missing}': No such file or directory")
    );
    c.ok(
        "blockdev-snapshot-sync",
        json!({"device": "drive0", "snapshot-file": snap, "snapshot-node-name": "snap0"}),
    );
    let b = c.ok("query-block", json!({}));
    let ins = &b[0]["inserted"];
    assert_eq!(ins["file"], snap.as_str());
    assert_eq!(ins["node-name"], "snap0");
    assert_eq!(ins["backing_file"], top.as_str());
    assert_eq!(ins["backing_file_depth"], 2);
    assert_eq!(ins["ro"], false);
    let nodes = c.ok("query-named-block-nodes", json!({"flat": true}));
    let old_node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == old.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{old} not listed: {nodes}"));
    assert_eq!(old_node["ro"], true, "{old_node}");
    // The old active image is now read-only: qemu-img can read it alongside.
    run(Command::new("qemu-img").args(["info", &top]));
    assert_eq!(backing_filename(&snap).as_deref(), Some(top.as_str()));
    // Stream the chain the snapshot made (node names of the chain work as `base-node`).
    c.ok("block-stream", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    let nodes = c.ok("query-named-block-nodes", json!({"flat": true}));
    assert!(
        !nodes.to_string().contains(&format!("\"{old}\"")),
        "the streamed node is still listed: {nodes}"
    );
    quit(&mut vm, c);
    assert_eq!(backing_filename(&snap), None);
    assert!(compare(&snap, "qcow2", &want, "raw"));
    run(Command::new("qemu-img").args(["check", "-q", &snap]));
}

/// 040 `test_commit`: `mid` (below the active layer) committed into the base: the job
/// ends by itself; the top image's backing becomes the base; the contents stay.
#[test]
fn commit_intermediate() {
    let dir = TempDir::new("commit-mid");
    let (backing, mid, test) = chain_images(&dir);
    qemu_io("qcow2", &test, &["write -P 0xab 768k 64k"]);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok(
        "block-commit",
        json!({"device": "drive0", "top": mid, "base": backing}),
    );
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "commit");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    assert!(
        !c.sequence().iter().any(|s| s == "ready"),
        "{:?}",
        c.sequence()
    );
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["backing_file"], backing.as_str());
    assert_eq!(b[0]["inserted"]["backing_file_depth"], 1);
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test).as_deref(), Some(backing.as_str()));
    assert!(compare(&test, "qcow2", &want, "raw"));
    // mid's data is in the base now (040 checks it with qemu-io).
    qemu_io(
        "raw",
        &backing,
        &["read -P 0x1 0 512", "read -P 0x1 524288 512"],
    );
    // The top's own data stayed in the top.
    qemu_io("raw", &backing, &["read -P 0 768k 64k"]);
}

/// 040 `test_top_is_active` (active commit): mirror-based, READY with type `commit`, and
/// `block-job-complete` switches the drive to the base.
#[test]
fn commit_active_pivots_to_the_base() {
    let dir = TempDir::new("commit-active");
    let (backing, _mid, test) = chain_images(&dir);
    qemu_io("qcow2", &test, &["write -P 0xab 768k 64k"]);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    let (_, desc) = c.err(
        "block-commit",
        json!({"device": "drive0", "backing-file": "x"}),
    );
    assert_eq!(
        desc,
        "'backing-file' specified, but 'top' is the active layer"
    );
    c.ok("block-commit", json!({"device": "drive0", "base": backing}));
    let ready = c.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["type"], "commit");
    assert_eq!(ready["data"]["device"], "drive0");
    assert_eq!(ready["data"]["offset"], ready["data"]["len"]);
    let j = c.job();
    assert_eq!(j["type"], "commit");
    assert_eq!(j["ready"], true);
    assert!(j.get("actively-synced").is_none(), "{j}");
    assert_eq!(j["speed"], 0);
    // 040 TestSetSpeed.
    c.ok(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": 8 * 1024 * 1024}),
    );
    assert_eq!(c.job()["speed"], 8 * 1024 * 1024);
    let (_, desc) = c.err(
        "block-job-set-speed",
        json!({"device": "drive0", "speed": -1}),
    );
    assert_eq!(desc, "Parameter 'speed' expects a non-negative value");
    c.ok("block-job-complete", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "commit");
    assert_eq!(c.sequence(), PIVOT);
    assert_eq!(inserted_file(&mut c), backing);
    quit(&mut vm, c);
    assert!(compare(&backing, "raw", &want, "raw"));
}

/// `block-commit`'s errors (040's), with QEMU 10's texts and classes.
#[test]
fn commit_errors_as_qemu() {
    let dir = TempDir::new("commit-errors");
    let (_backing, mid, test) = chain_images(&dir);
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    let (class, desc) = c.err("block-commit", json!({"device": "nonexistent"}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("DeviceNotFound", "Device 'nonexistent' not found")
    );
    let cases = [
        (
            json!({"device": "drive0", "top": "badfile"}),
            "Top image file badfile not found".to_string(),
        ),
        (
            json!({"device": "drive0", "base": "badfile"}),
            "Can't find 'badfile' in the backing chain".into(),
        ),
        (
            json!({"device": "drive0", "top-node": "badfile"}),
            "Cannot find device='' nor node-name='badfile'".into(),
        ),
        (
            json!({"device": "drive0", "base-node": "badfile"}),
            "Cannot find device='' nor node-name='badfile'".into(),
        ),
        (
            json!({"device": "drive0", "top": "x", "top-node": "x"}),
            "'top-node' and 'top' are mutually exclusive".into(),
        ),
        (
            json!({"device": "drive0", "base": "x", "base-node": "x"}),
            "'base-node' and 'base' are mutually exclusive".into(),
        ),
        (
            json!({"device": "drive0", "top": mid, "base": mid}),
            format!("Can't find '{mid}' in the backing chain"),
        ),
        (
            json!({"device": "drive0", "job-id": "c", "speed": -1}),
            "Parameter 'speed' expects a non-negative value".into(),
        ),
    ];
    for (args, want) in cases {
        let (class, desc) = c.err("block-commit", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert_eq!(desc, want, "{args}");
    }
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    quit(&mut vm, c);
}

/// `blockdev-snapshot`: an overlay made by `blockdev-add` (`backing: null`) goes on top of
/// the drive, which uses it from then on; QEMU's errors for overlays that cannot be one.
#[test]
fn snapshot_with_a_blockdev_add_overlay() {
    let dir = TempDir::new("snapshot");
    let (_, top) = source_images(&dir);
    let want = snapshot_contents(&top, dir.path(), "want.raw");
    let over = dir.join("over.qcow2");
    qemu_img_create("qcow2", &over, "1M");
    let over = over.display().to_string();
    let raw = dir.join("raw.img");
    qemu_img_create("raw", &raw, "1M");
    let raw = raw.display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={top},format=qcow2"));
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ov", "backing": null,
               "file": {"driver": "file", "filename": over}}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "rawov",
               "file": {"driver": "file", "filename": raw}}),
    );
    let (_, desc) = c.err(
        "blockdev-snapshot",
        json!({"node": "nope", "overlay": "ov"}),
    );
    assert_eq!(desc, "Cannot find device='nope' nor node-name='nope'");
    let (_, desc) = c.err(
        "blockdev-snapshot",
        json!({"node": "drive0", "overlay": "nope"}),
    );
    assert_eq!(desc, "Cannot find device='nope' nor node-name='nope'");
    let (_, desc) = c.err(
        "blockdev-snapshot",
        json!({"node": "drive0", "overlay": "rawov"}),
    );
    assert_eq!(desc, "The overlay does not support backing images");
    c.ok(
        "blockdev-snapshot",
        json!({"node": "drive0", "overlay": "ov"}),
    );
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["file"], over.as_str());
    assert_eq!(b[0]["inserted"]["node-name"], "ov");
    assert_eq!(b[0]["inserted"]["backing_file_depth"], 2);
    let nodes = c.ok("query-named-block-nodes", json!({}));
    let ov = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "ov"))
        .cloned()
        .unwrap_or_else(|| panic!("ov not listed: {nodes}"));
    assert_eq!(ov["backing_file"], top.as_str(), "{ov}");
    assert_eq!(ov["backing_file_depth"], 2, "{ov}");
    assert_eq!(
        ov["image"]["backing-image"]["filename"],
        top.as_str(),
        "{ov}"
    );
    // The drive reads the old image through the overlay: stream it in, then it stands
    // alone with the drive's contents.
    c.ok("block-stream", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    quit(&mut vm, c);
    assert!(compare(&over, "qcow2", &want, "raw"));
    assert_eq!(backing_filename(&over), None);
}

/// block-stream under load: the workload guest writes and verifies on a qcow2 overlay
/// over a backing chain while the chain is streamed into it (slowed so it overlaps the
/// guest's run). The guest passes; the overlay then stands alone, and the part of the
/// disk the guest never wrote holds the backing chain's data.
#[test]
fn guest_keeps_writing_through_stream() {
    if !kvm_or_skip("guest_keeps_writing_through_stream") {
        return;
    }
    let dir = TempDir::new("stream-guest");
    let base = dir.join("base.qcow2");
    qemu_img_create("qcow2", &base, "16M");
    let base = base.display().to_string();
    qemu_io("qcow2", &base, &["write -P 0x5a 0 16M"]);
    let mid = dir.join("mid.qcow2").display().to_string();
    let img = dir.join("disk0.qcow2").display().to_string();
    qemu_img_overlay(&mid, &base, "qcow2", None);
    qemu_io("qcow2", &mid, &["write -P 0x6b 12M 1M"]);
    qemu_img_overlay(&img, &mid, "qcow2", None);
    let drive = format!("id=disk0,file={img},format=qcow2");
    let mut vm = Splitvmm::start_workload(dir, "run=write-verify-loop seconds=6 bytes=8M", &drive);
    let mut c = Client::new(&vm);
    let log = vm.dir.join("serial.log");
    tests::wait_for_text(&log, Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    c.ok(
        "block-stream",
        json!({"device": "disk0", "speed": 4 * 1024 * 1024}),
    );
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], done["data"]["len"]);
    let b = c.ok("query-block", json!({}));
    assert!(b[0]["inserted"].get("backing_file").is_none(), "{b}");
    let ev = c.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let code = vm.wait_exit(Duration::from_secs(120)).code();
    let serial = std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{serial}");
    assert!(serial.contains("workload: PASS"), "{serial}");
    run(Command::new("qemu-img").args(["check", "-q", &img]));
    assert_eq!(backing_filename(&img), None);
    qemu_io(
        "qcow2",
        &img,
        &[
            "read -P 0x5a 8M 4M",
            "read -P 0x6b 12M 1M",
            "read -P 0x5a 13M 3M",
        ],
    );
    // The expected disk: the old chain (still on disk, unchanged) with the blocks the
    // guest wrote. Only its share (the first 8 MiB) may differ from the chain, and only
    // by whole pattern blocks of its own offset; qemu-img compare checks the rest.
    let got = std::fs::read(snapshot_contents(&img, vm.dir.path(), "got.raw")).expect("read");
    let chain = snapshot_contents(&mid, vm.dir.path(), "expect.raw");
    let mut expect = std::fs::read(&chain).expect("read");
    assert_eq!(got.len(), expect.len());
    let mut guest_blocks = 0;
    for (i, (g, e)) in got.chunks(4096).zip(expect.chunks_mut(4096)).enumerate() {
        if g == e {
            continue;
        }
        let off = (i * 4096) as u64;
        assert!(
            off < 8 << 20,
            "block at {off} differs outside the guest's share"
        );
        assert_eq!(&g[..8], b"SPLITVMM", "block at {off} is not a guest block");
        assert_eq!(
            g[16..24],
            off.to_le_bytes(),
            "block at {off} is another block's"
        );
        e.copy_from_slice(g);
        guest_blocks += 1;
    }
    assert!(guest_blocks > 0);
    std::fs::write(&chain, &expect).expect("write");
    assert!(compare(&img, "qcow2", &chain, "raw"));
}

/// 141's stream cancel: with `speed: 1` the first 512 KiB chunk goes and the job then
/// waits; a cancel ends it with BLOCK_JOB_CANCELLED at that offset, and the chain is
/// unchanged.
#[test]
fn stream_cancel_leaves_the_chain() {
    let dir = TempDir::new("stream-cancel");
    let (_backing, mid, test) = chain_images(&dir);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok("block-stream", json!({"device": "drive0", "speed": 1}));
    for _ in 0..500 {
        if c.job()["offset"] == 524288 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    c.ok("block-job-cancel", json!({"device": "drive0"}));
    let ev = c.event("BLOCK_JOB_CANCELLED");
    assert_eq!(ev["data"]["type"], "stream");
    assert_eq!(ev["data"]["offset"], 524288);
    assert_eq!(ev["data"]["len"], 1 << 20);
    assert_eq!(ev["data"]["speed"], 1);
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["backing_file"], mid.as_str());
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test).as_deref(), Some(mid.as_str()));
    assert!(compare(&test, "qcow2", &want, "raw"));
}

/// Active commit, soft-cancelled after READY: BLOCK_JOB_COMPLETED without the switch (the
/// drive stays on its image), and the base can be committed into again (its locks are as
/// before); the second time it completes.
#[test]
fn commit_active_cancel_after_ready_then_again() {
    let dir = TempDir::new("commit-cancel");
    let (backing, _mid, test) = chain_images(&dir);
    qemu_io("qcow2", &test, &["write -P 0xab 768k 64k"]);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok("block-commit", json!({"device": "drive0", "base": backing}));
    c.event("BLOCK_JOB_READY");
    c.ok("block-job-cancel", json!({"device": "drive0"}));
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "commit");
    assert_eq!(inserted_file(&mut c), test);
    c.ok(
        "block-commit",
        json!({"device": "drive0", "job-id": "again"}),
    );
    c.event("BLOCK_JOB_READY");
    c.ok("job-complete", json!({"id": "again"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(inserted_file(&mut c), backing);
    quit(&mut vm, c);
    assert!(compare(&backing, "raw", &want, "raw"));
}

/// Differential: the argument checks of `block-stream`, `block-commit` and
/// `blockdev-snapshot-sync` against qemu-storage-daemon 10 on the same chain (its top a
/// node named `drive0` there, a drive `drive0` here): the same class and text for each,
/// so the texts above are QEMU's in this very run.
#[test]
fn stream_commit_snapshot_errors_match_qemu() {
    let dir = TempDir::new("jobs-vs-qemu");
    let (_backing, mid, test) = chain_images(&dir);
    let snap = dir.join("snap.qcow2").display().to_string();
    let mut script: Vec<(&str, Value)> = stream_argument_errors()
        .into_iter()
        .map(|(args, _)| ("block-stream", args))
        .collect();
    script.extend([
        (
            "block-stream",
            json!({"device": "drive0", "base": mid, "speed": "x"}),
        ),
        (
            "block-stream",
            json!({"device": "drive0", "on-error": "bogus"}),
        ),
        ("block-commit", json!({"device": "nonexistent"})),
        (
            "block-commit",
            json!({"device": "drive0", "top": "badfile"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "base": "badfile"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "top-node": "badfile"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "base-node": "badfile"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "top": "x", "top-node": "x"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "base": "x", "base-node": "x"}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "top": mid, "base": mid}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "job-id": "c", "speed": -1}),
        ),
        (
            "block-commit",
            json!({"device": "drive0", "backing-file": "x"}),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "nope", "snapshot-file": snap}),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"device": "nope", "snapshot-file": snap}),
        ),
        (
            "blockdev-snapshot-sync",
            json!({"snapshot-file": snap, "mode": "bogus"}),
        ),
        ("blockdev-snapshot", json!({"node": "nope", "overlay": "x"})),
        ("query-block-jobs", json!({})),
    ]);
    let play = |qmp: &mut RawQmp| -> Vec<Value> {
        script
            .iter()
            .map(|(cmd, args)| {
                let r = qmp.exec(cmd, args.clone());
                match r.get("error") {
                    Some(e) => json!({"class": e["class"], "desc": e["desc"]}),
                    None => r["return"].clone(),
                }
            })
            .collect()
    };
    let theirs = {
        let blockdev =
            format!("driver=qcow2,node-name=drive0,file.driver=file,file.filename={test}");
        let qsd = StorageDaemon::start_with(&dir.join("qsd.sock"), &["--blockdev", &blockdev]);
        play(&mut qsd.raw_qmp())
    };
    let (mut vm, c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    let ours = play(&mut vm.raw_qmp());
    quit(&mut vm, c);
    let diffs: Vec<String> = script
        .iter()
        .zip(theirs.iter().zip(&ours))
        .filter(|(_, (a, b))| a != b)
        .map(|((cmd, args), (a, b))| {
            format!("{cmd} {args}\n  qemu-storage-daemon: {a}\n  splitvmm:            {b}")
        })
        .collect();
    assert!(diffs.is_empty(), "replies differ:\n{}", diffs.join("\n"));
}

/// 030 `test_stream_intermediate` and `test_job_id_missing`: after a snapshot, the old
/// active image (named in the graph) is streamed into while the drive runs on the
/// overlay; it needs an explicit job id, as a node without a device does in QEMU.
#[test]
fn stream_into_an_intermediate_image() {
    let dir = TempDir::new("stream-mid");
    let (_backing, _mid, test) = chain_images(&dir);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let snap = dir.join("snap.qcow2").display().to_string();
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    let old = c.ok("query-block", json!({}))[0]["inserted"]["node-name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    c.ok(
        "blockdev-snapshot-sync",
        json!({"device": "drive0", "snapshot-file": snap, "snapshot-node-name": "snap0"}),
    );
    let (_, desc) = c.err("block-stream", json!({"device": old}));
    assert_eq!(desc, "Invalid job ID ''");
    c.ok(
        "block-stream",
        json!({"device": old, "job-id": "stream-mid"}),
    );
    let done = wait_completed(&mut c);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["device"], "stream-mid");
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["backing_file_depth"], 1, "{b}");
    let nodes = c.ok("query-named-block-nodes", json!({"flat": true}));
    let old_node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == old.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{old} not listed: {nodes}"));
    assert_eq!(old_node["ro"], true, "{old_node}");
    // The old image is read-only again: qemu-img reads it alongside.
    run(Command::new("qemu-img").args(["info", &test]));
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test), None);
    assert_eq!(backing_filename(&snap).as_deref(), Some(test.as_str()));
    assert!(compare(&test, "qcow2", &want, "raw"));
    assert!(compare(&snap, "qcow2", &want, "raw"));
}

/// `auto-finalize: false` and `auto-dismiss: false` on a stream: it waits in `pending`
/// (BLOCK_JOB_PENDING) with the chain unchanged until `job-finalize`, which rewrites it,
/// then stays `concluded` until `job-dismiss`.
#[test]
fn stream_manual_finalize_changes_the_chain_at_finalization() {
    let dir = TempDir::new("stream-finalize");
    let (_backing, mid, test) = chain_images(&dir);
    let want = snapshot_contents(&test, dir.path(), "want.raw");
    let (mut vm, mut c) = start(dir, &format!("id=drive0,file={test},format=qcow2"));
    c.ok(
        "block-stream",
        json!({"device": "drive0", "auto-finalize": false, "auto-dismiss": false}),
    );
    let pending = c.event("BLOCK_JOB_PENDING");
    assert_eq!(pending["data"], json!({"type": "stream", "id": "drive0"}));
    assert_eq!(c.job()["status"], "pending");
    let b = c.ok("query-block", json!({}));
    assert_eq!(b[0]["inserted"]["backing_file"], mid.as_str(), "{b}");
    c.ok("job-finalize", json!({"id": "drive0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(c.job()["status"], "concluded");
    let b = c.ok("query-block", json!({}));
    assert!(b[0]["inserted"].get("backing_file").is_none(), "{b}");
    c.ok("job-dismiss", json!({"id": "drive0"}));
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    quit(&mut vm, c);
    assert_eq!(backing_filename(&test), None);
    assert!(compare(&test, "qcow2", &want, "raw"));
}

/// Active commit under load: the workload guest writes and verifies on a qcow2 overlay
/// while it is committed into its base, READY, and the drive switched to the base; the
/// guest passes on the base, which is then a sound image with the overlay's data.
#[test]
fn guest_keeps_writing_through_active_commit() {
    if !kvm_or_skip("guest_keeps_writing_through_active_commit") {
        return;
    }
    let dir = TempDir::new("commit-guest");
    let base = dir.join("base.qcow2");
    qemu_img_create("qcow2", &base, "16M");
    let base = base.display().to_string();
    qemu_io("qcow2", &base, &["write -P 0x5a 8M 8M"]);
    let img = dir.join("disk0.qcow2").display().to_string();
    qemu_img_overlay(&img, &base, "qcow2", None);
    let drive = format!("id=disk0,file={img},format=qcow2");
    let mut vm = Splitvmm::start_workload(dir, "run=write-verify-loop seconds=6 bytes=8M", &drive);
    let mut c = Client::new(&vm);
    let log = vm.dir.join("serial.log");
    tests::wait_for_text(&log, Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    c.ok("block-commit", json!({"device": "disk0"}));
    let ready = c.event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["type"], "commit");
    c.ok("block-job-complete", json!({"device": "disk0"}));
    let done = c.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(inserted_file(&mut c), base);
    let ev = c.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let code = vm.wait_exit(Duration::from_secs(120)).code();
    let serial = std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{serial}");
    assert!(serial.contains("workload: PASS"), "{serial}");
    run(Command::new("qemu-img").args(["check", "-q", &base]));
    qemu_io("qcow2", &base, &["read -P 0x5a 8M 8M"]);
    // Every block of the guest's share is its own pattern block or untouched zeroes.
    let got = std::fs::read(snapshot_contents(&base, vm.dir.path(), "got.raw")).expect("read");
    let mut guest_blocks = 0;
    for (i, b) in got[..8 << 20].chunks(4096).enumerate() {
        if b.iter().all(|x| *x == 0) {
            continue;
        }
        let off = (i * 4096) as u64;
        assert_eq!(&b[..8], b"SPLITVMM", "block at {off} is not a guest block");
        assert_eq!(
            b[16..24],
            off.to_le_bytes(),
            "block at {off} is another block's"
        );
        guest_blocks += 1;
    }
    assert!(guest_blocks > 0);
}
