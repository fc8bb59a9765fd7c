//! Crash recovery (issue 7, DESIGN.md §1 and §3): block-proc is SIGKILLed under the
//! workload guest's write-verify loop. The monitor reports it (`CHILD_EXITED`, a
//! `BLOCK_IO_ERROR` per drive, STOP into `io-error`), ends the jobs that died with it in
//! error, starts a new block-proc in the same jail, replays the block configuration (nodes,
//! the NBD server on the same listening socket, exports), and vmm-proc sends it the
//! requests that were in flight. After `cont` the guest verifies every write it had
//! acknowledged and passes. A block-proc that keeps dying ends splitvmm.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{
    RawQmp, Splitvmm, TempDir, alive, descendants, kvm_or_skip, proc_name, proc_status_field,
    qemu_img_create, run, wait_for_text,
};

/// The pid of splitvmm's block-proc.
fn block_proc(vm: &Splitvmm) -> i32 {
    descendants(vm.pid())
        .into_iter()
        .find(|p| proc_name(*p).as_deref() == Some("block-proc"))
        .unwrap_or_else(|| panic!("no block-proc under {}", vm.pid()))
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}

fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

/// The workload guest on a qcow2 disk, running, with `--image-dir` its directory.
fn start_guest(dir: TempDir, append: &str) -> Splitvmm {
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "16M");
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    Splitvmm::start_workload(dir, append, &drive)
}

/// The guest loop's progress lines so far.
fn progress(vm: &Splitvmm) -> usize {
    std::fs::read_to_string(vm.dir.join("serial.log"))
        .unwrap_or_default()
        .matches("write-verify-loop: ")
        .count()
}

/// Kills block-proc once the guest's loop has reported progress beyond `seen` lines (it
/// is writing and verifying), and checks what the monitor reports up to the restart.
/// Returns the events.
fn kill_and_recover(vm: &Splitvmm, c: &mut RawQmp, seen: usize) -> Vec<Value> {
    wait_for_text(&vm.dir.join("serial.log"), Duration::from_secs(60), |t| {
        t.matches("write-verify-loop: ").count() > seen
    });
    let old = block_proc(vm);
    sigkill(old);
    let events = c.events_until("__org.splitvmm_CHILD_RESTARTED");
    let exited = named(&events, "__org.splitvmm_CHILD_EXITED");
    assert_eq!(
        exited.first().map(|e| e["data"].clone()),
        Some(json!({"process": "block-proc", "pid": old, "signal": "SIGKILL", "signal-number": 9})),
        "{events:?}"
    );
    let restarted = &named(&events, "__org.splitvmm_CHILD_RESTARTED")[0]["data"];
    assert_eq!(restarted["process"], "block-proc");
    let new = i32::try_from(restarted["pid"].as_i64().expect("pid")).expect("pid");
    assert_ne!(new, old);
    assert!(!alive(old));
    assert_eq!(block_proc(vm), new);
    // Jailed as the first one was.
    assert_eq!(proc_status_field(new, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_status_field(new, "NoNewPrivs").as_deref(), Some("1"));
    events
}

/// The guest's disk reported the loss, and the guest stopped in `io-error` (the BLOCK_IO_ERROR
/// and STOP may come before or after the restart: vmm-proc notices on its own). Reads on
/// until both have come; returns them.
fn guest_stopped(c: &mut RawQmp, mut events: Vec<Value>) -> Vec<Value> {
    while named(&events, "STOP").is_empty() || named(&events, "BLOCK_IO_ERROR").is_empty() {
        events.push(c.read());
    }
    let err = named(&events, "BLOCK_IO_ERROR")[0]["data"].clone();
    assert_eq!(err["device"], "disk0", "{err}");
    assert_eq!(err["action"], "stop", "{err}");
    assert_eq!(err["nospace"], false, "{err}");
    assert_eq!(
        c.ok("query-status", json!({})),
        json!({"running": false, "status": "io-error"})
    );
    // Answered by the new block-proc, with the status the error left.
    let block = c.ok("query-block", json!({}));
    assert_eq!(block[0]["device"], "disk0", "{block}");
    assert_eq!(block[0]["io-status"], "failed", "{block}");
    events
}

/// After `cont`, the guest runs to its end and passes: every write it had acknowledged
/// reads back, also those in flight when block-proc died. The image is sound.
fn guest_passes(mut vm: Splitvmm, c: &mut RawQmp) {
    c.cont();
    assert_eq!(c.ok("query-block", json!({}))[0]["io-status"], "ok");
    let ev = c.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let code = vm.wait_exit(Duration::from_secs(120)).code();
    let serial = std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{serial}\n{}", vm.stderr_text());
    assert!(serial.contains("workload: PASS"), "{serial}");
    let img = vm.dir.join("disk0.qcow2").display().to_string();
    run(Command::new("qemu-img").args(["check", "-q", &img]));
}

#[test]
fn a_killed_block_proc_is_restarted_under_the_paused_guest_and_no_write_is_lost() {
    if !kvm_or_skip("a_killed_block_proc_is_restarted_under_the_paused_guest_and_no_write_is_lost")
    {
        return;
    }
    let vm = start_guest(
        TempDir::new("recover"),
        "run=write-verify-loop seconds=12 bytes=8M",
    );
    let mut c = vm.raw_qmp();
    let events = kill_and_recover(&vm, &mut c, 0);
    guest_stopped(&mut c, events);
    // Once more, on the restarted block-proc, after the guest went on writing.
    let seen = progress(&vm);
    c.cont();
    let events = kill_and_recover(&vm, &mut c, seen);
    guest_stopped(&mut c, events);
    guest_passes(vm, &mut c);
}

#[test]
fn recovery_ends_a_running_mirror_in_error_and_restores_nodes_and_nbd_exports() {
    if !kvm_or_skip("recovery_ends_a_running_mirror_in_error_and_restores_nodes_and_nbd_exports") {
        return;
    }
    let dir = TempDir::new("recover-jobs");
    let extra = dir.join("extra.qcow2");
    qemu_img_create("qcow2", &extra, "1M");
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 0 64k",
        extra.to_str().expect("path"),
    ]));
    let target = dir.join("target.qcow2").display().to_string();
    let sock = dir.join("nbd.sock").display().to_string();
    let vm = start_guest(dir, "run=write-verify-loop seconds=8 bytes=8M");
    let mut c = vm.raw_qmp();
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "extra", "read-only": true,
               "file": {"driver": "file", "filename": extra}}),
    );
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "extra", "node-name": "extra"}),
    );
    // A mirror slow enough to be running when block-proc dies (16 MiB at 64 KiB/s).
    c.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "format": "qcow2",
               "speed": 65536}),
    );
    let info = |export: &str| {
        run(Command::new("nbdinfo")
            .args(["--json", &format!("nbd+unix:///{export}?socket={sock}")]))
    };
    let before: Value = serde_json::from_str(&info("extra")).expect("nbdinfo json");
    let events = kill_and_recover(&vm, &mut c, 0);
    // The job died with block-proc: QEMU's sequence for a failed job, from the monitor.
    let done = named(&events, "BLOCK_JOB_COMPLETED");
    assert_eq!(done.len(), 1, "{events:?}");
    let data = &done[0]["data"];
    assert_eq!(
        (
            &data["type"],
            &data["device"],
            &data["speed"],
            &data["error"]
        ),
        (
            &json!("mirror"),
            &json!("disk0"),
            &json!(65536),
            &json!("Input/output error")
        ),
        "{data}"
    );
    // (Events before the death, as the job's `ready`, are in the list too.)
    let exited = events
        .iter()
        .position(|e| e["event"] == "__org.splitvmm_CHILD_EXITED")
        .expect("CHILD_EXITED");
    let statuses: Vec<&Value> = named(&events[exited..], "JOB_STATUS_CHANGE")
        .iter()
        .map(|e| &e["data"]["status"])
        .collect();
    assert_eq!(
        statuses,
        [&json!("aborting"), &json!("concluded"), &json!("null")],
        "{events:?}"
    );
    guest_stopped(&mut c, events);
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
    // The node, the server (same socket) and the export are back.
    let after: Value = serde_json::from_str(&info("extra")).expect("nbdinfo json");
    assert_eq!(
        after["exports"][0]["export-size"],
        before["exports"][0]["export-size"]
    );
    let out = tests::output(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 64k",
        &format!("nbd+unix:///extra?socket={sock}"),
    ]));
    assert!(
        out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes = c.ok("query-named-block-nodes", json!({"flat": true}));
    assert!(
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["node-name"] == "extra"),
        "{nodes}"
    );
    guest_passes(vm, &mut c);
}

/// Restarts are limited: the death after the last allowed restart shuts splitvmm down as
/// any child's death does, saying why, with nothing left behind.
#[test]
fn a_block_proc_that_keeps_dying_ends_splitvmm() {
    let dir = TempDir::new("recover-loop");
    let img = dir.join("disk.raw");
    qemu_img_create("raw", &img, "1M");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let mut vm = Splitvmm::start_in(dir, &["--drive", &drive]);
    let mut c = vm.raw_qmp();
    const MAX_RESTARTS: usize = 3;
    for _ in 0..MAX_RESTARTS {
        let pid = block_proc(&vm);
        sigkill(pid);
        let events = c.events_until("__org.splitvmm_CHILD_RESTARTED");
        assert_eq!(named(&events, "__org.splitvmm_CHILD_EXITED").len(), 1);
        // Without a guest no drive reports an error and no state changes.
        assert!(named(&events, "BLOCK_IO_ERROR").is_empty(), "{events:?}");
        assert_eq!(c.ok("query-block", json!({}))[0]["device"], "disk0");
    }
    let last = block_proc(&vm);
    sigkill(last);
    let ev = c.read();
    assert_eq!(ev["event"], "__org.splitvmm_CHILD_EXITED", "{ev}");
    assert_eq!(ev["data"]["pid"], last);
    let ev = c.read();
    assert_eq!(ev["event"], "SHUTDOWN", "{ev}");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-error"}));
    assert_eq!(vm.wait_exit(Duration::from_secs(15)).code(), Some(1));
    let stderr = vm.stderr_text();
    assert!(
        stderr.contains(&format!(
            "block-proc (pid {last}) was killed by signal 9 (SIGKILL); not restarted (it was restarted 3 times already)"
        )),
        "{stderr}"
    );
    assert!(!vm.qmp.exists(), "socket left behind");
}
