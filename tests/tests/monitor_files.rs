//! The monitor's file access (issue 7): Landlock lets it create unix sockets anywhere and
//! publish its pidfile, and nothing else; the running monitor still binds sockets where a
//! client asks, and never removes a file that is not a socket.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use tests::{Splitvmm, TempDir, bin_dir, run};

/// The monitor's real rules (`monitor_proc::sandbox::restrict_paths`), applied alone in a
/// probe process: every kind of access is tried and must give what the rules say.
#[test]
fn landlock_lets_the_monitor_make_sockets_and_publish_its_pidfile_only() {
    let dir = TempDir::new("monitor-files");
    let piddir = TempDir::new("monitor-piddir");
    std::fs::write(dir.join("secret"), "keep me").expect("write a file");
    let pidfile = piddir.join("splitvmm.pid");
    let stdout = run(Command::new(bin_dir().join("seccomp-probe"))
        .args(["splitvmm-paths"])
        .arg(dir.path())
        .arg(&pidfile));
    assert!(stdout.contains("landlock: FullyEnforced"), "{stdout}");
    let denied = libc::EACCES.to_string();
    for (what, want) in [
        ("read", denied.as_str()),
        ("write", &denied),
        ("create", &denied),
        ("mkdir", &denied),
        ("list", &denied),
        ("rename", &denied),
        ("hardlink", &denied),
        ("symlink", &denied),
        ("read /etc/passwd", &denied),
        ("bind", "ok"),
        ("remove socket", "ok"),
        ("publish pidfile", "ok"),
        // Landlock answers a cross-directory rename it does not allow with EXDEV.
        (
            "rename into the pidfile's directory",
            &libc::EXDEV.to_string(),
        ),
        ("remove pidfile", "ok"),
    ] {
        let line = format!("{what}: {want}");
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("secret")).expect("the file is still there"),
        "keep me"
    );
    for name in ["new", "sub", "moved", "linked", "sym"] {
        assert!(!dir.join(name).exists(), "{name} was made");
    }
}

fn nbd_server_start(qmp: &mut tests::RawQmp, path: &Path) -> serde_json::Value {
    qmp.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path}}}),
    )
}

/// The real monitor, jailed: it logs its Landlock status, binds an NBD socket in a
/// directory it was never told about, removes it again, refuses (as "Address already in
/// use") to bind over a regular file instead of deleting it, and at exit removes its QMP
/// socket and its pidfile and nothing else.
#[test]
fn the_jailed_monitor_binds_sockets_anywhere_and_removes_no_file() {
    let dir = TempDir::new("monitor-jailed");
    let elsewhere = TempDir::new("monitor-elsewhere");
    let victim = elsewhere.join("victim");
    std::fs::write(&victim, "keep me").expect("write a file");
    let mut vm = Splitvmm::start_in_env(dir, &[], &[("RUST_LOG", Path::new("jail=debug"))]);
    let log = vm.stderr_text();
    assert!(
        log.lines().any(|l| l.contains("splitvmm")
            && l.contains("Landlock")
            && l.contains("FullyEnforced")),
        "no Landlock line in the monitor's log:\n{log}"
    );
    let mut qmp = vm.raw_qmp();
    let sock = elsewhere.join("nbd.sock");
    let r = nbd_server_start(&mut qmp, &sock);
    assert_eq!(r, json!({"return": {}}), "{r}");
    assert!(sock.exists(), "no socket at {}", sock.display());
    qmp.ok("nbd-server-stop", json!({}));
    assert!(!sock.exists(), "the socket was not removed");

    let r = nbd_server_start(&mut qmp, &victim);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        r["error"]["desc"],
        format!(
            "Failed to bind socket to {}: Address already in use",
            victim.display()
        ),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("the file is still there"),
        "keep me"
    );

    qmp.ok("quit", json!({}));
    let status = vm.wait_exit(std::time::Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", vm.stderr_text());
    assert!(!vm.pidfile.exists(), "the pidfile is left");
    assert!(!vm.qmp.exists(), "the QMP socket is left");
    assert!(victim.exists());
}
