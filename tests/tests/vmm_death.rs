//! vmm-proc killed while the guest writes and a mirror runs: the monitor reports the death
//! and SHUTDOWN with its reason, the mirror ends cancelled (QEMU's sequence for a job that a
//! shutdown cancels, iotest 185), block-proc closes both images consistently, and
//! everything exits.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{
    Splitvmm, TempDir, alive, descendants, kvm_or_skip, proc_name, qemu_img_create, run,
    wait_for_text,
};

#[test]
fn a_killed_vmm_proc_shuts_down_with_a_reason_and_cancels_the_mirror_cleanly() {
    if !kvm_or_skip("a_killed_vmm_proc_shuts_down_with_a_reason_and_cancels_the_mirror_cleanly") {
        return;
    }
    let dir = TempDir::new("vmm-death");
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "16M");
    let target = dir.join("target.qcow2").display().to_string();
    let drive = format!("id=disk0,file={},format=qcow2", img.display());
    let mut vm = Splitvmm::start_workload(dir, "run=write-verify-loop seconds=120", &drive);
    let mut c = vm.raw_qmp();
    wait_for_text(&vm.dir.join("serial.log"), Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    // Slow enough that it is still copying when vmm-proc dies.
    let r = c.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "format": "qcow2",
               "speed": 65536}),
    );
    assert_eq!(r, json!({}));
    let jobs = c.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    let tree: Vec<i32> = descendants(vm.pid());
    let vmm = tree
        .iter()
        .copied()
        .find(|p| proc_name(*p).as_deref() == Some("vmm-proc"))
        .unwrap_or_else(|| panic!("no vmm-proc in {tree:?}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");

    let events = c.events_until("SHUTDOWN");
    let exited = events
        .iter()
        .find(|e| e["event"] == "__org.splitvmm_CHILD_EXITED")
        .unwrap_or_else(|| panic!("no CHILD_EXITED in {events:?}"));
    assert_eq!(
        exited["data"],
        json!({"process": "vmm-proc", "pid": vmm, "signal": "SIGKILL", "signal-number": 9})
    );
    let shutdown = events.last().cloned().unwrap_or_default();
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-error"})
    );
    // Then the job, cancelled by the shutdown as QEMU's `quit` cancels it.
    let events = c.events_until("BLOCK_JOB_CANCELLED");
    let cancelled = events.last().cloned().unwrap_or_default();
    assert_eq!(cancelled["data"]["device"], "disk0", "{cancelled}");
    assert_eq!(cancelled["data"]["type"], "mirror", "{cancelled}");
    assert!(cancelled["data"].get("error").is_none(), "{cancelled}");
    let statuses: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
        .filter_map(|e| e["data"]["status"].as_str())
        .collect();
    assert_eq!(statuses.last(), Some(&"aborting"), "{events:?}");

    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", vm.stderr_text());
    let stderr = vm.stderr_text();
    assert!(
        stderr.contains(&format!(
            "vmm-proc (pid {vmm}) was killed by signal 9 (SIGKILL)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        tree.iter().all(|p| !alive(*p)),
        "processes left behind: {tree:?}"
    );
    // Both images were closed consistently: no leaks, no corruption, no dirty flag.
    for image in [img.display().to_string(), target] {
        run(Command::new("qemu-img").args(["check", "-q", &image]));
    }
}
