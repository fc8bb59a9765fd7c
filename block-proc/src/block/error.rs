//! Errors of the block layer: opening, creating and changing images. Each message is
//! QEMU's wording where QEMU has a text, so the QMP layer can pass it on as the `desc`.

use std::io;

use super::lock::LockError;

/// Why an image could not be opened, created or changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened.
    #[error("Could not open '{name}': {reason}")]
    Open {
        name: String,
        reason: String,
        /// The OS error behind it, if any.
        errno: Option<i32>,
    },
    /// The file resolves to a path outside the allowed directories.
    #[error(
        "Could not open '{name}': it resolves to '{resolved}', outside the allowed directories"
    )]
    OutsideDirs { name: String, resolved: String },
    /// Another user holds the image in a conflicting way.
    #[error("{0}")]
    Lock(#[from] LockError),
    /// Writable open of an image with the corrupt bit.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    Corrupt,
    /// Writable open of an image with the dirty bit (lazy refcounts after a crash): QEMU
    /// repairs the refcounts on open; imago cannot, so we refuse.
    #[error(
        "qcow2: Image '{0}' is dirty (its refcounts may be out of date); repair it with \
         'qemu-img check -r all' before opening it read/write"
    )]
    Dirty(String),
    /// The header names a backing file but not its format; we never probe.
    #[error(
        "Backing file '{backing}' of '{image}' has no backing format in the image header, and \
         splitvmm does not probe formats; record it with 'qemu-img rebase -u -F FORMAT -b \
         {backing} {image}'"
    )]
    NoBackingFormat { image: String, backing: String },
    /// A format the block layer does not know.
    #[error("Unknown driver '{0}'")]
    UnknownFormat(String),
    /// Opening the backing file failed.
    #[error("Could not open backing file: {0}")]
    Backing(Box<Error>),
    /// The backing chain refers back to an image already in it.
    #[error("Backing chain of '{image}' loops back to '{backing}'")]
    Loop { image: String, backing: String },
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An I/O error while working on `name`, worded `Could not open 'NAME': REASON`.
    pub fn open(name: &str, e: &io::Error) -> Self {
        Self::Open {
            name: name.to_string(),
            reason: ipc::common::os_error_text(e),
            errno: e.raw_os_error(),
        }
    }

    /// An error with a plain message.
    pub fn other(msg: impl std::fmt::Display) -> Self {
        Self::Other(msg.to_string())
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Other(ipc::common::os_error_text(&e))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Lock(LockError::Perm(_) | LockError::Shared(_)) => io::ErrorKind::ResourceBusy,
            Error::OutsideDirs { .. } => io::ErrorKind::PermissionDenied,
            Error::Corrupt | Error::Dirty(_) => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    }
}
