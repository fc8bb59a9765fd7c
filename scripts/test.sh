#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit and integration test (real
# splitvmm processes, real KVM, real QEMU tools, the real qemu.qmp client).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Module docs are where each module says what it owns: their links must resolve.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo build --workspace --locked
cargo test --workspace --locked
