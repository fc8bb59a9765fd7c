#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every unit and integration test (real
# splitvmm processes, real KVM, real QEMU tools, the real qemu.qmp client).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo test --workspace --locked
