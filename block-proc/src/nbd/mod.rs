//! NBD for block-proc: the server that exports its block devices (`nbd-server-*`,
//! `block-export-*`) and a client that uses a remote export as a [`BlockDevice`] (for
//! `blockdev-add driver=nbd`, e.g. a mirror target). Both work only on sockets handed to
//! block-proc: it creates none.
//!
//! - the wire protocol's numbers and encoding are in [`proto`];
//! - the server, [`NbdServer`], is in [`server`], with its reusable buffers in [`buffers`];
//! - the client, [`NbdClient`], is in [`client`].
//!
//! [`BlockDevice`]: crate::device::BlockDevice

pub mod buffers;
pub mod client;
pub mod proto;
pub mod server;

#[cfg(test)]
mod tests;

pub use client::{NbdClient, NbdClientInfo};
pub use server::{
    Export, ExportInfo, NbdError, NbdListener, NbdServer, NbdServerConfig, RemoveMode,
};
