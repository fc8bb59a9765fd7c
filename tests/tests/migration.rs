//! Live migration between two splitvmm instances on this machine (real KVM, sandbox on):
//! the workload guest keeps running on the destination and ends with PASS; cancel,
//! a destination that dies and a corrupted stream leave the source running.

use std::time::Duration;

use guest::abi;
use serde_json::{Value, json};
use tests::{RawQmp, Splitvmm, TempDir, kvm_or_skip, wait_for_text};

/// One guest: its splitvmm, QMP connection and serial log.
struct Vm {
    vm: Splitvmm,
    qmp: RawQmp,
}

impl Vm {
    /// The workload guest with `append` on `cpus` vCPUs and `memory`, plus `extra` args.
    fn start(tag: &str, append: &str, memory: &str, cpus: u8, extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let serial = format!("file:{}", dir.join("serial.log").display());
        let cpus = cpus.to_string();
        let mut args = vec![
            "--kernel",
            "builtin:workload",
            "--append",
            append,
            "--memory",
            memory,
            "--cpus",
            &cpus,
            "--serial",
            &serial,
        ];
        args.extend_from_slice(extra);
        let vm = Splitvmm::start_in(dir, &args);
        let mut qmp = vm.raw_qmp();
        qmp.ok(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "events", "state": true }] }),
        );
        Self { vm, qmp }
    }

    fn serial(&self) -> std::path::PathBuf {
        self.vm.dir.join("serial.log")
    }

    fn status(&mut self) -> String {
        self.qmp.ok("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits for `MIGRATION` with `status`, failing on a final status that is not it.
    fn migration_event(&mut self, status: &str) {
        loop {
            let ev = self.qmp.event("MIGRATION");
            let got = ev["data"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if got == status {
                return;
            }
            assert!(
                !matches!(got.as_str(), "completed" | "failed" | "cancelled"),
                "expected migration status {status}, got {got}: {}",
                self.vm.stderr_text()
            );
        }
    }

    /// Waits for the guest to power off; returns splitvmm's exit code and the last line.
    fn finish(mut self) -> (Option<i32>, String) {
        self.qmp.event("SHUTDOWN");
        let code = self.vm.wait_exit(Duration::from_secs(120)).code();
        let serial = std::fs::read_to_string(self.serial()).unwrap_or_default();
        let last = serial
            .lines()
            .map(str::trim_end)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        (code, last)
    }
}

/// A destination for a source started with `append`, `memory` and `cpus`, waiting on a
/// unix socket in its directory.
fn destination(append: &str, memory: &str, cpus: u8, extra: &[&str]) -> (Vm, String) {
    let dir = TempDir::new("mig-dst-sock");
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut args = vec!["--incoming", uri.as_str()];
    args.extend_from_slice(extra);
    let mut dst = Vm::start("mig-dst", append, memory, cpus, &args);
    assert_eq!(dst.status(), "inmigrate");
    // The socket directory must outlive the test's use of it.
    std::mem::forget(dir);
    (dst, uri)
}

fn query_migrate(qmp: &mut RawQmp) -> Value {
    qmp.ok("query-migrate", json!({}))
}

/// Migrates `src` to `uri` with unlimited bandwidth and waits for completion; returns
/// the final `query-migrate`.
fn migrate(src: &mut Vm, uri: &str) -> Value {
    src.qmp.ok(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 0, "downtime-limit": 300 }),
    );
    src.qmp.ok("migrate", json!({ "uri": uri }));
    src.migration_event("completed");
    query_migrate(&mut src.qmp)
}

fn run_to_pass_after_migration(append: &str, cpus: u8, settle: &str) {
    let mut src = Vm::start("mig-src", append, "128M", cpus, &[]);
    let (dst, uri) = destination(append, "128M", cpus, &[]);
    wait_for_text(&src.serial(), Duration::from_secs(60), |t| {
        t.contains(settle)
    });
    // Let the program get going.
    std::thread::sleep(Duration::from_millis(500));
    let info = migrate(&mut src, &uri);
    assert_eq!(info["status"], "completed", "{info}");
    for key in ["total-time", "downtime", "setup-time"] {
        assert!(info[key].is_u64(), "{key} missing: {info}");
    }
    let ram = &info["ram"];
    assert_eq!(ram["total"], 128u64 << 20, "{info}");
    assert!(
        ram["duplicate"].as_u64() > Some(0),
        "zero pages as such: {info}"
    );
    assert!(ram["normal"].as_u64() > Some(0), "{info}");
    assert!(ram["dirty-sync-count"].as_u64() >= Some(1), "{info}");
    assert_eq!(src.status(), "postmigrate");
    let (code, last) = dst.finish();
    assert!(
        last.starts_with(abi::PASS_PREFIX) && code == Some(0),
        "destination: exit {code:?}, last line {last:?}"
    );
}

#[test]
fn an_idle_guest_migrates_and_finishes_on_the_destination() {
    if !kvm_or_skip("an_idle_guest_migrates_and_finishes_on_the_destination") {
        return;
    }
    run_to_pass_after_migration("run=idle seconds=4", 1, "idle");
}

#[test]
fn a_dirtying_guest_migrates_and_its_pages_check_out_on_the_destination() {
    if !kvm_or_skip("a_dirtying_guest_migrates_and_its_pages_check_out_on_the_destination") {
        return;
    }
    // 64 MiB/s over 125 MiB: every page is rewritten (and its stamp checked) about every
    // 2 s, before and after the switch-over.
    run_to_pass_after_migration("run=dirty rate=64M seconds=8", 2, "free");
}
