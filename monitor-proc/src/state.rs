//! The monitor's shared state: what QMP commands read and change, and the way they ask the
//! supervisor to shut down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ipc::block::{BlockInfo, IoStatus};
use ipc::common::RunState;
use ipc::launcher::{ChildKind, LaunchRequest};
use ipc::{AsyncChannel, QmpError};
use tokio::sync::mpsc;

use crate::events::EventBus;
use crate::link::{self, RpcClient};

/// Why splitvmm is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// The `quit` command.
    Quit,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal,
    /// A child process died.
    ChildDied,
    /// The guest powered off through the debug-exit port with this value (0 = PASS).
    GuestShutdown(u32),
    /// The guest reset itself under `--no-reboot`.
    GuestReset,
}

impl ShutdownCause {
    /// QEMU's `ShutdownCause` name for the SHUTDOWN event.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Quit => "host-qmp-quit",
            Self::Signal => "host-signal",
            Self::ChildDied => "host-error",
            Self::GuestShutdown(_) => "guest-shutdown",
            Self::GuestReset => "guest-reset",
        }
    }

    /// The SHUTDOWN event's `guest` member: whether the guest asked for it.
    pub fn guest(self) -> bool {
        matches!(self, Self::GuestShutdown(_) | Self::GuestReset)
    }

    /// Whether splitvmm exits with status 0: after `quit` or a signal, after a guest
    /// that powered off with the debug-exit value 0 (PASS), and after a guest reset under
    /// `--no-reboot` (as QEMU `-no-reboot` exits 0).
    pub fn success(self) -> bool {
        matches!(
            self,
            Self::Quit | Self::Signal | Self::GuestShutdown(0) | Self::GuestReset
        )
    }
}

/// Everything the QMP commands act on.
#[derive(Debug)]
pub struct Monitor {
    pub name: Option<String>,
    pub events: EventBus,
    pub block: Arc<RpcClient<link::Block>>,
    pub vmm: Option<Arc<RpcClient<link::Vmm>>>,
    /// The NBD server's listening socket, which the monitor made.
    pub nbd: crate::block_commands::NbdListener,
    /// The guest's vCPUs (0 without a guest).
    pub cpus: u8,
    /// Host thread ids of the children, from the launcher.
    pub threads: Option<ThreadQuery>,
    /// What a restarted block-proc is given back.
    pub recovery: Arc<crate::recovery::Recovery>,
    /// Migration parameters, capabilities and connection.
    pub migration: crate::migration::Migration,
    /// Descriptors QMP clients named with `getfd`.
    pub fds: crate::fds::NamedFds,
    runstate: Mutex<RunState>,
    /// The drives a guest I/O error stopped the VM for, with their `io-status`
    /// (`failed` or `nospace`) until `cont`; the others are `ok`.
    io_errors: Mutex<HashMap<String, IoStatus>>,
    shutdown: mpsc::UnboundedSender<ShutdownCause>,
}

/// Asks the launcher, which alone sees the children's threads from the host pid
/// namespace, for a child's thread names and host thread ids (`query-cpus-fast`).
#[derive(Debug)]
pub struct ThreadQuery {
    chan: Arc<AsyncChannel>,
    replies: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<(String, i32)>>>,
}

impl ThreadQuery {
    pub fn new(
        chan: Arc<AsyncChannel>,
        replies: mpsc::UnboundedReceiver<Vec<(String, i32)>>,
    ) -> Self {
        Self {
            chan,
            replies: tokio::sync::Mutex::new(replies),
        }
    }

    /// The threads of the running child of `kind` (one question at a time, so answers
    /// cannot cross).
    pub async fn threads(&self, kind: ChildKind) -> Result<Vec<(String, i32)>, QmpError> {
        let mut replies = self.replies.lock().await;
        let gone = || QmpError::generic("the launcher is not running");
        self.chan
            .send(&LaunchRequest::Threads { kind }, &[])
            .await
            .map_err(|_| gone())?;
        tokio::time::timeout(std::time::Duration::from_secs(5), replies.recv())
            .await
            .ok()
            .flatten()
            .ok_or_else(gone)
    }
}

impl Monitor {
    pub fn new(
        name: Option<String>,
        events: EventBus,
        block: Arc<RpcClient<link::Block>>,
        vmm: Option<Arc<RpcClient<link::Vmm>>>,
        runstate: RunState,
        shutdown: mpsc::UnboundedSender<ShutdownCause>,
    ) -> Self {
        Self {
            name,
            events,
            block,
            vmm,
            nbd: Default::default(),
            cpus: 0,
            threads: None,
            recovery: Arc::default(),
            migration: Default::default(),
            fds: Default::default(),
            runstate: Mutex::new(runstate),
            io_errors: Mutex::default(),
            shutdown,
        }
    }

    pub fn runstate(&self) -> RunState {
        *self
            .runstate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a new run state and emits STOP or RESUME when the guest stops or starts
    /// running, as QEMU does.
    pub fn set_runstate(&self, new: RunState) {
        let old = std::mem::replace(
            &mut *self
                .runstate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            new,
        );
        match (old == RunState::Running, new == RunState::Running) {
            (true, false) => self.events.emit("STOP", None),
            (false, true) => self.events.emit("RESUME", None),
            _ => {}
        }
    }

    /// A guest request on `device` failed and its policy stops the VM: its io-status
    /// becomes `nospace` or `failed`, unless an earlier error already set it (QEMU's
    /// `blk_iostatus_set_err`).
    pub fn io_error(&self, device: &str, nospace: bool) {
        self.io_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(device.to_string())
            .or_insert(if nospace {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            });
    }

    /// `cont`: every drive's io-status back to `ok` (QEMU's `blk_iostatus_reset`).
    pub fn reset_io_status(&self) {
        self.io_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Puts the io-status guest errors left into `query-block`'s answer (block-proc says
    /// which drives keep one).
    pub fn fill_io_status(&self, info: &mut [BlockInfo]) {
        let errors = self
            .io_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for b in info {
            if let (Some(status), Some(e)) = (&mut b.io_status, errors.get(&b.device)) {
                *status = *e;
            }
        }
    }

    /// Asks the supervisor to shut everything down.
    pub fn request_shutdown(&self, cause: ShutdownCause) {
        let _ = self.shutdown.send(cause);
    }
}
