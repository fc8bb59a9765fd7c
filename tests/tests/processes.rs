//! The process tree: every process jailed with its seccomp filter, block-proc answering
//! `query-block` across the process boundary, everything torn down with nothing left
//! behind. (A dying block-proc is restarted: `recovery.rs`.)

use std::time::{Duration, Instant};

use serde_json::json;
use tests::{
    Splitvmm, TempDir, alive, descendants, kvm_or_skip, proc_name, proc_status_field,
    qemu_img_create,
};

fn start_vm() -> Splitvmm {
    let dir = TempDir::new("procs");
    let img = dir.join("disk.raw");
    qemu_img_create("raw", &img, "1M");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    Splitvmm::start_in(
        dir,
        &[
            "--kernel",
            "builtin:workload",
            "--append",
            "run=idle",
            "--memory",
            "64M",
            "--drive",
            &drive,
        ],
    )
}

/// (name, pid) of the monitor and all its descendants.
fn tree(vm: &Splitvmm) -> Vec<(String, i32)> {
    std::iter::once(vm.pid())
        .chain(descendants(vm.pid()))
        .map(|p| (proc_name(p).unwrap_or_default(), p))
        .collect()
}

fn pid_of(tree: &[(String, i32)], name: &str) -> i32 {
    tree.iter()
        .find(|(n, _)| n == name)
        .map(|t| t.1)
        .unwrap_or_else(|| panic!("no {name} in {tree:?}"))
}

#[test]
fn every_process_runs_under_its_seccomp_filter_and_namespaces() {
    if !kvm_or_skip("every_process_runs_under_its_seccomp_filter_and_namespaces") {
        return;
    }
    let vm = start_vm();
    let t = tree(&vm);
    assert_eq!(t.len(), 4, "monitor, launcher, block-proc, vmm-proc: {t:?}");
    for (name, pid) in &t {
        assert_eq!(
            proc_status_field(*pid, "Seccomp").as_deref(),
            Some("2"),
            "{name} ({pid}) is not filtered"
        );
        assert_eq!(
            proc_status_field(*pid, "NoNewPrivs").as_deref(),
            Some("1"),
            "{name} ({pid}) lacks no_new_privs"
        );
    }
    let ns = |pid: i32, kind: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns link")
    };
    let me = std::process::id() as i32;
    let (block, vmm) = (pid_of(&t, "block-proc"), pid_of(&t, "vmm-proc"));
    for kind in ["pid", "ipc", "uts"] {
        assert_ne!(
            ns(block, kind),
            ns(me, kind),
            "block-proc shares the {kind} namespace"
        );
        assert_ne!(
            ns(vmm, kind),
            ns(me, kind),
            "vmm-proc shares the {kind} namespace"
        );
    }
    assert_ne!(
        ns(vmm, "net"),
        ns(me, "net"),
        "vmm-proc shares the network namespace"
    );
    assert_ne!(
        ns(vmm, "mnt"),
        ns(me, "mnt"),
        "vmm-proc shares the mount namespace"
    );
    assert_eq!(
        ns(block, "net"),
        ns(me, "net"),
        "block-proc keeps the host network namespace"
    );
    // vmm-proc's root is empty.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .expect("vmm root")
        .collect();
    assert!(root.is_empty(), "vmm-proc sees files at its root: {root:?}");
    assert_eq!(
        proc_status_field(vmm, "NSpid").map(|s| s.split_whitespace().last().map(String::from)),
        Some(Some("1".into()))
    );
}

#[test]
fn query_block_is_answered_by_block_proc() {
    let dir = TempDir::new("boundary");
    let img = dir.join("disk.raw");
    qemu_img_create("raw", &img, "2M");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let vm = Splitvmm::start_in(dir, &["--drive", &drive]);
    let block = pid_of(&tree(&vm), "block-proc");
    let mut c = vm.raw_qmp();
    let r = c.cmd(r#"{"execute": "query-block", "id": 1}"#);
    assert_eq!(
        r["return"][0]["inserted"]["image"]["virtual-size"],
        json!(2 << 20),
        "{r}"
    );
    // Freeze block-proc: query-block waits for it, while the monitor itself still answers.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(block),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    c.send(br#"{"execute": "query-block", "id": 2}"#);
    let mut other = vm.raw_qmp();
    let r = other.cmd(r#"{"execute": "query-version", "id": 3}"#);
    assert_eq!(
        r["id"], 3,
        "the monitor must answer while block-proc is frozen"
    );
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(block),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    let r = c.reply();
    assert_eq!(r["id"], 2);
    assert_eq!(r["return"][0]["device"], "disk0", "{r}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut vm = Splitvmm::start(&[]);
    let t = tree(&vm);
    let mut c = vm.raw_qmp();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let ev = c.read();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert!(
        vm.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        vm.stderr_text()
    );
    assert!(!vm.qmp.exists() && !vm.pidfile.exists());
    std::thread::sleep(Duration::from_millis(100));
    assert!(t.iter().all(|(_, p)| !alive(*p)), "left behind: {t:?}");
}

#[test]
fn a_killed_monitor_takes_its_children_with_it() {
    if !kvm_or_skip("a_killed_monitor_takes_its_children_with_it") {
        return;
    }
    let mut vm = start_vm();
    let t = tree(&vm);
    assert_eq!(t.len(), 4, "{t:?}");
    vm.child.kill().expect("SIGKILL the monitor");
    let _ = vm.child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.iter().any(|(_, p)| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "orphans: {:?}",
            t.iter().filter(|(_, p)| alive(*p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sandbox_off_runs_unconfined_and_says_so() {
    let mut vm = Splitvmm::start(&["--sandbox", "off"]);
    let t = tree(&vm);
    assert_eq!(t.len(), 3, "monitor, launcher, block-proc: {t:?}");
    for (name, pid) in &t {
        assert_eq!(
            proc_status_field(*pid, "Seccomp").as_deref(),
            Some("0"),
            "{name} is filtered"
        );
    }
    assert!(
        vm.stderr_text().contains("WARNING: --sandbox off"),
        "{}",
        vm.stderr_text()
    );
    let mut c = vm.raw_qmp();
    assert_eq!(c.cmd(r#"{"execute": "quit"}"#)["return"], json!({}));
    assert!(vm.wait_exit(Duration::from_secs(15)).success());
}
