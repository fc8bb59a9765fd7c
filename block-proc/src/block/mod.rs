//! The block layer: disk images (raw and qcow2, on the `imago` crate) with their backing
//! chains, QEMU-compatible image locking, and image creation (DESIGN.md §5).
//!
//! - [`node`]: [`Node`], one opened image implementing [`crate::device::BlockDevice`];
//! - [`create`]: new raw and qcow2 images, and rewriting a qcow2 image's backing file;
//! - [`lock`]: QEMU's OFD lock-byte protocol;
//! - [`gate`]: the allowed-directories policy every file open goes through;
//! - [`header`]: the qcow2 header as the block layer reads and rewrites it;
//! - [`file`](mod@file): the storage object under every image (imago's `File` plus a descriptor for
//!   locks, holes and `fallocate`);
//! - [`mapped`]: reads of an image file from the page cache through mappings of the file;
//! - [`commit`]: group commit of qcow2 metadata, for the acknowledgement rule;
//! - [`order`]: the refcount-before-pointer write order imago misses, kept at the file;
//! - [`error`]: errors, worded as QEMU words them.
//!
//! imago is built in its synchronous mode: its async mode's format driver futures are not
//! `Send` (`async_trait(?Send)`, and a prepared mapping holds a `Box<dyn Any>` across an
//! await), and `BlockDevice` futures must be; its async file driver would make the same
//! blocking system calls anyway. Reads and writes run on the calling tokio worker (reads
//! in no-wait mode, [`file::without_waiting`]); what waits for the disk goes through
//! [`commit::blocking`] (`block_in_place` on the multi-threaded runtime).

pub mod commit;
pub mod create;
pub mod error;
pub mod file;
pub mod gate;
pub mod header;
pub mod lock;
pub mod mapped;
pub mod node;
pub mod order;

#[cfg(test)]
mod tests;

pub use create::{create_qcow2, create_raw, set_backing_file};
pub use error::Error;
pub use node::{Backing, Node, OpenOptions};
