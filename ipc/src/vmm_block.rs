//! vmm-proc ↔ block-proc: the guest's disk data path. vmm-proc is the guest-facing side and
//! may be compromised, so block-proc validates everything that arrives here.
//!
//! ```text
//! vmm-proc                             block-proc
//!   Hello ──────────────────────────────►
//!   ◄────────────────────────────── Hello
//!   VmmBlockCall{id, ListDevices} ──────►
//!   ◄──── BlockToVmm::Reply{id, Devices}
//!   VmmBlockCall{id, SetMemory} + memfd ►   map the guest's RAM (once)
//!   ◄──── BlockToVmm::Reply{id, Done}
//!   Submit([IoRequest, ...]) ───────────►   I/O straight into / out of guest RAM
//!   ◄──── BlockToVmm::Completed([IoCompletion, ...])   (as they finish, any order)
//! ```
//!
//! A request's segments are guest-physical ranges of the shared memory; no data crosses
//! the socket. Completions carry the request's tag and a virtio-blk status.
//!
//! After a block-proc restart (crash recovery) vmm-proc makes the same sequence on the new
//! link, then submits again every request the dead block-proc had not completed.

use serde::{Deserialize, Serialize};

use crate::{CallId, Message};

/// The most requests one `Submit` may carry.
pub const MAX_BATCH: usize = 256;
/// The most segments one request may have.
pub const MAX_SEGMENTS: usize = 1024;
/// The most bytes one request may move.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// The size of the answer to `GetId` (virtio-blk's `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: u32 = 20;

/// A control request from vmm-proc (answered by `BlockToVmm::Reply`), or a batch of I/O.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmToBlock {
    Call {
        id: CallId,
        request: VmmBlockRequest,
    },
    /// I/O requests, answered by `Completed` messages.
    Submit(Vec<IoRequest>),
}

impl Message for VmmToBlock {
    fn fd_count(&self) -> usize {
        match self {
            Self::Call {
                request: VmmBlockRequest::SetMemory { .. },
                ..
            } => 1,
            _ => 0,
        }
    }
}

/// What vmm-proc may ask of block-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmBlockRequest {
    /// The drives the guest sees, to build its devices.
    ListDevices,
    /// The guest's RAM: a sealed memfd (travels with the message) of `size` bytes, guest
    /// physical address 0 at offset 0.
    SetMemory { size: u64 },
    /// A migration's switch-over: take (`active`) or give up every drive's image locks.
    SetImageLocks { active: bool },
}

/// A range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its offset in the guest memory file. That is its guest-physical address below the
    /// device window at 3 GiB; RAM a (Linux) guest sees from 4 GiB up follows the low RAM
    /// in the file, and vmm-proc translates (`vmm_proc::memory::RamMap`).
    pub gpa: u64,
    pub len: u32,
}

/// What a request does (virtio-blk's request types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoOp {
    /// Read from `sector` into the segments.
    Read,
    /// Write the segments at `sector`.
    Write,
    Flush,
    /// `(sector, sectors)` ranges to discard.
    Discard(Vec<(u64, u32)>),
    /// `(sector, sectors)` ranges to zero; `unmap` allows freeing them.
    WriteZeroes {
        ranges: Vec<(u64, u32)>,
        unmap: bool,
    },
    /// Write the drive's id (up to [`ID_BYTES`]) into the segments.
    GetId,
}

/// One guest request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IoRequest {
    /// Chosen by vmm-proc; echoed in the completion.
    pub tag: u64,
    /// Index in the `ListDevices` answer.
    pub device: u16,
    pub op: IoOp,
    /// In 512-byte sectors.
    pub sector: u64,
    pub segments: Vec<Segment>,
}

/// How a request ended (virtio-blk's status byte, with ENOSPC told apart so vmm-proc can
/// apply `werror=enospc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoStatus {
    Ok,
    IoErr,
    Unsupported,
    /// The image ran out of space (ENOSPC); the guest sees an I/O error.
    NoSpace,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCompletion {
    pub tag: u64,
    pub status: IoStatus,
    /// For a request that failed in the image, the node the drive's requests went to
    /// (QMP `BLOCK_IO_ERROR`'s `node-name`; a mirror's pivot changes it); else `None`.
    pub node_name: Option<String>,
}

/// block-proc to vmm-proc.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlockToVmm {
    Reply {
        id: CallId,
        result: Result<VmmBlockAnswer, String>,
    },
    Completed(Vec<IoCompletion>),
}

impl Message for BlockToVmm {}

/// Successful answers to calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VmmBlockAnswer {
    Devices(Vec<GuestDrive>),
    Done,
}

/// What the guest-facing side needs to know about a drive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestDrive {
    pub id: String,
    pub size_bytes: u64,
    pub read_only: bool,
}
