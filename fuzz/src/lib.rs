//! splitvmm's fuzz targets (issue 7): the code that reads what an untrusted peer sends.
//!
//! | target | input | what it drives |
//! |---|---|---|
//! | [`qmp_input`] | bytes from a QMP client | the streaming JSON parser (whole vs. chunked), request checks, argument schema, and block-proc's decoding of the arguments the schema lets through |
//! | [`ipc_decode`] | one IPC frame | the decoder of every message type of every link; vmm-proc's guest I/O requests through block-proc's checks against an in-memory model |
//! | [`nbd_server`] | bytes from an NBD client | the NBD server's handshake and transmission phases over an in-memory pipe |
//! | [`qcow2_open`] | an image file | opening a qcow2 image read-only through block-proc's node layer (header checks, imago, backing chain), then reads and block status |
//! | [`qcow2_write`] | an image file | opening it read-write, then writes (allocating and copy-on-write), zeroing, discard, a resize and a flush; closing and opening it again |
//! | [`migration_stream`] | bytes a migration destination reads | the stream decoder (header, checksummed sections, page records, vCPU and device state) |
//!
//! Each target is a function `fn(&[u8])` here that panics on a finding. `fuzz_targets/*.rs`
//! wrap it for libFuzzer when built by `cargo fuzz` (`cfg(fuzzing)`); otherwise each
//! target is a small program that replays the files or directories it is given
//! ([`replay_main`]), and `tests/corpus.rs` replays the checked-in corpus. `fuzz/run.sh`
//! runs the targets; docs/security.md has the commands and measured rates.

pub mod device;
pub mod ipc_decode;
pub mod migration_stream;
pub mod nbd_server;
pub mod qcow2_open;
pub mod qcow2_write;
pub mod qmp_input;
pub mod seeds;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A fuzz target: panics when the input shows a bug.
pub type Target = fn(&[u8]);

/// Runs `f` on this thread's tokio runtime (current-thread, I/O and time enabled), made on
/// first use and kept: building one per input would dominate the cost of small inputs.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// Every file of `path` (itself if it is a file, else the files directly under it), sorted.
pub fn inputs(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The `main` of a target built without libFuzzer: runs `target` once on every file named
/// on the command line (directories: every file directly in them), e.g. to replay a crash
/// artifact or the corpus under a debugger. A panic aborts, like under libFuzzer.
pub fn replay_main(name: &str, target: Target) -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        eprintln!("usage: {name} FILE|DIR...  (replays inputs; `cargo fuzz run {name}` fuzzes)");
        return ExitCode::from(2);
    }
    let mut n = 0;
    for arg in &args {
        let files = match inputs(arg) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{name}: {}: {e}", arg.display());
                return ExitCode::FAILURE;
            }
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(data) => {
                    eprintln!("{name}: {}", file.display());
                    target(&data);
                    n += 1;
                }
                Err(e) => {
                    eprintln!("{name}: {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    eprintln!("{name}: {n} inputs, no finding");
    ExitCode::SUCCESS
}
