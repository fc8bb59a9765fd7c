//! Sandboxing for splitvmm's processes (DESIGN §7), x86_64 Linux only.
//!
//! - [`seccomp`]: syscall allowlists written as reviewable data, their union, compilation and
//!   the base policy every process of ours needs to keep running.
//! - [`spawn()`]: the launcher's way to start a child: cloned straight into new namespaces,
//!   with chosen fds, a parent-death signal, and nothing else inherited.
//! - [`DenyList`]: the launcher's filter, which must leave `execve` and the children's
//!   start-up alone.
//! - [`enter()`]: the one call each process makes to jail itself before it reads untrusted
//!   input; a trapped syscall is logged by a SIGSYS handler before the process dies.

mod deny;
mod enter;
mod error;
pub mod seccomp;
mod sigsys;
mod spawn;

/// Capability numbers from `<linux/capability.h>` (libc does not export them), for
/// [`keep_capabilities`].
pub mod cap {
    pub const CAP_DAC_OVERRIDE: u32 = 1;
    pub const CAP_KILL: u32 = 5;
    pub const CAP_SETGID: u32 = 6;
    pub const CAP_SETUID: u32 = 7;
    pub const CAP_SETPCAP: u32 = 8;
    pub const CAP_SYS_ADMIN: u32 = 21;
}

pub use deny::DenyList;
pub use enter::{
    Jailed, LandlockRules, LandlockStatus, Policy, enter, keep_capabilities, parse_runas,
    restrict_paths, seccomp_mode,
};
pub use error::JailError;
pub use seccomp::{SeccompPolicy, base_runtime_policy, thread_runtime_policy};
pub use spawn::{Child, Namespaces, SpawnSpec, spawn};
