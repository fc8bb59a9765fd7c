//! The seccomp filter is on and kills: a forbidden syscall dies by SIGSYS with a log line, and
//! `/proc/PID/status` shows mode 2 while the process runs jailed.

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
};

use nix::unistd::{Pid, geteuid};

#[test]
fn forbidden_socket_dies_by_sigsys_and_is_logged() {
    let output = common::probe(&["socket"]).output().expect("run jail-probe");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "{:?}, stderr: {stderr}",
        output.status
    );
    assert!(
        stderr.contains("jail-probe: seccomp: forbidden syscall 41\n"),
        "stderr: {stderr}"
    );
}

#[test]
fn jailed_process_shows_seccomp_mode_2_and_keeps_threads() {
    let mut child = common::probe(&["idle"]).spawn().expect("run jail-probe");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the probe's stdout");
    // "ready" comes after enter() and after a thread was started under the filter.
    assert_eq!(line, "ready\n", "the probe did not get ready");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    assert_eq!(jail::seccomp_mode(pid).expect("read /proc/PID/status"), 2);
    if common::can_run(geteuid().is_root(), "root (to check dropped capabilities)") {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert!(
                status.contains(&format!("{set}:\t0000000000000000\n")),
                "{set} not empty: {status}"
            );
        }
    }
    drop(child.stdin.take());
    let status = child.wait().expect("wait for the probe");
    assert!(status.success(), "{status:?}");
}
