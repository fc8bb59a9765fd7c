#!/usr/bin/env bash
# Runs every benchmark against its QEMU equivalent; figures go to docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --locked
bench=${CARGO_TARGET_DIR:-target}/release/bench
"$bench" qmp --json "$@"
"$bench" load --json
# The workload guest under splitvmm and under QEMU -M microvm (needs /dev/kvm).
"$bench" boot --json
"$bench" disk --json
"$bench" mem --json
"$bench" mirror --json
