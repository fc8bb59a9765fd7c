//! The command line: every option documented, every bad value refused with a message that
//! names the option and the value, and exit status 1.

use std::process::Command;

use tests::bin_dir;

fn splitvmm(args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("splitvmm"))
        .args(args)
        .output()
        .expect("run splitvmm")
}

#[test]
fn help_documents_every_option() {
    let out = splitvmm(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--name",
        "--memory",
        "--cpus",
        "--kernel",
        "--initrd",
        "--append",
        "--drive",
        "--qmp",
        "--serial",
        "--incoming",
        "--paused",
        "--image-dir",
        "--sandbox",
        "--runas",
        "--pidfile",
        "Examples:",
    ] {
        assert!(help.contains(opt), "--help does not mention {opt}:\n{help}");
    }
}

#[test]
fn bad_values_exit_1_naming_option_and_value() {
    for (args, needles) in [
        (&["--memory", "lots"][..], &["--memory", "lots"][..]),
        (&["--cpus", "300"][..], &["--cpus", "300"][..]),
        (
            &["--drive", "id=d0,file=/tmp/x.img"][..],
            &["--drive", "format= is required"][..],
        ),
        (
            &["--drive", "id=d0,file=/tmp/x.img,format=raw,cache=none"][..],
            &["--drive", "cache"][..],
        ),
        (
            &["--qmp", "unix:/tmp/q.sock"][..],
            &["--qmp", "unix:/tmp/q.sock"][..],
        ),
        (&["--sandbox", "perhaps"][..], &["--sandbox", "perhaps"][..]),
        (&["--serial", "tty"][..], &["--serial", "tty"][..]),
        (&["--runas", "root"][..], &["--runas", "root"][..]),
        (
            &["--kernel", "builtin:missing"][..],
            &["--kernel", "builtin:missing"][..],
        ),
        (&["--no-such-option"][..], &["--no-such-option"][..]),
    ] {
        let out = splitvmm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} must exit 1: {err}");
        for n in needles {
            assert!(
                err.contains(n),
                "{args:?}: the message does not name {n:?}: {err}"
            );
        }
    }
}

#[test]
fn a_drive_that_cannot_be_opened_is_a_clear_start_up_error() {
    let out = splitvmm(&["--drive", "id=d0,file=/nonexistent/disk.raw,format=raw"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Could not open '/nonexistent/disk.raw': No such file or directory"),
        "{err}"
    );
}
