#!/usr/bin/env bash
# The main job: builds splitvmm, makes a qcow2 demo disk and boots the embedded workload
# guest on it with a QMP socket. The guest writes and verifies its disk for a minute
# (run=write-verify-loop; progress on the serial console, here). Meanwhile
# scripts/mirror-demo.py mirrors the disk to a new qcow2 image over QMP (drive-mirror),
# waits for BLOCK_JOB_READY and completes the job: the guest goes on, on the target. The
# run ends with the guest's last line `workload: PASS ...` (every block it wrote, before
# and after the switch, read back intact), a clean `qemu-img check` of the target, and
# exit status 0. Connect with qmp-shell meanwhile; QMP `quit` (or Ctrl-C) ends it early.
#
# DEMO_DIR (default ./demo) holds the disk, the QMP socket and the serial log;
# DEMO_SECONDS (default 60) is how long the guest's loop runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked -p monitor-proc -p block-proc -p vmm-proc
bin=${CARGO_TARGET_DIR:-target}/release
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "run.sh: splitvmm needs /dev/kvm (read and write) to boot its guest" >&2
    exit 1
fi
demo=${DEMO_DIR:-$PWD/demo}
seconds=${DEMO_SECONDS:-60}
mkdir -p "$demo"
rm -f "$demo/qmp.sock" "$demo/serial.log" "$demo/status" "$demo/disk0.qcow2" "$demo/disk0-mirror.qcow2"
qemu-img create -q -f qcow2 "$demo/disk0.qcow2" 1G
cat <<MSG
splitvmm is booting its embedded workload guest (--kernel builtin:workload) with
$demo/disk0.qcow2 as a virtio-blk disk. For ${seconds} s the guest writes random blocks of
it and reads them back, checking each; its serial console is below. Once it is writing,
the disk is mirrored to $demo/disk0-mirror.qcow2 and the guest switched to that copy
(lines starting "mirror-demo:").

From another terminal, connect with the reference client:
    qmp-shell $demo/qmp.sock
and try:  query-status   query-block   query-blockstats   stop   cont   quit

MSG
set +e
# splitvmm's exit status goes through a file: $! is the pipeline's last process, tee,
# which ends once splitvmm has and the whole console is in serial.log.
{
    "$bin/splitvmm" --name demo --memory 256M \
        --kernel builtin:workload --append "run=write-verify-loop seconds=$seconds" \
        --drive "id=disk0,file=$demo/disk0.qcow2,format=qcow2" \
        --image-dir "$demo" \
        --qmp "unix:$demo/qmp.sock,server=on,wait=off" \
        --serial stdio --pidfile "$demo/splitvmm.pid"
    echo $? > "$demo/status"
} | tee "$demo/serial.log" &
console=$!
python3 scripts/mirror-demo.py "$demo" &
mirror=$!
wait "$console"
status=$(cat "$demo/status" 2>/dev/null || echo 1)
wait "$mirror"
mirrored=$?
set -e
last=$(grep -a '^workload: ' "$demo/serial.log" | tail -n 1 | tr -d '\r')
case "$last" in
    "workload: PASS"*) ;;
    "workload: FAIL"*) exit 1 ;;
    *)
        echo "run.sh: splitvmm stopped (exit status $status) before the guest finished" >&2
        exit "$status"
        ;;
esac
if [ "$mirrored" -ne 0 ]; then
    echo "run.sh: the mirror did not complete" >&2
    exit 1
fi
qemu-img check -q "$demo/disk0-mirror.qcow2"
echo "run.sh: the guest passed on the mirror target; qemu-img check of $demo/disk0-mirror.qcow2: clean"
exit "$status"
