//! The `nbd_server` fuzz target: see [`fuzz::nbd_server`]. Under `cargo fuzz` it is a libFuzzer
//! target; otherwise a program that replays the files or directories it is given.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::nbd_server::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fuzz::replay_main("nbd_server", fuzz::nbd_server::run)
}
