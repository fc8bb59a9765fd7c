#!/usr/bin/env bash
# The main job on the embedded default: builds splitvmm, makes a demo disk and starts
# splitvmm with it and a QMP socket, then says how to connect. Ctrl-C (or QMP `quit`) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked
demo=${DEMO_DIR:-$PWD/demo}
mkdir -p "$demo"
[ -f "$demo/disk0.qcow2" ] || qemu-img create -q -f qcow2 "$demo/disk0.qcow2" 1G
rm -f "$demo/qmp.sock"
cat <<MSG
splitvmm is starting in storage-daemon mode with $demo/disk0.qcow2.
Connect with the reference client:
    qmp-shell $demo/qmp.sock
and try:  query-block   query-status   query-commands   quit
MSG
exec target/release/splitvmm --name demo \
    --drive "id=disk0,file=$demo/disk0.qcow2,format=qcow2" \
    --qmp "unix:$demo/qmp.sock,server=on,wait=off" \
    --pidfile "$demo/splitvmm.pid"
