//! The `qcow2_write` fuzz target: see [`fuzz::qcow2_write`]. Under `cargo fuzz` it is a
//! libFuzzer target; otherwise a program that replays the files or directories it is given.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::qcow2_write::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fuzz::replay_main("qcow2_write", fuzz::qcow2_write::run)
}
