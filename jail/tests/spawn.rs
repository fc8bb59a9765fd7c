//! `spawn` with every namespace and an empty root: the child is PID 1, sees only `lo`, gets
//! exactly its fds at their target numbers, and finds `/` empty after `enter`.

mod common;

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use jail::{Namespaces, SpawnSpec};
use nix::{
    sys::{
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::geteuid,
};

/// A pipe holding `content` (write end closed), its read end moved to fd number `at`.
fn pipe_with(content: &str, at: RawFd) -> OwnedFd {
    let (reader, mut writer) = io::pipe().expect("pipe");
    writer.write_all(content.as_bytes()).expect("fill the pipe");
    // SAFETY: dup3 onto a number this test reserves for itself; the result is a new fd that
    // only the returned OwnedFd owns.
    let fd = unsafe { libc::dup3(reader.as_raw_fd(), at, libc::O_CLOEXEC) };
    assert_eq!(fd, at, "dup3: {}", io::Error::last_os_error());
    // SAFETY: see above.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn child_in_new_namespaces_gets_its_fds_and_an_empty_root() {
    if !common::can_run(geteuid().is_root(), "root (to create namespaces)") {
        return;
    }
    let (mut output, writer) = io::pipe().expect("pipe");
    let writer = OwnedFd::from(writer);
    // The sources sit at 200 and 201 and swap places: each one's number is the other's target.
    let a = pipe_with("A", 200);
    let b = pipe_with("B", 201);
    let child = jail::spawn(SpawnSpec {
        exe: common::PROBE.into(),
        args: vec!["ns-report".into()],
        env: vec![("JAIL_TEST".into(), "passed".into())],
        fds: vec![
            (File::open("/dev/null").expect("open /dev/null").into(), 0),
            (writer.try_clone().expect("dup"), 1),
            (writer, 2),
            (a, 201),
            (b, 200),
        ],
        namespaces: Namespaces {
            pid: true,
            mount: true,
            net: true,
            ipc: true,
            uts: true,
        },
        death_signal: Signal::SIGKILL,
    })
    .expect("spawn into new namespaces");
    let mut report = String::new();
    output
        .read_to_string(&mut report)
        .expect("read the child's output");
    assert_eq!(
        waitpid(child.pid, None).expect("waitpid"),
        WaitStatus::Exited(child.pid, 0),
        "{report}"
    );
    for expected in [
        "pid=1 ",
        "fds=[0, 1, 2, 200, 201] ",
        "ifaces=[\"lo\"] ",
        "fd200=B fd201=A ",
        "env=passed ",
        "root_entries=0\n",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in {report:?}"
        );
    }
}

#[test]
fn failed_exec_is_reported_and_bad_specs_are_refused() {
    let spec = |exe: &str, fds: Vec<(OwnedFd, RawFd)>| SpawnSpec {
        exe: exe.into(),
        args: Vec::new(),
        env: Vec::new(),
        fds,
        namespaces: Namespaces::default(),
        death_signal: Signal::SIGKILL,
    };
    let missing =
        jail::spawn(spec("/nonexistent/jail-probe", Vec::new())).expect_err("no such file");
    assert!(
        missing.to_string().contains("execve: No such file"),
        "{missing}"
    );
    let null = || OwnedFd::from(File::open("/dev/null").expect("open /dev/null"));
    let twice = jail::spawn(spec(common::PROBE, vec![(null(), 3), (null(), 3)]))
        .expect_err("duplicate target");
    assert!(twice.to_string().contains("distinct"), "{twice}");
}
