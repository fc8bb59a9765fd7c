#!/usr/bin/env bash
# Builds what the nested Linux boot test (tests/tests/nested_linux.rs) needs, from Debian's
# packages only: `apt-get download` plus `dpkg-deb -x`, no kernel installed on this host.
#
#   L1  the generic Debian 6.1 kernel (it has 9p and kvm-amd), run by the test under
#       `qemu-system-x86_64 -accel tcg -cpu max`, with an initramfs whose /init loads kvm_amd
#       and the 9p modules, mounts the host's / (read-only) and the test's work directory
#       over virtio-9p, chroots into the host's / and runs the script named after `--` on
#       the kernel command line;
#   L2  Debian's cloud kernel with an initramfs whose /init loads virtio_mmio, virtio_pci
#       and virtio_blk, writes a pattern to /dev/vda, reads it back, prints a verdict line
#       and reboots; the boot after the reboot finds the pattern on the disk, says so and
#       powers off (or, asked to, the first boot powers off at once).
#
# Idempotent and cached: the packages are downloaded once per kernel version; the
# initramfs images are rebuilt only when this script changes. Prints the assets directory
# (l1-vmlinuz, l1.cpio, l2-vmlinuz, l2-vmlinux, l2.cpio) as its last line.
#
# Cache: $SPLITVMM_NESTED_CACHE, else $XDG_CACHE_HOME/splitvmm/nested, else
# ~/.cache/splitvmm/nested.
set -euo pipefail

cache=${SPLITVMM_NESTED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitvmm/nested}
mkdir -p "$cache/debs"
log() { echo "nested-assets: $*" >&2; }
die() { log "$*"; exit 1; }
# One builder at a time (tests run in parallel, worktrees share the cache).
exec 9>"$cache/lock"
flock 9

# --- Which packages ------------------------------------------------------------------------
# The newest 6.1 version of a meta package (bookworm's kernel; backports' 6.12 is skipped),
# then the versioned image package it depends on, e.g. linux-image-6.1.0-56-amd64.
resolve_image() {
    local meta=$1 ver dep
    ver=$(apt-cache madison "$meta" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' |
        grep '^6\.1\.' | sort -V | tail -n1) || true
    [ -n "$ver" ] || return 1
    dep=$(apt-cache depends "$meta=$ver" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-6\.1[^ ]*\)$/\1/p' | head -n1)
    [ -n "$dep" ] || return 1
    echo "$dep"
}
if gen_pkg=$(resolve_image linux-image-amd64) && cloud_pkg=$(resolve_image linux-image-cloud-amd64); then
    :
elif [ -s "$cache/packages" ]; then
    log "apt-cache cannot resolve the kernel packages; using the cached ones"
    read -r gen_pkg cloud_pkg <"$cache/packages"
else
    die "apt-cache cannot resolve linux-image-amd64 / linux-image-cloud-amd64 to a 6.1 kernel (run apt-get update?)"
fi
echo "$gen_pkg $cloud_pkg" >"$cache/packages"
gen_ver=${gen_pkg#linux-image-}
cloud_ver=${cloud_pkg#linux-image-}

# --- Download and unpack -------------------------------------------------------------------
# Each package is unpacked into root/<name>; a .done marker makes a partial unpack redo.
fetch() {
    local pkg=$1 root="$cache/root/$1" deb
    [ -e "$root/.done" ] && return
    deb=$(ls "$cache/debs/${pkg}"_*.deb 2>/dev/null | head -n1) || true
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        (cd "$cache/debs" && apt-get download -q "$pkg" 2>&1 | { grep -v 'unsandboxed' || true; } >&2) ||
            (cd "$cache/debs" && apt-get update -qq && apt-get download -q "$pkg" >&2) ||
            die "apt-get download $pkg failed"
        deb=$(ls "$cache/debs/${pkg}"_*.deb | head -n1)
    fi
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$deb" "$root"
    touch "$root/.done"
}
fetch busybox-static
fetch "$gen_pkg"
fetch "$cloud_pkg"
busybox="$cache/root/busybox-static/bin/busybox"
[ -x "$busybox" ] || die "busybox-static has no bin/busybox"

# The packages carry no modules.dep (depmod runs at install time): make one with busybox.
for v in "$gen_ver" "$cloud_ver"; do
    base="$cache/root/linux-image-$v"
    [ -s "$base/lib/modules/$v/modules.dep" ] || "$busybox" depmod -b "$base" "$v"
done

# --- Initramfs images ----------------------------------------------------------------------
out="$cache/$gen_ver+$cloud_ver"
stamp=$(sha256sum "$0" | cut -d' ' -f1)
if [ -e "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    echo "$out"
    exit 0
fi

# Prints the module paths (relative to lib/modules/VER) to load for the named modules,
# dependencies first, each once.
module_order() {
    local dep_file=$1
    shift
    awk -v want="$*" '
        { sub(/:$/, "", $1); path[$1] = $0; n = split($1, p, "/"); name = p[n]
          sub(/\.ko(\.[a-z]+)?$/, "", name); gsub(/-/, "_", name); byname[name] = $1 }
        function visit(f,   fields, i, k) {
            if (f in seen) return
            seen[f] = 1
            k = split(path[f], fields, " ")
            for (i = 2; i <= k; i++) visit(fields[i])
            print f
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                m = w[i]; gsub(/-/, "_", m)
                if (!(m in byname)) { print "missing module " w[i] > "/dev/stderr"; exit 1 }
                visit(byname[m])
            }
        }' "$dep_file"
}

# make_initramfs NAME KVER INIT MODULE...: a newc cpio (uncompressed: TCG unpacks it
# fastest) with busybox, the modules and their dependencies, and INIT as /init.
make_initramfs() {
    local name=$1 ver=$2 init=$3
    shift 3
    local mods="$cache/root/linux-image-$ver/lib/modules/$ver" tree="$out/$name.tree" m
    rm -rf "$tree"
    mkdir -p "$tree/bin" "$tree/lib/modules" "$tree/dev" "$tree/proc" "$tree/sys" "$tree/tmp"
    cp "$busybox" "$tree/bin/busybox"
    module_order "$mods/modules.dep" "$@" >"$tree/lib/modules/order"
    while read -r m; do
        mkdir -p "$tree/lib/modules/$(dirname "$m")"
        case $m in
            *.ko.xz) xz -dc "$mods/$m" >"$tree/lib/modules/${m%.xz}" ;;
            *.ko.zst) zstd -qdc "$mods/$m" >"$tree/lib/modules/${m%.zst}" ;;
            *) cp "$mods/$m" "$tree/lib/modules/$m" ;;
        esac
    done <"$tree/lib/modules/order"
    sed -i 's/\.ko\.[a-z]*$/.ko/' "$tree/lib/modules/order"
    printf '%s\n' "$init" >"$tree/init"
    chmod 755 "$tree/init"
    (cd "$tree" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort |
        "$busybox" cpio -o -H newc -R 0:0 >"$out/$name.cpio.tmp" 2>/dev/null)
    mv "$out/$name.cpio.tmp" "$out/$name.cpio"
    rm -rf "$tree"
}

# Shared by both /init scripts: busybox applets, the pseudo file systems, the modules.
common_init='/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d" " -f1 /proc/uptime; }
while read -r m; do
    insmod "/lib/modules/$m" || echo "$tag: insmod $m failed"
done </lib/modules/order'

# L1: load KVM and 9p, mount the shares, chroot into the host and run the given script.
l1_init='#!/bin/busybox sh
tag=NESTED-L1'"
$common_init
"'echo "$tag: modules loaded at $(up) s"
[ -c /dev/kvm ] || echo "$tag: no /dev/kvm"
run=$1
work=${run%/*}
mkdir -p /host
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,cache=loose,ro" host /host || echo "$tag: cannot mount the host share"
mount -t devtmpfs devtmpfs /host/dev
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
# No tmpfs over /tmp: the checkout (and its target/) may live there. Scratch goes to /run.
mount -t tmpfs tmpfs /host/run
mkdir -p "/host$work"
mount -t 9p -o "$opts" work "/host$work" || echo "$tag: cannot mount the work share"
echo "$tag: running $run at $(up) s"
TMPDIR=/run chroot /host /bin/sh "$run" </dev/null
echo "$tag: exit status $? at $(up) s"
sync
umount "/host$work"
poweroff -f'

# L2: a pattern made from the token given after `--` goes to /dev/vda at 1 MiB. If the disk
# already holds it, this is the boot after a reboot: say so and power off. Otherwise write
# it, read it back with O_DIRECT, compare, say so, and reboot (the VMM resets the VM and the
# next boot finds the pattern), or with `-- TOKEN once` power off at once. A failure powers
# off too, so that a broken run ends instead of rebooting in a loop.
l2_init='#!/bin/busybox sh
tag=NESTED-L2'"
$common_init
"'echo "$tag: init at $(up) s, CPUs $(cat /sys/devices/system/cpu/online)"
token=${1:-none}
mode=${2:-reboot}
verdict() { echo "$tag: VERDICT $*, token $token, at $(up) s"; }
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
    verdict FAIL no /dev/vda
    poweroff -f
fi
yes "splitvmm-nested $token" | head -c 1048576 >/tmp/pattern
if dd if=/dev/vda of=/tmp/ondisk bs=65536 skip=16 count=16 iflag=direct status=none &&
    cmp -s /tmp/pattern /tmp/ondisk; then
    verdict PASS found 1048576 bytes at 1048576 of /dev/vda after a reboot
    poweroff -f
fi
if dd if=/tmp/pattern of=/dev/vda bs=65536 seek=16 oflag=direct conv=fsync status=none &&
    dd if=/dev/vda of=/tmp/readback bs=65536 skip=16 count=16 iflag=direct status=none &&
    cmp /tmp/pattern /tmp/readback; then
    verdict PASS wrote and read back 1048576 bytes at 1048576 of /dev/vda
else
    verdict FAIL the read-back differs or dd failed
    poweroff -f
fi
sync
[ "$mode" = once ] && poweroff -f
reboot -f'

mkdir -p "$out"
log "building the initramfs images in $out"
make_initramfs l1 "$gen_ver" "$l1_init" ccp irqbypass kvm kvm_amd \
    virtio_pci 9pnet_virtio 9p
make_initramfs l2 "$cloud_ver" "$l2_init" virtio_mmio virtio_pci virtio_blk
cp "$cache/root/linux-image-$gen_ver/boot/vmlinuz-$gen_ver" "$out/l1-vmlinuz"
cp "$cache/root/linux-image-$cloud_ver/boot/vmlinuz-$cloud_ver" "$out/l2-vmlinuz"
# The cloud kernel's vmlinux (an ELF with a PVH note), for the loader's ELF/PVH path: the
# bzImage's payload is LZ4 (magic 02 21 4c 18). lz4 stops at the payload's end with an
# error about what follows it; the ELF check below is what counts.
offset=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$out/l2-vmlinuz" | head -n1 | cut -d: -f1)
[ -n "$offset" ] || die "no LZ4 payload in the cloud kernel"
tail -c +$((offset + 1)) "$out/l2-vmlinuz" | lz4 -dc >"$out/l2-vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$out/l2-vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
    die "the cloud kernel's payload did not unpack to an ELF vmlinux"
echo "$stamp" >"$out/stamp"
echo "$out"
