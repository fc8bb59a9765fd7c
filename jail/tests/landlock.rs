//! Landlock: a jailed process writes under its read-write directory and nowhere else.

mod common;

use std::{fs, path::PathBuf};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("jail-landlock-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

#[test]
fn writes_only_inside_the_allowed_directory() {
    let (inside, outside) = (scratch_dir("inside"), scratch_dir("outside"));
    let output = common::probe(&[
        "landlock",
        inside.to_str().expect("utf-8"),
        outside.to_str().expect("utf-8"),
    ])
    .output()
    .expect("run jail-probe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    if common::can_run(!stdout.contains("NotEnforced"), "a kernel with Landlock") {
        assert!(stdout.contains("inside=ok "), "{stdout}");
        assert!(
            stdout.contains(&format!("outside={}\n", libc::EACCES)),
            "{stdout}"
        );
        assert_eq!(
            fs::read_to_string(inside.join("probe.txt")).expect("file written inside"),
            "x"
        );
        assert!(!outside.join("probe.txt").exists());
    }
    for dir in [inside, outside] {
        fs::remove_dir_all(dir).expect("remove a scratch directory");
    }
}
