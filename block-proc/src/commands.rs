//! The QMP commands block-proc executes. The monitor has checked each command's arguments
//! against its schema; here they are decoded into typed structures and run against the
//! block state. Replies and errors are QEMU's.

use std::os::fd::OwnedFd;

use ipc::QmpError;
use serde_json::{Map, Value};

use crate::drives::Drives;

/// Runs `command` with its JSON `arguments` and the descriptors that came with it; returns
/// the QMP return value as JSON text.
pub async fn execute(
    _drives: &Drives,
    command: &str,
    arguments: &str,
    _fds: Vec<OwnedFd>,
) -> Result<String, QmpError> {
    let _args: Map<String, Value> = serde_json::from_str(arguments)
        .map_err(|e| QmpError::generic(format!("{command}: bad arguments from the monitor: {e}")))?;
    Err(QmpError::command_not_found(format!("The command {command} has not been found")))
}
