//! The numbers of `docs/guest-abi.md` that the guest itself and host-side code both need:
//! where the image lives, how many vCPUs it serves, its ports and its result lines.
//!
//! Compiled into the freestanding guest and into the host library alike (core only).

/// Physical (= virtual) address the image is linked at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The guest must not write below this address (the VMM's GDT, start info, command line
/// and page tables live there).
pub const LOW_MEMORY_END: u64 = 0x1_0000;

/// The most vCPUs the guest has stacks and per-vCPU state for.
pub const MAX_VCPUS: usize = 16;

/// The most `virtio_mmio.device=` entries the guest takes.
pub const MAX_DISKS: usize = 8;

/// Stack size per vCPU (in the image's `.bss`).
pub const STACK_SIZE: usize = 64 * 1024;

/// 16550 serial port (transmit holding register).
pub const SERIAL_PORT: u16 = 0x3f8;

/// Boot timer port: vCPU 0 writes [`BOOT_TIMER_BYTE`] here before anything else.
pub const BOOT_TIMER_PORT: u16 = 0xe9;

/// The byte written to [`BOOT_TIMER_PORT`] (123, as Firecracker's boot timer).
pub const BOOT_TIMER_BYTE: u8 = 0x7b;

/// Debug-exit port (QEMU `isa-debug-exit,iobase=0xf4,iosize=4`), written with 32 bits.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Value written to [`DEBUG_EXIT_PORT`] after `workload: PASS`.
pub const DEBUG_EXIT_PASS: u32 = 0;

/// Value written to [`DEBUG_EXIT_PORT`] after `workload: FAIL`.
pub const DEBUG_EXIT_FAIL: u32 = 1;

/// `hvm_start_info.magic` of the PVH boot ABI.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// The start of the final success line.
pub const PASS_PREFIX: &str = "workload: PASS";

/// The start of the final failure line.
pub const FAIL_PREFIX: &str = "workload: FAIL";

/// Highest guest-physical address RAM may reach (the device window starts here).
pub const RAM_LIMIT: u64 = 0xc000_0000;

/// vCPU `index`'s share of `units` split among `parts` vCPUs (docs/guest-abi.md, "Work
/// split"): equal contiguous ranges, `[index * units / parts, (index + 1) * units / parts)`.
pub const fn share(units: u64, parts: usize, index: usize) -> (u64, u64) {
    let p = parts as u128;
    let u = units as u128;
    let i = index as u128;
    ((i * u / p) as u64, ((i + 1) * u / p) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once_in_order() {
        for (units, parts) in [(10, 3), (3, 4), (4096, 1), (1 << 40, 16), (0, 2)] {
            let mut next = 0;
            for i in 0..parts {
                let (a, b) = share(units, parts, i);
                assert_eq!(a, next, "{units} units, {parts} parts, part {i}");
                assert!(b >= a && b - a <= units.div_ceil(parts as u64));
                next = b;
            }
            assert_eq!(next, units);
        }
    }
}
