#!/usr/bin/env bash
# Runs every benchmark against its QEMU equivalent; figures go to docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --locked
target/release/bench qmp --json "$@"
target/release/bench load --json
# The workload guest under splitvmm and under QEMU -M microvm (needs /dev/kvm).
target/release/bench boot --json
target/release/bench disk --json
target/release/bench mem --json
target/release/bench mirror --json
