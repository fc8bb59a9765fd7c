//! Shared by the integration tests: the probe binary and the skip-or-fail rule.

use std::{
    io::Write,
    process::{Command, Stdio},
};

pub const PROBE: &str = env!("CARGO_BIN_EXE_jail-probe");

/// `Command` for `jail-probe MODE ARGS...` with piped stdio.
#[allow(dead_code)] // spawn.rs starts the probe with jail::spawn instead
pub fn probe(args: &[&str]) -> Command {
    let mut command = Command::new(PROBE);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Whether a test that needs `requirement` can run. If not, it says it skipped, except when
/// the `CI` environment variable is set: then a missing requirement is a failure.
pub fn can_run(met: bool, requirement: &str) -> bool {
    if !met {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but this host lacks {requirement}"
        );
        // Straight to fd 2: the test harness captures eprintln! of passing tests.
        let _ = writeln!(std::io::stderr(), "SKIPPED: this test needs {requirement}");
    }
    met
}
