#!/usr/bin/env bash
# Installs what splitvmm's build, demo and tests need, from the package registries only
# (Debian's packages, PyPI). Idempotent: installs only what is missing.
set -euo pipefail

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# QEMU's tools, version 10: the oracle for images and NBD, and the rival in benchmarks.
# Plain bookworm has QEMU 7.2; 10.x comes from bookworm-backports. Never install
# qemu-system-x86 from plain bookworm: it would replace qemu-utils 10 with 7.2.
qemu_major() { qemu-img --version 2>/dev/null | sed -n 's/^qemu-img version \([0-9]*\)\..*/\1/p'; }
enable_backports() {
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ && return
    # Enable the suite in the existing Debian entry (deb822), else add a one-line list.
    if grep -qs '^Suites: bookworm bookworm-updates$' /etc/apt/sources.list.d/debian.sources; then
        sed -i 's/^Suites: bookworm bookworm-updates$/Suites: bookworm bookworm-updates bookworm-backports/' \
            /etc/apt/sources.list.d/debian.sources
    else
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            > /etc/apt/sources.list.d/bookworm-backports.list
    fi
    apt_updated=
}
major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt 10 ] || ! command -v qemu-storage-daemon >/dev/null; then
    enable_backports
    apt_install -t bookworm-backports qemu-utils
fi
# qemu-system-x86 10.x (same suite): the rival VMM in benchmarks and the software-emulated
# host of the nested Linux boot test.
if ! command -v qemu-system-x86_64 >/dev/null; then
    enable_backports
    apt_install -t bookworm-backports qemu-system-x86
fi

# Independent NBD peers.
command -v nbdinfo >/dev/null || apt_install libnbd-bin
command -v nbdkit >/dev/null || apt_install nbdkit

# The reference QMP client.
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q 'qemu.qmp>=0.0.3'

# Rust's formatter and linter (part of the toolchain; installed if the toolchain allows).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# ACPI tools (iasl): the unit tests disassemble the ACPI tables the Linux loader writes
# (vmm-proc/src/linux/acpi.rs) and check the result.
command -v iasl >/dev/null || apt_install acpica-tools
# lz4: scripts/nested-assets.sh unpacks the cloud kernel's vmlinux (ELF, PVH) with it.
command -v lz4 >/dev/null || apt_install lz4
