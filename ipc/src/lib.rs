//! Inter-process communication between the splitvmm processes.
//!
//! Every link is one `SOCK_SEQPACKET` socketpair created by the supervisor. A frame is
//! one datagram holding one bincode-encoded message ([`codec`]); file descriptors travel
//! beside it as `SCM_RIGHTS` and belong to that message ([`channel`]). The first frame
//! each side sends is a [`handshake::Hello`] naming the link and the protocol version.
//!
//! Each link has its own typed messages, one module per link, so a peer can only say what
//! its link allows:
//! - [`launcher`]: monitor ↔ launcher (start, stop and reap the children);
//! - [`block`]: monitor ↔ block-proc (block devices, jobs, NBD);
//! - [`vmm`]: monitor ↔ vmm-proc (run state, guest);
//! - [`vmm_block`]: vmm-proc ↔ block-proc (the guest's disk data path).
//!
//! Types shared by several links (QMP errors, run states) live in [`common`].

pub mod block;
pub mod channel;
pub mod codec;
pub mod common;
pub mod handshake;
pub mod launcher;
pub mod logging;
pub mod nbd_uri;
pub mod vmm;
pub mod vmm_block;

pub use channel::{AsyncChannel, Channel, Received};
pub use codec::{CodecError, MAX_FRAME};
pub use common::{CallId, ErrorClass, QmpError};
pub use handshake::{Hello, Link, PROTOCOL_VERSION};

/// Everything that can go wrong on a link. A hostile or broken peer produces one of these,
/// never a panic.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The frame could not be encoded or decoded.
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    /// The peer closed the link.
    #[error("peer closed the link")]
    Closed,
    /// The frame was larger than [`MAX_FRAME`] and was dropped.
    #[error("frame larger than {MAX_FRAME} bytes dropped")]
    Oversized,
    /// The peer sent more file descriptors than a frame may carry.
    #[error("too many file descriptors in one frame (limit {0})")]
    TooManyFds(usize),
    /// The message arrived with a different number of descriptors than it declares.
    #[error("message expects {expected} file descriptors, frame carried {got}")]
    FdCount { expected: usize, got: usize },
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// A message type of some link: says how many file descriptors travel with it, so the
/// receiver can refuse frames that carry unexpected ones.
pub trait Message: serde::Serialize + serde::de::DeserializeOwned {
    /// How many file descriptors must accompany this message.
    fn fd_count(&self) -> usize {
        0
    }
}
