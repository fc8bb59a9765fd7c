//! The monitor's requests to vmm-proc and the run-state machine they drive.
//!
//! States follow QEMU's `RunState`: `prelaunch` (with `--paused`, until the first `cont`),
//! `running`, `paused`, `shutdown`. Every change is reported to the monitor as an event
//! before the request that caused it is answered, so STOP/RESUME precede the reply as in
//! QEMU.

use std::os::fd::OwnedFd;

use ipc::common::RunState;
use ipc::vmm::{VmmCall, VmmConfig, VmmEvent, VmmMessage, VmmReply, VmmRequest};
use ipc::vmm_block::GuestDrive;
use ipc::{Channel, IpcError, QmpError};

/// The virtual machine as the monitor controls it.
#[derive(Debug)]
pub struct Vm {
    config: VmmConfig,
    /// The kernel image, when it came from a file.
    _kernel: Option<OwnedFd>,
    drives: Vec<GuestDrive>,
    state: RunState,
}

impl Vm {
    pub fn new(config: VmmConfig, kernel: Option<OwnedFd>, drives: Vec<GuestDrive>) -> Self {
        let state = if config.start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        Self {
            config,
            _kernel: kernel,
            drives,
            state,
        }
    }

    /// The transition a request asks for, if any, or QEMU's error for it.
    fn transition(&self, request: &VmmRequest) -> Result<Option<RunState>, QmpError> {
        Ok(match (request, self.state) {
            (VmmRequest::Stop, RunState::Running) => Some(RunState::Paused),
            (VmmRequest::Stop, _) => None,
            (VmmRequest::Cont, RunState::Paused | RunState::Prelaunch) => Some(RunState::Running),
            (VmmRequest::Cont, RunState::Shutdown) => {
                return Err(QmpError::generic(
                    "Resetting the Virtual Machine is required",
                ));
            }
            _ => None,
        })
    }

    /// Answers the monitor until `Shutdown` or until its link closes.
    pub fn serve(&mut self, monitor: &Channel) -> Result<(), IpcError> {
        tracing::info!(
            memory = self.config.memory_bytes,
            cpus = self.config.cpus,
            drives = self.drives.len(),
            "vm configured"
        );
        loop {
            let call = match monitor.recv::<VmmCall>() {
                Ok(r) => r.msg,
                Err(IpcError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            let result = match &call.request {
                VmmRequest::QueryStatus => Ok(VmmReply::Status(self.state)),
                VmmRequest::Configure(_) => {
                    Err(QmpError::generic("vmm-proc is already configured"))
                }
                VmmRequest::Shutdown => {
                    self.state = RunState::Shutdown;
                    monitor.send(
                        &VmmMessage::Reply {
                            id: call.id,
                            result: Ok(VmmReply::Done),
                        },
                        &[],
                    )?;
                    return Ok(());
                }
                VmmRequest::Stop | VmmRequest::Cont => match self.transition(&call.request) {
                    Ok(Some(next)) => {
                        self.state = next;
                        monitor.send(&VmmMessage::Event(VmmEvent::RunState(next)), &[])?;
                        Ok(VmmReply::Done)
                    }
                    Ok(None) => Ok(VmmReply::Done),
                    Err(e) => Err(e),
                },
            };
            monitor.send(
                &VmmMessage::Reply {
                    id: call.id,
                    result,
                },
                &[],
            )?;
        }
    }
}
