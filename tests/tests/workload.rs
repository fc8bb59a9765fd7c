//! The workload guest (`--kernel builtin:workload`) on splitvmm, real KVM, sandbox on:
//! every run ends with `workload: PASS` and exit status 0 (or FAIL and 1), what it wrote is
//! checked from outside with the `guest` library's pattern and qemu-img, and it survives
//! stop/cont and system_reset in the middle of its disk I/O.

use std::process::Command;
use std::time::Duration;

use guest::{abi, written_image};
use serde_json::json;
use tests::{
    RawQmp, Splitvmm, TempDir, image_bytes, kvm_or_skip, qemu_img_create, run, wait_for_text,
};

/// One finished run of the workload guest.
struct Finished {
    code: Option<i32>,
    serial: String,
}

impl Finished {
    /// The final line, which the ABI says is the `workload:` one.
    fn last_line(&self) -> &str {
        self.serial
            .lines()
            .map(str::trim_end)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
    }

    /// Asserts PASS with exit status 0; returns the summary.
    fn passed(&self) -> &str {
        let last = self.last_line();
        assert!(
            last.starts_with(abi::PASS_PREFIX) && self.code == Some(0),
            "expected PASS and exit 0, got exit {:?}; serial:\n{}",
            self.code,
            self.serial
        );
        last[abi::PASS_PREFIX.len()..].trim()
    }

    /// Asserts FAIL with exit status 1; returns the reason.
    fn failed(&self) -> &str {
        let last = self.last_line();
        assert!(
            last.starts_with(abi::FAIL_PREFIX) && self.code == Some(1),
            "expected FAIL and exit 1, got exit {:?}; serial:\n{}",
            self.code,
            self.serial
        );
        last[abi::FAIL_PREFIX.len()..].trim()
    }
}

/// Starts splitvmm paused with the built-in workload, `append`, `cpus` and `drives`.
fn start(dir: TempDir, cpus: u8, append: &str, drives: &[String]) -> (Splitvmm, RawQmp) {
    let serial = format!("file:{}", dir.join("serial.log").display());
    let cpus = cpus.to_string();
    let mut args = vec![
        "--kernel",
        "builtin:workload",
        "--append",
        append,
        "--memory",
        "128M",
        "--cpus",
        &cpus,
        "--serial",
        &serial,
        "--paused",
    ];
    for d in drives {
        args.extend(["--drive", d.as_str()]);
    }
    let vm = Splitvmm::start_in(dir, &args);
    let qmp = vm.raw_qmp();
    (vm, qmp)
}

/// Waits for the guest to power off and splitvmm to exit.
fn finish(mut vm: Splitvmm, mut qmp: RawQmp) -> (Finished, TempDir) {
    let ev = qmp.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({ "guest": true, "reason": "guest-shutdown" })
    );
    let code = vm.wait_exit(Duration::from_secs(120)).code();
    let serial = std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default();
    let dir = std::mem::replace(&mut vm.dir, TempDir::new("moved"));
    (Finished { code, serial }, dir)
}

/// Boots once with `append` and waits for the end.
fn boot_once(dir: TempDir, cpus: u8, append: &str, drives: &[String]) -> (Finished, TempDir) {
    let (vm, mut qmp) = start(dir, cpus, append, drives);
    qmp.cont();
    finish(vm, qmp)
}

/// `qemu-img compare` of `image` (through its backing chain) against `want` written to a
/// raw file: QEMU's own reading says the image holds exactly those bytes (a shorter
/// `want` stands for zeroes up to the image's size).
fn qemu_img_compare(dir: &TempDir, want: &[u8], image: &std::path::Path, format: &str) {
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, want).expect("write the expected image");
    let out = tests::output(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", format])
            .arg(&expected)
            .arg(image),
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_then_verify(format: &str, cpus: u8) {
    let dir = TempDir::new("workload-write");
    let img = dir.join(&format!("disk0.{format}"));
    qemu_img_create(format, &img, "16M");
    let drives = [format!("id=disk0,file={},format={format}", img.display())];
    let (written, dir) = boot_once(dir, cpus, "run=write seed=7 bytes=8M gen=3", &drives);
    let summary = written.passed();
    assert!(
        summary.starts_with("write seed=7 gen=3: 8192 KiB"),
        "{summary}"
    );
    assert!(summary.contains(&format!("{cpus} vCPU(s)")), "{summary}");
    let bytes = image_bytes(&img, format, &dir);
    let want = written_image(7, 3, 8 << 20);
    assert!(bytes[..8 << 20] == want[..], "the image is not the pattern");
    assert!(bytes[8 << 20..].iter().all(|&b| b == 0), "written past 8M");
    qemu_img_compare(&dir, &want, &img, format);
    if format == "qcow2" {
        run(Command::new("qemu-img").args(["check", "-q"]).arg(&img));
    }
    let (verified, dir) = boot_once(dir, cpus, "run=verify seed=7 bytes=8M gen=3", &drives);
    assert!(
        verified
            .passed()
            .starts_with("verify seed=7 gen=3: 8192 KiB verified"),
        "{}",
        verified.serial
    );
    // verify really reads: another seed fails, and splitvmm exits 1.
    let (other, _dir) = boot_once(dir, cpus, "run=verify seed=8 bytes=8M gen=3", &drives);
    assert!(other.failed().contains("seed 7"), "{}", other.serial);
}

#[test]
fn builtin_workload_writes_the_exact_pattern_to_raw_on_one_vcpu() {
    if kvm_or_skip("builtin_workload_writes_the_exact_pattern_to_raw_on_one_vcpu") {
        write_then_verify("raw", 1);
    }
}

#[test]
fn builtin_workload_writes_the_exact_pattern_to_raw_on_two_vcpus() {
    if kvm_or_skip("builtin_workload_writes_the_exact_pattern_to_raw_on_two_vcpus") {
        write_then_verify("raw", 2);
    }
}

#[test]
fn builtin_workload_writes_the_exact_pattern_to_qcow2_on_one_vcpu() {
    if kvm_or_skip("builtin_workload_writes_the_exact_pattern_to_qcow2_on_one_vcpu") {
        write_then_verify("qcow2", 1);
    }
}

#[test]
fn builtin_workload_writes_the_exact_pattern_to_qcow2_on_two_vcpus() {
    if kvm_or_skip("builtin_workload_writes_the_exact_pattern_to_qcow2_on_two_vcpus") {
        write_then_verify("qcow2", 2);
    }
}

/// A qcow2 top over a qcow2 middle over a raw base: the guest's pattern lands in the top,
/// and what it did not write still reads from the layers below (copy-on-write through the
/// chain), checked byte for byte after `qemu-img convert` of the whole chain.
fn write_over_a_backing_chain(cpus: u8) {
    let dir = TempDir::new("workload-chain");
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_create("raw", &base, "16M");
    // Data in the base, half under the guest's range and half past it; more in the middle.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 6M 4M"])
        .arg(&base));
    tests::qemu_img_overlay(&mid, &base, "raw", None);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xc3 12M 1M"])
        .arg(&mid));
    tests::qemu_img_overlay(&top, &mid, "qcow2", None);
    let drives = [format!("id=disk0,file={},format=qcow2", top.display())];
    let (written, dir) = boot_once(dir, cpus, "run=write seed=11 bytes=8M gen=1", &drives);
    let summary = written.passed();
    assert!(summary.contains(&format!("{cpus} vCPU(s)")), "{summary}");
    let mut want = vec![0u8; 16 << 20];
    want[6 << 20..10 << 20].fill(0x5a);
    want[12 << 20..13 << 20].fill(0xc3);
    want[..8 << 20].copy_from_slice(&written_image(11, 1, 8 << 20));
    let bytes = image_bytes(&top, "qcow2", &dir);
    assert!(
        bytes == want,
        "the chain does not read as pattern over its backing data"
    );
    qemu_img_compare(&dir, &want, &top, "qcow2");
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&top));
    // The layers below were opened read-only and are untouched.
    assert!(
        image_bytes(&mid, "qcow2", &dir)[..6 << 20]
            .iter()
            .all(|&b| b == 0)
    );
    let (verified, _dir) = boot_once(dir, cpus, "run=verify seed=11 bytes=8M gen=1", &drives);
    assert!(
        verified
            .passed()
            .starts_with("verify seed=11 gen=1: 8192 KiB verified"),
        "{}",
        verified.serial
    );
}

#[test]
fn builtin_workload_writes_over_a_backing_chain_on_one_vcpu() {
    if kvm_or_skip("builtin_workload_writes_over_a_backing_chain_on_one_vcpu") {
        write_over_a_backing_chain(1);
    }
}

#[test]
fn builtin_workload_writes_over_a_backing_chain_on_two_vcpus() {
    if kvm_or_skip("builtin_workload_writes_over_a_backing_chain_on_two_vcpus") {
        write_over_a_backing_chain(2);
    }
}

#[test]
fn builtin_workload_default_loop_passes_with_two_disks() {
    if !kvm_or_skip("builtin_workload_default_loop_passes_with_two_disks") {
        return;
    }
    let dir = TempDir::new("workload-loop");
    let a = dir.join("a.raw");
    let b = dir.join("b.qcow2");
    qemu_img_create("raw", &a, "8M");
    qemu_img_create("qcow2", &b, "8M");
    let drives = [
        format!("id=a,file={},format=raw", a.display()),
        format!("id=b,file={},format=qcow2", b.display()),
    ];
    let (done, _dir) = boot_once(dir, 2, "run=write-verify-loop seconds=2", &drives);
    let summary = done.passed();
    assert!(summary.contains("2 disk(s), 2 vCPU(s)"), "{summary}");
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&b));
}

/// stop in the middle of the write-verify loop, wait, cont: the guest still verifies
/// everything it wrote; system_reset restarts it, and the rerun passes too.
#[test]
fn builtin_workload_survives_stop_cont_and_system_reset_mid_run() {
    if !kvm_or_skip("builtin_workload_survives_stop_cont_and_system_reset_mid_run") {
        return;
    }
    let dir = TempDir::new("workload-stop");
    let img = dir.join("disk0.qcow2");
    qemu_img_create("qcow2", &img, "16M");
    let drives = [format!("id=disk0,file={},format=qcow2", img.display())];
    let (vm, mut qmp) = start(dir, 2, "run=write-verify-loop seconds=5", &drives);
    let log = vm.dir.join("serial.log");
    qmp.cont();
    // Wait until the loop reports its first second: disk I/O is under way.
    wait_for_text(&log, Duration::from_secs(60), |t| {
        t.contains("write-verify-loop: 1.")
    });
    qmp.ok("stop", json!({}));
    qmp.event("STOP");
    let stats = qmp.ok("query-blockstats", json!({}));
    let writes = stats[0]["stats"]["wr_operations"].as_u64().unwrap_or(0);
    assert!(writes > 0, "{stats}");
    std::thread::sleep(Duration::from_millis(500));
    let still = qmp.ok("query-blockstats", json!({}));
    assert_eq!(
        still[0]["stats"]["wr_operations"].as_u64(),
        Some(writes),
        "I/O while paused"
    );
    qmp.cont();
    qmp.ok("system_reset", json!({}));
    qmp.event("RESET");
    let (done, _dir) = finish(vm, qmp);
    done.passed();
    assert_eq!(
        done.serial.matches("workload: 2 vCPU(s)").count(),
        2,
        "the guest did not start over:\n{}",
        done.serial
    );
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&img));
}
