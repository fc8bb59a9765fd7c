//! The `ipc_decode` fuzz target: see [`fuzz::ipc_decode`]. Under `cargo fuzz` it is a libFuzzer
//! target; otherwise a program that replays the files or directories it is given.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::ipc_decode::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fuzz::replay_main("ipc_decode", fuzz::ipc_decode::run)
}
