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
//! | vCPU | `KVM_RUN`; at reset `KVM_SET_LAPIC`, `KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_FPU`, `KVM_SET_MP_STATE` |
//! | I/O, controller, monitor link | none (irqfds and ioeventfds are plain eventfd reads and writes) |
//!
//! One filter covers the whole process (seccomp's TSYNC installs it on every thread); the
//! other threads do not need the vCPU ioctls, but a per-thread filter could only narrow
//! what a compromised vCPU thread, which shares the address space, can reach anyway.

use jail::seccomp::{allow_if, arg_eq};
use jail::{Policy, SeccompPolicy, base_runtime_policy};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs};

const KVMIO: u32 = 0xae;

/// `_IO(KVMIO, nr)`.
const fn io(nr: u32) -> u32 {
    (KVMIO << 8) | nr
}

/// `_IOW(KVMIO, nr, T)` with `size_of::<T>() == size`.
const fn iow(nr: u32, size: usize) -> u32 {
    (1 << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
}

pub const KVM_RUN: u32 = io(0x80);
pub const KVM_SET_REGS: u32 = iow(0x82, size_of::<kvm_regs>());
pub const KVM_SET_SREGS: u32 = iow(0x84, size_of::<kvm_sregs>());
pub const KVM_SET_FPU: u32 = iow(0x8d, size_of::<kvm_fpu>());
pub const KVM_SET_LAPIC: u32 = iow(0x8f, size_of::<kvm_lapic_state>());
pub const KVM_SET_MP_STATE: u32 = iow(0x99, size_of::<kvm_mp_state>());

/// vmm-proc's syscalls: the base runtime, plus the KVM ioctls above.
pub fn seccomp_policy() -> SeccompPolicy {
    let ioctl = |req: u32, why| allow_if(libc::SYS_ioctl, &[arg_eq(1, req)], why);
    base_runtime_policy().union(&SeccompPolicy::new([
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
        ioctl(KVM_SET_MP_STATE, "reset: make the vCPU runnable again"),
    ]))
}

/// Enters the jail, keeping only `keep_fds` (and stdio) open.
pub fn enter(keep_fds: &[i32]) -> Result<(), jail::JailError> {
    let policy = Policy {
        name: "vmm-proc",
        keep_fds: keep_fds.to_vec(),
        empty_root: true,
        landlock: None,
        drop_caps: true,
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
    }
}
