//! Descriptors a QMP client gave the monitor by name (`getfd`, `closefd`), for commands that
//! take `fd:NAME` (`migrate`). As in QEMU they belong to the monitor, not to a connection;
//! splitvmm has one table for all its QMP connections.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use crate::qmp::QmpError;
use crate::server::SessionState;

/// The named descriptors (QEMU's `mon->fds`).
#[derive(Debug, Default)]
pub struct NamedFds(Mutex<HashMap<String, OwnedFd>>);

impl NamedFds {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwnedFd>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes and returns the descriptor called `name` (QEMU's `monitor_get_fd`).
    pub fn take(&self, name: &str) -> Result<OwnedFd, QmpError> {
        self.table().remove(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' has not been found"))
        })
    }
}

fn fdname(args: &Map<String, Value>) -> &str {
    args.get("fdname")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `getfd`: names the descriptor that came with the command. A name in use gets the new
/// descriptor; the old one is closed.
pub fn getfd(
    fds: &NamedFds,
    session: &SessionState,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let fd = session
        .take_fd()
        .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
    let name = fdname(args);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(QmpError::generic(
            "Parameter 'fdname' expects a name not starting with a digit",
        ));
    }
    fds.table().insert(name.to_string(), fd);
    Ok(json!({}))
}

/// `closefd`.
pub fn closefd(fds: &NamedFds, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let name = fdname(args);
    fds.table()
        .remove(name)
        .map(|_| json!({}))
        .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
}
