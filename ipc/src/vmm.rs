//! monitor ↔ vmm-proc: the VM configuration, run-state control and vmm-proc's events.
//!
//! ```text
//! monitor                              vmm-proc
//!   Hello ──────────────────────────────►
//!   ◄────────────────────────────── Hello
//!   VmmCall{id, Configure} [+ kernel fd] ►   set up, enter the jail
//!   ◄───────────── VmmMessage::Reply{id}
//!   VmmCall{id, Stop | Cont} ───────────►
//!   ◄── VmmMessage::Event(RunState{..})      (STOP / RESUME on the QMP side)
//!   ◄───────────── VmmMessage::Reply{id}
//!   VmmCall{id, Shutdown} ──────────────►   stop, reply, exit
//! ```

use serde::{Deserialize, Serialize};

use crate::common::RunState;
use crate::{CallId, Message, QmpError};

/// A request to vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmCall {
    pub id: CallId,
    pub request: VmmRequest,
}

impl Message for VmmCall {
    fn fd_count(&self) -> usize {
        match &self.request {
            VmmRequest::Configure(VmmConfig {
                kernel: KernelImage::File,
                ..
            }) => 1,
            _ => 0,
        }
    }
}

/// What the monitor asks of vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmRequest {
    /// First request: the VM's configuration. A kernel file travels as a descriptor.
    Configure(VmmConfig),
    QueryStatus,
    Stop,
    Cont,
    /// Stop the vCPUs and exit.
    Shutdown,
}

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelImage {
    /// An image embedded in splitvmm (`builtin:NAME`).
    Builtin(String),
    /// A file the monitor opened; its descriptor travels with the message.
    File,
}

/// vmm-proc's start-up configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmConfig {
    pub memory_bytes: u64,
    pub cpus: u8,
    pub kernel: KernelImage,
    pub cmdline: String,
    /// `--paused`: stay in `prelaunch` until `cont`.
    pub start_paused: bool,
    pub sandbox: bool,
}

/// vmm-proc to monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmMessage {
    Reply {
        id: CallId,
        result: Result<VmmReply, QmpError>,
    },
    Event(VmmEvent),
}

impl Message for VmmMessage {}

/// Successful answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmReply {
    Done,
    Status(RunState),
}

/// Things vmm-proc reports unasked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmEvent {
    /// The run state changed (the monitor emits STOP or RESUME).
    RunState(RunState),
}
