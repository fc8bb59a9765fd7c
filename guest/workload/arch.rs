//! The few x86 instructions the guest needs at CPL3, wrapped: port I/O (IOPL 3), MMIO,
//! `rdtsc`, `cpuid`, `pause`, `mfence`.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the serial, boot-timer and debug-exit ports has no effect on
    // memory; the guest runs with IOPL 3, so it does not fault.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`; the guest reads only the PIT's counter this way.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes 32 bits to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter (cr4.TSD is clear, so it is legal at CPL3).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `cpuid` leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only reads identification registers. rbx is reserved by LLVM, so it
    // is saved and restored around the instruction by hand.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags),
        )
    };
    (a, b, c, d)
}

/// A spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// A full memory barrier (stores before it are visible before loads after it).
pub fn mfence() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Reads a 32-bit device register.
///
/// # Safety
/// `addr` must be a 4-byte aligned address of a device register (or RAM) that is mapped.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees the address; a volatile access is one `mov`, which is
    // what the VMM's MMIO emulation decodes.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit device register.
///
/// # Safety
/// As for [`mmio_read32`].
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads a 16-bit device register.
///
/// # Safety
/// As for [`mmio_read32`], with 2-byte alignment.
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
