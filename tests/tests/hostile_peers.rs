//! A compromised vmm-proc against the real block-proc and monitor, and a compromised
//! block-proc against the real monitor and vmm-proc, over the real links.
//!
//! `SPLITVMM_HELPER_DIR` points the launcher at a directory where one child is the real
//! one and the other a hostile program (tests/src/bin/hostile-vmm.rs, hostile-block.rs):
//! the launcher starts both exactly as in production (namespaces, descriptors), the real
//! processes run under their real jails, and the hostile program enters the jail of the
//! process it replaces before it attacks.
//! They answer with errors or drop the link; they never crash, and nothing outside the
//! requests' ranges changes (the guest memory's sentinel bytes, the image's bytes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tests::{
    Splitvmm, TempDir, alive, bin_dir, descendants, image_bytes, kvm_or_skip, proc_name, qemu_io,
    wait_for_text,
};

/// A helper directory named `name` inside `dir`: the real block-proc, hostile-vmm as vmm-proc.
fn helper_dir(dir: &TempDir, name: &str) -> PathBuf {
    helpers(dir, name, "block-proc", "hostile-vmm")
}

/// A helper directory named `name` inside `dir` with `block` as block-proc and `vmm` as
/// vmm-proc (file names in the build directory).
fn helpers(dir: &TempDir, name: &str, block: &str, vmm: &str) -> PathBuf {
    let helpers = dir.join(name);
    std::fs::create_dir_all(&helpers).expect("helper dir");
    for (target, slot) in [(block, "block-proc"), (vmm, "vmm-proc")] {
        std::os::unix::fs::symlink(bin_dir().join(target), helpers.join(slot))
            .expect("link a helper");
    }
    helpers
}

/// A 1 MiB raw disk full of 0x5a.
fn disk(dir: &TempDir) -> PathBuf {
    let img = dir.join("disk.raw");
    tests::qemu_img_create("raw", &img, "1M");
    qemu_io("raw", &img.display().to_string(), &["write -P 0x5a 0 1M"]);
    img
}

/// Starts splitvmm with hostile-vmm in vmm-proc's slot, playing `scenario`.
fn start(scenario: &str) -> (Splitvmm, PathBuf) {
    let dir = TempDir::new("hostile");
    let img = disk(&dir);
    let helpers = helper_dir(&dir, "helpers");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let append = format!("hostile={scenario}");
    let vm = Splitvmm::start_in_env(
        dir,
        &[
            "--kernel",
            "builtin:workload",
            "--append",
            &append,
            "--memory",
            "64M",
            "--drive",
            &drive,
        ],
        &[("SPLITVMM_HELPER_DIR", helpers.as_path())],
    );
    (vm, img)
}

/// Waits for `WHO: done` on splitvmm's stderr and returns what the hostile program `who`
/// found, one `NAME: RESULT` per line.
fn findings_of(vm: &Splitvmm, who: &str, timeout: Duration) -> Vec<String> {
    let done = format!("{who}: done");
    let prefix = format!("{who}: ");
    let text = wait_for_text(&vm.stderr, timeout, |t| t.contains(&done));
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(String::from)
        .collect()
}

/// The hostile vmm-proc's findings.
fn findings(vm: &Splitvmm) -> Vec<String> {
    findings_of(vm, "hostile-vmm", Duration::from_secs(120))
}

fn expect(findings: &[String], line: &str) {
    assert!(
        findings.iter().any(|f| f == line),
        "no {line:?} in {findings:#?}"
    );
}

fn pid_of(vm: &Splitvmm, name: &str) -> i32 {
    descendants(vm.pid())
        .into_iter()
        .find(|p| proc_name(*p).as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no {name} under splitvmm"))
}

/// block-proc still serves the monitor, and splitvmm quits cleanly; the image is unchanged.
fn block_proc_survives(mut vm: Splitvmm, img: &Path) {
    let block = pid_of(&vm, "block-proc");
    let mut qmp = vm.raw_qmp();
    let r = qmp.cmd(r#"{"execute": "query-block", "id": 1}"#);
    assert_eq!(r["return"][0]["device"], "disk0", "{r}");
    assert!(alive(block), "block-proc died: {}", vm.stderr_text());
    let r = qmp.cmd(r#"{"execute": "quit", "id": 2}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", vm.stderr_text());
    let stderr = vm.stderr_text();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("seccomp: forbidden"),
        "{stderr}"
    );
    let scratch = TempDir::new("hostile-img");
    assert!(
        image_bytes(img, "raw", &scratch).iter().all(|b| *b == 0x5a),
        "the image changed"
    );
}

#[test]
fn hostile_guest_io_gets_errors_and_touches_nothing_outside_its_ranges() {
    if !kvm_or_skip("hostile_guest_io_gets_errors_and_touches_nothing_outside_its_ranges") {
        return;
    }
    let (vm, img) = start("io");
    let f = findings(&vm);
    expect(&f, "jailed: io");
    expect(&f, "list devices: devices disk0:1048576");
    expect(
        &f,
        "unsealed memory: error: guest memory must be a memfd sealed against shrinking",
    );
    expect(
        &f,
        "memory larger than its memfd: error: guest memory is 524288 bytes, not 1048576",
    );
    expect(&f, "set memory: done");
    expect(&f, "set memory twice: error: guest memory is already set");
    for case in [
        "read past guest memory",
        "read straddling the end of guest memory",
        "read at an overflowing address",
        "write from an overflowing address",
        "read past the disk",
        "read at an overflowing sector",
        "unknown device",
        "too many segments",
        "huge segments",
        "zero-length segment",
        "discard past the disk",
        "write zeroes at an overflowing sector",
        "get id into memory past the end",
    ] {
        expect(&f, &format!("{case}: IoErr"));
    }
    expect(&f, "overlapping segments: Ok");
    expect(&f, "overlapping read data: 0x5a");
    expect(&f, "memory outside the requests untouched: true");
    expect(&f, "oversized batch: 257 of 257 IoErr");
    expect(&f, "flood: 16384 of 16384 completed Ok");
    expect(&f, "garbage frame: link closed");
    wait_for_text(&vm.stderr, Duration::from_secs(10), |t| {
        t.contains("vmm-proc link dropped: bad frame")
    });
    block_proc_survives(vm, &img);
}

#[test]
fn an_undeclared_descriptor_drops_the_link_and_block_proc_goes_on() {
    if !kvm_or_skip("an_undeclared_descriptor_drops_the_link_and_block_proc_goes_on") {
        return;
    }
    let (vm, img) = start("fds");
    let f = findings(&vm);
    expect(&f, "undeclared descriptor: link closed");
    wait_for_text(&vm.stderr, Duration::from_secs(10), |t| {
        t.contains("vmm-proc link dropped: message expects 0 file descriptors, frame carried 1")
    });
    block_proc_survives(vm, &img);
}

#[test]
fn another_protocol_version_is_refused_by_block_proc() {
    if !kvm_or_skip("another_protocol_version_is_refused_by_block_proc") {
        return;
    }
    let (vm, img) = start("block-version");
    let f = findings(&vm);
    expect(&f, "block hello of another version: link closed");
    let want = format!(
        "vmm-proc link dropped: handshake failed: peer speaks protocol version {}, this side {}",
        ipc::PROTOCOL_VERSION + 97,
        ipc::PROTOCOL_VERSION
    );
    wait_for_text(&vm.stderr, Duration::from_secs(10), |t| t.contains(&want));
    block_proc_survives(vm, &img);
}

#[test]
fn the_monitor_survives_a_hostile_vmm_proc() {
    if !kvm_or_skip("the_monitor_survives_a_hostile_vmm_proc") {
        return;
    }
    let (mut vm, img) = start("monitor");
    let mut qmp = vm.raw_qmp();
    // The attack starts once `stop` is answered: count events on both sides of the return.
    qmp.send(br#"{"execute": "stop", "id": 0}"#);
    let (mut resets, mut stopped, mut io_error) = (0, false, None);
    while !stopped || io_error.is_none() {
        let msg = qmp.read();
        match msg["event"].as_str() {
            Some("RESET") => resets += 1,
            Some("BLOCK_IO_ERROR") => io_error = Some(msg),
            None if msg["id"] == 0 && msg["return"] == json!({}) => stopped = true,
            _ => panic!("unexpected {msg}"),
        }
    }
    let io_error = io_error.unwrap_or_default();
    let f = findings(&vm);
    expect(&f, "first request: Stop");
    expect(&f, "reply to no request: Ok(())");
    expect(&f, "event flood: 2000 sent");
    expect(&f, "io error of no disk: Ok(())");
    expect(&f, "garbage frame: Ok(17)");
    // The monitor dropped the link at the garbage frame, after passing on what it could.
    wait_for_text(&vm.stderr, Duration::from_secs(10), |t| {
        t.contains("vmm-proc answered unknown request 987654")
    });
    assert_eq!(resets, 2000);
    // Passed on as data, never interpreted: one JSON line, the device name escaped.
    assert_eq!(
        io_error["data"]["device"], "no-such-disk\"\n{}",
        "{io_error}"
    );
    // The monitor answers; what needs vmm-proc fails with an error, not a hang.
    let r = qmp.cmd(r#"{"execute": "query-version", "id": 1}"#);
    assert!(r["return"]["qemu"].is_object(), "{r}");
    let r = qmp.cmd(r#"{"execute": "stop", "id": 2}"#);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(r["error"]["desc"], "vmm-proc is not running", "{r}");
    let r = qmp.cmd(r#"{"execute": "quit", "id": 3}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.code().is_some(), "{status}: {}", vm.stderr_text());
    assert!(
        !vm.stderr_text().contains("panicked"),
        "{}",
        vm.stderr_text()
    );
    drop(img);
}

#[test]
fn the_monitor_refuses_a_vmm_proc_of_another_protocol_version() {
    if !kvm_or_skip("the_monitor_refuses_a_vmm_proc_of_another_protocol_version") {
        return;
    }
    let dir = TempDir::new("hostile-version");
    let img = disk(&dir);
    let helpers = helper_dir(&dir, "monitor-version");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let out = tests::output(
        std::process::Command::new(bin_dir().join("splitvmm"))
            .env("SPLITVMM_HELPER_DIR", &helpers)
            .args(["--kernel", "builtin:workload", "--drive", &drive]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let want = format!(
        "splitvmm: vmm-proc: handshake failed: peer speaks protocol version {}, this side {}",
        ipc::PROTOCOL_VERSION + 97,
        ipc::PROTOCOL_VERSION
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Starts splitvmm with hostile-block in block-proc's slot, in a helper directory named
/// for `scenario`, with or without a guest.
fn start_hostile_block(scenario: &str, guest: bool) -> Splitvmm {
    let dir = TempDir::new("hostile-block");
    let img = disk(&dir);
    let helpers = helpers(
        &dir,
        &format!("hostile-block-{scenario}"),
        "hostile-block",
        "vmm-proc",
    );
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let mut args = vec!["--drive", drive.as_str()];
    if guest {
        args.extend([
            "--kernel",
            "builtin:workload",
            "--append",
            "run=idle",
            "--memory",
            "64M",
        ]);
    }
    Splitvmm::start_in_env(dir, &args, &[("SPLITVMM_HELPER_DIR", helpers.as_path())])
}

/// The hostile block-proc's findings.
fn block_findings(vm: &Splitvmm) -> Vec<String> {
    findings_of(vm, "hostile-block", Duration::from_secs(60))
}

#[test]
fn the_monitor_survives_a_hostile_block_proc_and_passes_on_only_block_events() {
    let mut vm = start_hostile_block("monitor", false);
    let mut qmp = vm.raw_qmp();
    // The attack answers this query-block; the events come before its reply.
    qmp.send(br#"{"execute": "query-block", "id": 1}"#);
    let mut events = Vec::new();
    let r = loop {
        let msg = qmp.read();
        if msg.get("event").is_some() {
            events.push(msg);
        } else {
            break msg;
        }
    };
    assert_eq!(r["id"], 1, "{r}");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // Of the six events, only the block event with object data reached the client.
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "BLOCK_JOB_COMPLETED", "{events:?}");
    assert_eq!(events[0]["data"]["device"], "spoofed", "{events:?}");
    let f = block_findings(&vm);
    expect(&f, "jailed: monitor");
    expect(&f, "first request: QueryBlock");
    expect(&f, "parts of no request: 500 sent");
    expect(&f, "garbage frame: Ok(16)");
    let r = qmp.cmd(r#"{"execute": "query-version", "id": 2}"#);
    assert!(r["return"]["qemu"].is_object(), "{r}");
    let stderr = wait_for_text(&vm.stderr, Duration::from_secs(10), |t| {
        t.contains(r#"block-proc sent event "bad name\n{\"x\": 1}", which is not a block event"#)
    });
    // The garbage frame after them broke the link: block-proc's commands fail, clearly.
    let r = qmp.cmd(r#"{"execute": "query-block", "id": 4}"#);
    assert_eq!(r["error"]["desc"], "block-proc is not running", "{r}");
    for dropped in [
        "block-proc sent event \"SHUTDOWN\", which is not a block event; dropped",
        "block-proc sent event \"STOP\", which is not a block event; dropped",
        "block-proc sent event BLOCK_JOB_READY with bad data",
        "block-proc sent event JOB_STATUS_CHANGE with data that is no object; dropped",
        "block-proc sent part of a reply to unknown request 1000000",
    ] {
        assert!(stderr.contains(dropped), "no {dropped:?} in {stderr}");
    }
    let r = qmp.cmd(r#"{"execute": "quit", "id": 3}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.code().is_some(), "{status}: {}", vm.stderr_text());
    assert!(
        !vm.stderr_text().contains("panicked"),
        "{}",
        vm.stderr_text()
    );
}

#[test]
fn vmm_proc_survives_a_hostile_block_proc() {
    if !kvm_or_skip("vmm_proc_survives_a_hostile_block_proc") {
        return;
    }
    let mut vm = start_hostile_block("vmm", true);
    let f = block_findings(&vm);
    expect(&f, "jailed: vmm");
    expect(&f, "completions of no request: Ok(())");
    expect(&f, "reply to no call: Ok(())");
    expect(&f, "garbage frame: Ok(16)");
    let vmm = pid_of(&vm, "vmm-proc");
    let mut qmp = vm.raw_qmp();
    // vmm-proc ignores what it never asked for and drops the data path at the garbage.
    wait_for_text(&vm.stderr, Duration::from_secs(10), |t| {
        t.contains("block-proc completed unknown request 0")
            && t.contains("block-proc answered unknown call 424242")
            && t.contains("data path from block-proc broken: bad frame")
    });
    // Without a data path the guest's disk requests cannot finish: vmm-proc keeps them and
    // stops the VM with its io-status set, waiting for a block-proc to reconnect it.
    let r = qmp.cmd(r#"{"execute": "query-status", "id": 1}"#);
    assert_eq!(r["return"]["status"], "io-error", "{r}");
    assert!(alive(vmm), "vmm-proc died: {}", vm.stderr_text());
    let r = qmp.cmd(r#"{"execute": "quit", "id": 2}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    let status = vm.wait_exit(Duration::from_secs(30));
    let stderr = vm.stderr_text();
    assert!(status.code().is_some(), "{status}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("seccomp: forbidden"),
        "{stderr}"
    );
}
