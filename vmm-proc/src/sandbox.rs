//! vmm-proc's jail, the tightest: new mount (with an empty root), network, pid, ipc and uts
//! namespaces (made by the launcher; the root is emptied here), every capability dropped,
//! and this seccomp allowlist. It opens no path and creates no socket: what it uses
//! arrives as descriptors.

use jail::{Policy, SeccompPolicy, base_runtime_policy};

/// vmm-proc's syscalls. Nothing beyond the base runtime yet: KVM's ioctls join with the
/// guest (each narrowed to its request number).
pub fn seccomp_policy() -> SeccompPolicy {
    base_runtime_policy()
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
