//! [`JailError`]: every way building a sandbox can fail, each naming the step and its input.

use std::{io, path::PathBuf};

/// A sandboxing step failed; the message says which step and with which input.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The seccomp policy cannot be compiled as written.
    #[error("seccomp policy is inconsistent: {0}")]
    Policy(String),
    /// seccompiler rejected the policy.
    #[error("compiling the seccomp filter failed: {0}")]
    SeccompCompile(#[from] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter on all threads (TSYNC) failed: {0}")]
    SeccompInstall(#[from] seccompiler::Error),
    /// `sigaction(SIGSYS)` failed.
    #[error("installing the SIGSYS handler failed: {0}")]
    SigsysHandler(#[source] io::Error),
    /// A [`crate::SpawnSpec`] cannot be honoured.
    #[error("invalid spawn request for {exe}: {reason}")]
    InvalidSpec { exe: PathBuf, reason: String },
    /// `clone` refused the namespace flags.
    #[error(
        "could not create namespaces ({requested}) for {exe}: {source}; \
         run as root, or use `--sandbox off`"
    )]
    Namespaces {
        exe: PathBuf,
        requested: String,
        source: io::Error,
    },
    /// Starting a child failed at `step` (in the parent or, reported back, in the child).
    #[error("spawning {exe} failed: {step}: {source}")]
    Spawn {
        exe: PathBuf,
        step: &'static str,
        source: io::Error,
    },
    /// Mount namespace, Landlock and capabilities are per thread: set them single-threaded.
    #[error(
        "jail::enter for {name} must run before the process starts threads (it has {threads}): \
         a new mount namespace, Landlock and capabilities only apply to the calling thread"
    )]
    Threaded { name: &'static str, threads: u32 },
    /// A step of [`crate::enter`] failed.
    #[error("{step} failed: {source}")]
    Enter { step: String, source: io::Error },
    /// `/` still has entries after `pivot_root`.
    #[error("the empty root is not empty: {0:?}")]
    RootNotEmpty(Vec<std::ffi::OsString>),
    /// A Landlock rule path could not be opened.
    #[error("Landlock rule path: {0}")]
    LandlockPath(#[from] landlock::PathFdError),
    /// Creating or enforcing the Landlock ruleset failed.
    #[error("Landlock ruleset failed: {0}")]
    Landlock(#[from] landlock::RulesetError),
}
