#!/bin/sh
# Regenerates the qcow2_open seed corpus with qemu-img and qemu-io: tiny images (512-byte
# clusters, so each is a few KiB) covering v2 and v3 headers, data, zero and compressed
# clusters, a backing file (base.raw, which the target provides), a self-referencing
# backing file, an external data file and 1-bit lazy refcounts.
# Usage: fuzz/make-qcow2-seeds.sh [OUTDIR]   (default: fuzz/corpus/qcow2_open)
set -eu
out=$(realpath "${1:-$(dirname "$0")/corpus/qcow2_open}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The target's base.raw is 64 KiB; any raw file serves to create the images.
head -c 65536 /dev/zero > base.raw
img() { qemu-img create -q -f qcow2 "$@"; }
io() { f=$1; shift; for c in "$@"; do set -- "$@" -c "$c"; shift; done; qemu-io -f qcow2 "$@" "$f" >/dev/null; }

img -o cluster_size=512,compat=0.10 v2-empty.qcow2 64K
img -o cluster_size=512,compat=0.10 -b base.raw -F raw v2-backing.qcow2 64K
img -o cluster_size=512 v3-data.qcow2 64K
io v3-data.qcow2 "write -P 0xab 0 1k" "write -z 4k 1k" "write -P 0x11 60k 512"
img -o cluster_size=512 -b base.raw -F raw v3-backing.qcow2 64K
io v3-backing.qcow2 "write -P 0xcd 1k 512" "write -z 8k 512"
img -o cluster_size=512,lazy_refcounts=on,refcount_bits=1 v3-lazy.qcow2 32K
io v3-lazy.qcow2 "write -P 0x77 512 512"
# The target names its image img.qcow2: this one is its own backing file.
img -o cluster_size=512 -u -b img.qcow2 -F qcow2 v3-selfloop.qcow2 64K
img -o cluster_size=512,data_file=base.raw,data_file_raw=on v3-datafile.qcow2 64K
io v3-datafile.qcow2 "write -P 0x42 0 512"
{ head -c 1024 /dev/zero | tr '\0' a; seq 1 400 | head -c 1024; } > data.raw
qemu-img convert -c -f raw -O qcow2 -o cluster_size=512 data.raw v3-compressed.qcow2

cp ./*.qcow2 "$out"/
ls -l "$out"
