//! PDEATHSIG: a spawned child dies when the process that spawned it dies, also as PID 1 of a
//! new PID namespace (where only SIGKILL gets through).

mod common;

use std::io::{BufRead, BufReader};

use nix::{
    sys::{
        prctl,
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::{Pid, geteuid},
};

fn child_dies_with_parent(args: &[&str]) {
    let mut parent = common::probe(args).spawn().expect("run jail-probe");
    let mut line = String::new();
    BufReader::new(parent.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read the grandchild's pid");
    let grandchild = Pid::from_raw(line.trim().parse().expect("a pid"));
    parent.kill().expect("kill the parent");
    // Once the parent is reaped, its orphan has been reparented to us (the subreaper).
    parent.wait().expect("reap the parent");
    // Without PDEATHSIG the grandchild would sleep 60 s and then exit 0.
    let status = waitpid(grandchild, None).expect("wait for the grandchild");
    assert_eq!(
        status,
        WaitStatus::Signaled(grandchild, Signal::SIGKILL, false)
    );
}

#[test]
fn spawned_child_dies_with_its_parent() {
    prctl::set_child_subreaper(true).expect("become a subreaper");
    child_dies_with_parent(&["spawn-sleeper"]);
    if common::can_run(geteuid().is_root(), "root (for a PID namespace)") {
        child_dies_with_parent(&["spawn-sleeper", "pidns"]);
    }
}
