//! vmm-proc's jail, the tightest: new mount (with an empty root), network, pid, ipc and uts
//! namespaces (made by the launcher; the root is emptied here), every capability dropped,
//! and this seccomp allowlist. It opens no path and creates no socket: what it uses
//! arrives as descriptors.
//!
//! The VM, its vCPUs, guest memory and every eventfd KVM knows about are made before the
//! jail, so the allowlist names only the KVM ioctls a running VM needs, each narrowed to
//! its request number:
//!
//! | thread | KVM ioctls |
//! |---|---|
//! | vCPU | `KVM_RUN`; at reset `KVM_SET_MP_STATE`, `KVM_SET_SREGS`, `KVM_SET_LAPIC`, `KVM_SET_REGS`, `KVM_SET_FPU`, `KVM_SET_MSRS` |
//! | controller | at reset `KVM_SET_IRQCHIP`, `KVM_SET_PIT2` (on the VM descriptor) |
//! | vCPU, migration | `KVM_GET_`/`SET_` `REGS`, `SREGS`, `XSAVE`, `XCRS`, `LAPIC`, `MSRS`, `MP_STATE`, `VCPU_EVENTS`, `DEBUGREGS` |
//! | controller, migration | `KVM_GET_IRQCHIP`, `KVM_GET_PIT2`, `KVM_GET_CLOCK`, `KVM_SET_CLOCK`, `KVM_GET_DIRTY_LOG`, `KVM_SET_USER_MEMORY_REGION` (dirty-log flag on the same slots) |
//! | I/O, monitor link | none (irqfds and ioeventfds are plain eventfd reads and writes) |
//!
//! CPUID (`KVM_GET_SUPPORTED_CPUID`, `KVM_SET_CPUID2`) is set once, before the jail, and
//! never again (KVM refuses a different CPUID once a vCPU has run), so neither is allowed.
//!
//! A reset of a Linux guest reads the kernel and the initramfs again from the descriptors
//! the monitor passed: `read` and `lseek` on held descriptors, nothing that opens a file.
//!
//! One filter covers the whole process (seccomp's TSYNC installs it on every thread); the
//! other threads do not need the vCPU ioctls, but a per-thread filter could only narrow
//! what a compromised vCPU thread, which shares the address space, can reach anyway.

use jail::seccomp::allow;
use jail::seccomp::{allow_if, arg_eq};
use jail::{Policy, SeccompPolicy, thread_runtime_policy};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const KVMIO: u32 = 0xae;

/// `_IO(KVMIO, nr)`.
const fn io(nr: u32) -> u32 {
    (KVMIO << 8) | nr
}

/// `_IOW(KVMIO, nr, T)` with `size_of::<T>() == size`.
const fn iow(nr: u32, size: usize) -> u32 {
    (1 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
}

/// `_IOR(KVMIO, nr, T)` with `size_of::<T>() == size`.
const fn ior(nr: u32, size: usize) -> u32 {
    (2 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
}

/// The most syscalls vmm-proc's filter may allow (issue 7); a test holds it there.
pub const MAX_SYSCALLS: usize = 45;

pub const KVM_RUN: u32 = io(0x80);
pub const KVM_SET_REGS: u32 = iow(0x82, size_of::<kvm_regs>());
pub const KVM_SET_SREGS: u32 = iow(0x84, size_of::<kvm_sregs>());
pub const KVM_SET_FPU: u32 = iow(0x8d, size_of::<kvm_fpu>());
pub const KVM_SET_LAPIC: u32 = iow(0x8f, size_of::<kvm_lapic_state>());
pub const KVM_SET_MP_STATE: u32 = iow(0x99, size_of::<kvm_mp_state>());
pub const KVM_SET_MSRS: u32 = iow(0x89, size_of::<kvm_msrs>());
/// `KVM_SET_IRQCHIP` is `_IOR` in <linux/kvm.h> (a historical slip kept for the ABI).
pub const KVM_SET_IRQCHIP: u32 = ior(0x63, size_of::<kvm_irqchip>());
pub const KVM_SET_PIT2: u32 = iow(0xa0, size_of::<kvm_pit_state2>());

/// `_IOWR(KVMIO, nr, T)` with `size_of::<T>() == size`.
const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
}

// Migration: reading a stopped vCPU's and VM's state on the source, writing it on the
// destination, and dirty logging during pre-copy.
pub const KVM_GET_REGS: u32 = ior(0x81, size_of::<kvm_regs>());
pub const KVM_GET_SREGS: u32 = ior(0x83, size_of::<kvm_sregs>());
pub const KVM_GET_MSRS: u32 = iowr(0x88, size_of::<kvm_msrs>());
pub const KVM_GET_LAPIC: u32 = ior(0x8e, size_of::<kvm_lapic_state>());
pub const KVM_GET_MP_STATE: u32 = ior(0x98, size_of::<kvm_mp_state>());
pub const KVM_GET_XSAVE: u32 = ior(0xa4, size_of::<kvm_xsave>());
pub const KVM_SET_XSAVE: u32 = iow(0xa5, size_of::<kvm_xsave>());
pub const KVM_GET_XCRS: u32 = ior(0xa6, size_of::<kvm_xcrs>());
pub const KVM_SET_XCRS: u32 = iow(0xa7, size_of::<kvm_xcrs>());
pub const KVM_GET_VCPU_EVENTS: u32 = ior(0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u32 = iow(0xa0, size_of::<kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u32 = ior(0xa1, size_of::<kvm_debugregs>());
pub const KVM_SET_DEBUGREGS: u32 = iow(0xa2, size_of::<kvm_debugregs>());
pub const KVM_GET_IRQCHIP: u32 = iowr(0x62, size_of::<kvm_irqchip>());
pub const KVM_GET_PIT2: u32 = ior(0x9f, size_of::<kvm_pit_state2>());
pub const KVM_GET_CLOCK: u32 = ior(0x7c, size_of::<kvm_clock_data>());
pub const KVM_SET_CLOCK: u32 = iow(0x7b, size_of::<kvm_clock_data>());
pub const KVM_GET_DIRTY_LOG: u32 = iow(0x42, size_of::<kvm_dirty_log>());
pub const KVM_SET_USER_MEMORY_REGION: u32 = iow(0x46, size_of::<kvm_userspace_memory_region>());

/// vmm-proc's syscalls: the thread runtime (std threads, no tokio: no `poll`, `recvfrom`,
/// `sendto`, `shutdown`, `statx`), the kernel reload, plus the KVM ioctls above. At most
/// [`MAX_SYSCALLS`] syscalls; ioctl request numbers are arguments of one syscall.
pub fn seccomp_policy() -> SeccompPolicy {
    let ioctl = |req: u32, why| allow_if(libc::SYS_ioctl, &[arg_eq(1, req)], why);
    thread_runtime_policy().union(&SeccompPolicy::new([
        ioctl(KVM_RUN, "vCPU threads run the guest"),
        ioctl(
            KVM_SET_REGS,
            "reset: a vCPU's general registers back to the entry state",
        ),
        ioctl(
            KVM_SET_SREGS,
            "reset: segments, control registers, GDT back to the entry state",
        ),
        ioctl(KVM_SET_FPU, "reset: the x87/SSE state back to its defaults"),
        ioctl(
            KVM_SET_LAPIC,
            "reset: the local APIC back to its power-on state",
        ),
        ioctl(
            KVM_SET_MP_STATE,
            "reset: the boot vCPU runnable, a Linux guest's other vCPUs waiting for INIT/SIPI",
        ),
        ioctl(
            KVM_SET_MSRS,
            "reset: kvmclock, steal time, async PF and PV EOI off, or KVM keeps writing the \
             old kernel's pages into the reloaded one",
        ),
        ioctl(
            KVM_SET_IRQCHIP,
            "reset: the PICs and the IOAPIC back to power-on (no routing left from the old guest)",
        ),
        ioctl(
            KVM_SET_PIT2,
            "reset: the PIT back to power-on; migration: the source's PIT",
        ),
        ioctl(KVM_GET_REGS, "migration: a paused vCPU's general registers"),
        ioctl(
            KVM_GET_SREGS,
            "migration: a paused vCPU's special registers",
        ),
        ioctl(
            KVM_GET_MSRS,
            "migration: a paused vCPU's MSRs, the TSC among them",
        ),
        ioctl(KVM_GET_LAPIC, "migration: a paused vCPU's local APIC"),
        ioctl(
            KVM_GET_MP_STATE,
            "migration: whether a vCPU runs, halts or waits for SIPI",
        ),
        ioctl(
            KVM_GET_XSAVE,
            "migration: a paused vCPU's FPU/SSE/AVX state",
        ),
        ioctl(
            KVM_SET_XSAVE,
            "migration: the source vCPU's FPU/SSE/AVX state",
        ),
        ioctl(KVM_GET_XCRS, "migration: a paused vCPU's XCR0"),
        ioctl(KVM_SET_XCRS, "migration: the source vCPU's XCR0"),
        ioctl(
            KVM_GET_VCPU_EVENTS,
            "migration: a paused vCPU's pending exceptions, interrupts and NMIs",
        ),
        ioctl(
            KVM_SET_VCPU_EVENTS,
            "migration: the source vCPU's pending exceptions, interrupts and NMIs",
        ),
        ioctl(
            KVM_GET_DEBUGREGS,
            "migration: a paused vCPU's debug registers",
        ),
        ioctl(
            KVM_SET_DEBUGREGS,
            "migration: the source vCPU's debug registers",
        ),
        ioctl(
            KVM_GET_IRQCHIP,
            "migration: the PICs' and the IOAPIC's state",
        ),
        ioctl(KVM_GET_PIT2, "migration: the PIT's state"),
        ioctl(KVM_GET_CLOCK, "migration: the VM's kvmclock value"),
        ioctl(KVM_SET_CLOCK, "migration: the source's kvmclock value"),
        ioctl(
            KVM_GET_DIRTY_LOG,
            "migration: the pages the guest wrote since the last pass (pre-copy)",
        ),
        ioctl(
            KVM_SET_USER_MEMORY_REGION,
            "migration: dirty logging on (KVM_MEM_LOG_DIRTY_PAGES) and off again, same slots",
        ),
        // Also in the thread runtime; named here because a reset needs them even if the base
        // shrinks.
        allow(
            libc::SYS_read,
            "reset: a Linux kernel and initramfs are read again from their descriptors",
        ),
        allow(
            libc::SYS_lseek,
            "reset: the loader seeks in the kernel and initramfs descriptors",
        ),
    ]))
}

/// Enters the jail, as `runas` if given. Every descriptor open now stays: each is vmm-proc's
/// and still needed (the launcher handed over only what vmm-proc uses, set-up added the
/// VM's own).
pub fn enter(runas: Option<(u32, u32)>) -> Result<(), jail::JailError> {
    let policy = Policy {
        name: "vmm-proc",
        empty_root: true,
        landlock: None,
        drop_caps: true,
        runas,
        seccomp: seccomp_policy(),
    };
    jail::enter(&policy).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_SET_FPU, 0x41a0_ae8d);
        assert_eq!(KVM_SET_LAPIC, 0x4400_ae8f);
        assert_eq!(KVM_SET_MP_STATE, 0x4004_ae99);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_SET_IRQCHIP, 0x8208_ae63);
        assert_eq!(KVM_SET_PIT2, 0x4070_aea0);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_SET_XSAVE, 0x5000_aea5);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_SET_XCRS, 0x4188_aea7);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS, 0x4040_aea0);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_SET_DEBUGREGS, 0x4080_aea2);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_SET_CLOCK, 0x4030_ae7b);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
    }

    #[test]
    fn the_policy_compiles_and_names_no_unnarrowed_ioctl() {
        let p = seccomp_policy();
        p.compile().expect("compiles");
        let text = p.to_string();
        let ioctl_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{} ", libc::SYS_ioctl)))
            .collect();
        assert!(
            ioctl_rules.iter().all(|l| l.contains("if arg1 ==")),
            "{text}"
        );
        assert!(!p.allows(libc::SYS_openat) && !p.allows(libc::SYS_memfd_create));
        assert!(p.syscall_count() <= MAX_SYSCALLS, "{text}");
    }
}
