//! The `qmp_input` fuzz target: see [`fuzz::qmp_input`]. Under `cargo fuzz` it is a libFuzzer
//! target; otherwise a program that replays the files or directories it is given.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::qmp_input::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fuzz::replay_main("qmp_input", fuzz::qmp_input::run)
}
