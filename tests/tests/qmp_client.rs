//! The foundation's QMP commands, driven by the reference client (`qemu.qmp`) against the
//! real splitvmm with its real children, in storage-daemon mode and with a guest process.

use std::time::Duration;

use serde_json::json;
use tests::{Splitvmm, TempDir, kvm_or_skip, qemu_img_create};

fn drives(dir: &TempDir) -> (Vec<String>, serde_json::Value) {
    let raw = dir.join("disk0.raw");
    let qcow = dir.join("disk1.qcow2");
    qemu_img_create("raw", &raw, "3M");
    qemu_img_create("qcow2", &qcow, "64M");
    let args = vec![
        "--drive".into(),
        format!("id=disk0,file={},format=raw", raw.display()),
        "--drive".into(),
        format!("id=disk1,file={},format=qcow2,readonly=on", qcow.display()),
    ];
    let spec = json!([
        { "id": "disk0", "file": raw.display().to_string(), "format": "raw", "virtual-size": 3 << 20, "ro": false },
        { "id": "disk1", "file": qcow.display().to_string(), "format": "qcow2", "virtual-size": 64 << 20, "ro": true },
    ]);
    (args, spec)
}

fn run_scenario(extra: &[&str], mode: &str) {
    let dir = TempDir::new("qmp-client");
    let (drive_args, spec) = drives(&dir);
    let mut args: Vec<&str> = vec!["--name", "testvm"];
    args.extend(drive_args.iter().map(String::as_str));
    args.extend(extra);
    let mut vm = Splitvmm::start_in(dir, &args);
    let out = vm.python("qmp_commands.py", &[mode, &spec.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "qemu.qmp scenario failed:\n{stdout}\n{}\nsplitvmm stderr:\n{}",
        String::from_utf8_lossy(&out.stderr),
        vm.stderr_text()
    );
    let status = vm.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "splitvmm exit after quit: {status}: {}",
        vm.stderr_text()
    );
    assert!(!vm.qmp.exists(), "the QMP socket was not removed");
    assert!(!vm.pidfile.exists(), "the pidfile was not removed");
}

#[test]
fn every_foundation_command_through_qemu_qmp_in_storage_daemon_mode() {
    run_scenario(&[], "daemon");
}

#[test]
fn every_foundation_command_through_qemu_qmp_with_a_guest_process() {
    if !kvm_or_skip("every_foundation_command_through_qemu_qmp_with_a_guest_process") {
        return;
    }
    run_scenario(
        &[
            "--kernel",
            "builtin:workload",
            "--append",
            "run=idle",
            "--memory",
            "64M",
        ],
        "vm",
    );
}
