//! Block job error policies for real, each scenario played on qemu-storage-daemon 10 and on
//! splitvmm with the same commands and compared event by event:
//!
//! - iotests 041 TestReadErrors: a mirror whose source sits on a `blkdebug` node that
//!   fails one read with EIO, with `on-source-error` report, ignore and stop (BLOCK_JOB_ERROR,
//!   the io-status, resume after stop, the completion error text);
//! - a mirror target on a full filesystem (a 3 MiB tmpfs, 2 MiB of it taken, mounted in a mount namespace of
//!   the test's own): `on-target-error` report, ignore, stop and enospc meet a real ENOSPC;
//!   after stop or enospc, room is made and `block-job-resume` lets the job finish;
//! - an NBD source (served by qemu-nbd) that goes away mid-mirror: the job ends with the
//!   error instead of hanging, and the target is left as it was.
//! - the blkdebug write path as an NBD client of either server sees it (ENOSPC, once);
//! - iotests 041 TestWriteErrors: `blockdev-mirror` to a `raw` node over a `blkdebug` node
//!   that fails one write (EIO, or ENOSPC for `enospc`), with `on-target-error` report,
//!   ignore, stop and enospc.
//!
//! The transcripts compare event names and data (not `len`/`offset`, which depend on how
//! far each copy got when the error struck) and the `query-block-jobs` answers at the
//! interesting moments.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tests::{
    EventLog, RawQmp, Splitvmm, StorageDaemon, TempDir, qemu_img_create, qemu_img_overlay, qemu_io,
    qemu_nbd,
};

/// A QMP connection that keeps every event it reads, in order, with the job helpers of
/// these tests.
struct Rec(EventLog);

impl std::ops::Deref for Rec {
    type Target = EventLog;
    fn deref(&self) -> &EventLog {
        &self.0
    }
}

impl std::ops::DerefMut for Rec {
    fn deref_mut(&mut self) -> &mut EventLog {
        &mut self.0
    }
}

impl Rec {
    fn new(q: RawQmp) -> Self {
        Self(EventLog::new(q))
    }

    fn status(&mut self, status: &str) {
        self.until(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == status);
    }

    /// `query-block-jobs` without what depends on timing.
    fn jobs(&mut self) -> Value {
        let mut v = self.ok("query-block-jobs", json!({}));
        if let Value::Array(a) = &mut v {
            for j in a {
                if let Value::Object(m) = j {
                    for k in ["len", "offset", "busy"] {
                        m.remove(k);
                    }
                }
            }
        }
        v
    }

    /// The events so far, as `{"event", "data"}` without `len`/`offset` (and timestamps).
    fn transcript(&self) -> Vec<Value> {
        self.events()
            .iter()
            .map(|e| {
                let mut d = e["data"].clone();
                if let Value::Object(m) = &mut d {
                    m.remove("len");
                    m.remove("offset");
                }
                json!({"event": e["event"], "data": d})
            })
            .collect()
    }
}

/// Runs `scenario` on qemu-storage-daemon and on splitvmm (allowed into `dir`); returns
/// both results, QEMU's first.
fn both<T>(dir: &TempDir, scenario: impl Fn(&mut Rec) -> T) -> (T, T) {
    let theirs = {
        let qsd = StorageDaemon::start(&dir.join("qsd.sock"));
        let mut r = Rec::new(qsd.raw_qmp());
        scenario(&mut r)
    };
    let ours = {
        let d = dir.path().display().to_string();
        let vm = Splitvmm::start(&["--image-dir", &d]);
        let mut r = Rec::new(vm.raw_qmp());
        scenario(&mut r)
    };
    (theirs, ours)
}

fn same_files(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img compare")
        .success()
}

/// 041 TestReadErrors' blkdebug rules: armed by a read in state 1, one EIO on the read that
/// covers 1 MiB (sector 2048), the state toggling on every read.
fn read_error_rules() -> Value {
    json!({
        "inject-error": [{"event": "read_aio", "state": 1, "errno": 5, "sector": 2048,
                          "once": true, "immediately": false}],
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                      {"event": "read_aio", "state": 2, "new_state": 1}],
    })
}

/// The source of 041 TestReadErrors as nodes: `raw` over `blkdebug` over the file (QEMU's
/// `blkdebug:RULES:backing.img` with `backing_fmt=raw`).
fn blkdebug_source(rec: &mut Rec, image: &Path) {
    let mut dbg = json!({"driver": "blkdebug",
                         "image": {"driver": "file", "filename": image}});
    if let (Value::Object(d), Value::Object(r)) = (&mut dbg, read_error_rules()) {
        d.extend(r);
    }
    rec.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src", "file": dbg}),
    );
}

/// One TestReadErrors case: the transcript, the `query-block-jobs` answers taken on the
/// way, and whether the target ended equal to the source.
fn read_error_case(dir: &TempDir, policy: &str) -> (Vec<Value>, Vec<Value>, bool) {
    let src = dir.join("src.raw");
    let tgt = dir.join("tgt.raw");
    let (theirs, ours) = both(dir, |rec| {
        qemu_img_create("raw", &tgt, "2M");
        blkdebug_source(rec, &src);
        rec.ok(
            "drive-mirror",
            json!({"device": "src", "job-id": "drive0", "target": tgt, "format": "raw",
                   "mode": "existing", "sync": "full", "on-source-error": policy}),
        );
        let mut queries = Vec::new();
        match policy {
            "report" => {}
            "stop" => {
                rec.status("paused");
                queries.push(rec.jobs());
                rec.ok("block-job-resume", json!({"device": "drive0"}));
                rec.event("BLOCK_JOB_READY");
                queries.push(rec.jobs());
                rec.ok("block-job-complete", json!({"device": "drive0"}));
            }
            _ => {
                rec.event("BLOCK_JOB_READY");
                queries.push(rec.jobs());
                rec.ok("block-job-complete", json!({"device": "drive0"}));
            }
        }
        rec.status("null");
        rec.ok("blockdev-del", json!({"node-name": "src"}));
        let equal = same_files(&src, &tgt);
        std::fs::remove_file(&tgt).expect("remove target");
        (rec.transcript(), queries, equal)
    });
    assert_eq!(
        theirs.0, ours.0,
        "{policy}: events differ (qemu-storage-daemon, then splitvmm)"
    );
    assert_eq!(theirs.1, ours.1, "{policy}: query-block-jobs differs");
    assert_eq!(theirs.2, ours.2, "{policy}: target contents differ");
    ours
}

/// A 2 MiB raw image `name` in `dir`: 0x11 in its first MiB, 0x22 in its second.
fn patterned_image(dir: &TempDir, name: &str) {
    let path = dir.join(name);
    qemu_img_create("raw", &path, "2M");
    qemu_io(
        "raw",
        &path.display().to_string(),
        &["write -P 0x11 0 1M", "write -P 0x22 1M 1M"],
    );
}

/// The mirror tests' source.
fn source_image(dir: &TempDir) {
    patterned_image(dir, "src.raw");
}

/// `BLOCK_JOB_ERROR` of job `drive0` for a failed `operation` (`read`, `write`).
fn job_error(operation: &str, action: &str) -> Value {
    json!({"event": "BLOCK_JOB_ERROR",
           "data": {"action": action, "device": "drive0", "operation": operation}})
}

#[test]
fn read_error_report_ends_the_job_with_eio() {
    let dir = TempDir::new("jerr-report");
    source_image(&dir);
    let (events, _, _) = read_error_case(&dir, "report");
    assert!(events.contains(&job_error("read", "report")), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_COMPLETED"
                && e["data"]["error"] == "Input/output error"),
        "{events:#?}"
    );
}

#[test]
fn read_error_ignore_goes_on_and_copies_everything() {
    let dir = TempDir::new("jerr-ignore");
    source_image(&dir);
    let (events, queries, equal) = read_error_case(&dir, "ignore");
    assert!(events.contains(&job_error("read", "ignore")), "{events:#?}");
    assert_eq!(queries[0][0]["paused"], false);
    assert_eq!(queries[0][0]["io-status"], "ok");
    assert!(equal, "the target must be a full copy");
}

#[test]
fn read_error_stop_pauses_with_io_status_failed_until_resumed() {
    let dir = TempDir::new("jerr-stop");
    source_image(&dir);
    let (events, queries, equal) = read_error_case(&dir, "stop");
    assert!(events.contains(&job_error("read", "stop")), "{events:#?}");
    assert_eq!(queries[0][0]["status"], "paused");
    assert_eq!(queries[0][0]["io-status"], "failed");
    assert_eq!(queries[1][0]["io-status"], "ok");
    assert!(equal, "the target must be a full copy");
}

/// 041 TestWriteErrors' blkdebug rules with `errno`: armed by a write in state 1, one
/// error on the write that covers 1 MiB (sector 2048), the state toggling on every write.
fn write_error_rules(errno: i64) -> Value {
    json!({
        "inject-error": [{"event": "write_aio", "state": 1, "errno": errno, "sector": 2048,
                          "once": true, "immediately": false}],
        "set-state": [{"event": "write_aio", "state": 1, "new_state": 2},
                      {"event": "write_aio", "state": 2, "new_state": 1}],
    })
}

/// One TestWriteErrors case: `blockdev-mirror` of a raw source node to a target made of a
/// `raw` node over a `blkdebug` node (QEMU's `blkdebug:RULES:target.img`) with
/// `on-target-error` `policy`, the injected error `errno`. Returns the transcript (an
/// ignored error's repeats folded), the `query-block-jobs` answers taken on the way and
/// whether the target ended equal to the source.
fn write_error_case(dir: &TempDir, policy: &str, errno: i64) -> (Vec<Value>, Vec<Value>, bool) {
    let src = dir.join("src.raw");
    let tgt = dir.join("tgt.raw");
    let (theirs, ours) = both(dir, |rec| {
        qemu_img_create("raw", &tgt, "2M");
        rec.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "src",
                   "file": {"driver": "file", "filename": src}}),
        );
        let mut dbg = json!({"driver": "blkdebug",
                             "image": {"driver": "file", "filename": tgt}});
        if let (Value::Object(d), Value::Object(r)) = (&mut dbg, write_error_rules(errno)) {
            d.extend(r);
        }
        rec.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "tgt", "file": dbg}),
        );
        rec.ok(
            "blockdev-mirror",
            json!({"device": "src", "job-id": "drive0", "target": "tgt", "sync": "full",
                   "on-target-error": policy}),
        );
        let mut queries = Vec::new();
        let stops = policy == "stop" || (policy == "enospc" && errno == 28);
        if stops {
            rec.status("paused");
            queries.push(rec.jobs());
            rec.ok("block-job-resume", json!({"device": "drive0"}));
            // Queried once READY: right after the resume the job may or may not be.
            rec.event("BLOCK_JOB_READY");
            queries.push(rec.jobs());
            rec.ok("block-job-complete", json!({"device": "drive0"}));
        } else if policy == "ignore" {
            rec.event("BLOCK_JOB_ERROR");
            rec.event("BLOCK_JOB_READY");
            queries.push(rec.jobs());
            rec.ok("block-job-complete", json!({"device": "drive0"}));
        }
        rec.status("null");
        rec.ok("blockdev-del", json!({"node-name": "tgt"}));
        rec.ok("blockdev-del", json!({"node-name": "src"}));
        let equal = same_files(&src, &tgt);
        std::fs::remove_file(&tgt).expect("remove target");
        let mut t = rec.transcript();
        t.dedup();
        (t, queries, equal)
    });
    assert_eq!(
        theirs.0, ours.0,
        "{policy}/{errno}: events differ (qemu-storage-daemon, then splitvmm)"
    );
    assert_eq!(
        theirs.1, ours.1,
        "{policy}/{errno}: query-block-jobs differs"
    );
    assert_eq!(theirs.2, ours.2, "{policy}/{errno}: target contents differ");
    ours
}

/// iotests 041 TestWriteErrors `test_report_write` (and `enospc` meeting an EIO, which
/// reports it): the job ends with the error, never READY.
#[test]
fn write_error_report_ends_the_mirror_with_eio() {
    let dir = TempDir::new("jerr-wreport");
    source_image(&dir);
    for policy in ["report", "enospc"] {
        let (events, _, _) = write_error_case(&dir, policy, 5);
        assert!(
            events.contains(&job_error("write", "report")),
            "{policy}: {events:#?}"
        );
        assert!(
            !events.iter().any(|e| e["event"] == "BLOCK_JOB_READY"),
            "{policy}: {events:#?}"
        );
        assert!(
            events.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"
                && e["data"]["type"] == "mirror"
                && e["data"]["error"] == "Input/output error"),
            "{policy}: {events:#?}"
        );
    }
}

/// 041 TestWriteErrors `test_ignore_write`: the error is reported, the job does not pause,
/// the write is retried and the mirror completes with a full copy.
#[test]
fn write_error_ignore_retries_and_completes() {
    let dir = TempDir::new("jerr-wignore");
    source_image(&dir);
    let (events, queries, equal) = write_error_case(&dir, "ignore", 5);
    assert!(
        events.contains(&job_error("write", "ignore")),
        "{events:#?}"
    );
    assert_eq!(queries[0][0]["paused"], false);
    assert_eq!(queries[0][0]["io-status"], "ok");
    assert!(equal, "the target must be a full copy");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"].get("error").is_none()),
        "{events:#?}"
    );
}

/// 041 TestWriteErrors `test_stop_write`, and `enospc` meeting an ENOSPC: the job pauses
/// with io-status `failed` / `nospace`, `ok` again after `block-job-resume`, then READY and
/// a full copy.
#[test]
fn write_error_stop_pauses_until_resumed() {
    let dir = TempDir::new("jerr-wstop");
    source_image(&dir);
    for (policy, errno, io_status) in [("stop", 5, "failed"), ("enospc", 28, "nospace")] {
        let (events, queries, equal) = write_error_case(&dir, policy, errno);
        assert!(
            events.contains(&job_error("write", "stop")),
            "{policy}: {events:#?}"
        );
        assert_eq!(queries[0][0]["status"], "paused", "{policy}");
        assert_eq!(queries[0][0]["io-status"], io_status, "{policy}");
        assert_eq!(queries[1][0]["paused"], false, "{policy}");
        assert_eq!(queries[1][0]["io-status"], "ok", "{policy}");
        assert!(equal, "{policy}: the target must be a full copy");
    }
}

/// 030 TestEIO / TestENOSPC's blkdebug rules with `errno`: armed by a read in state 1,
/// one error on the read that covers 512 KiB (sector 1024, the second stream chunk), the
/// state toggling on every read.
fn stream_error_rules(errno: i64) -> Value {
    json!({
        "inject-error": [{"event": "read_aio", "state": 1, "errno": errno, "sector": 1024,
                          "once": true, "immediately": false}],
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                      {"event": "read_aio", "state": 2, "new_state": 1}],
    })
}

/// One TestEIO / TestENOSPC case, on nodes made by `blockdev-add`: a qcow2 image over a
/// backing made of a `raw` node over a `blkdebug` node over the raw backing file (QEMU's
/// `backing_file=blkdebug:RULES:backing.img`), streamed with `on-error` `policy`. Returns
/// the transcript, the `query-block-jobs` answers taken on the way (with `offset`), whether
/// the top node still has a backing file after the job, and whether the top image then
/// reads as the backing file.
fn stream_error_case(
    dir: &TempDir,
    policy: &str,
    errno: i64,
) -> (Vec<Value>, Vec<Value>, bool, bool) {
    let base = dir.join("backing.raw");
    let top = dir.join("test.qcow2");
    let (theirs, ours) = both(dir, |rec| {
        let _ = std::fs::remove_file(&top);
        qemu_img_overlay(&top, &base, "raw", None);
        let mut dbg = json!({"driver": "blkdebug",
                             "image": {"driver": "file", "filename": base}});
        if let (Value::Object(d), Value::Object(r)) = (&mut dbg, stream_error_rules(errno)) {
            d.extend(r);
        }
        rec.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "base", "read-only": true, "file": dbg}),
        );
        rec.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "top", "backing": "base",
                   "file": {"driver": "file", "filename": top}}),
        );
        rec.ok(
            "block-stream",
            json!({"device": "top", "job-id": "drive0", "on-error": policy}),
        );
        let mut queries = Vec::new();
        let query = |rec: &mut Rec| {
            let mut v = rec.ok("query-block-jobs", json!({}));
            if let Some(Value::Object(m)) = v.get_mut(0) {
                m.remove("busy");
            }
            v
        };
        if policy == "stop" || (policy == "enospc" && errno == 28) {
            rec.status("paused");
            queries.push(query(rec));
            rec.ok("block-job-resume", json!({"device": "drive0"}));
            // The rest streams fast: the job may be over already (030 allows that too).
            let after = rec.jobs();
            if let Some(j) = after.get(0) {
                assert_eq!(j["paused"], false, "{after}");
                assert_eq!(j["io-status"], "ok", "{after}");
            }
        }
        // (After an ignored error the job may be over before a query: 2 MiB stream fast.)
        rec.status("null");
        let nodes = rec.ok("query-named-block-nodes", json!({"flat": true}));
        let backed = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == "top"))
            .is_some_and(|n| n.get("backing_file").is_some());
        rec.ok("blockdev-del", json!({"node-name": "top"}));
        rec.ok("blockdev-del", json!({"node-name": "base"}));
        let equal = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
            .arg(&top)
            .arg(&base)
            .status()
            .expect("qemu-img compare")
            .success();
        let mut t = rec.transcript();
        t.dedup();
        (t, queries, backed, equal)
    });
    assert_eq!(
        theirs.0, ours.0,
        "{policy}/{errno}: events differ (qemu-storage-daemon, then splitvmm)"
    );
    assert_eq!(
        theirs.1, ours.1,
        "{policy}/{errno}: query-block-jobs differs"
    );
    assert_eq!(theirs.2, ours.2, "{policy}/{errno}: the backing differs");
    assert_eq!(theirs.3, ours.3, "{policy}/{errno}: image contents differ");
    ours
}

/// The stream tests' backing file.
fn stream_backing(dir: &TempDir) {
    patterned_image(dir, "backing.raw");
}

/// 030 TestEIO `test_report` and `test_enospc` (an EIO under `enospc` is reported): the
/// stream ends with the error and the chain stays as it was.
#[test]
fn stream_read_error_report_ends_the_job() {
    let dir = TempDir::new("jerr-sreport");
    stream_backing(&dir);
    for policy in ["report", "enospc"] {
        let (events, _, backed, _) = stream_error_case(&dir, policy, 5);
        assert!(
            events.contains(&job_error("read", "report")),
            "{policy}: {events:#?}"
        );
        assert!(
            events.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"
                && e["data"]["type"] == "stream"
                && e["data"]["error"] == "Input/output error"),
            "{policy}: {events:#?}"
        );
        assert!(backed, "{policy}: the backing stays");
    }
}

/// 030 TestEIO `test_ignore`: the job goes on without pausing (no `paused` in the events),
/// copies the rest, and ends
/// with the error, leaving the backing in place.
#[test]
fn stream_read_error_ignore_goes_on_and_keeps_the_backing() {
    let dir = TempDir::new("jerr-signore");
    stream_backing(&dir);
    let (events, _, backed, _) = stream_error_case(&dir, "ignore", 5);
    assert!(events.contains(&job_error("read", "ignore")), "{events:#?}");
    assert!(
        !events.iter().any(|e| e["data"]["status"] == "paused"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["error"].is_string()),
        "{events:#?}"
    );
    assert!(backed, "the backing stays");
}

/// 030 TestEIO `test_stop` and TestENOSPC `test_enospc`: the job pauses after the first
/// chunk with io-status `failed` / `nospace`, runs on after `block-job-resume`, and
/// completes: the whole chain is streamed and the backing gone.
#[test]
fn stream_read_error_stop_pauses_until_resumed() {
    let dir = TempDir::new("jerr-sstop");
    stream_backing(&dir);
    for (policy, errno, io_status) in [("stop", 5, "failed"), ("enospc", 28, "nospace")] {
        let (events, queries, backed, equal) = stream_error_case(&dir, policy, errno);
        assert!(
            events.contains(&job_error("read", "stop")),
            "{policy}: {events:#?}"
        );
        assert_eq!(queries[0][0]["status"], "paused", "{policy}");
        assert_eq!(queries[0][0]["offset"], 512 << 10, "{policy}");
        assert_eq!(queries[0][0]["io-status"], io_status, "{policy}");
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"].get("error").is_none()),
            "{policy}: {events:#?}"
        );
        assert!(!backed, "{policy}: the whole chain was streamed");
        assert!(equal, "{policy}: the image holds the backing's data");
    }
}

/// Mounts a tmpfs of `size` at `at` in a mount namespace of this test thread's own (the
/// processes it starts inherit it; the host and the other tests never see the mount).
fn private_tmpfs(at: &Path, size: &str) {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    std::fs::create_dir_all(at).expect("mount point");
    unshare(CloneFlags::CLONE_NEWNS).unwrap_or_else(|e| {
        panic!("a full filesystem needs a mount namespace (CAP_SYS_ADMIN, e.g. root): {e}")
    });
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make the mounts private");
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        Some(format!("size={size}").as_str()),
    )
    .expect("mount tmpfs");
}

/// One full-filesystem case: a 2 MiB source mirrored to a raw target on a 3 MiB tmpfs
/// that a 2 MiB filler leaves 1 MiB of.
/// With `stop`/`enospc`, room is made after the pause (the filler goes) and the job
/// resumes and completes.
fn enospc_case(dir: &TempDir, policy: &str) -> (Vec<Value>, Vec<Value>) {
    let src = dir.join("src.raw");
    let full = dir.join("full");
    let tgt = full.join("tgt.raw");
    let filler = full.join("filler");
    let (theirs, ours) = both(dir, |rec| {
        qemu_img_create("raw", &tgt, "2M");
        std::fs::write(&filler, vec![0x55u8; 2 << 20]).expect("filler");
        rec.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "src",
                   "file": {"driver": "file", "filename": src}}),
        );
        rec.ok(
            "drive-mirror",
            json!({"device": "src", "job-id": "drive0", "target": tgt, "format": "raw",
                   "mode": "existing", "sync": "full", "on-target-error": policy}),
        );
        let mut queries = Vec::new();
        match policy {
            "report" => rec.status("null"),
            "ignore" => {
                // Ignored errors are retried: the job stays busy and never gets READY.
                rec.event("BLOCK_JOB_ERROR");
                queries.push(rec.jobs());
                rec.ok(
                    "block-job-cancel",
                    json!({"device": "drive0", "force": true}),
                );
                rec.status("null");
            }
            _ => {
                rec.status("paused");
                queries.push(rec.jobs());
                std::fs::remove_file(&filler).expect("make room");
                rec.ok("block-job-resume", json!({"device": "drive0"}));
                rec.event("BLOCK_JOB_READY");
                queries.push(rec.jobs());
                rec.ok("block-job-complete", json!({"device": "drive0"}));
                rec.status("null");
                assert!(
                    same_files(&src, &tgt),
                    "{policy}: the target is a full copy"
                );
            }
        }
        rec.ok("blockdev-del", json!({"node-name": "src"}));
        let _ = std::fs::remove_file(&tgt);
        let _ = std::fs::remove_file(&filler);
        // Only the first error of a kind matters: an ignored one repeats until the cancel.
        let mut t = rec.transcript();
        t.dedup();
        (t, queries)
    });
    assert_eq!(theirs.0, ours.0, "{policy}: events differ");
    assert_eq!(theirs.1, ours.1, "{policy}: query-block-jobs differs");
    ours
}

#[test]
fn mirror_to_a_full_filesystem_follows_on_target_error() {
    let dir = TempDir::new("jerr-enospc");
    source_image(&dir);
    private_tmpfs(&dir.join("full"), "3M");
    let enospc = "No space left on device";
    let (events, _) = enospc_case(&dir, "report");
    assert!(
        events.contains(&job_error("write", "report")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["error"] == enospc),
        "{events:#?}"
    );
    let (events, queries) = enospc_case(&dir, "ignore");
    assert!(
        events.iter().any(|e| e["data"]["action"] == "ignore"),
        "{events:#?}"
    );
    assert_eq!(queries[0][0]["io-status"], "ok");
    for policy in ["stop", "enospc"] {
        let (events, queries) = enospc_case(&dir, policy);
        assert!(
            events.iter().any(|e| e["data"]["action"] == "stop"),
            "{policy}: {events:#?}"
        );
        assert_eq!(queries[0][0]["io-status"], "nospace", "{policy}");
        assert_eq!(queries[1][0]["io-status"], "ok", "{policy}");
    }
}

/// A mirror from an NBD source whose server goes away mid-copy: a read error (report: the
/// job ends; it must not hang), and the target keeps what was copied before.
#[test]
fn nbd_source_that_disconnects_ends_the_job_with_an_error() {
    let dir = TempDir::new("jerr-nbd");
    let big = dir.join("big.raw");
    qemu_img_create("raw", &big, "64M");
    qemu_io("raw", &big.display().to_string(), &["write -P 0x33 0 64M"]);
    let tgt = dir.join("tgt.raw");
    qemu_img_create("raw", &tgt, "64M");
    let sock = dir.join("nbd.sock");
    let server = qemu_nbd(&big, "raw", "big", &sock, true);
    let d = dir.path().display().to_string();
    let vm = Splitvmm::start(&["--image-dir", &d]);
    let mut rec = Rec::new(vm.raw_qmp());
    rec.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "src", "read-only": true, "export": "big",
               "server": {"type": "unix", "path": sock}}),
    );
    // Slow enough that the server is gone long before the copy ends (1 MiB/s of 64 MiB).
    rec.ok(
        "drive-mirror",
        json!({"device": "src", "job-id": "drive0", "target": tgt, "format": "raw",
               "mode": "existing", "sync": "full", "speed": 1 << 20}),
    );
    rec.status("running");
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(server);
    let err = rec.event("BLOCK_JOB_ERROR");
    assert_eq!(err["data"]["operation"], "read", "{err}");
    let done = rec.event("BLOCK_JOB_COMPLETED");
    assert!(
        done["data"]["error"].is_string(),
        "the job must end with an error: {done}"
    );
    rec.status("null");
    assert_eq!(rec.jobs(), json!([]));
    // splitvmm still answers, and the source node can go.
    rec.ok("blockdev-del", json!({"node-name": "src"}));
    let len = std::fs::metadata(&tgt).expect("target").len();
    assert_eq!(len, 64 << 20, "the target keeps its size");
}

/// A mirror to an NBD target (`nbd+unix://`, the monitor connects) whose server goes away
/// mid-copy: the target's write error follows `on-target-error` (`report`: a
/// BLOCK_JOB_ERROR with `operation` `write`, then the job ends with an error; it must not
/// hang), and the source is untouched.
#[test]
fn nbd_target_that_disconnects_follows_on_target_error() {
    let dir = TempDir::new("jerr-nbd-target");
    let src = dir.join("src.raw");
    qemu_img_create("raw", &src, "64M");
    qemu_io("raw", &src.display().to_string(), &["write -P 0x5c 0 64M"]);
    let before = std::fs::read(&src).expect("source");
    let exported = dir.join("exported.raw");
    qemu_img_create("raw", &exported, "64M");
    let sock = dir.join("nbd.sock");
    let server = qemu_nbd(&exported, "raw", "t", &sock, false);
    let d = dir.path().display().to_string();
    let vm = Splitvmm::start(&["--image-dir", &d]);
    let mut rec = Rec::new(vm.raw_qmp());
    rec.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": src}}),
    );
    // 1 MiB/s of 64 MiB: the server is gone long before the copy ends.
    rec.ok(
        "drive-mirror",
        json!({"device": "src", "job-id": "drive0", "format": "raw", "mode": "existing",
               "target": format!("nbd+unix:///t?socket={}", sock.display()),
               "sync": "full", "speed": 1 << 20, "on-target-error": "report"}),
    );
    rec.status("running");
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(server);
    let err = rec.event("BLOCK_JOB_ERROR");
    assert_eq!(err["data"]["operation"], "write", "{err}");
    assert_eq!(err["data"]["action"], "report", "{err}");
    let done = rec.event("BLOCK_JOB_COMPLETED");
    assert!(
        done["data"]["error"].is_string(),
        "the job must end with an error: {done}"
    );
    rec.status("null");
    assert_eq!(rec.jobs(), json!([]));
    rec.ok("blockdev-del", json!({"node-name": "src"}));
    assert_eq!(
        std::fs::read(&src).expect("source"),
        before,
        "the source changed"
    );
}

/// The blkdebug write path, as an NBD client sees it on both servers: a `raw` node over a
/// `blkdebug` node, exported writable; a write arms the rule (`write_aio`, raised by the
/// raw node), which fails the first write covering sector 8 with ENOSPC, once.
#[test]
fn blkdebug_write_errors_reach_an_nbd_client_as_in_qemu() {
    let dir = TempDir::new("jerr-bdwrite");
    let img = dir.join("w.raw");
    qemu_img_create("raw", &img, "1M");
    let sock = dir.join("nbd.sock");
    let io = |cmd: &str| -> String {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(format!("nbd+unix:///w?socket={}", sock.display()))
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        text.lines().next().unwrap_or_default().to_string()
    };
    let (theirs, ours) = both(&dir, |rec| {
        rec.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "w", "file": {
                "driver": "blkdebug", "image": {"driver": "file", "filename": img},
                "inject-error": [{"event": "write_aio", "errno": 28, "sector": 8,
                                  "once": true}]}}),
        );
        rec.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        rec.ok("nbd-server-add", json!({"device": "w", "writable": true}));
        let out = vec![
            io("write 0 512"),
            io("write 4096 512"),
            io("write 4096 512"),
            io("read 4096 512"),
        ];
        rec.ok("nbd-server-stop", json!({}));
        rec.ok("blockdev-del", json!({"node-name": "w"}));
        out
    });
    assert_eq!(theirs, ours, "qemu-storage-daemon, then splitvmm");
    assert!(ours[1].contains("No space left on device"), "{ours:?}");
    assert!(ours[2].starts_with("wrote"), "once: {ours:?}");
}
