//! vmm-proc ↔ block-proc: the guest's disk data path. vmm-proc is the guest-facing side and
//! may be compromised, so block-proc validates everything that arrives here.
//!
//! ```text
//! vmm-proc                             block-proc
//!   Hello ──────────────────────────────►
//!   ◄────────────────────────────── Hello
//!   VmmBlockCall{id, ListDevices} ──────►
//!   ◄──────── VmmBlockReply{id, Devices}
//! ```

use serde::{Deserialize, Serialize};

use crate::{CallId, Message};

/// A request from vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmBlockCall {
    pub id: CallId,
    pub request: VmmBlockRequest,
}

impl Message for VmmBlockCall {}

/// What vmm-proc may ask of block-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmBlockRequest {
    /// The drives the guest sees, to build its devices.
    ListDevices,
}

/// block-proc's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmBlockReply {
    pub id: CallId,
    pub result: Result<VmmBlockAnswer, String>,
}

impl Message for VmmBlockReply {}

/// Successful answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmBlockAnswer {
    Devices(Vec<GuestDrive>),
}

/// What the guest-facing side needs to know about a drive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestDrive {
    pub id: String,
    pub size_bytes: u64,
    pub read_only: bool,
}
