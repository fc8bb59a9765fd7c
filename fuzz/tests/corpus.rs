//! The fuzz targets' smoke test: every checked-in corpus file runs through its target
//! without a finding, and the seeds do what they are there for (reach the code the target
//! is about, rather than failing at its door). Cheap: a few dozen inputs, no libFuzzer.
//!
//! `FUZZ_WRITE_SEEDS=1 cargo test -p fuzz --test corpus` rewrites the generated seeds
//! ([`fuzz::seeds`]) into `fuzz/corpus/`, e.g. after a change to the IPC messages.

use std::path::{Path, PathBuf};

use block_proc::nbd::proto::{EPERM, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use fuzz::seeds::Seed;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let files = fuzz::inputs(&corpus(target)).expect("corpus directory");
    assert!(!files.is_empty(), "no corpus for {target}");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let data = std::fs::read(&p).expect("read");
            (name, data)
        })
        .collect()
}

/// Writes the generated seeds when asked to; otherwise checks they are all checked in.
fn sync_seeds(target: &str, seeds: &[Seed]) {
    let dir = corpus(target);
    for (name, data) in seeds {
        let path = dir.join(name);
        if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
            std::fs::write(&path, data).expect("write seed");
        } else {
            assert!(
                path.is_file(),
                "{} is missing: run FUZZ_WRITE_SEEDS=1 cargo test -p fuzz --test corpus",
                path.display()
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn qmp_input_corpus() {
    for (name, data) in files("qmp_input") {
        let outcomes = fuzz::qmp_input::checked(&data);
        assert!(!outcomes.is_empty(), "{name}: no message");
        if name.starts_with("ok-") {
            for o in &outcomes {
                assert!(o.is_ok(), "{name}: {o:?}");
            }
        } else {
            assert!(outcomes.iter().any(Result::is_err), "{name}: no error");
        }
    }
}

#[test]
fn ipc_decode_corpus() {
    let seeds = fuzz::seeds::ipc_decode();
    for (name, data) in &seeds {
        assert!(
            fuzz::ipc_decode::decoded(data),
            "seed {name} does not decode"
        );
    }
    sync_seeds("ipc_decode", &seeds);
    for (name, data) in files("ipc_decode") {
        assert!(fuzz::ipc_decode::decoded(&data), "{name} does not decode");
    }
}

#[test]
fn nbd_server_corpus() {
    let seeds = fuzz::seeds::nbd_server();
    sync_seeds("nbd_server", &seeds);
    for (name, data) in files("nbd_server") {
        let out = fuzz::nbd_server::serve(&data);
        match name.as_str() {
            // Reached transmission: structured replies, or simple ones with the refused write.
            "go-structured" => assert!(contains(&out, &STRUCTURED_REPLY_MAGIC.to_be_bytes())),
            "export-name-ro" => {
                let mut refused = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                refused.extend_from_slice(&EPERM.to_be_bytes());
                assert!(contains(&out, &refused), "{name}: write not refused");
            }
            "info-go-view" => assert!(contains(&out, &SIMPLE_REPLY_MAGIC.to_be_bytes())),
            _ => {}
        }
    }
}

#[test]
fn qcow2_open_corpus() {
    for (name, data) in files("qcow2_open") {
        let opened = fuzz::qcow2_open::open(&data);
        match name.as_str() {
            // Findings of the fuzzer, kept: block-proc must refuse them (quickly).
            _ if name.starts_with("regress-") => {
                assert!(opened.is_err(), "{name} opened");
            }
            "v3-selfloop.qcow2" => {
                let e = opened.expect_err("a self-referencing image opens");
                assert!(e.contains("loop"), "{name}: {e}");
            }
            "v3-data.qcow2" => {
                let head = opened.expect("v3-data opens");
                assert!(
                    head[..1024].iter().all(|&b| b == 0xab),
                    "{name}: wrong data"
                );
                assert!(head[1024..].iter().all(|&b| b == 0), "{name}: wrong data");
            }
            _ => assert!(opened.is_ok(), "{name}: {opened:?}"),
        }
    }
}

#[test]
fn qcow2_write_corpus() {
    for (name, data) in files("qcow2_write") {
        let written = fuzz::qcow2_write::write(&data);
        match name.as_str() {
            _ if name.starts_with("regress-") => {
                assert!(written.is_err(), "{name} opened");
            }
            "v3-selfloop.qcow2" => {
                let e = written.expect_err("a self-referencing image opens");
                assert!(e.contains("loop"), "{name}: {e}");
            }
            // 1-bit refcounts: read-only only (`block::order`).
            "v3-lazy.qcow2" => {
                let e = written.expect_err("1-bit refcounts open read/write");
                assert!(e.contains("cannot be opened read/write"), "{name}: {e}");
            }
            _ => assert!(written.is_ok(), "{name}: {written:?}"),
        }
    }
}

#[test]
fn migration_stream_corpus() {
    let seeds = fuzz::seeds::migration_stream();
    sync_seeds("migration_stream", &seeds);
    for (name, data) in files("migration_stream") {
        fuzz::migration_stream::run(&data);
        let Some((mode, rest)) = data.split_first() else {
            continue;
        };
        let reached_end = match mode & 1 {
            1 => fuzz::migration_stream::decode(&fuzz::migration_stream::with_checksums(rest)),
            _ => fuzz::migration_stream::decode(rest),
        };
        match name.as_str() {
            "whole" | "whole-bare" => assert_eq!(reached_end, Ok(true), "{name}"),
            "head" => assert!(
                reached_end.is_err_and(|e| e.contains("truncated")),
                "{name}"
            ),
            _ => {}
        }
    }
}
