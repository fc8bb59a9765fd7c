//! Builds the freestanding workload guest (`workload/main.rs`) into `$OUT_DIR/workload.elf`.
//!
//! Only the host target exists on these machines (no `x86_64-unknown-none`, no rust-src),
//! so the guest is a `#![no_std]` program for `x86_64-unknown-linux-gnu`, linked with
//! `-nostartfiles -nostdlib -static` and its own linker script. `rustc` is called directly
//! (not through a `[[bin]]` target) so `cargo test` never builds it as a test binary.
//! Under `cargo clippy`, the call goes through clippy-driver, so the guest's own sources
//! get the same lints as the rest of the workspace.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let main_rs = manifest.join("workload/main.rs");
    let script = manifest.join("workload/link.ld");
    let elf = out.join("workload.elf");
    let deps = out.join("workload.d");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // clippy-driver (cargo clippy) is a rustc that also lints; it takes rustc as its
    // first argument, as cargo passes it.
    let mut cmd = match env::var_os("RUSTC_WORKSPACE_WRAPPER").filter(|w| !w.is_empty()) {
        Some(wrapper) => {
            let mut c = Command::new(wrapper);
            c.arg(&rustc);
            c
        }
        None => Command::new(&rustc),
    };
    cmd.args([
        "--edition=2024",
        "--crate-type=bin",
        "--crate-name=workload",
        "--target=x86_64-unknown-linux-gnu",
        "-Cpanic=abort",
        "-Crelocation-model=static",
        "-Crelro-level=off",
        "-Copt-level=2",
        "-Ccodegen-units=1",
        "-Cdebuginfo=0",
        "-Cstrip=debuginfo",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-Wl,--build-id=none",
        "-Dwarnings",
    ])
    .arg(format!("-Clink-arg=-T{}", script.display()))
    .arg(format!(
        "--emit=link={},dep-info={}",
        elf.display(),
        deps.display()
    ))
    .arg(&main_rs)
    // Keep cargo's view of the build out of this compilation (it is not a cargo crate).
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_PRIMARY_PACKAGE");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !output.status.success() {
        panic!(
            "building the workload guest failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Warnings fail the build above; anything else rustc said is still worth seeing.
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo::warning=workload: {line}");
    }

    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={}", script.display());
    for src in dep_sources(&deps) {
        println!("cargo::rerun-if-changed={}", src.display());
    }
    // Linting (clippy) or not changes what the compilation checks.
    println!("cargo::rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    println!("cargo::rerun-if-env-changed=CLIPPY_ARGS");
}

/// Every source file rustc read, from its dep-info (`target: dep dep ...` lines).
fn dep_sources(deps: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(deps)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", deps.display()));
    let mut sources = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(": ") else {
            continue;
        };
        for dep in rest.split_whitespace() {
            let p = PathBuf::from(dep);
            if p.extension().is_some_and(|e| e == "rs") && !sources.contains(&p) {
                sources.push(p);
            }
        }
    }
    assert!(
        !sources.is_empty(),
        "{} names no sources; rerun-if-changed would miss edits",
        deps.display()
    );
    sources
}
