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

/// As PID 1 of a PID namespace (block-proc's and vmm-proc's place), a process ignores
/// default-action signals it sends itself; a forbidden syscall must kill it all the same.
#[test]
fn forbidden_syscall_kills_pid_1_of_a_pid_namespace() {
    if !common::can_run(
        nix::unistd::geteuid().is_root(),
        "root (to create namespaces)",
    ) {
        return;
    }
    let (mut err_read, err_write) = std::io::pipe().expect("pipe");
    let spec = jail::SpawnSpec {
        exe: common::PROBE.into(),
        args: vec!["socket".into()],
        env: Vec::new(),
        fds: vec![(std::os::fd::OwnedFd::from(err_write), 2)],
        namespaces: jail::Namespaces {
            pid: true,
            ..Default::default()
        },
        death_signal: nix::sys::signal::Signal::SIGKILL,
    };
    let child = jail::spawn(spec).expect("spawn");
    let status = nix::sys::wait::waitpid(child.pid, None).expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut err_read, &mut stderr).expect("stderr");
    assert!(
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
        ),
        "{status:?}, stderr: {stderr}"
    );
    assert!(
        stderr.contains("jail-probe: seccomp: forbidden syscall 41\n"),
        "stderr: {stderr}"
    );
}
