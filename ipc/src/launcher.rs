//! monitor ↔ launcher: the launcher is the one process that may exec. The monitor asks it
//! to start a child (handing over the child's socket ends), and the launcher reports every
//! child's exit the moment it reaps it.
//!
//! ```text
//! monitor                          launcher
//!   Hello ───────────────────────────►
//!   ◄─────────────────────────── Hello
//!   Spawn{kind} + [link fds] ────────►   clone into namespaces, exec
//!   ◄──────────── Spawned{kind, pid} | SpawnFailed{kind, error}
//!   ...                                  (child exits, launcher reaps it)
//!   ◄─────────── Exited{kind, pid, status}
//!   Kill{kind} ──────────────────────►   SIGKILL
//!   Exit ────────────────────────────►   kill what is left, reap, exit
//! ```

use serde::{Deserialize, Serialize};

use crate::Message;

/// The children the launcher can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChildKind {
    Block,
    Vmm,
}

impl ChildKind {
    /// The executable's (and the process's) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "block-proc",
            Self::Vmm => "vmm-proc",
        }
    }
}

/// Monitor to launcher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LaunchRequest {
    /// Start a child. Carries the child's end of its monitor link, then, when
    /// `peer_link` is set, its end of the vmm↔block link.
    Spawn {
        kind: ChildKind,
        peer_link: bool,
        sandbox: bool,
    },
    /// Kill a child with SIGKILL (its exit is reported as usual).
    Kill { kind: ChildKind },
    /// The threads of the running child of `kind`, as the host sees them (answered by
    /// `Threads`; the monitor cannot read `/proc` once jailed, the child's own pid
    /// namespace hides host thread ids).
    Threads { kind: ChildKind },
    /// Kill whatever is left, reap it, and exit.
    Exit,
}

impl Message for LaunchRequest {
    fn fd_count(&self) -> usize {
        match self {
            Self::Spawn { peer_link, .. } => 1 + usize::from(*peer_link),
            _ => 0,
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Launcher to monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LauncherMessage {
    Spawned {
        kind: ChildKind,
        pid: i32,
    },
    SpawnFailed {
        kind: ChildKind,
        error: String,
    },
    Exited {
        kind: ChildKind,
        pid: i32,
        status: ExitStatus,
    },
    /// Answer to `Threads`: each thread's name (`comm`) and host thread id; empty if no
    /// such child runs.
    Threads {
        threads: Vec<(String, i32)>,
    },
}

impl Message for LauncherMessage {}
