//! The `migration_stream` fuzz target: see [`fuzz::migration_stream`]. Under `cargo fuzz` it
//! is a libFuzzer target; otherwise a program that replays the files or directories it is
//! given.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::migration_stream::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fuzz::replay_main("migration_stream", fuzz::migration_stream::run)
}
