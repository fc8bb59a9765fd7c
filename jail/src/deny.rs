//! A deny filter, for the one process that must keep `execve`: the launcher. Filters are
//! inherited across exec, so an allowlist there would have to admit everything the
//! children do before they jail themselves (the dynamic loader's `openat` and
//! `mmap(PROT_EXEC)` among them). A deny filter instead removes, for the launcher and
//! everything it starts, the calls none of splitvmm's processes ever needs; each child then
//! adds its own allowlist on top.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::JailError;

/// Syscalls that trap (and so kill, logged by the SIGSYS handler); the rest are allowed.
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    entries: Vec<(c_long, &'static str)>,
}

impl DenyList {
    /// A deny list of `(syscall, why)` pairs.
    pub fn new(entries: impl IntoIterator<Item = (c_long, &'static str)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// Whether `nr` is denied.
    pub fn denies(&self, nr: c_long) -> bool {
        self.entries.iter().any(|e| e.0 == nr)
    }

    /// Compiles the filter: the listed syscalls trap, others run; foreign architectures die.
    pub fn compile(&self) -> Result<BpfProgram, JailError> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = self
            .entries
            .iter()
            .map(|&(nr, _)| (nr, Vec::new()))
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Trap,
            TargetArch::x86_64,
        )?;
        Ok(BpfProgram::try_from(filter)?)
    }

    /// Sets `no_new_privs`, the SIGSYS logger for `name`, and the filter on every thread.
    pub fn install(&self, name: &'static str) -> Result<(), JailError> {
        let program = self.compile()?;
        nix::sys::prctl::set_no_new_privs().map_err(|e| JailError::Enter {
            step: "prctl(PR_SET_NO_NEW_PRIVS)".into(),
            source: e.into(),
        })?;
        crate::sigsys::install(name)?;
        crate::seccomp::install(&program)
    }
}
