//! The first frame on every link: who is talking, and which protocol version.
//!
//! Both sides send a [`Hello`] and check the other's. A peer of another version, on
//! another link, or speaking something else entirely fails here with a clear error,
//! before any request is read.

use serde::{Deserialize, Serialize};

use crate::{IpcError, Message};

/// Bumped on every incompatible change to any link's messages.
pub const PROTOCOL_VERSION: u32 = 2;

const MAGIC: [u8; 8] = *b"SPLITVMM";

/// The links between the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Link {
    /// monitor ↔ launcher
    Launcher,
    /// monitor ↔ block-proc
    MonitorBlock,
    /// monitor ↔ vmm-proc
    MonitorVmm,
    /// vmm-proc ↔ block-proc
    VmmBlock,
}

/// The handshake message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    magic: [u8; 8],
    version: u32,
    link: Link,
}

impl Message for Hello {}

impl Hello {
    /// This side's hello on `link`.
    pub fn new(link: Link) -> Self {
        Self {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            link,
        }
    }

    /// Checks the peer's hello against what this side expects.
    pub fn check(&self, link: Link) -> Result<(), IpcError> {
        if self.magic != MAGIC {
            return Err(IpcError::Handshake("peer is not a splitvmm process".into()));
        }
        if self.version != PROTOCOL_VERSION {
            return Err(IpcError::Handshake(format!(
                "peer speaks protocol version {}, this side {PROTOCOL_VERSION}",
                self.version
            )));
        }
        if self.link != link {
            return Err(IpcError::Handshake(format!(
                "peer is on link {:?}, expected {link:?}",
                self.link
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_version_and_magic_are_refused() {
        let mut h = Hello::new(Link::VmmBlock);
        assert!(h.check(Link::VmmBlock).is_ok());
        h.version += 1;
        let e = h.check(Link::VmmBlock).expect_err("version");
        let want = format!(
            "protocol version {}, this side {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        );
        assert!(e.to_string().contains(&want), "{e}");
        let bad = Hello {
            magic: *b"NOTSPLIT",
            version: PROTOCOL_VERSION,
            link: Link::VmmBlock,
        };
        assert!(bad.check(Link::VmmBlock).is_err());
    }
}
