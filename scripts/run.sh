#!/usr/bin/env bash
# The main job: builds splitvmm, makes a qcow2 demo disk and boots the embedded workload
# guest on it with a QMP socket. The guest writes and verifies its disk for a minute
# (run=write-verify-loop; progress on the serial console, here), and the run ends with
# its last line `workload: PASS ...` and exit status 0. Connect with qmp-shell meanwhile;
# QMP `quit` (or Ctrl-C) ends it early.
#
# DEMO_DIR (default ./demo) holds the disk, the QMP socket and the serial log;
# DEMO_SECONDS (default 60) is how long the guest's loop runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked -p monitor-proc -p block-proc -p vmm-proc
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "run.sh: splitvmm needs /dev/kvm (read and write) to boot its guest" >&2
    exit 1
fi
demo=${DEMO_DIR:-$PWD/demo}
seconds=${DEMO_SECONDS:-60}
mkdir -p "$demo"
[ -f "$demo/disk0.qcow2" ] || qemu-img create -q -f qcow2 "$demo/disk0.qcow2" 1G
rm -f "$demo/qmp.sock"
cat <<MSG
splitvmm is booting its embedded workload guest (--kernel builtin:workload) with
$demo/disk0.qcow2 as a virtio-blk disk. For ${seconds} s the guest writes random blocks of
it and reads them back, checking each; its serial console is below.

From another terminal, connect with the reference client:
    qmp-shell $demo/qmp.sock
and try:  query-status   query-block   query-blockstats   stop   cont   quit

MSG
set +e
target/release/splitvmm --name demo --memory 256M \
    --kernel builtin:workload --append "run=write-verify-loop seconds=$seconds" \
    --drive "id=disk0,file=$demo/disk0.qcow2,format=qcow2" \
    --qmp "unix:$demo/qmp.sock,server=on,wait=off" \
    --serial stdio --pidfile "$demo/splitvmm.pid" | tee "$demo/serial.log"
status=${PIPESTATUS[0]}
set -e
last=$(grep -a '^workload: ' "$demo/serial.log" | tail -n 1 | tr -d '\r')
case "$last" in
    "workload: PASS"*) exit "$status" ;;
    "workload: FAIL"*) exit 1 ;;
    *)
        echo "run.sh: splitvmm stopped (exit status $status) before the guest finished" >&2
        exit "$status"
        ;;
esac
