//! `--runas UID:GID`: the monitor, block-proc and vmm-proc become the user with no
//! capability left, the launcher keeps only what starting a jailed child needs; and a
//! sandbox that cannot be built (no privileges for namespaces) fails with a clear message
//! unless `--sandbox off`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{Splitvmm, TempDir, bin_dir, descendants, kvm_or_skip, proc_name, proc_status_field};

/// nobody:nogroup on Debian.
const USER: u32 = 65534;

fn chown(path: &Path) {
    std::os::unix::fs::chown(path, Some(USER), Some(USER)).expect("chown");
}

#[test]
fn runas_makes_every_process_the_user_and_the_launcher_keeps_six_capabilities() {
    if !kvm_or_skip("runas_makes_every_process_the_user_and_the_launcher_keeps_six_capabilities") {
        return;
    }
    let dir = TempDir::new("runas");
    chown(dir.path());
    let img = dir.join("disk.raw");
    tests::qemu_img_create("raw", &img, "1M");
    // Opened before the switch, as QEMU opens -drive files before -runas: root's file.
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mine = dir.join("user.raw");
    tests::qemu_img_create("raw", &mine, "1M");
    chown(&mine);
    let roots = dir.join("root-only.raw");
    tests::qemu_img_create("raw", &roots, "1M");
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let drive = format!("id=disk0,file={},format=raw", img.display());
    let runas = format!("{USER}:{USER}");
    let mut vm = Splitvmm::start_in(
        dir,
        &[
            "--runas",
            &runas,
            "--kernel",
            "builtin:workload",
            "--append",
            "run=idle",
            "--memory",
            "64M",
            "--drive",
            &drive,
        ],
    );
    let tree: Vec<(String, i32)> = std::iter::once(vm.pid())
        .chain(descendants(vm.pid()))
        .map(|p| (proc_name(p).unwrap_or_default(), p))
        .collect();
    assert_eq!(tree.len(), 4, "{tree:?}");
    let user = format!("{USER}\t{USER}\t{USER}\t{USER}");
    let none = "0000000000000000";
    for (name, pid) in &tree[..1] {
        assert_eq!(proc_status_field(*pid, "Uid"), Some(user.clone()), "{name}");
        assert_eq!(proc_status_field(*pid, "Gid"), Some(user.clone()), "{name}");
        assert_eq!(
            proc_status_field(*pid, "Groups"),
            Some(USER.to_string()),
            "{name}"
        );
        assert_eq!(proc_status_field(*pid, "CapEff").as_deref(), Some(none));
        assert_eq!(proc_status_field(*pid, "CapPrm").as_deref(), Some(none));
        assert_eq!(proc_status_field(*pid, "Seccomp").as_deref(), Some("2"));
    }
    for name in ["block-proc", "vmm-proc"] {
        let pid = tree
            .iter()
            .find(|t| t.0 == name)
            .map(|t| t.1)
            .unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(proc_status_field(pid, "Uid"), Some(user.clone()), "{name}");
        assert_eq!(proc_status_field(pid, "Gid"), Some(user.clone()), "{name}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(
                proc_status_field(pid, set).as_deref(),
                Some(none),
                "{name} {set}"
            );
        }
        assert_eq!(proc_status_field(pid, "Seccomp").as_deref(), Some("2"));
    }
    // The launcher stays root with SYS_ADMIN, SETPCAP, SETUID, SETGID, DAC_OVERRIDE, KILL.
    let launcher = tree
        .iter()
        .find(|t| t.0 == "splitvmm" && t.1 != vm.pid())
        .map(|t| t.1)
        .expect("launcher");
    let kept = (1u64 << 21) | (1 << 8) | (1 << 7) | (1 << 6) | (1 << 1) | (1 << 5);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            proc_status_field(launcher, set),
            Some(format!("{kept:016x}")),
            "launcher {set}"
        );
    }
    assert_eq!(proc_status_field(launcher, "CapAmb").as_deref(), Some(none));

    let mut qmp = vm.raw_qmp();
    let add = |file: &Path, name: &str| {
        json!({"execute": "blockdev-add", "arguments": {
            "node-name": name, "driver": "raw",
            "file": {"driver": "file", "filename": file.display().to_string()}}})
        .to_string()
    };
    let r = qmp.cmd(&add(&mine, "mine"));
    assert_eq!(r["return"], json!({}), "{r}");
    let r = qmp.cmd(&add(&roots, "roots"));
    assert_eq!(
        r["error"]["desc"],
        format!("Could not open '{}': Permission denied", roots.display()),
        "{r}"
    );
    let r = qmp.cmd(r#"{"execute": "quit"}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", vm.stderr_text());
    assert!(!vm.qmp.exists(), "the QMP socket was not removed");
    assert!(!vm.pidfile.exists(), "the pidfile was not removed");
}

/// splitvmm started by an unprivileged user (setpriv, no capabilities).
fn unprivileged(dir: &TempDir, extra: &[&str]) -> std::process::Output {
    let qmp = format!("unix:{},server=on,wait=off", dir.join("q.sock").display());
    tests::output(
        Command::new("setpriv")
            .args([
                "--reuid",
                &USER.to_string(),
                "--regid",
                &USER.to_string(),
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(bin_dir().join("splitvmm"))
            .args(["--qmp", &qmp])
            .args(extra),
    )
}

#[test]
fn a_sandbox_that_cannot_be_built_fails_clearly_unless_sandbox_off() {
    let dir = TempDir::new("no-sandbox");
    chown(dir.path());
    let out = unprivileged(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not create namespaces (pid, ipc, uts)")
            && stderr.contains("run as root, or use `--sandbox off`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.join("q.sock").exists(), "socket left behind");

    // --sandbox off runs (and says so); `quit` over QMP ends it. The QMP client waits for
    // the socket, then quits.
    let sock = dir.join("q.sock");
    let quitter = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = tests::RawQmp::connect(&sock);
        c.negotiate();
        c.cmd(r#"{"execute": "quit"}"#)
    });
    let out = unprivileged(&dir, &["--sandbox", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = quitter.join().unwrap_or_else(|_| {
        panic!(
            "the QMP client failed (above); splitvmm exited {:?}: {stderr}",
            out.status
        )
    });
    assert_eq!(r["return"], json!({}), "{r}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("WARNING: --sandbox off"), "{stderr}");
}

#[test]
fn runas_needs_the_sandbox() {
    let out = tests::output(Command::new(bin_dir().join("splitvmm")).args([
        "--runas",
        "65534:65534",
        "--sandbox",
        "off",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--runas 65534:65534: needs the sandbox"),
        "{stderr}"
    );
}
